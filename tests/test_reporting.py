import dataclasses
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instseg_trainer.reporting.curves import plot_curves
from instseg_trainer.reporting.events import Epoch, Event, Final, Iteration, Start, Validation
from instseg_trainer.reporting.overlay import draw_overlay
from instseg_trainer.reporting.reporters import (
    METRICS_FILENAME,
    JsonLinesReporter,
    MetricsFileReporter,
    MultiReporter,
    TerminalReporter,
    make_reporters,
)

START = Start(
    time="2026-11-30T10:00:00.000Z",
    template="MaskRCNN-ResNet50",
    total_epochs=3,
    iterations_per_epoch=10,
    train_images=40,
    val_images=8,
    classes=["cell"],
    device="cpu",
    world_size=1,
    output="/out",
    resumed_at_iteration=0,
    batch_size=4,
)


def iteration_event(iteration: int, loss: float = 1.0) -> Iteration:
    return Iteration(
        time=f"2026-11-30T10:00:{iteration % 60:02d}.000Z",
        epoch=(iteration - 1) // 10 + 1,
        total_epochs=3,
        iteration=iteration,
        epoch_iteration=(iteration - 1) % 10 + 1,
        iterations_per_epoch=10,
        loss=loss,
        losses={"loss_classifier": loss / 2, "loss_mask": loss / 4},
        learning_rate=0.002 * iteration / 30,
        images_per_second=4.1,
        eta_seconds=192.0,
    )


def epoch_event(epoch: int) -> Epoch:
    return Epoch(
        time="2026-11-30T10:05:00.000Z",
        epoch=epoch,
        total_epochs=3,
        iteration=epoch * 10,
        loss=1.0 / epoch,
        learning_rate=0.002,
        seconds=61.0,
    )


def validation_event(epoch: int, segm_map: float) -> Validation:
    return Validation(
        time="2026-11-30T10:05:01.000Z",
        epoch=epoch,
        total_epochs=3,
        iteration=epoch * 10,
        metrics={
            "segm": {"map": segm_map, "map50": segm_map + 0.2, "map75": segm_map - 0.1},
            "bbox": {"map": segm_map + 0.05, "map50": 0.7, "map75": 0.4},
            "f_measure": {"best": {"f_measure": 0.61, "threshold": 0.45}},
        },
        best={"epoch": epoch, "segm_map": segm_map},
        improved=True,
        learning_rate=0.002,
        seconds=4.0,
    )


FINAL = Final(
    time="2026-11-30T11:00:00.000Z",
    status="early_stopped",
    epochs=2,
    iteration=20,
    best={"epoch": 2, "segm_map": 0.42},
    best_checkpoint="/out/best.pth",
    last_checkpoint="/out/last.pth",
    wall_seconds=3725.0,
)


def as_json(events: list[Event]) -> list[dict]:
    """Events as their JSON lines read back."""
    return [json.loads(json.dumps(event.to_dict())) for event in events]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class BrokenReporter:
    def report(self, event: Event) -> None:
        raise ConnectionError("API server unreachable")

    def close(self) -> None:
        raise ConnectionError("API server unreachable")


class RecordingReporter:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.closed = False

    def report(self, event: Event) -> None:
        self.events.append(event)

    def close(self) -> None:
        self.closed = True


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_file_holds_every_event_and_a_restart_appends(tmp_path: Path) -> None:
    path = tmp_path / "out" / METRICS_FILENAME
    first_run = [START, iteration_event(1), epoch_event(1)]
    reporter = MetricsFileReporter(path)
    for event in first_run:
        reporter.report(event)
    # Readable before close: a crash right now must lose nothing.
    assert read_jsonl(path) == as_json(first_run)
    reporter.close()

    resumed = MetricsFileReporter(path)
    resumed.report(iteration_event(11))
    resumed.close()

    assert read_jsonl(path) == as_json([*first_run, iteration_event(11)])


