"""Recipe mechanics: warmup + plateau, EMA, early stopping, atomic checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from instseg_trainer.engine.checkpoint import load_checkpoint, save_checkpoint
from instseg_trainer.engine.early_stopping import EarlyStopping
from instseg_trainer.engine.ema import build_ema, ema_decay
from instseg_trainer.engine.schedule import WarmupPlateauSchedule
from instseg_trainer.errors import CheckpointError


def _optimizer(lr: float = 0.03) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)


def test_linear_warmup_then_plateau_reduction() -> None:
    opt = _optimizer(0.03)
    schedule = WarmupPlateauSchedule(
        opt, warmup_iterations=4, warmup_ratio=1 / 3, factor=0.1, patience=2, min_lr=1e-4
    )
    lrs = [schedule.learning_rate]
    for it in range(1, 7):
        opt.step()
        schedule.step_iteration(it)
        lrs.append(schedule.learning_rate)
    assert lrs[0] == pytest.approx(0.01)  # starts at lr * warmup_ratio
    assert lrs[2] == pytest.approx(0.02)  # linear
    assert lrs[4:] == pytest.approx([0.03, 0.03, 0.03])  # then the base rate, unchanged
    for metric in (0.5, 0.6, 0.6, 0.6):  # best 0.6, then two validations without gain
        schedule.step_validation(metric)
    assert schedule.learning_rate == pytest.approx(0.03)
    schedule.step_validation(0.55)  # patience 2 exceeded → x0.1
    assert schedule.learning_rate == pytest.approx(0.003)
    for _ in range(20):
        schedule.step_validation(0.1)
    assert schedule.learning_rate == pytest.approx(1e-4)  # never below min_lr


def test_schedule_state_round_trips() -> None:
    opt = _optimizer()
    a = WarmupPlateauSchedule(opt, warmup_iterations=10, warmup_ratio=0.5, factor=0.1,
                              patience=1, min_lr=0)  # fmt: skip
    for it in range(1, 4):
        opt.step()
        a.step_iteration(it)
    a.step_validation(0.3)
    state, opt_state = a.state_dict(), opt.state_dict()
    opt2 = _optimizer()
    b = WarmupPlateauSchedule(opt2, warmup_iterations=10, warmup_ratio=0.5, factor=0.1,
                              patience=1, min_lr=0)  # fmt: skip
    opt2.load_state_dict(opt_state)
    b.load_state_dict(state)
    for it in range(4, 8):
        opt.step()
        opt2.step()
        a.step_iteration(it)
        b.step_iteration(it)
    assert b.learning_rate == pytest.approx(a.learning_rate)


def test_ema_follows_otx_epoch_momentum() -> None:
    decay = ema_decay(0.4, 10)
    assert decay**10 == pytest.approx(0.6)  # weights one epoch old keep 60 %
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = build_ema(model, 0.4, 10)
    expected = 0.0
    for step in range(1, 21):
        with torch.no_grad():
            model.weight.fill_(float(step))
        ema.update_parameters(model)
        expected = float(step) if step == 1 else decay * expected + (1 - decay) * step
    assert ema.module.weight.item() == pytest.approx(expected)
    assert ema.module.weight.item() < 20.0  # it lags the raw weights


def test_early_stopping_waits_for_start_and_patience() -> None:
    stopper = EarlyStopping(patience=2, start=5)
    assert stopper.update(0.5, 1) is True
    assert stopper.update(0.4, 2) is False
    assert stopper.update(0.4, 3) is False
    assert not stopper.should_stop(3)  # patience used up, but before `start`
    assert stopper.update(0.45, 5) is False
    assert stopper.should_stop(5)
    assert stopper.best == 0.5 and stopper.best_epoch == 1
    assert not EarlyStopping(patience=0).should_stop(100)  # 0 disables


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1  # the good checkpoint survived
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left


def test_load_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="other.pt.*not an instseg checkpoint"):
        load_checkpoint(other)


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path: Path) -> None:
    import random

    import numpy as np

    from instseg_trainer.engine.checkpoint import restore_rng_state, rng_state

    save_checkpoint({"rng": [rng_state()]}, tmp_path / "c.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
