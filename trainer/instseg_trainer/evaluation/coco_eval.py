"""COCO-format glue: encode predictions and score them with pycocotools' COCOeval."""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# Positions in COCOeval.stats after summarize().
_SUMMARY_STATS = {
    "map": 0,
    "map50": 1,
    "map75": 2,
    "map_small": 3,
    "map_medium": 4,
    "map_large": 5,
    "mar100": 8,
}


def encode_masks(masks: np.ndarray) -> list[dict]:
    """Encode (N, H, W) binary masks as COCO compressed RLE dicts with ``counts`` as str."""
    masks = np.asarray(masks)
    if len(masks) == 0:
        return []
    # pycocotools encodes (H, W, N) uint8 arrays in Fortran order; bool masks whose strides
    # are already column-major per mask (predict_batch's) pass through without a copy
    as_bytes = masks.view(np.uint8) if masks.dtype == np.bool_ else masks.astype(np.uint8)
    rles = mask_utils.encode(np.asfortranarray(np.transpose(as_bytes, (1, 2, 0))))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def to_coco_results(
    image_id: int,
    boxes: np.ndarray,
    scores: np.ndarray,
    category_ids: np.ndarray,
    masks: np.ndarray | None,
) -> list[dict]:
    """Turn one image's detections into COCO results entries.

    ``boxes`` are (N, 4) xyxy pixels, ``category_ids`` the dataset's own category ids and
    ``masks`` (N, H, W) binary masks or None for box-only results.
    """
    xywh = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    xywh[:, 2:] -= xywh[:, :2]
    segmentations = encode_masks(masks) if masks is not None else [None] * len(xywh)
    results = []
    for box, score, category_id, segmentation in zip(
        xywh, scores, category_ids, segmentations, strict=True
    ):
        entry = {
            "image_id": int(image_id),
            "category_id": int(category_id),
            # Hundredths of a pixel keep predictions.json small without moving any IoU.
            "bbox": [round(float(v), 2) for v in box],
            "score": float(score),
        }
        if segmentation is not None:
            entry["segmentation"] = segmentation
        results.append(entry)
    return results


def coco_from_dict(dataset: dict) -> COCO:
    """Index an in-memory COCO dataset dict as a pycocotools ``COCO`` without temp files."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def check_results(ground_truth: COCO, results: list[dict], iou_type: str) -> None:
    """Raise ValueError when results cannot be scored against ``ground_truth`` as ``iou_type``."""
    unknown = sorted({r["image_id"] for r in results} - set(ground_truth.imgs))
    if unknown:
        raise ValueError(
            f"results reference image ids {unknown[:5]} that are not in the ground truth; "
            "predict on the ground-truth images only"
        )
    if iou_type == "segm" and any("segmentation" not in r for r in results):
        raise ValueError(
            "'segm' evaluation needs a 'segmentation' in every result; pass masks to "
            "to_coco_results or evaluate with iou_types=('bbox',)"
        )


def evaluate(
    ground_truth: dict, results: list[dict], iou_types: Sequence[str] = ("bbox", "segm")
) -> dict:
    """Score COCO results against a COCO ground-truth dict with pycocotools' COCOeval.

    Returns, per iou type, the COCO summary numbers (``map``, ``map50``, ``map75``,
    ``map_small``, ``map_medium``, ``map_large``, ``mar100``) and ``per_class`` AP keyed by
    category name (None for a category without ground truth). The numbers equal a plain
    COCOeval run on the same ground-truth and results JSON files.
    """
    # COCOeval rewrites ground-truth annotations in place (segmentations, ignore flags).
    coco_ground_truth = coco_from_dict(copy.deepcopy(ground_truth))
    for iou_type in iou_types:
        check_results(coco_ground_truth, results, iou_type)
    return {
        iou_type: _evaluate_iou_type(coco_ground_truth, results, iou_type) for iou_type in iou_types
    }


def _evaluate_iou_type(ground_truth: COCO, results: list[dict], iou_type: str) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(ground_truth, _load_results(ground_truth, results), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    # pycocotools says -1 when an area range has no ground truth; we say 0.0 so all are floats.
    metrics: dict = {
        name: max(float(coco_eval.stats[index]), 0.0) for name, index in _SUMMARY_STATS.items()
    }
    params = coco_eval.params
    # precision is [iou threshold, recall point, category, area range, max detections].
    precision = coco_eval.eval["precision"][
        :, :, :, params.areaRngLbl.index("all"), params.maxDets.index(100)
    ]
    per_class = {}
    for index, category_id in enumerate(params.catIds):
        valid = precision[:, :, index][precision[:, :, index] > -1]
        per_class[ground_truth.cats[category_id]["name"]] = (
            float(valid.mean()) if valid.size else None
        )
    metrics["per_class"] = per_class
    return metrics


def _load_results(ground_truth: COCO, results: list[dict]) -> COCO:
    if not results:
        # loadRes([]) raises, yet predicting nothing is a valid (all-miss) result.
        return coco_from_dict(
            {
                "images": ground_truth.dataset["images"],
                "categories": ground_truth.dataset["categories"],
                "annotations": [],
            }
        )
    # loadRes adds id/area/iscrowd to each entry; shallow copies keep the caller's list intact.
    return ground_truth.loadRes([dict(result) for result in results])
