"""The user's path: train → eval → predict from the command line, per template; resume."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from instseg_trainer.cli import main
from instseg_trainer.engine.checkpoint import load_checkpoint
from instseg_trainer.engine.trainer import TrainConfig, train
from instseg_trainer.errors import CheckpointError
from instseg_trainer.reporting.reporters import MultiReporter
from instseg_trainer.sample_data import write_sample_dataset
from instseg_trainer.templates import get_template

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_sample_dataset(root, num_train=4, num_val=3, seed=1, min_size=64, max_size=96)
    return root


def _cli(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    assert code == 0, out.getvalue()
    return out.getvalue()


def _pycocotools_stats(gt_path: Path, results_path: Path, iou_type: str) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        results = json.loads(results_path.read_text())
        dt = gt.loadRes(str(results_path)) if results else None
        if dt is None:
            return [0.0] * 12
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [max(s, 0.0) for s in ev.stats]


@pytest.mark.parametrize(
    "template", ["MaskRCNN-EfficientNetB2B", "MaskRCNN-ResNet50", "MaskRCNN-ConvNeXt"]
)
def test_train_eval_predict(template: str, tiny_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    stdout = _cli(
        "train", template, "--train-data-roots", str(tiny_root),
        "--val-data-roots", str(tiny_root), "--output", str(run), "--epochs", "1",
        "--batch-size", "2", "--input-size", "64", "--backbone-weights", "none",
        "--workers", "0", "--log-interval", "1",
    )  # fmt: skip
    events = [json.loads(line) for line in stdout.splitlines()]  # stdout is not a tty: JSON
    assert [e["event"] for e in events] == [
        "start",
        "iteration",
        "iteration",
        "epoch",
        "validation",
        "final",
    ]
    assert events[-1]["status"] == "completed"
    for name in ("best.pt", "last.pt", "metrics.jsonl", "curves.png"):
        assert (run / name).is_file(), name
    assert len((run / "metrics.jsonl").read_text().splitlines()) == len(events)
    best = load_checkpoint(run / "best.pt")
    assert best["template"] == template and best["category_ids"] == [1, 2, 4]
    assert "optimizer" not in best  # inference-only: small

    out = tmp_path / "eval"
    _cli("eval", "--weights", str(run / "best.pt"), "--data-roots", str(tiny_root),
         "--subset", "val", "--output", str(out), "--workers", "0")  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    validation = next(e for e in events if e["event"] == "validation")["metrics"]
    for iou_type in ("segm", "bbox"):  # eval of best.pt reproduces the training's validation
        assert metrics[iou_type]["map"] == pytest.approx(validation[iou_type]["map"], abs=1e-12)
    original = tiny_root / "annotations" / "instances_val.json"
    for iou_type in ("segm", "bbox"):
        for gt in (out / "ground_truth.json", original):  # what we scored == the user's file
            stats = _pycocotools_stats(gt, out / "predictions.json", iou_type)
            assert metrics[iou_type]["map"] == pytest.approx(stats[0], abs=1e-9)
            assert metrics[iou_type]["map50"] == pytest.approx(stats[1], abs=1e-9)
    val_ids = {i["id"] for i in json.loads(original.read_text())["images"]}
    assert {r["image_id"] for r in json.loads((out / "predictions.json").read_text())} <= val_ids

    pred = tmp_path / "pred"
    images = tiny_root / "images" / "val"
    _cli("predict", "--weights", str(run / "best.pt"), "--input", str(images),
         "--output", str(pred), "--score-threshold", "0.0", "--workers", "0")  # fmt: skip
    assert sorted(p.stem for p in pred.glob("*.png")) == sorted(p.stem for p in images.iterdir())
    listed = json.loads((pred / "images.json").read_text())
    assert len(listed) == 3
    results = json.loads((pred / "predictions.json").read_text())
    assert all(r["category_id"] in (1, 2, 4) and "segmentation" in r for r in results)


def _config(root: Path, output: Path, **kwargs) -> TrainConfig:
    template = get_template("MaskRCNN-EfficientNetB2B").with_overrides(
        epochs=2, batch_size=2, input_size=64, warmup_iterations=3
    )
    return TrainConfig(template, root, root, output, device="cpu", num_workers=0,
                       backbone_weights="none", **kwargs)  # fmt: skip


def test_resume_continues_exactly_where_it_stopped(tiny_root: Path, tmp_path: Path) -> None:
    quiet = MultiReporter([])
    whole = train(_config(tiny_root, tmp_path / "whole"), quiet)
    assert whole.status == "completed" and whole.iteration == 4

    # stop mid-way through epoch 2 (2 iterations per epoch), then run the same command again
    part = train(_config(tiny_root, tmp_path / "split", stop_after_iterations=3), quiet)
    assert part.status == "stopped" and part.iteration == 3
    rest = train(_config(tiny_root, tmp_path / "split"), quiet)
    assert rest.status == "completed" and rest.iteration == 4

    a, b = load_checkpoint(tmp_path / "whole/last.pt"), load_checkpoint(tmp_path / "split/last.pt")
    assert a["position"] == b["position"]
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, msg=f"{key}.{name} differs")
    assert a["best"] == b["best"]
    assert a["schedule"] == b["schedule"]

    again = train(_config(tiny_root, tmp_path / "split"), quiet)  # a restarted Job, say
    assert again.already_finished and again.iteration == 4

    with pytest.raises(CheckpointError, match="--batch-size"):
        config = _config(tiny_root, tmp_path / "split")
        config.template = config.template.with_overrides(batch_size=1, epochs=3)
        train(config, quiet)

    longer = _config(tiny_root, tmp_path / "split")
    longer.template = longer.template.with_overrides(epochs=3)
    extended = train(longer, quiet)  # the same command with more epochs goes on
    assert extended.status == "completed" and extended.epochs == 3
    assert extended.iteration == 6


def test_torchrun_two_processes_on_cpu(tiny_root: Path, tmp_path: Path) -> None:
    """DDP with gloo: rank 0 alone writes, metrics come from all ranks' predictions."""
    import subprocess
    import sys

    run = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "instseg_trainer.cli", "train", "MaskRCNN-EfficientNetB2B",
        "--train-data-roots", str(tiny_root), "--val-data-roots", str(tiny_root),
        "--output", str(run), "--epochs", "1", "--batch-size", "1", "--input-size", "64",
        "--backbone-weights", "none", "--workers", "0", "--log-interval", "1",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    kinds = [e["event"] for e in events]
    assert kinds == ["start", "iteration", "iteration", "epoch", "validation", "final"]  # rank 0
    assert events[0]["world_size"] == 2
    assert set(events[4]["metrics"]) >= {"segm", "bbox", "f_measure"}
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()
    assert len(load_checkpoint(run / "last.pt")["rng"]) == 2  # each rank's RNG, for resume


