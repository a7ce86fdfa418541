"""OTX-style F-measure: micro F1 at IoU 0.5 with the confidence threshold tuned on validation.

OTX matches enclosing boxes even for instance segmentation; iou_type="bbox" reproduces its
numbers, the default "segm" matches masks instead.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from instseg_trainer.evaluation.coco_eval import check_results, coco_from_dict

IOU_THRESHOLD = 0.5
# OTX sweeps np.arange(0.025, 1.0, 0.025) and keeps predictions scoring strictly above each.
CONFIDENCE_THRESHOLDS = np.round(np.arange(1, 40) * 0.025, 3)
# OTX's threshold when no grid point reaches a positive F-measure.
DEFAULT_THRESHOLD = 0.1


@dataclass(frozen=True)
class FMeasure:
    """Micro-averaged F-measure over all classes at one confidence threshold."""

    f_measure: float
    precision: float
    recall: float
    threshold: float


@dataclass(frozen=True)
class _Matches:
    # Per non-crowd ground truth: best score of a prediction at IoU >= 0.5 (-inf when none).
    found_by_score: np.ndarray
    # Per counted prediction: its score and how many ground truths it covers beyond the first.
    scores: np.ndarray
    extra_covered: np.ndarray


def best_f_measure(ground_truth: dict, results: list[dict], iou_type: str = "segm") -> FMeasure:
    """F-measure at the best confidence threshold of OTX's grid, as chosen on validation data.

    Ties go to the highest threshold; when no threshold gives a positive F-measure the result
    is reported at OTX's default threshold of 0.1.
    """
    return _best(_match(ground_truth, results, iou_type))


def f_measures(
    ground_truth: dict, results: list[dict], threshold: float | None, iou_type: str = "segm"
) -> tuple[FMeasure, FMeasure | None]:
    """The best F-measure and, when `threshold` is given, the one at it: one matching pass."""
    matches = _match(ground_truth, results, iou_type)
    at = _f_measure(matches, threshold) if threshold is not None else None
    return _best(matches), at


def _best(matches: _Matches) -> FMeasure:
    curve = [_f_measure(matches, float(threshold)) for threshold in CONFIDENCE_THRESHOLDS]
    f_values = np.array([point.f_measure for point in curve])
    if f_values.max() <= 0.0:
        return _f_measure(matches, DEFAULT_THRESHOLD)
    return curve[len(curve) - 1 - int(np.argmax(f_values[::-1]))]


def f_measure_at(
    ground_truth: dict, results: list[dict], threshold: float, iou_type: str = "segm"
) -> FMeasure:
    """F-measure keeping only predictions that score strictly above ``threshold``."""
    return _f_measure(_match(ground_truth, results, iou_type), threshold)


def _f_measure(matches: _Matches, threshold: float) -> FMeasure:
    kept = matches.scores > threshold
    n_true = len(matches.found_by_score)
    n_predicted = int(kept.sum())
    # OTX's false negatives: ground truths nobody found, plus one per ground truth a single
    # prediction covers beyond its first (each ground truth needs its own prediction).
    n_missed = int((matches.found_by_score <= threshold).sum() + matches.extra_covered[kept].sum())
    n_found = n_true - n_missed
    # OTX's conventions for the empty cases.
    if n_predicted == 0:
        precision, recall = 1.0, 0.0
    elif n_true == 0:
        precision, recall = 0.0, 1.0
    else:
        precision, recall = n_found / n_predicted, n_found / n_true
    total = precision + recall
    f_measure = 2 * precision * recall / total if total > 0 else 0.0
    return FMeasure(f_measure, precision, recall, threshold)


def _match(ground_truth: dict, results: list[dict], iou_type: str) -> _Matches:
    coco = coco_from_dict(ground_truth)
    check_results(coco, results, iou_type)
    truths: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for annotation in coco.anns.values():
        truths[annotation["image_id"], annotation["category_id"]].append(annotation)
    detections: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for result in results:
        # Like COCOeval, predictions of categories the dataset lacks are not scored.
        if result["category_id"] in coco.cats:
            detections[result["image_id"], result["category_id"]].append(result)

    found_by_score, scores, extra_covered = [], [], []
    for key in truths.keys() | detections.keys():
        found, score, extra = _match_group(coco, truths[key], detections[key], iou_type)
        found_by_score.append(found)
        scores.append(score)
        extra_covered.append(extra)
    return _Matches(
        np.concatenate([np.empty(0), *found_by_score]),
        np.concatenate([np.empty(0), *scores]),
        np.concatenate([np.empty(0, dtype=np.int64), *extra_covered]),
    )


def _match_group(
    coco: COCO, truths: list[dict], detections: list[dict], iou_type: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    regular = [t for t in truths if not t.get("iscrowd", 0)]
    crowd = [t for t in truths if t.get("iscrowd", 0)]
    scores = np.array([d["score"] for d in detections], dtype=np.float64)
    if not detections:
        return np.full(len(regular), -np.inf), scores, np.zeros(0, dtype=np.int64)
    if truths:
        # For crowd regions pycocotools measures intersection over the prediction's area.
        ious = np.asarray(
            mask_utils.iou(
                [_geometry(coco, d, iou_type) for d in detections],
                [_geometry(coco, t, iou_type) for t in regular + crowd],
                [0] * len(regular) + [1] * len(crowd),
            )
        ).reshape(len(detections), len(truths))
    else:
        ious = np.zeros((len(detections), 0))
    regular_ious = ious[:, : len(regular)]
    covers = regular_ious >= IOU_THRESHOLD
    found_by_score = np.where(covers, scores[:, None], -np.inf).max(axis=0, initial=-np.inf)
    # OTX finds a ground truth at IoU >= 0.5 but counts multi-coverage only strictly above 0.5.
    extra = np.maximum((regular_ious > IOU_THRESHOLD).sum(axis=1) - 1, 0)
    # A prediction on a crowd region only is neither right nor wrong, as in COCOeval.
    on_crowd_only = ~covers.any(axis=1) & (ious[:, len(regular) :] >= IOU_THRESHOLD).any(axis=1)
    return found_by_score, scores[~on_crowd_only], extra[~on_crowd_only]


def _geometry(coco: COCO, annotation: dict, iou_type: str) -> list[float] | dict:
    if iou_type == "bbox":
        return list(annotation["bbox"])
    if iou_type == "segm":
        return coco.annToRLE(annotation)
    raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