def test_metrics_file_after_a_torn_line_starts_a_new_line(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILENAME
    path.write_text(json.dumps(START.to_dict()) + '\n{"event": "itera')
    reporter = MetricsFileReporter(path)
    reporter.report(iteration_event(1))
    reporter.close()

    assert json.loads(path.read_text().splitlines()[-1]) == as_json([iteration_event(1)])[0]


def test_json_lines_reporter_writes_one_compact_object_per_line() -> None:
    stream = io.StringIO()
    reporter = JsonLinesReporter(stream)
    events = [START, iteration_event(1), dataclasses.replace(iteration_event(2), loss=math.nan)]
    for event in events:
        reporter.report(event)
    reporter.close()

    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert [json.loads(line) for line in lines[:2]] == as_json(events[:2])
    # Strict JSON: a diverged (NaN) loss is written as null, not as the invalid token NaN.
    assert json.loads(lines[2])["loss"] is None
    assert "NaN" not in lines[2]


def test_failing_reporter_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    recorder = RecordingReporter()
    multi = MultiReporter([BrokenReporter(), recorder])
    with caplog.at_level(logging.WARNING):
        for event in [START, iteration_event(1), FINAL]:
            multi.report(event)
        multi.close()

    assert recorder.events == [START, iteration_event(1), FINAL]
    assert recorder.closed
    assert len([r for r in caplog.records if "BrokenReporter" in r.getMessage()]) == 1


def test_make_reporters_writes_json_lines_when_stream_is_not_a_terminal(tmp_path: Path) -> None:
    stream = io.StringIO()
    reporter = make_reporters(tmp_path, stream=stream)
    reporter.report(START)
    reporter.report(iteration_event(1))
    reporter.close()

    events = as_json([START, iteration_event(1)])
    assert [json.loads(line) for line in stream.getvalue().splitlines()] == events
    assert read_jsonl(tmp_path / METRICS_FILENAME) == events


def test_make_reporters_draws_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    stream = FakeTerminal()
    reporter = make_reporters(tmp_path, stream=stream)
    reporter.report(iteration_event(5))
    reporter.close()

    output = stream.getvalue()
    assert output.startswith("\r")
    assert "epoch 1/3" in output
    assert read_jsonl(tmp_path / METRICS_FILENAME) == as_json([iteration_event(5)])


def test_terminal_reporter_shows_progress_summaries_and_final(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    stream = FakeTerminal()
    reporter = TerminalReporter(stream)
    for event in [
        START,
        iteration_event(4, loss=1.234),
        epoch_event(1),
        validation_event(1, 0.412),
        FINAL,
    ]:
        reporter.report(event)
    reporter.close()
    output = stream.getvalue()

    bar = output.split("\r")[1]
    assert "epoch 1/3 [####------]  40% it 4/10 loss 1.234" in bar
    assert "lr 2.7e-04 4.1 img/s ETA 3m12s" in bar
    assert "segm mAP 0.412 mAP50 0.612 | bbox mAP 0.462 | F1 0.610 @ 0.45" in output
    assert "best segm mAP 0.412 (epoch 1)" in output
    assert "stopped early" in output
    assert "1h02m" in output


def test_terminal_progress_bar_fits_the_terminal_width_and_keeps_the_eta(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    stream = FakeTerminal()
    reporter = TerminalReporter(stream)
    reporter.report(iteration_event(1))
    reporter.report(iteration_event(2))

    redraws = stream.getvalue().split("\r")[1:]
    assert len(redraws) == 2
    assert all(len(line) < 60 for line in redraws)
    assert "loss 1.000" in redraws[1] and "ETA 3m12s" in redraws[1]

    monkeypatch.setenv("COLUMNS", "20")
    reporter.report(iteration_event(3))
    assert len(stream.getvalue().split("\r")[-1]) < 20


def write_jsonl(path: Path, events: list) -> None:
    path.write_text("".join(json.dumps(event.to_dict()) + "\n" for event in events))


def assert_is_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 0 and image.height > 0


def test_plot_curves_handles_a_resumed_run(tmp_path: Path) -> None:
    first_run = [START] + [iteration_event(i) for i in range(1, 16)] + [epoch_event(1)]
    first_run.append(validation_event(1, 0.2))
    # Crashed at iteration 15, resumed from the epoch-1 checkpoint: 11..15 are logged again.
    resumed = [START] + [iteration_event(i, loss=0.5) for i in range(11, 31)]
    resumed += [epoch_event(2), validation_event(2, 0.3), epoch_event(3)]
    metrics = tmp_path / METRICS_FILENAME
    write_jsonl(metrics, first_run + resumed)

    out = plot_curves(metrics, tmp_path / "plots" / "curves.png")

    assert out == tmp_path / "plots" / "curves.png"
    assert_is_png(out)
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]


def test_plot_curves_without_validation_or_iterations_yet(tmp_path: Path) -> None:
    metrics = tmp_path / METRICS_FILENAME
    write_jsonl(metrics, [START, iteration_event(1), iteration_event(2)])
    assert_is_png(plot_curves(metrics, tmp_path / "early.png"))

    write_jsonl(metrics, [START])
    assert_is_png(plot_curves(metrics, tmp_path / "start-only.png"))


def test_plot_curves_replaces_an_existing_png(tmp_path: Path) -> None:
    metrics = tmp_path / METRICS_FILENAME
    out = tmp_path / "curves.png"
    out.write_bytes(b"stale")
    write_jsonl(metrics, [START, iteration_event(1)])

    plot_curves(metrics, out)

    assert_is_png(out)


def test_draw_overlay_colours_masks_and_leaves_the_background() -> None:
    image = np.full((120, 160, 3), 100, dtype=np.uint8)
    masks = np.zeros((2, 120, 160), dtype=bool)
    masks[0, 40:80, 20:60] = True
    masks[1, 50:100, 100:140] = True
    boxes = np.array([[20, 40, 60, 80], [100, 50, 140, 100]], dtype=np.float32)

    overlay = draw_overlay(image, boxes, ["cell", "cell"], np.array([0.93, 0.51]), masks)

    assert overlay.size == (160, 120)
    pixels = np.asarray(overlay)
    assert not np.array_equal(pixels[60, 40], image[60, 40])
    assert not np.array_equal(pixels[75, 120], image[75, 120])
    assert not np.array_equal(pixels[60, 40], pixels[75, 120])
    assert np.array_equal(pixels[110, 80], image[110, 80])
    assert np.array_equal(image, np.full((120, 160, 3), 100, dtype=np.uint8))


def test_draw_overlay_keeps_tags_inside_the_image_at_the_border() -> None:
    image = np.zeros((40, 50, 3), dtype=np.uint8)
    boxes = np.array([[30, 0, 50, 20]], dtype=np.float32)

    overlay = draw_overlay(image, boxes, ["nucleus"], np.array([0.8]), masks=None)

    assert overlay.size == (50, 40)
    # The tag is pushed left into the image (the box itself never reaches x < 30).
    assert np.asarray(overlay)[0:10, 0:30].any()
    assert np.array_equal(np.asarray(overlay)[30:, :20], image[30:, :20])


def test_draw_overlay_rejects_probability_masks() -> None:
    image = np.zeros((10, 10, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="masks > 0.5"):
        draw_overlay(
            image,
            np.array([[0, 0, 5, 5]]),
            ["a"],
            np.array([0.9]),
            np.full((1, 10, 10), 0.7, dtype=np.float32),
        )
