"""The launcher the operator's multi-process pods run: torchrun that rejoins a rendezvous
whose host is being replaced, and passes the trainer's bad-input exit code on."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

from instseg_trainer import launch


def test_bad_input_in_every_process_exits_2_for_the_jobs_failure_policy(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "instseg_trainer.launch", "--standalone", "--nproc-per-node", "2",
        "--max-restarts", "0", "-m", "instseg_trainer.cli", "train", "MaskRCNN-EfficientNetB2B",
        "--train-data-roots", str(tmp_path / "missing"), "--val-data-roots", str(tmp_path),
        "--output", str(tmp_path / "run"),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"{tmp_path / 'missing'}" in done.stderr  # the trainer's own message


def test_a_lost_rendezvous_host_is_joined_again(monkeypatch, caplog) -> None:
    calls = []

    def run(args) -> None:
        calls.append(args.nnodes)
        if len(calls) == 1:
            raise RendezvousConnectionError("The connection to the C10d store has failed.")

    monkeypatch.setattr(launch, "run", run)
    monkeypatch.setattr(launch, "RETRY_PAUSE_SECONDS", 0)
    argv = ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "w-0.s:29500",
            "-m", "instseg_trainer.cli", "train"]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="instseg_trainer.launch"):
        assert launch.launch(argv) == 0
    assert calls == ["2", "2"]
    assert "lost the rendezvous host" in caplog.text


def test_rejoining_gives_up_after_its_deadline(monkeypatch) -> None:
    def run(args) -> None:
        raise RendezvousConnectionError("The connection to the C10d store has failed.")

    monkeypatch.setattr(launch, "run", run)
    monkeypatch.setattr(launch, "RETRY_SECONDS", 0)
    with pytest.raises(RendezvousConnectionError):
        launch.launch(["--nnodes", "2", "-m", "instseg_trainer.cli", "train"])


def test_a_crash_ends_with_one_summary_line_for_the_operators_status(tmp_path: Path) -> None:
    crash = tmp_path / "crash.py"
    crash.write_text("import sys\nprint('CUDA error: an illegal memory access', file=sys.stderr)\n"
                     "sys.exit(1)\n")  # fmt: skip
    cmd = [sys.executable, "-m", "instseg_trainer.launch", "--standalone", "--nproc-per-node",
           "1", "--max-restarts", "0", str(crash)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "rank 0 failed (exit code 1)" in last, done.stderr[-2000:]