@pytest.mark.parametrize(
    ("workers", "signum", "to_group"),
    [
        (0, signal.SIGTERM, False),  # a pod eviction or Job suspension: SIGTERM to the trainer
        (2, signal.SIGTERM, True),  # `timeout`, or a runtime signalling the whole group
        (2, signal.SIGINT, True),  # Ctrl-C in a terminal: the foreground group, loader workers too
    ],
    ids=["sigterm", "sigterm-group-with-workers", "ctrl-c-with-workers"],
)
def test_a_stop_signal_saves_a_checkpoint_and_the_rerun_finishes(
    tiny_root: Path, tmp_path: Path, workers: int, signum: int, to_group: bool
) -> None:
    """Stopped mid-epoch, then the same command again: nothing done before the signal is lost."""
    import subprocess
    import sys

    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "instseg_trainer.cli", "train", "MaskRCNN-EfficientNetB2B",
        "--train-data-roots", str(tiny_root), "--val-data-roots", str(tiny_root),
        "--output", str(run), "--epochs", "2", "--batch-size", "1", "--input-size", "64",
        "--backbone-weights", "none", "--workers", str(workers), "--log-interval", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    for line in proc.stdout:  # wait until it is really training
        if json.loads(line)["event"] == "iteration":
            break
    if to_group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err[-2000:]  # Ctrl-C 130, SIGTERM 143
    final = json.loads(out.splitlines()[-1])
    assert final["event"] == "final" and final["status"] == "interrupted"
    stopped_at = load_checkpoint(run / "last.pt")["position"]["iteration"]
    assert 1 <= stopped_at < 8

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[0]["resumed_at_iteration"] == stopped_at
    assert events[-1]["status"] == "completed" and events[-1]["iteration"] == 8


def test_a_stop_signal_during_validation_ends_at_once_and_the_rerun_validates(
    tmp_path: Path,
) -> None:
    """The epoch's training is saved before validation starts; a SIGTERM during validation
    (a long one on a real val set would outlast the pod's grace period) ends the run at once,
    and the same command validates that epoch first, then goes on."""
    import subprocess
    import sys

    data = tmp_path / "data"
    write_sample_dataset(data, num_train=4, num_val=12, seed=2, min_size=64, max_size=96)
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "instseg_trainer.cli", "train", "MaskRCNN-EfficientNetB2B",
        "--train-data-roots", str(data), "--val-data-roots", str(data),
        "--output", str(run), "--epochs", "2", "--batch-size", "2", "--input-size", "64",
        "--backbone-weights", "none", "--workers", "0", "--log-interval", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the first epoch is trained: validation comes next
        if json.loads(line)["event"] == "epoch":
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    first = [json.loads(line) for line in out.splitlines()]
    assert [e["event"] for e in first] == ["final"] and first[0]["status"] == "interrupted"
    position = load_checkpoint(run / "last.pt")["position"]
    assert (position["epoch"], position["epoch_step"], position["iteration"]) == (1, 0, 2)
    assert position["validation_pending"] is True

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[0]["event"] == "start" and events[0]["resumed_at_iteration"] == 2
    assert (events[1]["event"], events[1]["epoch"]) == ("validation", 1)  # no training first
    assert events[-1]["status"] == "completed" and events[-1]["iteration"] == 4
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in logged if e["event"] == "validation"] == [1, 2]
    assert [e["epoch"] for e in logged if e["event"] == "epoch"] == [1, 2]
    assert not load_checkpoint(run / "last.pt")["position"]["validation_pending"]
