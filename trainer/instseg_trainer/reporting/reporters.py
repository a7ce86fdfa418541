"""Where training events go: metrics file, JSON lines on stdout, or a terminal progress bar.

The trainer emits typed events (events.py): Start, Iteration, Epoch, Validation and Final.
Every destination is a `Reporter`; `make_reporters` assembles the usual set behind one
`MultiReporter`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, TextIO

from instseg_trainer.reporting.events import (
    Epoch,
    Event,
    Exported,
    Final,
    Iteration,
    Start,
    Validation,
)

logger = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.jsonl"
PROGRESS_BAR_WIDTH = 10


class Reporter(Protocol):
    """Receives every training event; must not assume which events come or in what number."""

    def report(self, event: Event) -> None:
        """Handle one event."""
        ...

    def close(self) -> None:
        """Flush and release whatever the reporter holds; called once at the end."""
        ...


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def event_to_json(event: Event) -> str:
    """Serialise an event as one compact, strict JSON line (NaN/inf become null)."""
    # Strict JSON: log collectors and jq reject the NaN a diverged loss would produce.
    return json.dumps(_finite_or_null(event.to_dict()), separators=(",", ":"), allow_nan=False)


class JsonLinesReporter:
    """Writes one JSON object per line to a stream (stdout in a cluster), flushed per event."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def report(self, event: Event) -> None:
        self._stream.write(event_to_json(event) + "\n")
        self._stream.flush()

    def close(self) -> None:
        # The stream (usually stdout) belongs to the caller, so flush but leave it open.
        self._stream.flush()


