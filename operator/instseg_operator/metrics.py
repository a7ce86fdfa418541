"""Prometheus series for trainings (prefix `instseg_`), derived from the resources' status.

Per-training gauges carry namespace/name/template labels and are removed when the resource
goes away, so Grafana never shows a deleted training as stuck.
"""

from __future__ import annotations

import contextlib
import datetime

from instseg_contract import PHASES
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TRAINING_LABELS = ("namespace", "name", "template")

# status.progress field → (gauge name, help)
PROGRESS_GAUGES = {
    "epoch": ("instseg_training_epoch", "Current epoch (1-based) of the training"),
    "loss": ("instseg_training_loss", "Training loss, mean over the last reporting window"),
    "learningRate": ("instseg_training_learning_rate", "Current learning rate"),
    "imagesPerSecond": ("instseg_training_images_per_second", "Training throughput"),
    "etaSeconds": ("instseg_training_eta_seconds", "Estimated time to the end of training"),
}
METRIC_GAUGES = {
    "segmMap": ("instseg_training_segm_map", "Latest validation segm mAP"),
    "bboxMap": ("instseg_training_bbox_map", "Latest validation bbox mAP"),
    "bestSegmMap": ("instseg_training_best_segm_map", "Best validation segm mAP so far"),
    "bestBboxMap": ("instseg_training_best_bbox_map", "Bbox mAP of the best epoch"),
}


class TrainingMetrics:
    """The operator's metrics on one registry (its own in tests, the default in production)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kwargs = {"registry": registry} if registry is not None else {}
        self.created = Counter(
            "instseg_trainings_created", "Trainings created", ["template"], **kwargs
        )
        self.succeeded = Counter(
            "instseg_trainings_succeeded", "Trainings that succeeded", ["template"], **kwargs
        )
        self.failed = Counter(
            "instseg_trainings_failed", "Trainings that failed", ["template"], **kwargs
        )
        self.by_phase = Gauge("instseg_trainings", "Trainings by phase", ["phase"], **kwargs)
        self.progress_ratio = Gauge(
            "instseg_training_progress_ratio", "Epochs done / total epochs",
            TRAINING_LABELS, **kwargs,
        )  # fmt: skip
        self.gauges = {
            field: Gauge(name, doc, TRAINING_LABELS, **kwargs)
            for field, (name, doc) in {**PROGRESS_GAUGES, **METRIC_GAUGES}.items()
        }
        # one series per training, 1 for its current phase (as kube-state-metrics does for pods):
        # alerts name the training
        self.phase = Gauge(
            "instseg_training_phase", "1 for the training's current phase",
            [*TRAINING_LABELS, "phase"], **kwargs,
        )  # fmt: skip
        self.last_progress = Gauge(
            "instseg_training_last_progress_timestamp_seconds",
            "When the trainer last reported progress (Unix time)", TRAINING_LABELS, **kwargs,
        )  # fmt: skip
        self.reconcile_seconds = Histogram(
            "instseg_reconcile_duration_seconds", "Time spent in one reconcile", **kwargs
        )
        self._phases: dict[tuple[str, str], str] = {}
        self._labels: dict[tuple[str, str], tuple[str, str, str]] = {}
        for phase in PHASES:
            self.by_phase.labels(phase).set(0)

    def count_created(self, template: str) -> None:
        """Called by the create handler, once per new resource."""
        self.created.labels(template).inc()

    def count_transition(self, template: str, phase: str) -> None:
        """Called by whoever writes a new phase into a training's status (the operator), so
        each success or failure is counted once, also across operator restarts."""
        if phase == "Succeeded":
            self.succeeded.labels(template).inc()
        elif phase == "Failed":
            self.failed.labels(template).inc()

    def observe(self, resource: dict) -> None:
        """Updates every series of one training from its current status."""
        meta, spec = resource["metadata"], resource.get("spec") or {}
        status = resource.get("status") or {}
        key = (meta["namespace"], meta["name"])
        labels = (meta["namespace"], meta["name"], spec.get("template", ""))
        if self._labels.get(key, labels) != labels:  # template changed: no stale series
            self._remove_series(self._labels[key])
        self._labels[key] = labels
        phase = status.get("phase")
        if phase and phase != self._phases.get(key):
            self._phases[key] = phase
            self._count_phases()
        if phase:
            for each in PHASES:
                self.phase.labels(*labels, each).set(int(each == phase))
        progress = status.get("progress") or {}
        if progress.get("updatedAt"):
            updated = datetime.datetime.fromisoformat(progress["updatedAt"].replace("Z", "+00:00"))
            self.last_progress.labels(*labels).set(updated.timestamp())
        values = {**progress, **(progress.get("metrics") or {})}
        for field, gauge in self.gauges.items():
            if isinstance(values.get(field), (int, float)):
                gauge.labels(*labels).set(values[field])
        if progress.get("totalEpochs"):
            done = progress.get("epoch", 0) if phase != "Succeeded" else progress["totalEpochs"]
            self.progress_ratio.labels(*labels).set(done / progress["totalEpochs"])

    def forget(self, namespace: str, name: str) -> None:
        """Removes a deleted training's series."""
        labels = self._labels.pop((namespace, name), None)
        self._phases.pop((namespace, name), None)
        if labels is None:
            return
        self._remove_series(labels)
        self._count_phases()

    def _remove_series(self, labels: tuple[str, str, str]) -> None:
        for gauge in [*self.gauges.values(), self.progress_ratio, self.last_progress]:
            with contextlib.suppress(KeyError):  # never set for this training
                gauge.remove(*labels)
        for phase in PHASES:
            with contextlib.suppress(KeyError):
                self.phase.remove(*labels, phase)

    def _count_phases(self) -> None:
        for phase in PHASES:
            self.by_phase.labels(phase).set(sum(p == phase for p in self._phases.values()))
