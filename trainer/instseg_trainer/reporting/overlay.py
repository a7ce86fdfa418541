"""Predictions drawn over an image: translucent masks, contours, boxes and "name 0.93" tags."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MASK_OPACITY = 0.45
TAG_PADDING = 2

# Distinct, saturated colours (Kelly's list, minus white/black/greys) so neighbours differ.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 225, 25),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
)


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        # Edge padding: a mask cut by the image border gets no contour along that border.
        padded = np.pad(mask, 1, mode="edge")
        mask = (
            padded[1:-1, 1:-1]
            & padded[:-2, 1:-1]
            & padded[2:, 1:-1]
            & padded[1:-1, :-2]
            & padded[1:-1, 2:]
        )
    return mask


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    red, green, blue = background
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 150 else (255, 255, 255)


def _check_shapes(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[str],
    scores: np.ndarray,
    masks: np.ndarray | None,
) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    count = len(boxes)
    if boxes.shape != (count, 4):
        raise ValueError(f"boxes must be (N, 4) xyxy, got {boxes.shape}")
    if len(labels) != count or len(scores) != count:
        raise ValueError(
            f"boxes, labels and scores must have one entry per instance, "
            f"got {count}, {len(labels)} and {len(scores)}"
        )
    if masks is not None:
        if masks.shape != (count, *image.shape[:2]):
            raise ValueError(
                f"masks must be (N, H, W) = {(count, *image.shape[:2])}, got {masks.shape}"
            )
        if masks.dtype != np.bool_:
            raise ValueError(
                f"masks must be bool, got {masks.dtype}; threshold probabilities first "
                "(e.g. masks > 0.5)"
            )


def draw_overlay(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[str],
    scores: np.ndarray,
    masks: np.ndarray | None = None,
) -> Image.Image:
    """Draw instances over an RGB image and return a new image of the same size.

    image: (H, W, 3) uint8; boxes: (N, 4) xyxy in pixels; labels: N class names;
    scores: N confidences; masks: optional (N, H, W) bool. Instance i gets palette colour i.
    """
    boxes, scores = np.asarray(boxes, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    _check_shapes(image, boxes, labels, scores, masks)
    height, width = image.shape[:2]
    colours = [PALETTE[index % len(PALETTE)] for index in range(len(boxes))]
    line_width = max(1, round(min(height, width) / 250))

    canvas = image.astype(np.float32)
    if masks is not None:
        for colour, mask in zip(colours, masks, strict=True):
            canvas[mask] = canvas[mask] * (1 - MASK_OPACITY) + np.array(colour) * MASK_OPACITY
        for colour, mask in zip(colours, masks, strict=True):
            canvas[mask & ~_erode(mask, line_width)] = colour
    result = Image.fromarray(np.round(canvas).astype(np.uint8))

    draw = ImageDraw.Draw(result)
    # Scaled so tags stay legible on large images (the unscaled default is 10 px).
    font = ImageFont.load_default(size=max(10, round(min(height, width) / 50)))
    for colour, box in zip(colours, boxes, strict=True):
        x_min, x_max = sorted((round(box[0]), round(box[2])))
        y_min, y_max = sorted((round(box[1]), round(box[3])))
        draw.rectangle((x_min, y_min, x_max, y_max), outline=colour, width=line_width)
    # Tags after all boxes so that no outline crosses a tag's text.
    for colour, box, label, score in zip(colours, boxes, labels, scores, strict=True):
        text = f"{label} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_width = right - left + 2 * TAG_PADDING
        tag_height = bottom - top + 2 * TAG_PADDING
        x_min, y_min = round(min(box[0], box[2])), round(min(box[1], box[3]))
        tag_x = min(max(x_min, 0), max(width - tag_width, 0))
        # Above the box when it fits, else just inside its top edge.
        tag_y = y_min - tag_height if y_min - tag_height >= 0 else y_min
        tag_y = min(max(tag_y, 0), max(height - tag_height, 0))
        draw.rectangle((tag_x, tag_y, tag_x + tag_width - 1, tag_y + tag_height - 1), fill=colour)
        draw.text(
            (tag_x + TAG_PADDING - left, tag_y + TAG_PADDING - top),
            text,
            fill=_text_colour(colour),
            font=font,
        )
    return result
