"""Training curves (loss, learning rate, validation mAP) rendered from `metrics.jsonl`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from instseg_trainer.files import atomic_write

Event = dict[str, Any]


def _read_events(metrics_jsonl: Path) -> list[Event]:
    events = []
    with Path(metrics_jsonl).open(encoding="utf-8") as lines:
        for line in lines:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                # A crash mid-write can leave a torn line; the rest of the file is still good.
                continue
            if isinstance(event, dict):
                events.append(event)
    return events


def _last_per_key(events: list[Event], kind: str, key: str) -> list[Event]:
    latest: dict[int, Event] = {}
    for event in events:
        if event.get("event") == kind and isinstance(event.get(key), int):
            # After a resume the same iteration/epoch is logged again; the rerun is the truth.
            latest[event[key]] = event
    return [latest[k] for k in sorted(latest)]


def _show_empty(axes: Axes, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes, color="0.5")


def _plot_loss(axes: Axes, iterations: list[Event], epochs: list[Event]) -> None:
    axes.set_title("training loss")
    axes.set_xlabel("iteration")
    if not iterations:
        _show_empty(axes, "no iterations yet")
        return
    steps = [event["iteration"] for event in iterations]
    components = sorted({name for event in iterations for name in event.get("losses", {})})
    for name in components:
        values = [event.get("losses", {}).get(name) for event in iterations]
        axes.plot(steps, _as_floats(values), linewidth=0.8, alpha=0.35, label=name)
    axes.plot(steps, _as_floats([e.get("loss") for e in iterations]), color="black", label="loss")
    if epochs:
        axes.plot(
            [event["iteration"] for event in epochs if "iteration" in event],
            _as_floats([event.get("loss") for event in epochs if "iteration" in event]),
            "o",
            color="tab:red",
            markersize=4,
            label="epoch mean",
        )
    axes.set_ylim(bottom=0)
    axes.legend(fontsize="x-small")


def _plot_learning_rate(axes: Axes, iterations: list[Event]) -> None:
    axes.set_title("learning rate")
    axes.set_xlabel("iteration")
    if not iterations:
        _show_empty(axes, "no iterations yet")
        return
    axes.plot(
        [event["iteration"] for event in iterations],
        _as_floats([event.get("learning_rate") for event in iterations]),
        color="tab:blue",
    )
    axes.set_yscale("log")


def _plot_validation(axes: Axes, validations: list[Event]) -> None:
    axes.set_title("validation mAP")
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not validations:
        _show_empty(axes, "no validation yet")
        return
    epochs = [event["epoch"] for event in validations]

    def series(task: str, metric: str) -> list[float]:
        return _as_floats(
            [event.get("metrics", {}).get(task, {}).get(metric) for event in validations]
        )

    axes.plot(epochs, series("segm", "map"), "o-", color="tab:green", label="segm mAP")
    axes.plot(
        epochs, series("segm", "map50"), "o--", color="tab:green", alpha=0.6, label="segm mAP50"
    )
    axes.plot(epochs, series("bbox", "map"), "s-", color="tab:orange", label="bbox mAP")
    best = validations[-1].get("best", {})
    if isinstance(best.get("epoch"), int) and isinstance(best.get("segm_map"), (int, float)):
        axes.plot(
            best["epoch"],
            best["segm_map"],
            "*",
            color="gold",
            markeredgecolor="black",
            markersize=14,
            label=f"best {best['segm_map']:.3f} (epoch {best['epoch']})",
        )
    axes.set_ylim(bottom=0)
    axes.legend(fontsize="x-small")


def _as_floats(values: list[Any]) -> list[float]:
    # Missing or null values (e.g. a NaN loss written as null) become gaps in the line.
    return [float(v) if isinstance(v, (int, float)) else float("nan") for v in values]


def plot_curves(metrics_jsonl: Path, out_png: Path) -> Path:
    """Render loss, learning-rate and validation-mAP curves from a metrics file to a PNG.

    Tolerates resumed runs (repeated iterations keep their last value), torn last lines and
    files without validation yet. The PNG is replaced atomically, so readers never see half.
    """
    events = _read_events(metrics_jsonl)
    iterations = _last_per_key(events, "iteration", "iteration")
    epochs = _last_per_key(events, "epoch", "epoch")
    validations = _last_per_key(events, "validation", "epoch")

    # A bare Figure, not pyplot: no global backend or figure registry touched.
    figure = Figure(figsize=(15, 4.5), layout="constrained")
    loss_axes, lr_axes, map_axes = figure.subplots(1, 3)
    _plot_loss(loss_axes, iterations, epochs)
    _plot_learning_rate(lr_axes, iterations)
    _plot_validation(map_axes, validations)
    starts = [event for event in events if event.get("event") == "start"]
    if starts:
        figure.suptitle(str(starts[-1].get("template", "")))

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_png, lambda file: figure.savefig(file, format="png", dpi=100))
    return out_png
