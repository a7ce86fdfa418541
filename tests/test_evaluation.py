import copy
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from instseg_trainer.evaluation.coco_eval import (
    coco_from_dict,
    encode_masks,
    evaluate,
    to_coco_results,
)
from instseg_trainer.evaluation.f_measure import best_f_measure, f_measure_at

SIZE = 48


def _rect(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def _annotation(ann_id, image_id, category_id, segmentation, rle, iscrowd=0):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "area": float(mask_utils.area(rle)),
        "bbox": mask_utils.toBbox(rle).tolist(),
        "iscrowd": iscrowd,
    }


def _polygon(ann_id, image_id, category_id, polygon):
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], SIZE, SIZE))
    return _annotation(ann_id, image_id, category_id, [polygon], rle)


def _compressed_rle(ann_id, image_id, category_id, mask):
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    return _annotation(ann_id, image_id, category_id, rle, rle)


def _uncompressed_crowd(ann_id, image_id, category_id, mask):
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    segmentation = {"size": [SIZE, SIZE], "counts": counts}
    rle = mask_utils.frPyObjects(segmentation, SIZE, SIZE)
    return _annotation(ann_id, image_id, category_id, segmentation, rle, iscrowd=1)


CROWD_MASK = _rect(2, 14, 30, 46)


@pytest.fixture
def ground_truth() -> dict:
    return {
        "images": [
            {"id": 10, "height": SIZE, "width": SIZE, "file_name": "a.png"},
            {"id": 20, "height": SIZE, "width": SIZE, "file_name": "b.png"},
            {"id": 30, "height": SIZE, "width": SIZE, "file_name": "empty.png"},
        ],
        "categories": [
            {"id": 1, "name": "cat"},
            {"id": 4, "name": "dog"},
            {"id": 7, "name": "bird"},
        ],
        "annotations": [
            _polygon(1, 10, 1, [4, 4, 16, 4, 16, 16, 4, 16]),
            _compressed_rle(2, 10, 4, _rect(24, 40, 26, 44)),
            _polygon(3, 20, 1, [20, 20, 36, 20, 36, 30, 28, 34, 20, 30]),
            _uncompressed_crowd(4, 20, 4, CROWD_MASK),
        ],
    }


def _result(image_id: int, category_id: int, mask: np.ndarray, score: float) -> dict:
    x, y, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask))).tolist()
    (entry,) = to_coco_results(
        image_id,
        np.array([[x, y, x + w, y + h]]),
        np.array([score]),
        np.array([category_id]),
        mask[None],
    )
    return entry


def _perfect_results(ground_truth: dict, score: float, category_ids=(1, 4)) -> list[dict]:
    coco = coco_from_dict(ground_truth)
    return [
        _result(ann["image_id"], ann["category_id"], coco.annToMask(ann), score)
        for ann in ground_truth["annotations"]
        if not ann["iscrowd"] and ann["category_id"] in category_ids
    ]


def test_encode_masks_round_trips_and_is_json_serialisable():
    masks = np.stack([_rect(1, 5, 2, 9), _rect(10, 30, 0, 48)]).astype(bool)

    rles = encode_masks(masks)

    assert [rle["size"] for rle in rles] == [[SIZE, SIZE], [SIZE, SIZE]]
    decoded = mask_utils.decode(json.loads(json.dumps(rles)))
    np.testing.assert_array_equal(decoded.transpose(2, 0, 1), masks)


def test_to_coco_results_converts_boxes_and_serialises():
    results = to_coco_results(
        7,
        np.array([[1.234, 2.0, 11.5, 7.0]], dtype=np.float32),
        np.array([0.75], dtype=np.float32),
        np.array([4]),
        _rect(2, 7, 1, 12)[None],
    )

    assert json.loads(json.dumps(results)) == results
    (entry,) = results
    assert entry["image_id"] == 7 and entry["category_id"] == 4
    assert entry["bbox"] == pytest.approx([1.23, 2.0, 10.27, 5.0])
    assert entry["score"] == pytest.approx(0.75)
    assert mask_utils.area(entry["segmentation"]) == 5 * 11


def test_to_coco_results_without_masks_has_no_segmentation():
    results = to_coco_results(1, np.zeros((2, 4)), np.ones(2), np.array([1, 4]), None)

    assert [set(r) for r in results] == [{"image_id", "category_id", "bbox", "score"}] * 2


def test_perfect_predictions_score_one(ground_truth):
    # A prediction on the crowd region must neither help nor hurt.
    results = [*_perfect_results(ground_truth, 1.0), _result(20, 4, CROWD_MASK, 1.0)]

    metrics = evaluate(ground_truth, results)

    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["map"] == pytest.approx(1.0)
        assert metrics[iou_type]["map50"] == pytest.approx(1.0)
        assert metrics[iou_type]["mar100"] == pytest.approx(1.0)
        # COCOeval divides by (tp + fp + machine epsilon), so "1.0" is only approximately one.
        assert metrics[iou_type]["per_class"] == pytest.approx({"cat": 1, "dog": 1, "bird": None})
        assert best_f_measure(ground_truth, results, iou_type).f_measure == pytest.approx(1.0)


