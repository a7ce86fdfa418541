"""Prometheus series from trainings' status: values, transitions, removal on delete."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from instseg_operator.metrics import TrainingMetrics


def _training(name: str, phase: str | None, progress: dict | None = None) -> dict:
    status = {}
    if phase:
        status["phase"] = phase
    if progress:
        status["progress"] = progress
    return {
        "metadata": {"namespace": "team-a", "name": name},
        "spec": {"template": "MaskRCNN-ResNet50"},
        "status": status,
    }


def _value(registry: CollectorRegistry, metric: str, **labels) -> float | None:
    return registry.get_sample_value(metric, labels)


def test_progress_becomes_labelled_gauges() -> None:
    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry)
    progress = {
        "epoch": 3, "totalEpochs": 12, "loss": 0.8, "learningRate": 0.01,
        "imagesPerSecond": 41.5, "etaSeconds": 900,
        "metrics": {"segmMap": 0.31, "bestSegmMap": 0.35, "bboxMap": 0.3, "bestBboxMap": 0.33},
    }  # fmt: skip
    metrics.observe(_training("a", "Running", progress))
    labels = {"namespace": "team-a", "name": "a", "template": "MaskRCNN-ResNet50"}
    assert _value(registry, "instseg_training_epoch", **labels) == 3
    assert _value(registry, "instseg_training_progress_ratio", **labels) == 0.25
    assert _value(registry, "instseg_training_images_per_second", **labels) == 41.5
    assert _value(registry, "instseg_training_best_segm_map", **labels) == 0.35
    assert _value(registry, "instseg_trainings", phase="Running") == 1
    assert _value(registry, "instseg_trainings", phase="Pending") == 0
    text = generate_latest(registry).decode()
    assert 'instseg_training_loss{name="a",namespace="team-a",template="MaskRCNN-ResNet50"}' in text


def test_transitions_count_and_deleted_trainings_disappear() -> None:
    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry)
    metrics.count_created("MaskRCNN-ResNet50")
    metrics.observe(_training("a", "Pending"))
    metrics.observe(_training("a", "Running", {"epoch": 1, "totalEpochs": 2, "loss": 1.0}))
    metrics.count_transition("MaskRCNN-ResNet50", "Running")
    metrics.count_transition("MaskRCNN-ResNet50", "Succeeded")
    metrics.observe(_training("a", "Succeeded", {"epoch": 2, "totalEpochs": 2, "loss": 0.5}))
    metrics.observe(_training("b", "Failed"))  # only seen, not written: not counted
    template = {"template": "MaskRCNN-ResNet50"}
    assert _value(registry, "instseg_trainings_created_total", **template) == 1
    assert _value(registry, "instseg_trainings_succeeded_total", **template) == 1
    assert _value(registry, "instseg_trainings_failed_total", **template) is None
    assert _value(registry, "instseg_trainings", phase="Succeeded") == 1
    labels = {"namespace": "team-a", "name": "a", "template": "MaskRCNN-ResNet50"}
    assert _value(registry, "instseg_training_progress_ratio", **labels) == 1.0
    metrics.forget("team-a", "a")
    assert _value(registry, "instseg_training_loss", **labels) is None
    assert _value(registry, "instseg_trainings", phase="Succeeded") == 0
    assert 'name="a"' not in generate_latest(registry).decode()
    metrics.forget("team-a", "never-seen")  # harmless


def test_a_changed_template_leaves_no_stale_series() -> None:
    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry)
    metrics.observe(_training("a", "Suspended", {"epoch": 1, "totalEpochs": 2, "loss": 1.0}))
    changed = _training("a", "Pending", {"epoch": 1, "totalEpochs": 2, "loss": 0.9})
    changed["spec"]["template"] = "MaskRCNN-ConvNeXt"
    metrics.observe(changed)
    text = generate_latest(registry).decode()
    assert 'template="MaskRCNN-ResNet50"' not in text
    assert 'instseg_training_loss{name="a",namespace="team-a",template="MaskRCNN-ConvNeXt"}' in text


def test_each_training_has_its_phase_and_last_progress_for_alerts() -> None:
    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry)
    progress = {"epoch": 1, "totalEpochs": 4, "updatedAt": "2026-11-30T10:00:00Z"}
    metrics.observe(_training("a", "Running", progress))
    labels = {"namespace": "team-a", "name": "a", "template": "MaskRCNN-ResNet50"}
    assert _value(registry, "instseg_training_phase", **labels, phase="Running") == 1
    assert _value(registry, "instseg_training_phase", **labels, phase="Failed") == 0
    stamp = _value(registry, "instseg_training_last_progress_timestamp_seconds", **labels)
    assert stamp == 1796032800.0  # 2026-11-30T10:00:00Z
    metrics.observe(_training("a", "Failed", progress))
    assert _value(registry, "instseg_training_phase", **labels, phase="Failed") == 1
    assert _value(registry, "instseg_training_phase", **labels, phase="Running") == 0
    metrics.forget("team-a", "a")
    assert _value(registry, "instseg_training_phase", **labels, phase="Failed") is None
    assert _value(registry, "instseg_training_last_progress_timestamp_seconds", **labels) is None
