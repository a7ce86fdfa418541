"""Data as users keep it: the COCO 2017 layout, one COCO file beside its images, Datumaro's
other instance formats (detected, converted in memory), a val split when no val root is
given, and one clear line for a root that holds no instance masks."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from instseg_trainer.cli import main
from instseg_trainer.data.coco import CocoSubset
from instseg_trainer.data.formats import export_coco_as
from instseg_trainer.data.roots import load_roots, load_train_val
from instseg_trainer.errors import DataError
from instseg_trainer.sample_data import write_sample_dataset

# formats whose Datumaro export and import keep every instance (Cityscapes' keeps one mask
# per class for classes outside its own label map: tested apart)
LOSSLESS_FORMATS = ("voc_instance_segmentation", "label_me", "cvat", "datumaro")


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    write_sample_dataset(root, num_train=8, num_val=4, seed=5, min_size=64, max_size=96)
    return root


def _masks_by_image(data: CocoSubset) -> dict[str, list[tuple[str, int]]]:
    """Per image file stem: each non-crowd instance as (class name, mask area), sorted."""
    found: dict[str, list[tuple[str, int]]] = {}
    for record in data.records:
        gt = {a["id"]: a for a in data.ground_truth()["annotations"]}
        instances = []
        for inst in record.instances:
            if inst.crowd:
                continue
            segmentation = gt[inst.annotation_id]["segmentation"]
            if isinstance(segmentation, list):  # polygons
                rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, record.height,
                                                              record.width))  # fmt: skip
            elif isinstance(segmentation["counts"], list):  # uncompressed RLE
                rle = mask_utils.frPyObjects(segmentation, record.height, record.width)
            else:
                rle = segmentation
            instances.append((data.class_names[inst.label], int(mask_utils.area(rle))))
        found[record.path.stem.replace("_leftImg8bit", "")] = sorted(instances)
    return found


@pytest.mark.parametrize("fmt", LOSSLESS_FORMATS)
def test_a_datumaro_format_is_detected_and_reads_as_its_coco_source(
    coco_root: Path, tmp_path: Path, fmt: str
) -> None:
    export_coco_as(coco_root, tmp_path / fmt, fmt)
    for subset in ("train", "val"):
        source, converted = load_roots([coco_root], subset), load_roots([tmp_path / fmt], subset)
        assert sorted(converted.class_names) == sorted(source.class_names)  # no "background"
        expected, got = _masks_by_image(source), _masks_by_image(converted)
        assert got.keys() == expected.keys()
        for image, instances in expected.items():  # same classes, masks within a pixel row
            assert [name for name, _ in got[image]] == [name for name, _ in instances], image
            assert np.allclose([a for _, a in got[image]], [a for _, a in instances], atol=40)


def test_cityscapes_reads_without_its_background_label(coco_root: Path, tmp_path: Path) -> None:
    export_coco_as(coco_root, tmp_path / "cityscapes", "cityscapes")
    train = load_roots([tmp_path / "cityscapes"], "train")
    assert sorted(train.class_names) == ["circle", "rectangle", "triangle"]
    assert len(train.records) == 8 and train.ground_truth()["annotations"]


def test_the_coco_2017_layout_trains_without_moving_a_file(coco_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "coco2017"
    (root / "annotations").mkdir(parents=True)
    for subset in ("train", "val"):
        shutil.copy(coco_root / "annotations" / f"instances_{subset}.json",
                    root / "annotations" / f"instances_{subset}2017.json")  # fmt: skip
        shutil.copytree(coco_root / "images" / subset, root / f"{subset}2017")
    train, val = load_train_val([root], [root])
    assert (train.name, val.name) == ("train2017", "val2017")
    assert len(train.records) == 8 and len(val.records) == 4
    assert all(r.path.parent == root / "train2017" for r in train.records)


def _single_file_root(coco_root: Path, target: Path, prefix: str) -> Path:
    """labelme2coco's layout: annotations.json + JPEGImages/, file names with `prefix`."""
    data = json.loads((coco_root / "annotations" / "instances_train.json").read_text())
    for image in data["images"]:
        image["file_name"] = prefix + Path(image["file_name"]).name
    shutil.copytree(coco_root / "images" / "train", target / "JPEGImages")
    (target / "annotations.json").write_text(json.dumps(data))
    return target


