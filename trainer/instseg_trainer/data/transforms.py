"""Resize (keep aspect ratio), horizontal flip, and mask rasterisation at the final size.

Polygons stay polygons through flip and resize and are rasterised once, at the size the
model sees: rasterising full-size masks first and resizing them is what makes large images
slow in other trainers.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from instseg_trainer.data.coco import Instance


def fitted_size(height: int, width: int, input_size: int) -> tuple[int, int]:
    """(height, width) scaled so that the longer side equals `input_size`, aspect kept."""
    scale = input_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(image: Image.Image, size_hw: tuple[int, int]) -> np.ndarray:
    """RGB image → (H, W, 3) uint8 at `size_hw`."""
    if image.size != (size_hw[1], size_hw[0]):
        image = image.resize((size_hw[1], size_hw[0]), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def transform_instances(
    instances: tuple[Instance, ...],
    original_hw: tuple[int, int],
    size_hw: tuple[int, int],
    flip: bool,
    window: tuple[int, int, int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (N,4 xyxy), labels (N,) and masks (N,H,W uint8) at `size_hw`, crowd objects
    dropped. With a `window` (a tile, `original_hw` its size) the objects are cut to it and
    those left without a pixel are dropped."""
    h, w = size_hw
    sy, sx = h / original_hw[0], w / original_hw[1]
    x0, y0 = window[:2] if window else (0, 0)
    kept = [inst for inst in instances if not inst.crowd and _meets(inst.box, window)]
    boxes = np.zeros((len(kept), 4), dtype=np.float32)
    labels = np.zeros((len(kept),), dtype=np.int64)
    masks = np.zeros((len(kept), h, w), dtype=np.uint8)
    for i, inst in enumerate(kept):
        x1, y1, x2, y2 = inst.box
        box = np.array([(x1 - x0) * sx, (y1 - y0) * sy, (x2 - x0) * sx, (y2 - y0) * sy],
                       dtype=np.float32)  # fmt: skip
        if flip:
            box[[0, 2]] = w - box[[2, 0]]
        boxes[i] = box
        labels[i] = inst.label
        masks[i] = _rasterise(inst, sx, sy, size_hw, flip, window)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    if window is not None:  # objects the tile cuts: boxes of what is left, none if nothing
        present = masks.reshape(len(kept), -1).any(axis=1)
        boxes, labels, masks = boxes[present], labels[present], masks[present]
        boxes = _mask_boxes(masks, boxes)
    return boxes, labels, masks


def _meets(box: tuple[float, float, float, float], window) -> bool:
    """Whether an object's box reaches into the tile: the others are never rasterised."""
    if window is None:
        return True
    return box[0] < window[2] and box[2] > window[0] and box[1] < window[3] and box[3] > window[1]


def _mask_boxes(masks: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Each mask's box (xyxy, pixel edges), within its clipped original box."""
    out = boxes.copy()
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        out[i] = [max(boxes[i, 0], xs.min()), max(boxes[i, 1], ys.min()),
                  min(boxes[i, 2], xs.max() + 1), min(boxes[i, 3], ys.max() + 1)]  # fmt: skip
    return out


def _rasterise(
    inst: Instance, sx: float, sy: float, size_hw: tuple[int, int], flip: bool,
    window: tuple[int, int, int, int] | None = None,
) -> np.ndarray:  # fmt: skip
    h, w = size_hw
    x0, y0 = window[:2] if window else (0, 0)
    if inst.polygons:
        polys = []
        for poly in inst.polygons:
            p = (poly - np.array([x0, y0])) * np.array([sx, sy])
            if flip:
                p[:, 0] = w - p[:, 0]
            polys.append(p.reshape(-1).tolist())
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w)))
    mask = mask_utils.decode(inst.rle)
    if window is not None:
        mask = np.ascontiguousarray(mask[window[1] : window[3], window[0] : window[2]])
    if mask.shape != (h, w):
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
    return np.ascontiguousarray(mask[:, ::-1]) if flip else mask
