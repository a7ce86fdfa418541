"""Inference over a loader → COCO results; scoring with pycocotools and the F-measure."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict

import numpy as np
import torch
from torch import nn

from instseg_trainer.engine.distributed import Distributed
from instseg_trainer.evaluation.coco_eval import evaluate, to_coco_results
from instseg_trainer.evaluation.f_measure import f_measures
from instseg_trainer.models.mask_rcnn import predict_batch, to_model_input

MASK_THRESHOLD = 0.5


def detections_to_numpy(detection: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """One image's detections (from predict_batch) → numpy."""
    out = {
        "boxes": detection["boxes"].float().cpu().numpy(),
        "scores": detection["scores"].float().cpu().numpy(),
        "labels": detection["labels"].cpu().numpy() - 1,  # back to 0-based class indices
    }
    if "masks" in detection:
        # bool masks, 1 byte a pixel; .cpu() keeps their column-major strides for RLE encoding
        out["masks"] = detection["masks"].cpu().numpy()
    return out


def predict(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> Iterable[tuple[dict, dict[str, np.ndarray]]]:
    """Yields (meta, detections) per image, in the loader's order."""
    model.eval()
    for images, _, metas in loader:
        inputs = to_model_input(images, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            detections = predict_batch(
                model, inputs, [m["original_size"] for m in metas], MASK_THRESHOLD
            )
        for meta, det in zip(metas, detections):
            yield meta, detections_to_numpy(det)


def coco_results(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    category_ids: list[int],
    dist: Distributed,
    amp_dtype: torch.dtype | None = None,
    should_stop: Callable[[], bool] | None = None,
    predictor: Callable = None,
) -> list[dict] | None:
    """COCO results of every image of the (possibly sharded) loader, on every rank; None when
    `should_stop` said so between two images (single process only: ranks gather at the end).
    `predictor` is `predict` (whole images), or evaluation.tiled.predict_tiled."""
    detections = (predictor or predict)(model, loader, device, amp_dtype)
    return coco_results_of(detections, category_ids, dist, should_stop)


def coco_results_of(
    detections: Iterable[tuple[dict, dict[str, np.ndarray]]],
    category_ids: list[int],
    dist: Distributed,
    should_stop: Callable[[], bool] | None = None,
) -> list[dict] | None:
    """COCO results of (meta, detections) pairs, from any model that yields them."""
    ids = np.asarray(category_ids)
    local: list[dict] = []
    for meta, det in detections:
        if should_stop is not None and should_stop():
            return None
        local.extend(
            to_coco_results(
                meta["image_id"], det["boxes"], det["scores"], ids[det["labels"]], det.get("masks")
            )
        )
    return [r for part in dist.gather_to_all(local) for r in part]


def score(ground_truth: dict, results: list[dict], threshold: float | None = None) -> dict:
    """bbox/segm COCO metrics, and the segm F-measure: the best over thresholds, and the one
    at `threshold` (the threshold chosen on validation) when given."""
    metrics = evaluate(ground_truth, results)
    best, at = f_measures(ground_truth, results, threshold, iou_type="segm")
    metrics["f_measure"] = {"best": asdict(best)}
    if at is not None:
        metrics["f_measure"]["at_threshold"] = asdict(at)
    return metrics
