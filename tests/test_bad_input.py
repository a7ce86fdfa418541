"""Every bad input gets one clear message naming the file or field, exit code 2, no traceback."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from instseg_trainer.cli import main
from instseg_trainer.data.coco import load_coco_subset

ANN = Path("annotations") / "instances_train.json"


def _train(capsys, train: Path, val: Path, *extra: str, output: Path | None = None) -> str:
    args = [
        "train", "MaskRCNN-EfficientNetB2B",
        "--train-data-roots", str(train), "--val-data-roots", str(val),
        "--output", str(output or train.parent / "out"),
        "--backbone-weights", "none", "--input-size", "64", "--epochs", "1", "--workers", "0",
        *extra,
    ]  # fmt: skip
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def _edit(root: Path, change) -> None:
    path = root / ANN
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_missing_root(capsys, tmp_path: Path) -> None:
    err = _train(capsys, tmp_path / "nope", tmp_path / "nope")
    assert "nope" in err and "does not exist" in err


def test_root_without_annotations(capsys, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    err = _train(capsys, tmp_path / "empty", tmp_path / "empty")
    assert str(tmp_path / "empty") in err  # the root, and the formats tried
    assert "annotations/instances_*.json" in err and "voc_instance_segmentation" in err


def test_truncated_json_names_file_line_and_column(capsys, dataset_copy: Path) -> None:
    path = dataset_copy / ANN
    path.write_text(path.read_text()[:500])
    err = _train(capsys, dataset_copy, dataset_copy)
    assert str(path) in err and "line" in err and "column" in err and "truncated" in err


def test_json_without_categories_field(capsys, dataset_copy: Path) -> None:
    _edit(dataset_copy, lambda d: d.pop("categories"))
    err = _train(capsys, dataset_copy, dataset_copy)
    assert "'categories'" in err and "instances_train.json" in err


def test_missing_image_file_is_named(capsys, dataset_copy: Path) -> None:
    victim = sorted((dataset_copy / "images" / "train").iterdir())[0]
    victim.unlink()
    err = _train(capsys, dataset_copy, dataset_copy)
    assert victim.name in err and "missing or not readable" in err


def test_unreadable_image_is_named(capsys, dataset_copy: Path) -> None:
    victim = sorted((dataset_copy / "images" / "train").iterdir())[1]
    victim.write_bytes(b"not an image at all")
    err = _train(capsys, dataset_copy, dataset_copy)
    assert victim.name in err


def test_bad_annotations_are_skipped_counted_and_logged(
    dataset_copy: Path, sample_root: Path, caplog
) -> None:
    def damage(data: dict) -> None:
        anns = [a for a in data["annotations"] if isinstance(a["segmentation"], list)]
        anns[0]["segmentation"] = [[1.0, 1.0, 5.0, 5.0]]  # two points
        anns[1]["bbox"] = [10.0, 10.0, 0.0, 7.0]  # zero width
        anns[2]["category_id"] = 99  # not declared
        data["annotations"].append(dict(anns[3], id=10_000, image_id=123_456))  # no such image

    _edit(dataset_copy, damage)
    clean = load_coco_subset(sample_root, "train")
    with caplog.at_level(logging.WARNING):
        subset = load_coco_subset(dataset_copy, "train")
    assert subset.skipped["polygon with fewer than 3 points"] == 1
    assert subset.skipped["zero-area box"] == 1
    assert subset.skipped["unknown category id"] == 1
    assert subset.skipped["annotation for an unknown image id"] == 1
    kept = sum(len(r.instances) for r in subset.records)
    assert kept == sum(len(r.instances) for r in clean.records) - 3
    assert "skipped 4 bad annotation(s)" in caplog.text and "instances_train.json" in caplog.text


def test_train_set_without_objects(capsys, dataset_copy: Path) -> None:
    _edit(dataset_copy, lambda d: d.update(annotations=[]))
    err = _train(capsys, dataset_copy, dataset_copy)
    assert "no usable objects" in err and "instances_train.json" in err


def test_train_and_val_classes_differ(capsys, dataset_copy: Path) -> None:
    path = dataset_copy / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    data["categories"][0]["name"] = "ellipse"
    path.write_text(json.dumps(data))
    err = _train(capsys, dataset_copy, dataset_copy)
    assert "classes differ" in err and "ellipse" in err


def test_unknown_template(capsys, sample_root: Path) -> None:
    code = main(["train", "MaskRCNN-Nope", "--train-data-roots", str(sample_root),
                 "--val-data-roots", str(sample_root)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "unknown template 'MaskRCNN-Nope'" in err
    assert "MaskRCNN-ResNet50" in err


def test_output_not_writable(capsys, sample_root: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = _train(capsys, sample_root, sample_root, output=blocker / "out")
    assert "not writable" in err and "a-file" in err


def test_input_size_not_multiple_of_32(capsys, sample_root: Path, tmp_path: Path) -> None:
    args = ["train", "MaskRCNN-ResNet50", "--train-data-roots", str(sample_root),
            "--val-data-roots", str(sample_root), "--input-size", "100"]  # fmt: skip
    assert main(args) == 2
    assert "multiple of 32" in capsys.readouterr().err


def test_several_subsets_without_the_named_one(capsys, sample_root: Path, tmp_path: Path) -> None:
    code = main(["eval", "--weights", str(tmp_path / "x.pt"), "--data-roots", str(sample_root)])
    assert code == 2
    assert "x.pt" in capsys.readouterr().err  # the missing checkpoint is reported first
    with pytest.raises(Exception, match="several subsets"):
        load_coco_subset(sample_root, "test")


def test_not_a_checkpoint(capsys, tmp_path: Path, sample_root: Path) -> None:
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"garbage")
    code = main(["predict", "--weights", str(bogus), "--input", str(sample_root)])
    err = capsys.readouterr().err
    assert code == 2 and "model.pt" in err and "corrupt" in err


def test_truncated_image_in_a_loader_worker_gives_one_line(capsys, dataset_copy: Path) -> None:
    victim = sorted((dataset_copy / "images" / "train").iterdir())[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # the header still reads; decoding fails
    err = _train(capsys, dataset_copy, dataset_copy, "--workers", "2")
    assert victim.name in err and "cannot be read" in err
    assert len(err.strip().splitlines()) == 1, err


def test_image_size_differs_from_annotation(capsys, dataset_copy: Path) -> None:
    _edit(dataset_copy, lambda d: d["images"][0].update(width=d["images"][0]["width"] + 7))
    err = _train(capsys, dataset_copy, dataset_copy)
    assert "'width'/'height'" in err and "instances_train.json" in err


def test_category_id_zero_is_refused(capsys, dataset_copy: Path) -> None:
    def renumber(data: dict) -> None:
        data["categories"][0]["id"] = 0
        for ann in data["annotations"]:
            if ann["category_id"] == 1:
                ann["category_id"] = 0

    _edit(dataset_copy, renumber)
    err = _train(capsys, dataset_copy, dataset_copy)
    assert "category id 0" in err and "renumber" in err


def test_box_outside_the_image_is_skipped(dataset_copy: Path) -> None:
    _edit(dataset_copy, lambda d: d["annotations"][0].update(bbox=[5000.0, 10.0, 20.0, 20.0]))
    subset = load_coco_subset(dataset_copy, "train")
    assert subset.skipped["box outside the image"] == 1


def test_device_without_cuda(capsys, sample_root: Path) -> None:
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    err = _train(capsys, sample_root, sample_root, "--device", "cuda")
    assert "no CUDA device" in err


def test_an_unknown_recipe_setting_is_refused_with_the_known_ones(
    capsys, sample_root: Path, tmp_path: Path
) -> None:
    err = _train(capsys, sample_root, sample_root, "--set", "hyperparameters.momentom=0.95",
                 output=tmp_path / "out")  # fmt: skip
    assert "unknown setting 'hyperparameters.momentom'" in err
    assert "hyperparameters.momentum" in err and "model.rpn.nms_thresh" in err
    assert not (tmp_path / "out").exists()  # nothing made