class MetricsFileReporter:
    """Appends every event to a JSON-lines file; a resumed run continues the same file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ends_with_torn_line = self._ends_without_newline(self.path)
        self._file = self.path.open("a", encoding="utf-8", buffering=1)
        if ends_with_torn_line:
            # A crash mid-write left a partial line; start ours on a fresh one.
            self._file.write("\n")

    @staticmethod
    def _ends_without_newline(path: Path) -> bool:
        if not path.exists() or path.stat().st_size == 0:
            return False
        with path.open("rb") as existing:
            existing.seek(-1, 2)
            return existing.read(1) != b"\n"

    def report(self, event: Event) -> None:
        self._file.write(event_to_json(event) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def format_duration(seconds: float | None) -> str:
    """Render a duration compactly: `42s`, `3m12s`, `2h05m`, `1d03h`; `?` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = int(round(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h{total % 3600 // 60:02d}m"
    return f"{total // 86400}d{total % 86400 // 3600:02d}h"


def _number(value: Any, spec: str) -> str:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return format(value, spec)
    return "-"


class TerminalReporter:
    """A one-line progress bar redrawn in place, with epoch/validation/final summaries below."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._bar_length = 0

    def report(self, event: Event) -> None:
        if isinstance(event, Iteration):
            self._draw_bar(event)
        elif isinstance(event, Start):
            self._print(self._start_line(event))
        elif isinstance(event, Epoch):
            self._print(self._epoch_line(event))
        elif isinstance(event, Validation):
            self._print(self._validation_line(event))
        elif isinstance(event, Final):
            self._print(self._final_line(event))
        elif isinstance(event, Exported):
            for artifact in event.artifacts:
                self._print(
                    f"exported {artifact['name']}: {artifact['path']} (val segm mAP "
                    f"{_number(artifact['valSegmMap'], '.3f')})"
                )

    def close(self) -> None:
        if self._bar_length:
            self._stream.write("\n")
            self._bar_length = 0
        self._stream.flush()

    @staticmethod
    def _usable_width() -> int:
        # One column spare: writing into the last column makes some terminals wrap.
        return max(shutil.get_terminal_size().columns - 1, 1)

    def _draw_bar(self, event: Iteration) -> None:
        width = self._usable_width()
        line = self._progress_line(event, width)
        # Blank out what is left of a longer previous line, but never past the current width.
        self._stream.write("\r" + line.ljust(min(self._bar_length, width)))
        self._stream.flush()
        self._bar_length = len(line)

    def _print(self, line: str) -> None:
        if self._bar_length:
            blank = " " * min(self._bar_length, self._usable_width())
            self._stream.write("\r" + blank + "\r")
            self._bar_length = 0
        self._stream.write(line + "\n")
        self._stream.flush()

    @staticmethod
    def _progress_line(event: Iteration, width: int) -> str:
        done, total = event.epoch_iteration, event.iterations_per_epoch
        fraction = min(max(done / total, 0.0), 1.0) if total else 0.0
        filled = int(fraction * PROGRESS_BAR_WIDTH)
        bar = "[" + "#" * filled + "-" * (PROGRESS_BAR_WIDTH - filled) + "]"
        speed = f"{_number(event.images_per_second, '.1f')} img/s"
        learning_rate = f"lr {_number(event.learning_rate, '.1e')}"
        parts = [
            f"epoch {event.epoch}/{event.total_epochs}",
            bar,
            f"{fraction:4.0%} it {done}/{total}",
            f"loss {_number(event.loss, '.3f')}",
            learning_rate,
            speed,
            f"ETA {format_duration(event.eta_seconds)}",
        ]
        # On a narrow terminal drop the least useful fields first, so loss and ETA stay.
        for optional in (speed, learning_rate, bar):
            if len(" ".join(parts)) <= width:
                break
            parts.remove(optional)
        return " ".join(parts)[:width]

    @staticmethod
    def _start_line(event: Start) -> str:
        return (
            f"training {event.template} on {event.device}: "
            f"{event.train_images} train / {event.val_images} val images, "
            f"{event.total_epochs} epochs x {event.iterations_per_epoch} iterations "
            f"-> {event.output}"
        )

    @staticmethod
    def _epoch_line(event: Epoch) -> str:
        return (
            f"epoch {event.epoch}/{event.total_epochs} done "
            f"in {format_duration(event.seconds)}: "
            f"mean loss {_number(event.loss, '.4f')} "
            f"lr {_number(event.learning_rate, '.1e')}"
        )

    @staticmethod
    def _validation_line(event: Validation) -> str:
        segm, bbox = event.metrics.get("segm", {}), event.metrics.get("bbox", {})
        line = (
            f"epoch {event.epoch} validation: "
            f"segm mAP {_number(segm.get('map'), '.3f')} "
            f"mAP50 {_number(segm.get('map50'), '.3f')} | "
            f"bbox mAP {_number(bbox.get('map'), '.3f')}"
        )
        # the trainer reports the F-measure at its best threshold under "best"
        f_measure = (event.metrics.get("f_measure") or {}).get("best")
        if f_measure:
            line += (
                f" | F1 {_number(f_measure.get('f_measure'), '.3f')}"
                f" @ {_number(f_measure.get('threshold'), '.2f')}"
            )
        line += (
            f" | best segm mAP {_number(event.best.get('segm_map'), '.3f')}"
            f" (epoch {event.best.get('epoch', '?')})"
        )
        if event.improved:
            line += " new best"
        return line

    @staticmethod
    def _final_line(event: Final) -> str:
        outcome = "stopped early" if event.status == "early_stopped" else event.status
        return (
            f"training {outcome} after {event.epochs} epochs ({event.iteration} iterations) "
            f"in {format_duration(event.wall_seconds)}; "
            f"best segm mAP {_number(event.best.get('segm_map'), '.3f')} "
            f"at epoch {event.best.get('epoch', '?')} -> {event.best_checkpoint or '?'}"
        )


class MemoryReporter:
    """Keeps the events in a list (`events`): for programs that drive `train()` themselves."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def report(self, event: Event) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


class MultiReporter:
    """Sends each event to several reporters; one that fails never stops the others."""

    def __init__(self, reporters: Iterable[Reporter]) -> None:
        self.reporters = list(reporters)
        self._warned: set[int] = set()

    def report(self, event: Event) -> None:
        for reporter in self.reporters:
            self._call_safely(reporter, "report", event)

    def close(self) -> None:
        for reporter in self.reporters:
            self._call_safely(reporter, "close")

    def _call_safely(self, reporter: Reporter, method: str, *args: Any) -> None:
        try:
            getattr(reporter, method)(*args)
        except Exception:
            # Best effort: training goes on; warn once so a dead reporter cannot flood the log.
            if id(reporter) not in self._warned:
                self._warned.add(id(reporter))
                logger.warning(
                    "%s.%s failed; training continues (further failures not logged)",
                    type(reporter).__name__,
                    method,
                    exc_info=True,
                )


def make_reporters(output_dir: Path, stream: TextIO | None = None) -> MultiReporter:
    """The usual reporters: `<output_dir>/metrics.jsonl` always, plus a progress bar when
    `stream` (default: the current `sys.stdout`) is a terminal, else JSON lines on it."""
    # Resolved at call time so redirected/captured stdout is honoured.
    stream = sys.stdout if stream is None else stream
    console: Reporter = TerminalReporter(stream) if stream.isatty() else JsonLinesReporter(stream)
    return MultiReporter([MetricsFileReporter(Path(output_dir) / METRICS_FILENAME), console])
