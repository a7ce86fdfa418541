"""The trainer's events, typed: built by the training loop (engine/trainer.py) alone, read by
every reporter (reporters.py, kubernetes_status.py) through their fields.

On the wire (stdout in a pod, `<output>/metrics.jsonl`) each is one JSON object: `event` (its
kind, instseg_contract.EVENT_KINDS), `time` (ISO-8601, UTC), then its fields by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar


def now_iso() -> str:
    """The current time as ISO-8601 UTC with milliseconds: 2026-11-30T21:00:00.123Z."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> float:
    """An event's `time` as seconds since the epoch."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True, kw_only=True)
class Event:
    kind: ClassVar[str]
    time: str = field(default_factory=now_iso)

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.kind, **asdict(self)}


@dataclass(frozen=True, kw_only=True)
class Start(Event):
    """Training begins (or resumes at `resumed_at_iteration`)."""

    kind: ClassVar[str] = "start"
    template: str
    total_epochs: int
    iterations_per_epoch: int
    train_images: int
    val_images: int
    classes: list[str]
    device: str
    world_size: int
    output: str
    resumed_at_iteration: int
    batch_size: int  # per process and step


@dataclass(frozen=True, kw_only=True)
class Progress(Event):
    """An event during the epochs: where the training is."""

    epoch: int  # Iteration: the epoch in progress, from 1; the others: epochs done
    total_epochs: int
    iteration: int  # optimizer steps done in total


@dataclass(frozen=True, kw_only=True)
class Iteration(Progress):
    """A summary of the last `log_interval` iterations (means over every rank)."""

    kind: ClassVar[str] = "iteration"
    epoch_iteration: int
    iterations_per_epoch: int
    loss: float
    losses: dict[str, float]
    learning_rate: float
    images_per_second: float
    eta_seconds: float


@dataclass(frozen=True, kw_only=True)
class Epoch(Progress):
    """An epoch's training is done (its checkpoint is saved, its validation comes next)."""

    kind: ClassVar[str] = "epoch"
    loss: float  # the epoch's mean
    learning_rate: float
    seconds: float


@dataclass(frozen=True, kw_only=True)
class Validation(Progress):
    """An epoch's validation: COCO metrics, the F-measure, and the best epoch so far."""

    kind: ClassVar[str] = "validation"
    metrics: dict[str, Any]  # {"bbox": {...}, "segm": {...}, "f_measure": {"best": {...}}}
    best: dict[str, Any]  # epoch, segm_map, segm_map50, bbox_map, bbox_map50, f_measure, ...
    improved: bool
    learning_rate: float
    seconds: float


@dataclass(frozen=True, kw_only=True)
class BatchSize(Event):
    """The batch size changed for memory: chosen by --auto-batch-size ("auto"), or halved
    after the GPU ran out of memory ("out_of_memory"; the training resumes from last.pt).
    The learning rate follows it (engine.batch_size)."""

    kind: ClassVar[str] = "batch_size"
    batch_size: int
    previous_batch_size: int
    learning_rate: float
    reason: str


@dataclass(frozen=True, kw_only=True)
class Exported(Event):
    """After training (spec.export / --export): the models exported from best.pt, each with
    name, path, format, precision, sizeBytes and valSegmMap (instseg_contract.ARTIFACT_FIELDS).
    """

    kind: ClassVar[str] = "export"
    artifacts: list[dict[str, Any]]


@dataclass(frozen=True, kw_only=True)
class Final(Event):
    """The run ended: completed, early_stopped, stopped (--stop-after-iterations) or
    interrupted (a stop signal, `stop_signal`; its checkpoint is saved)."""

    kind: ClassVar[str] = "final"
    status: str
    epochs: int
    iteration: int
    best: dict[str, Any]
    best_checkpoint: str | None
    last_checkpoint: str
    wall_seconds: float
    already_finished: bool = False  # the output held a finished run: nothing was trained
    stop_signal: int | None = None
