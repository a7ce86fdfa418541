"""COCO import, transforms and sampling: what the model is trained on is what was annotated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from instseg_trainer.data.coco import CocoSubset, load_coco_subset
from instseg_trainer.data.dataset import InstanceSegDataset
from instseg_trainer.data.roots import load_roots
from instseg_trainer.data.sampler import EpochSampler
from instseg_trainer.data.transforms import fitted_size, transform_instances
from instseg_trainer.errors import DataError
from instseg_trainer.sample_data import write_sample_dataset


def test_import_keeps_dataset_ids_and_all_mask_kinds(sample_root: Path) -> None:
    train = load_coco_subset(sample_root, "train")
    raw = json.loads((sample_root / "annotations" / "instances_train.json").read_text())
    assert train.class_names == ["circle", "rectangle", "triangle"]
    assert train.category_ids == [1, 2, 4]  # the dataset's own, non-contiguous ids
    assert sorted(r.image_id for r in train.records) == sorted(i["id"] for i in raw["images"])
    instances = [inst for r in train.records for inst in r.instances]
    assert len(instances) == len(raw["annotations"])
    assert any(inst.polygons for inst in instances)
    assert any(inst.rle is not None and not inst.crowd for inst in instances)
    assert any(inst.crowd for inst in instances)
    by_id = {a["id"]: a for a in raw["annotations"]}
    for inst in instances:
        ann = by_id[inst.annotation_id]
        assert train.category_ids[inst.label] == ann["category_id"]
        assert inst.crowd == bool(ann["iscrowd"])


def test_ground_truth_round_trips_the_annotations(sample_root: Path) -> None:
    val = load_coco_subset(sample_root, "val")
    gt = val.ground_truth()
    raw = json.loads((sample_root / "annotations" / "instances_val.json").read_text())
    assert {a["id"] for a in gt["annotations"]} == {a["id"] for a in raw["annotations"]}
    raw_by_id = {a["id"]: a for a in raw["annotations"]}
    sizes = {i["id"]: (i["height"], i["width"]) for i in raw["images"]}
    for ann in gt["annotations"]:
        h, w = sizes[ann["image_id"]]
        ours = mask_utils.decode(mask_utils.merge(_rles(ann["segmentation"], h, w)))
        theirs = mask_utils.decode(
            mask_utils.merge(_rles(raw_by_id[ann["id"]]["segmentation"], h, w))
        )
        assert np.array_equal(ours, theirs)
        assert ann["area"] == raw_by_id[ann["id"]]["area"]


ANNOTATIONS = ("annotations", "instances_train.json")


@pytest.fixture
def second_root(tmp_path: Path) -> Path:
    """Another sample dataset of the same classes (5 train images, other shapes)."""
    root = tmp_path / "second"
    write_sample_dataset(root, num_train=5, num_val=3, seed=8)
    return root


def test_several_roots_are_one_subset_with_unique_ids(
    sample_root: Path, second_root: Path, monkeypatch
) -> None:
    monkeypatch.chdir(second_root.parent)
    merged = load_roots([sample_root, Path("second")], "train")  # a relative root too
    first, second = load_coco_subset(sample_root, "train"), load_coco_subset(second_root, "train")
    assert merged.annotation_files == (first.annotation_file, Path("second", *ANNOTATIONS))
    assert (merged.class_names, merged.category_ids) == (first.class_names, first.category_ids)
    assert [r.path for r in merged.records] == [r.path for r in first.records + second.records]
    assert all(r.path.is_absolute() and r.path.is_file() for r in merged.records)
    count = len(first.records) + len(second.records)
    assert [r.image_id for r in merged.records] == list(range(1, count + 1))
    instances = [i for r in merged.records for i in r.instances]
    assert len({i.annotation_id for i in instances}) == len(instances)
    gt = merged.ground_truth()
    # the ground truth is the union of both files', under the new ids
    assert len(gt["images"]) == count
    assert len(gt["annotations"]) == len(first.ground_truth()["annotations"]) + len(
        second.ground_truth()["annotations"]
    )
    images = {i["id"]: i for i in gt["images"]}
    by_id = {a["id"]: a for a in gt["annotations"]}
    for record in merged.records:
        assert images[record.image_id]["file_name"] == str(record.path)
        for inst in record.instances:
            assert by_id[inst.annotation_id]["image_id"] == record.image_id
            assert merged.category_ids[inst.label] == by_id[inst.annotation_id]["category_id"]


def _as_loaded(subset: CocoSubset) -> tuple:
    records = [
        (
            r.image_id,
            r.path,
            r.width,
            r.height,
            [(i.label, i.box, i.annotation_id) for i in r.instances],
        )
        for r in subset.records
    ]
    return subset.name, subset.annotation_files, subset.class_names, records, subset.raw


def test_one_root_is_loaded_as_before(sample_root: Path) -> None:
    one = load_roots([sample_root], "val")
    assert _as_loaded(one) == _as_loaded(load_coco_subset(sample_root, "val"))


def test_roots_with_other_categories_are_refused_naming_both(
    sample_root: Path, second_root: Path
) -> None:
    path = second_root.joinpath(*ANNOTATIONS)
    coco = json.loads(path.read_text())
    coco["categories"][0]["name"] = "ellipse"
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError) as refused:
        load_roots([sample_root, second_root], "train")
    message = str(refused.value)
    assert str(sample_root.joinpath(*ANNOTATIONS)) in message
    assert str(path) in message
    assert "(1, 'circle')" in message and "(1, 'ellipse')" in message


def test_a_root_given_twice_is_refused(sample_root: Path) -> None:
    with pytest.raises(DataError, match="more than once"):
        load_roots([sample_root, sample_root / ".." / sample_root.name], "train")


def _rles(segmentation, h: int, w: int) -> list:
    if isinstance(segmentation, list):
        return mask_utils.frPyObjects(segmentation, h, w)
    if isinstance(segmentation["counts"], list):
        return [mask_utils.frPyObjects(segmentation, h, w)]
    return [segmentation]


@pytest.mark.parametrize("flip", [False, True])
def test_resize_and_flip_keep_masks_and_boxes_aligned(sample_root: Path, flip: bool) -> None:
    train = load_coco_subset(sample_root, "train")
    record = next(r for r in train.records if len(r.instances) >= 2)
    size = fitted_size(record.height, record.width, 96)
    boxes, labels, masks = transform_instances(
        record.instances, (record.height, record.width), size, flip
    )
    assert masks.shape[1:] == size
    reference = [i for i in record.instances if not i.crowd]
    for box, mask in zip(boxes, masks):
        ys, xs = np.nonzero(mask)
        assert len(xs) > 0
        # the rasterised mask lies inside its (transformed) box, give or take a pixel
        assert xs.min() >= box[0] - 1.5 and xs.max() <= box[2] + 0.5
        assert ys.min() >= box[1] - 1.5 and ys.max() <= box[3] + 0.5
    unflipped = transform_instances(record.instances, (record.height, record.width), size, False)
    if flip:
        mirrored = unflipped[2][:, :, ::-1]
        agreement = (mirrored == masks).mean()
        assert agreement > 0.99
        np.testing.assert_allclose(boxes[:, 0], size[1] - unflipped[0][:, 2], atol=1e-4)
    assert np.array_equal(labels, np.array([i.label for i in reference]))


def test_rle_object_is_resized_not_lost(sample_root: Path) -> None:
    train = load_coco_subset(sample_root, "train")
    record = next(
        r for r in train.records if any(i.rle is not None and not i.crowd for i in r.instances)
    )
    inst = next(i for i in record.instances if i.rle is not None and not i.crowd)
    full = mask_utils.decode(inst.rle)
    size = fitted_size(record.height, record.width, 64)
    _, _, masks = transform_instances((inst,), (record.height, record.width), size, False)
    scale = (size[0] * size[1]) / (record.height * record.width)
    assert masks[0].sum() == pytest.approx(full.sum() * scale, rel=0.2)


def test_dataset_item_is_resized_to_input_size_and_drops_crowd(sample_root: Path) -> None:
    train = load_coco_subset(sample_root, "train")
    dataset = InstanceSegDataset(train.records, 128)
    for index, record in enumerate(train.records):
        image, target, meta = dataset[(index, True)]
        assert image.dtype == torch.uint8 and max(image.shape[1:]) == 128
        assert target["masks"].shape[1:] == image.shape[1:]
        assert len(target["boxes"]) == sum(not i.crowd for i in record.instances)
        assert (target["labels"] >= 1).all()  # 0 is torchvision's background
        assert meta["original_size"] == (record.height, record.width)


def test_sampler_is_deterministic_resumable_and_shards_cover_everything() -> None:
    sampler = EpochSampler(10, train=True, seed=7)
    sampler.set_epoch(3)
    first = list(sampler)
    sampler.set_epoch(3)
    assert list(sampler) == first
    sampler.set_epoch(3, skip=4)
    assert list(sampler) == first[4:]
    sampler.set_epoch(4)
    assert list(sampler) != first
    assert sorted(i for i, _ in first) == list(range(10))
    shards = [EpochSampler(10, train=True, seed=7, num_replicas=3, rank=r) for r in range(3)]
    for s in shards:
        s.set_epoch(3)
    seen = [i for s in shards for i, _ in s]
    assert len(seen) == 12 and set(seen) == set(range(10))  # padded to equal length per rank
    evals = [list(EpochSampler(10, train=False, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(i for part in evals for i in part) == list(range(10))  # no duplicates