@pytest.mark.parametrize("prefix", ["", "JPEGImages/"])
def test_one_coco_file_beside_its_images_is_a_root(
    coco_root: Path, tmp_path: Path, prefix: str
) -> None:
    root = _single_file_root(coco_root, tmp_path / "export", prefix)
    expected = _masks_by_image(load_roots([coco_root], "train"))
    for given in (root, root / "annotations.json"):  # the folder, or the file itself
        data = load_roots([given], "train")
        assert _masks_by_image(data) == expected
        assert all(r.path.parent == root / "JPEGImages" for r in data.records)


def test_without_a_val_root_a_fixed_fifth_of_train_validates(
    coco_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        train, val = load_train_val([coco_root], [])
    assert len(val.records) == 1 and len(train.records) == 7  # 20% of 8, at least one
    ids = {r.image_id for r in train.records}
    assert ids.isdisjoint(r.image_id for r in val.records)
    assert val.ground_truth()["images"] == [
        i for i in train.raw["images"] if i["id"] == val.records[0].image_id
    ]
    again = load_train_val([coco_root], [])[1]
    assert [r.image_id for r in again.records] == [r.image_id for r in val.records]
    assert "the val set is 1 of the 8 train images" in caplog.text


def test_a_root_without_instance_masks_is_named_with_the_formats_tried(
    coco_root: Path, tmp_path: Path
) -> None:
    export_coco_as(coco_root, tmp_path / "boxes", "voc_detection")  # boxes, no masks
    with pytest.raises(DataError, match="no instance masks or polygons"):
        load_roots([tmp_path / "boxes"], "train")
    (tmp_path / "pictures").mkdir()
    shutil.copy(next((coco_root / "images" / "train").iterdir()), tmp_path / "pictures")
    with pytest.raises(DataError) as refused:
        load_roots([tmp_path / "pictures"], "train")
    assert str(tmp_path / "pictures") in str(refused.value)
    assert "voc_instance_segmentation" in str(refused.value) and "cvat" in str(refused.value)


def test_train_runs_on_a_voc_root_without_a_val_root(
    coco_root: Path, tmp_path: Path, capsys
) -> None:
    assert main(["sample-data", str(tmp_path / "voc"), "--format", "voc_instance_segmentation",
                 "--train-images", "6", "--val-images", "2"]) == 0  # fmt: skip
    code = main([
        "train", "MaskRCNN-EfficientNetB2B", "--train-data-roots", str(tmp_path / "voc"),
        "--output", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "2",
        "--input-size", "64", "--backbone-weights", "none", "--workers", "0",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    start = next(e for e in events if e["event"] == "start")
    assert start["classes"] == ["circle", "rectangle", "triangle"]
    assert (start["train_images"], start["val_images"]) == (5, 1)
    assert any(e["event"] == "validation" for e in events)


def test_labelme2cocos_unused_background_category_is_no_class(
    coco_root: Path, tmp_path: Path
) -> None:
    root = _single_file_root(coco_root, tmp_path / "labelme", "JPEGImages/")
    data = json.loads((root / "annotations.json").read_text())
    data["categories"].insert(0, {"id": 0, "name": "_background_", "supercategory": None})
    (root / "annotations.json").write_text(json.dumps(data))
    loaded = load_roots([root], "train")
    assert loaded.class_names == ["circle", "rectangle", "triangle"]
    assert _masks_by_image(loaded) == _masks_by_image(load_roots([coco_root], "train"))
