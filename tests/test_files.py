"""Files the trainer writes honour the umask, and a failed write leaves nothing behind."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from instseg_trainer.engine.checkpoint import load_checkpoint, save_checkpoint
from instseg_trainer.evaluation.inference import write_json
from instseg_trainer.files import atomic_write
from instseg_trainer.reporting.curves import plot_curves


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    previous = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(previous)


def _checkpoint(path: Path) -> None:
    save_checkpoint({"epoch": 1}, path)


def _json(path: Path) -> None:
    write_json({"map": 0.5}, path)


def _curves(path: Path) -> None:
    metrics = path.parent / "metrics.jsonl"
    metrics.write_text('{"event": "iteration", "iteration": 1, "loss": 1.0}\n')
    plot_curves(metrics, path)


WRITERS = {"checkpoint": _checkpoint, "json": _json, "curves": _curves}


UMASKS = [
    pytest.param(m, mode, id=f"umask-{m:03o}")
    for m, mode in [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)]
]


@pytest.mark.parametrize("mask, mode", UMASKS)
@pytest.mark.parametrize("writer", WRITERS.values(), ids=WRITERS.keys())
def test_written_files_have_the_mode_the_umask_gives(umask, tmp_path, writer, mask, mode):
    umask(mask)
    target = tmp_path / "out" / "file"
    target.parent.mkdir()
    writer(target)
    assert stat.S_IMODE(target.stat().st_mode) == mode
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []


def test_a_replaced_file_gets_the_umask_mode_not_the_old_files(umask, tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("{}")
    target.chmod(0o600)
    umask(0o022)
    write_json({"map": 0.5}, target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_failed_first_write_leaves_no_file_and_no_temporary(tmp_path):
    def half_then_fail(file) -> None:
        file.write(b"half of it")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(tmp_path / "best.pt", half_then_fail)
    assert list(tmp_path.iterdir()) == []


def test_json_that_cannot_be_written_leaves_no_temporary(tmp_path):
    with pytest.raises(TypeError):
        write_json({"map": 0.5, "model": object()}, tmp_path / "metrics.json")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_previous_file_whole(tmp_path):
    target = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint({"epoch": 2, "bad": Unpicklable()}, target)
    assert load_checkpoint(target)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
