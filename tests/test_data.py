"""COCO import, transforms and sampling: what the model is trained on is what was annotated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from instseg_trainer.data.coco import load_coco_subset
from instseg_trainer.data.dataset import InstanceSegDataset
from instseg_trainer.data.sampler import EpochSampler
from instseg_trainer.data.transforms import fitted_size, transform_instances


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