def test_no_predictions_give_zeros(ground_truth):
    metrics = evaluate(ground_truth, [])

    for iou_type in ("bbox", "segm"):
        summary = {k: v for k, v in metrics[iou_type].items() if k != "per_class"}
        assert summary == dict.fromkeys(summary, 0.0)
        assert metrics[iou_type]["per_class"] == {"cat": 0.0, "dog": 0.0, "bird": None}
    score = best_f_measure(ground_truth, [])
    assert (score.f_measure, score.recall, score.threshold) == (0.0, 0.0, 0.1)


def test_one_class_found_gives_expected_partial_scores(ground_truth):
    results = _perfect_results(ground_truth, 0.9, category_ids=(1,))

    segm = evaluate(ground_truth, results, iou_types=("segm",))["segm"]
    score = best_f_measure(ground_truth, results)

    assert segm["per_class"] == pytest.approx({"cat": 1, "dog": 0, "bird": None})
    assert segm["map"] == pytest.approx(0.5)
    assert segm["mar100"] == pytest.approx(0.5)
    # Two of the three non-crowd objects found, no false positives.
    assert score.precision == pytest.approx(1.0)
    assert score.recall == pytest.approx(2 / 3)
    assert score.f_measure == pytest.approx(0.8)


def test_evaluate_equals_pycocotools_on_json_files(ground_truth, tmp_path):
    cat_mask = coco_from_dict(ground_truth).annToMask(ground_truth["annotations"][0])
    results = [
        _result(10, 1, np.roll(cat_mask, 2, axis=1), 0.8),
        _result(10, 4, _rect(26, 40, 26, 40), 0.6),
        _result(10, 1, _rect(24, 40, 26, 44), 0.7),
        _result(20, 1, _rect(25, 35, 20, 36), 0.3),
        _result(20, 4, CROWD_MASK, 0.5),
        _result(30, 1, _rect(0, 10, 0, 10), 0.4),
    ]
    gt_path, results_path = tmp_path / "gt.json", tmp_path / "predictions.json"
    gt_path.write_text(json.dumps(ground_truth))
    results_path.write_text(json.dumps(results))

    ours = evaluate(ground_truth, results)

    coco_gt = COCO(str(gt_path))
    for iou_type in ("bbox", "segm"):
        reference = COCOeval(coco_gt, coco_gt.loadRes(str(results_path)), iou_type)
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
        assert 0.0 < ours[iou_type]["map"] < 1.0
        assert ours[iou_type]["map"] == reference.stats[0]
        assert ours[iou_type]["map50"] == reference.stats[1]


def test_evaluate_leaves_inputs_untouched(ground_truth):
    results = _perfect_results(ground_truth, 0.5)
    before = copy.deepcopy((ground_truth, results))

    evaluate(ground_truth, results)
    best_f_measure(ground_truth, results)

    assert (ground_truth, results) == before


def test_evaluate_rejects_results_for_unknown_images(ground_truth):
    with pytest.raises(ValueError, match="image ids"):
        evaluate(ground_truth, [_result(99, 1, _rect(0, 4, 0, 4), 0.5)])


def test_best_threshold_drops_low_score_false_positive(ground_truth):
    results = [*_perfect_results(ground_truth, 0.9), _result(30, 1, _rect(0, 10, 0, 10), 0.2)]

    best = best_f_measure(ground_truth, results)
    everything = f_measure_at(ground_truth, results, threshold=0.0)

    assert 0.2 <= best.threshold < 0.9
    assert best.f_measure == pytest.approx(1.0)
    assert everything.precision == pytest.approx(3 / 4)
    assert best.f_measure > everything.f_measure


def test_f_measure_at_applies_threshold(ground_truth):
    results = [*_perfect_results(ground_truth, 0.9), _result(30, 1, _rect(0, 10, 0, 10), 0.2)]

    low = f_measure_at(ground_truth, results, threshold=0.1, iou_type="bbox")
    middle = f_measure_at(ground_truth, results, threshold=0.5, iou_type="bbox")
    high = f_measure_at(ground_truth, results, threshold=0.9, iou_type="bbox")

    assert (low.threshold, low.precision, low.recall) == (0.1, pytest.approx(0.75), 1.0)
    assert (middle.f_measure, middle.threshold) == (pytest.approx(1.0), 0.5)
    assert (high.f_measure, high.recall) == (0.0, 0.0)
