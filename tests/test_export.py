"""`instseg export`: ONNX and OpenVINO IR that eval and predict run as they run a checkpoint,
with the same detections (parity), a self-describing metadata file, and clean refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from instseg_trainer.sample_data import write_sample_dataset

EXPORTS = [("onnx", "fp32"), ("openvino", "fp32"), ("openvino", "fp16")]
# segm mAP the exported model may differ by, on the same images (the parity targets)
MAP_TOLERANCE = {"fp32": 0.005, "fp16": 0.01}


def _cli(*args: str) -> tuple[int, str]:
    """`instseg ARGS` in its own process: ONNX Runtime and OpenVINO (their thread pools) are
    never loaded into the test process, which forks the local cluster's processes later."""
    done = subprocess.run([sys.executable, "-m", "instseg_trainer.cli", *args],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def _train(root: Path, train_images: int, val_images: int, epochs: int) -> tuple[Path, Path]:
    """A model trained on generated shapes at 64 px (data root, its run directory)."""
    data = root / "data"
    write_sample_dataset(data, num_train=train_images, num_val=val_images, seed=3, min_size=64,
                         max_size=96)  # fmt: skip
    code, out = _cli(
        "train", "MaskRCNN-EfficientNetB2B", "--train-data-roots", str(data),
        "--val-data-roots", str(data), "--output", str(root / "run"), "--epochs", str(epochs),
        "--batch-size", "4" if train_images > 8 else "2", "--input-size", "64",
        "--backbone-weights", "none", "--workers", "0",
    )  # fmt: skip
    assert code == 0, out
    return data, root / "run"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small model trained a few epochs."""
    return _train(tmp_path_factory.mktemp("export"), 8, 4, epochs=2)


@pytest.fixture(scope="module")
def accurate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A model trained long enough to find objects (segm mAP about 0.1 on its val images), so
    that accuracy lost by quantization shows."""
    return _train(tmp_path_factory.mktemp("accurate"), 24, 6, epochs=10)


def _eval(weights: Path, data: Path, output: Path) -> tuple[dict, list[dict]]:
    code, out = _cli("eval", "--weights", str(weights), "--data-roots", str(data),
                     "--subset", "val", "--output", str(output), "--batch-size", "1",
                     "--workers", "0")  # fmt: skip
    assert code == 0, out
    metrics = json.loads((output / "metrics.json").read_text())
    return metrics, json.loads((output / "predictions.json").read_text())


def _top_scores(predictions: list[dict], count: int = 20) -> dict[int, list[float]]:
    by_image: dict[int, list[float]] = {}
    for p in predictions:
        by_image.setdefault(p["image_id"], []).append(p["score"])
    return {image: sorted(scores, reverse=True)[:count] for image, scores in by_image.items()}


@pytest.mark.parametrize(("fmt", "precision"), EXPORTS)
def test_an_exported_model_scores_as_the_checkpoint(
    trained: tuple[Path, Path], tmp_path: Path, fmt: str, precision: str
) -> None:
    data, run = trained
    code, out = _cli("export", "--weights", str(run / "best.pt"), "--format", fmt,
                     "--precision", precision, "--output", str(tmp_path / "exported"))  # fmt: skip
    assert code == 0, out
    suffix = ".onnx" if fmt == "onnx" else ".xml"
    model = tmp_path / "exported" / f"model_{precision}{suffix}"
    assert model.is_file() and f"exported {fmt} {precision}: {model}" in out
    reference, expected = _eval(run / "best.pt", data, tmp_path / "eval-pt")
    metrics, predictions = _eval(model, data, tmp_path / "eval-exported")
    for task in ("segm", "bbox"):
        assert abs(metrics[task]["map"] - reference[task]["map"]) <= MAP_TOLERANCE[precision]
    ours, theirs = _top_scores(predictions), _top_scores(expected)
    assert ours.keys() == theirs.keys()
    tolerance = 1e-3 if precision == "fp32" else 5e-2
    for image, scores in theirs.items():  # the same detections, not only the same mAP
        assert np.allclose(ours[image], scores, atol=tolerance), image
    code, out = _cli("predict", "--weights", str(model), "--input", str(data / "images" / "val"),
                     "--output", str(tmp_path / "pred"), "--workers", "0")  # fmt: skip
    assert code == 0, out
    assert len(list((tmp_path / "pred").glob("*.png"))) == 4


def test_the_metadata_makes_the_model_self_describing(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    _, run = trained
    code, _ = _cli("export", "--weights", str(run / "best.pt"), "--format", "onnx",
                   "--output", str(tmp_path))  # fmt: skip
    assert code == 0
    meta = json.loads((tmp_path / "model_fp32.onnx.json").read_text())
    dataset = json.loads((run.parent / "data" / "annotations" / "instances_val.json").read_text())
    assert [(c["name"], c["category_id"]) for c in meta["classes"]] == [
        (c["name"], c["id"]) for c in dataset["categories"]
    ]
    assert [c["label"] for c in meta["classes"]] == [1, 2, 3]
    assert (meta["template"], meta["input_size"], meta["format"]) == (
        "MaskRCNN-EfficientNetB2B", 64, "onnx",
    )  # fmt: skip
    assert meta["onnx_opset"] >= 17 and meta["normalisation"]["mean"] == [0.485, 0.456, 0.406]
    assert "score_threshold" in meta and meta["instseg_version"]
    assert "mask head" in meta["in_graph"] and "paste" in meta["postprocessing"]


def test_a_bad_request_fails_in_one_line_and_leaves_nothing(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    _, run = trained
    output = tmp_path / "out"
    code, said = _cli("export", "--weights", str(run / "best.pt"), "--format", "tflite")
    assert code == 2 and "invalid choice: 'tflite'" in said
    code, said = _cli("export", "--weights", str(run / "best.pt"), "--format", "onnx",
                      "--precision", "fp16", "--output", str(output))  # fmt: skip
    assert code == 2 and "--format openvino --precision fp16" in said
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((run / "best.pt").read_bytes()[:1000])
    code, said = _cli("export", "--weights", str(truncated), "--format", "onnx",
                      "--output", str(output))  # fmt: skip
    assert code == 2 and str(truncated) in said and "Traceback" not in said
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, said = _cli("export", "--weights", str(run / "best.pt"), "--format", "onnx",
                      "--output", str(blocker / "sub"))  # fmt: skip
    assert code == 2 and "not writable" in said
    assert not output.exists() or not any(output.iterdir())


def test_an_export_that_fails_midway_leaves_no_file(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch
) -> None:
    from instseg_trainer.export import exporter

    def broken(model, input_size, path) -> None:
        Path(path).write_bytes(b"half a model")
        raise RuntimeError("killed midway")

    monkeypatch.setattr(exporter, "export_onnx", broken)
    _, run = trained
    with pytest.raises(RuntimeError):
        exporter.export_model(run / "best.pt", "onnx", "fp32", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_last_pt_of_an_unfinished_run_exports_with_a_warning(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    data, _ = trained
    code, out = _cli(
        "train", "MaskRCNN-EfficientNetB2B", "--train-data-roots", str(data),
        "--val-data-roots", str(data), "--output", str(tmp_path / "run"), "--epochs", "2",
        "--batch-size", "2", "--input-size", "64", "--backbone-weights", "none",
        "--workers", "0", "--stop-after-iterations", "5",
    )  # fmt: skip
    assert code == 0, out
    code, said = _cli("export", "--weights", str(tmp_path / "run" / "last.pt"),
                      "--format", "onnx", "--output", str(tmp_path / "exported"))  # fmt: skip
    assert code == 0
    assert "unfinished run (epoch 1)" in said


def test_optimize_quantizes_to_int8_within_the_allowed_drop(
    accurate: tuple[Path, Path], tmp_path: Path
) -> None:
    data, run = accurate
    exported = tmp_path / "exported"
    assert _cli("export", "--weights", str(run / "best.pt"), "--format", "openvino",
                "--output", str(exported))[0] == 0  # fmt: skip
    code, out = _cli("optimize", "--weights", str(exported / "model_fp32.xml"),
                     "--data-roots", str(data), "--output", str(exported))  # fmt: skip
    assert code == 0, out
    meta = json.loads((exported / "model_int8.xml.json").read_text())
    quantization = meta["quantization"]
    assert meta["precision"] == "int8" and quantization["calibration_images"] == 24  # all
    drop = quantization["val_segm_map_fp32"] - quantization["val_segm_map_int8"]
    assert drop <= 0.01 + 1e-9 and "drop" in out
    reference, _ = _eval(run / "best.pt", data, tmp_path / "eval-pt")
    assert reference["segm"]["map"] >= 0.05  # there is accuracy to lose
    metrics, _ = _eval(exported / "model_int8.xml", data, tmp_path / "eval-int8")
    assert abs(metrics["segm"]["map"] - reference["segm"]["map"]) <= 0.02  # the INT8 target


def test_optimize_takes_only_an_fp32_openvino_model(trained: tuple[Path, Path], tmp_path) -> None:
    data, run = trained
    assert _cli("export", "--weights", str(run / "best.pt"), "--format", "onnx",
                "--output", str(tmp_path))[0] == 0  # fmt: skip
    code, said = _cli("optimize", "--weights", str(tmp_path / "model_fp32.onnx"),
                      "--data-roots", str(data), "--output", str(tmp_path))  # fmt: skip
    assert code == 2 and "fp32 OpenVINO IR" in said


def test_train_exports_after_training_and_reports_the_models(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    data, _ = trained
    code, out = _cli(
        "train", "MaskRCNN-EfficientNetB2B", "--train-data-roots", str(data),
        "--val-data-roots", str(data), "--output", str(tmp_path / "run"), "--epochs", "1",
        "--batch-size", "2", "--input-size", "64", "--backbone-weights", "none",
        "--workers", "0", "--export", "onnx,openvino", "--export-precision", "fp16",
    )  # fmt: skip
    assert code == 0, out
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
              .splitlines()]  # fmt: skip
    assert [e["event"] for e in events][-2:] == ["final", "export"]
    artifacts = {a["name"]: a for a in events[-1]["artifacts"]}
    assert set(artifacts) == {"onnx-fp32", "openvino-fp16"}  # ONNX stays fp32
    for artifact in artifacts.values():
        assert Path(artifact["path"]).parent == tmp_path / "run" / "exported"
        assert Path(artifact["path"]).is_file() and 0 <= artifact["valSegmMap"] <= 1
