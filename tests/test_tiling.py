"""Tiling for small objects in large images: the tiles, their size from the objects, objects
cut to a tile for training, detections of overlapping tiles merged into the image, and a
training and evaluation through tiles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from instseg_trainer.cli import main
from instseg_trainer.data.coco import ImageRecord, Instance
from instseg_trainer.data.roots import load_roots
from instseg_trainer.data.tiling import Tiling, auto_tiling, choose_tiling, tile_records
from instseg_trainer.data.transforms import transform_instances
from instseg_trainer.engine.checkpoint import load_checkpoint
from instseg_trainer.errors import DataError
from instseg_trainer.evaluation.tiled import merge_tiles
from instseg_trainer.sample_data import write_sample_dataset


def test_tiles_cover_the_image_with_the_overlap_and_end_at_its_edges() -> None:
    windows = Tiling(400, 0.2).windows(600, 1000)
    assert sorted({w[0] for w in windows}) == [0, 320, 600]
    assert sorted({w[1] for w in windows}) == [0, 200]
    assert all(w[2] - w[0] == 400 and w[3] - w[1] == 400 for w in windows)
    assert max(w[2] for w in windows) == 1000 and max(w[3] for w in windows) == 600
    assert Tiling(400, 0.2).windows(300, 350) == [(0, 0, 350, 300)]
    with pytest.raises(DataError, match="overlap"):
        Tiling(400, 0.9)


def _record(width: int, height: int, boxes: list[tuple[float, float, float, float]]):
    instances = tuple(
        Instance(label=0, box=box, annotation_id=i,
                 polygons=(np.array([[box[0], box[1]], [box[2], box[1]], [box[2], box[3]],
                                     [box[0], box[3]]], dtype=np.float64),))
        for i, box in enumerate(boxes, start=1)
    )  # fmt: skip
    return ImageRecord(1, Path("x.png"), width, height, instances)


def test_the_tile_size_follows_the_objects_as_otx_sizes_it() -> None:
    small = [_record(2000, 1500, [(100, 100, 130, 130), (500, 500, 540, 540)])] * 3
    tiling = auto_tiling(small, input_size=512)
    assert tiling is not None and 500 <= tiling.size <= 620  # objects of ~35 px → 32 px
    assert 0.2 <= tiling.overlap <= 0.5
    large = [_record(600, 400, [(0, 0, 300, 300)])]
    assert auto_tiling(large, input_size=512) is None
    assert choose_tiling("auto", None, large, 512) is None
    assert choose_tiling("on", None, large, 512) == Tiling(300, 0.2)  # 2 x 2 when asked
    assert choose_tiling("off", None, small, 512) is None


def test_objects_are_cut_to_their_tile_and_those_outside_dropped() -> None:
    record = _record(200, 100, [(90, 10, 130, 50), (150, 60, 190, 90)])
    window = (0, 0, 100, 100)  # holds the left 10 px of the first object, none of the second
    boxes, labels, masks = transform_instances(record.instances, (100, 100), (100, 100), False,
                                               window)  # fmt: skip
    assert len(boxes) == 1 and labels.tolist() == [0]
    assert boxes[0].tolist() == pytest.approx([90, 10, 100, 50], abs=1)
    assert 300 <= masks[0].sum() <= 500  # ~10 x 40 px
    tiles = tile_records([record], Tiling(100, 0.0))
    assert tiles[0].window is None and {t.window for t in tiles[1:]} <= {
        (0, 0, 100, 100), (100, 0, 200, 100)}  # fmt: skip
    assert (100, 0, 200, 100) in {t.window for t in tiles}  # both objects' centres lie there


def test_detections_of_overlapping_tiles_merge_into_the_image() -> None:
    mask = torch.zeros((1, 50, 50), dtype=torch.bool)
    mask[0, 10:20, 30:40] = True
    same_object = [  # seen by two tiles whose corners are (0, 0) and (20, 0)
        ({"boxes": torch.tensor([[30.0, 10, 40, 20]]), "scores": torch.tensor([0.9]),
          "labels": torch.tensor([1]), "masks": mask}, (0, 0, 50, 50)),
        ({"boxes": torch.tensor([[10.0, 10, 20, 20]]), "scores": torch.tensor([0.8]),
          "labels": torch.tensor([1]), "masks": mask.roll(-20, dims=2)}, (20, 0, 70, 50)),
    ]  # fmt: skip
    merged = merge_tiles(same_object, (50, 70), nms_thresh=0.5, detections_per_img=100)
    assert merged["boxes"].tolist() == [[30.0, 10, 40, 20]] and merged["scores"].tolist() == [
        pytest.approx(0.9)]  # fmt: skip
    assert merged["masks"].shape == (1, 50, 70)
    assert merged["masks"][0, 10:20, 30:40].all() and merged["masks"][0].sum() == 100


def test_a_training_through_tiles_is_evaluated_on_whole_images(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    write_sample_dataset(data, num_train=4, num_val=2, seed=4, min_size=192, max_size=224,
                         object_scale=0.3, max_objects=6)  # fmt: skip
    code = main([
        "train", "MaskRCNN-EfficientNetB2B", "--train-data-roots", str(data),
        "--val-data-roots", str(data), "--output", str(tmp_path / "run"), "--epochs", "1",
        "--batch-size", "2", "--input-size", "64", "--backbone-weights", "none",
        "--workers", "0", "--tiling", "on", "--tile-size", "96",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    start = next(e for e in events if e["event"] == "start")
    assert start["train_images"] > 4 and start["val_images"] == 2  # tiles, whole images
    assert load_checkpoint(tmp_path / "run" / "best.pt")["tiling"] == {"size": 96, "overlap": 0.2}
    assert main(["eval", "--weights", str(tmp_path / "run" / "best.pt"), "--data-roots",
                 str(data), "--subset", "val", "--output", str(tmp_path / "eval"),
                 "--workers", "0"]) == 0  # fmt: skip
    truth = json.loads((tmp_path / "eval" / "ground_truth.json").read_text())
    val = load_roots([data], "val")
    assert sorted(i["id"] for i in truth["images"]) == sorted(r.image_id for r in val.records)
    _exported_model_tiles_as_the_checkpoint(tmp_path, data)


def _instseg(*args: str) -> None:
    """In its own process, as tests/test_export.py runs ONNX Runtime."""
    done = subprocess.run([sys.executable, "-m", "instseg_trainer.cli", *args],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def _exported_model_tiles_as_the_checkpoint(tmp_path: Path, data: Path) -> None:
    _instseg("export", "--weights", str(tmp_path / "run" / "best.pt"), "--format", "onnx",
             "--output", str(tmp_path / "exported"))  # fmt: skip
    meta = json.loads((tmp_path / "exported" / "model_fp32.onnx.json").read_text())
    assert meta["tiling"] == {"size": 96, "overlap": 0.2} and meta["nms_thresh"] == 0.5
    _instseg("eval", "--weights", str(tmp_path / "exported" / "model_fp32.onnx"),
             "--data-roots", str(data), "--subset", "val", "--output", str(tmp_path / "onnx"),
             "--workers", "0")  # fmt: skip
    ours, theirs = (json.loads((tmp_path / name / "predictions.json").read_text())
                    for name in ("eval", "onnx"))  # fmt: skip
    assert len(theirs) == len(ours)  # the same detections, merged the same way
    top = sorted(p["score"] for p in ours)[-5:]
    assert sorted(p["score"] for p in theirs)[-5:] == pytest.approx(top, abs=1e-3)
