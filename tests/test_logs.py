"""What the trainer writes on stderr: one JSON object per line in a pod (stderr a pipe or a
file), the human format on a terminal; the exit codes the same either way."""

from __future__ import annotations

import json
import logging
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

from instseg_trainer.logs import JsonFormatter

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
CLI = [sys.executable, "-m", "instseg_trainer.cli"]


def _json_lines(stderr: str) -> list[dict]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
        assert ISO_UTC.match(entry["time"]), entry["time"]
    return entries


def _on_a_terminal(cmd: list[str]) -> tuple[int, str]:
    """Runs `cmd` with stderr on a pseudo-terminal; its exit code and what it wrote there."""
    reader, terminal = pty.openpty()
    with subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal
    ) as proc:
        os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(reader, 4096)
            except OSError:  # EIO: every writer to the terminal is gone
                break
            if not chunk:
                break
            chunks.append(chunk)
        code = proc.wait(timeout=120)
    os.close(reader)
    return code, b"".join(chunks).decode().replace("\r\n", "\n")


def _train_with_a_warning_then_an_error(data: Path, tmp_path: Path) -> list[str]:
    """A train set with an annotation of an unknown image (skipped with a warning) and a
    val root that does not exist (a user error, exit 2)."""
    path = data / "annotations" / "instances_train.json"
    coco = json.loads(path.read_text())
    coco["annotations"].append(dict(coco["annotations"][0], id=10_000, image_id=123_456))
    path.write_text(json.dumps(coco))
    return [*CLI, "train", "MaskRCNN-EfficientNetB2B", "--train-data-roots", str(data),
            "--val-data-roots", str(tmp_path / "missing"), "--output", str(tmp_path / "run"),
            "--workers", "0"]  # fmt: skip


def test_the_formatter_writes_iso_utc_time_level_logger_and_message() -> None:
    record = logging.LogRecord("instseg.x", logging.WARNING, __file__, 1, "%d ✓", (3,), None)
    record.created = 1796072400.123456  # 2026-11-30 21:00:00.123 UTC
    entry = json.loads(JsonFormatter().format(record))
    assert entry == {
        "time": "2026-11-30T21:00:00.123Z",
        "level": "WARNING",
        "logger": "instseg.x",
        "message": "3 ✓",
    }


def test_in_a_pod_warnings_and_the_error_are_json_lines(dataset_copy, tmp_path) -> None:
    cmd = _train_with_a_warning_then_an_error(dataset_copy, tmp_path)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    entries = _json_lines(done.stderr)
    warning = next(e for e in entries if e["logger"] == "instseg_trainer.data.coco")
    assert warning["level"] == "WARNING"
    assert "skipped 1 bad annotation(s)" in warning["message"]
    error = entries[-1]
    assert error["level"] == "ERROR" and error["logger"] == "instseg"
    assert error["message"].startswith("instseg train: error: dataset root '")
    assert "missing' does not exist" in error["message"]


def test_on_a_terminal_the_human_format_and_the_plain_error(dataset_copy, tmp_path) -> None:
    code, stderr = _on_a_terminal(_train_with_a_warning_then_an_error(dataset_copy, tmp_path))
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert any(
        line.startswith("WARNING instseg_trainer.data.coco: ") and "skipped 1" in line
        for line in lines
    ), stderr
    assert lines[-1].startswith("instseg train: error: dataset root '"), stderr
    assert "{" not in stderr


def test_a_usage_error_is_a_json_line_in_a_pod_and_argparses_on_a_terminal() -> None:
    cmd = [*CLI, "train", "MaskRCNN-ResNet50", "--epochs", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    (entry,) = _json_lines(done.stderr)
    assert entry["message"] == "instseg train: error: argument --epochs: must be > 0, got 0"
    code, stderr = _on_a_terminal(cmd)
    assert code == 2
    assert stderr.startswith("usage: instseg train")
    assert stderr.strip().endswith("instseg train: error: argument --epochs: must be > 0, got 0")


def test_python_warnings_torchs_loggers_and_a_crash_are_json_lines_too() -> None:
    script = (
        "import logging, warnings\n"
        "from instseg_trainer.logs import configure_logging\n"
        "configure_logging()\n"
        "warnings.warn('a deprecated thing')\n"
        "logging.getLogger('torch.distributed.run').warning('torchrun says\\nsomething')\n"
        "raise RuntimeError('CUDA out of memory')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1  # as for any uncaught exception
    warning, torch_warning, crash = _json_lines(done.stderr)
    assert warning["logger"] == "py.warnings" and "a deprecated thing" in warning["message"]
    assert torch_warning["logger"] == "torch.distributed.run"
    assert torch_warning["message"] == "torchrun says\nsomething"
    assert crash["level"] == "CRITICAL"
    assert crash["message"] == "RuntimeError: CUDA out of memory"
    assert "Traceback" in crash["exception"]


def test_the_launchers_lines_and_its_workers_are_json(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "instseg_trainer.launch", "--standalone", "--nproc-per-node", "2",
        "--max-restarts", "0", "-m", "instseg_trainer.cli", "train", "MaskRCNN-EfficientNetB2B",
        "--train-data-roots", str(tmp_path / "missing"), "--val-data-roots", str(tmp_path),
        "--output", str(tmp_path / "run"),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    entries = _json_lines(done.stderr)
    loggers = {e["logger"] for e in entries}
    assert any(name.startswith("torch.distributed") for name in loggers)  # torchrun's own
    # bad input: the launcher adds no report of its own, the trainer's error is what counts
    assert "instseg_trainer.launch" not in loggers
    assert any("instseg train: error: dataset root" in e["message"] for e in entries)
