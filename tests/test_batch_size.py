"""The batch size memory allows: the search (OTX's automatic batch size), the learning rate
that follows it, and an out-of-memory error that halves the batch and resumes instead of
failing the training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from instseg_trainer.engine import trainer as trainer_module
from instseg_trainer.engine.batch_size import find_batch_size, scaled_learning_rate
from instseg_trainer.engine.checkpoint import load_checkpoint
from instseg_trainer.engine.run import TrainConfig
from instseg_trainer.engine.trainer import train
from instseg_trainer.errors import InstsegError
from instseg_trainer.reporting.events import BatchSize, Start
from instseg_trainer.reporting.kubernetes_status import progress_patch
from instseg_trainer.reporting.reporters import make_reporters
from instseg_trainer.sample_data import write_sample_dataset
from instseg_trainer.templates import get_template


@pytest.mark.parametrize(
    ("largest", "start", "found"),
    [(11, 4, 11), (2, 4, 2), (4, 4, 4), (1000, 4, 64), (0, 4, 1), (5, 1, 5)],
)
def test_the_search_finds_the_largest_batch_that_fits(largest, start, found) -> None:
    tried: list[int] = []

    def fits(batch: int) -> bool:
        tried.append(batch)
        return batch <= largest

    assert find_batch_size(fits, start, limit=64) == found
    assert len(tried) <= 2 * math.log2(64) + 1  # doubling, then bisecting


def test_the_learning_rate_follows_the_batch_as_otx_scales_it() -> None:
    assert scaled_learning_rate(0.01, 4, 16) == pytest.approx(0.02)  # √4
    assert scaled_learning_rate(0.02, 4, 2) == pytest.approx(0.02 / math.sqrt(2))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("memory")
    write_sample_dataset(root, num_train=8, num_val=2, seed=2, min_size=64, max_size=96)
    return root


def _config(data: Path, output: Path, epochs: int = 2, **kwargs) -> TrainConfig:
    template = get_template("MaskRCNN-EfficientNetB2B").with_overrides(
        epochs=epochs, batch_size=4, input_size=64, warmup_iterations=1, learning_rate=0.02
    )
    return TrainConfig(template, data, data, output, device="cpu", num_workers=0,
                       backbone_weights="none", **kwargs)  # fmt: skip


def _out_of_memory_at(monkeypatch, batch: int, epoch: int) -> None:
    """Steps of `batch` images in epoch `epoch` (0-based) raise CUDA's out-of-memory error."""
    real_step = trainer_module._step

    def step(run, net, images, targets):
        if run.batch_size == batch and run.pos.epoch == epoch:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(run, net, images, targets)

    monkeypatch.setattr(trainer_module, "_step", step)


def _events(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").open()]


def test_out_of_memory_halves_the_batch_and_resumes_from_last_pt(
    data: Path, tmp_path: Path, monkeypatch
) -> None:
    _out_of_memory_at(monkeypatch, batch=4, epoch=1)
    output = tmp_path / "run"
    reporter = make_reporters(output)
    final = train(_config(data, output), reporter)
    reporter.close()
    assert final.status == "completed" and final.epochs == 2
    events = _events(output)
    changed = [e for e in events if e["event"] == "batch_size"]
    assert len(changed) == 1 and changed[0]["reason"] == "out_of_memory"
    assert (changed[0]["batch_size"], changed[0]["previous_batch_size"]) == (2, 4)
    assert changed[0]["learning_rate"] == pytest.approx(0.02 / math.sqrt(2))
    starts = [e for e in events if e["event"] == "start"]
    assert [s["batch_size"] for s in starts] == [4, 2]
    assert starts[1]["resumed_at_iteration"] == 2  # epoch 1 (2 steps of 4) was kept
    assert starts[1]["iterations_per_epoch"] == 4
    state = load_checkpoint(output / "last.pt")
    assert (state["batch_size"], state["batch_adapted_from"]) == (2, 4)

    # a restarted pod with the template's batch keeps the batch memory chose
    monkeypatch.undo()
    longer = train(_config(data, output, epochs=3), make_reporters(output))
    assert longer.status == "completed" and longer.epochs == 3
    assert _events(output)[-1]["event"] == "final"
    assert [e["batch_size"] for e in _events(output) if e["event"] == "start"][-1] == 2

    # out of memory again: the batch the run used (2) is halved, not the template's (4)
    _out_of_memory_at(monkeypatch, batch=2, epoch=3)
    again = train(_config(data, output, epochs=4), make_reporters(output))
    assert again.status == "completed"
    changed = [e for e in _events(output) if e["event"] == "batch_size"]
    assert (changed[-1]["batch_size"], changed[-1]["previous_batch_size"]) == (1, 2)


def test_out_of_memory_at_batch_one_ends_with_what_to_change(
    data: Path, tmp_path: Path, monkeypatch
) -> None:
    _out_of_memory_at(monkeypatch, batch=1, epoch=0)
    config = _config(data, tmp_path / "run")
    config.template = config.template.with_overrides(batch_size=1)
    with pytest.raises(InstsegError, match="at batch size 1 .* lower --input-size"):
        train(config, make_reporters(tmp_path / "run"))


def test_auto_batch_size_is_a_no_op_on_cpu(data: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level("INFO"):
        final = train(_config(data, tmp_path / "run", epochs=1, auto_batch_size=True),
                      make_reporters(tmp_path / "run"))  # fmt: skip
    assert final.status == "completed"
    assert "--auto-batch-size: a no-op on cpu" in caplog.text
    assert not [e for e in _events(tmp_path / "run") if e["event"] == "batch_size"]


def test_the_batch_size_reaches_the_resource_status() -> None:
    changed = BatchSize(batch_size=2, previous_batch_size=4, learning_rate=0.01,
                        reason="out_of_memory")  # fmt: skip
    assert progress_patch(changed) == {"batchSize": 2, "learningRate": 0.01}
    start = Start(template="t", total_epochs=3, iterations_per_epoch=2, train_images=8,
                  val_images=2, classes=["a"], device="cuda:0", world_size=1, output="/o",
                  resumed_at_iteration=0, batch_size=4)  # fmt: skip
    assert progress_patch(start)["batchSize"] == 4
