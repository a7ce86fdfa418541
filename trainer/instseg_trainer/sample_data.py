"""A deterministic synthetic COCO instance-segmentation dataset of filled shapes.

The demo, the tests and the CPU benchmark train on it: shapes of random colour on a noisy
gradient, the class being the shape. Annotations mix polygons, compressed RLE and crowd
regions (uncompressed RLE), and category ids are non-contiguous, so importers are exercised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CLASS_NAMES: tuple[str, ...] = ("circle", "rectangle", "triangle")
# Non-contiguous on purpose: consumers must map category ids, not assume 1..N.
CATEGORY_IDS: dict[str, int] = {"circle": 1, "rectangle": 2, "triangle": 4}

SUBSETS: tuple[str, ...] = ("train", "val")

_EMPTY_IMAGE_PROB = 0.1
# Conditional on a non-empty image, so about 1 image in 15 overall carries a crowd region.
_CROWD_IMAGE_PROB = 0.075
_RLE_OBJECT_PROB = 0.25
_MAX_OBJECTS = 4
_OBJECT_SIZE_RANGE = (0.18, 0.45)
_CROWD_MEMBER_SIZE_RANGE = (0.07, 0.11)
_CIRCLE_VERTICES = 32
_PLACEMENT_ATTEMPTS = 30
_COLOUR_ATTEMPTS = 20
# Distance in RGB that the 5th-percentile pixel under an object must keep from its colour.
_MIN_CONTRAST = 90.0
# Pixels kept free around polygon objects and crowd regions, so nothing ever touches them.
_GAP_PX = 2
# An occluded (RLE) object must keep this share of its area visible.
_MIN_VISIBLE_FRACTION = 0.6
# A new object may lie on top of earlier RLE objects with at most this share of its area.
_MAX_OVERLAP_FRACTION = 0.3
_NOISE_SIGMA = 5.0


@dataclass(frozen=True)
class _Shapes:
    """How many objects an image holds (1 to max_objects) and their size: object_scale
    times the default share of the image's shorter side (small objects in large images,
    for tiling)."""

    object_scale: float
    max_objects: int


@dataclass
class _PlacedObject:
    category_id: int
    full: np.ndarray
    visible: np.ndarray
    polygon: list[float] | None
    iscrowd: bool = False


def write_sample_dataset(
    root: Path,
    *,
    num_train: int = 96,
    num_val: int = 24,
    seed: int = 0,
    min_size: int = 128,
    max_size: int = 256,
    object_scale: float = 1.0,
    max_objects: int = _MAX_OBJECTS,
) -> dict[str, dict[str, int]]:
    """Write the synthetic dataset in Datumaro's ``coco_instances`` layout under ``root``.

    Writes ``annotations/instances_{train,val}.json`` and ``images/{train,val}/*.png``,
    overwriting those files and leaving any other file alone. The same arguments always give
    byte-identical files; each subset has its own random stream, so ``num_train`` does not
    change the val images.

    Returns per-subset counts plus a ``total``: ``images``, ``objects`` (non-crowd
    annotations), ``polygons``, ``rle`` (compressed-RLE objects), ``crowd`` and
    ``empty_images`` (images without any annotation).
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
    if not 32 <= min_size <= max_size:
        raise ValueError(f"need 32 <= min_size <= max_size, got {min_size} and {max_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0 < object_scale <= 1 or max_objects < 1:
        raise ValueError(f"need 0 < object_scale <= 1 and max_objects >= 1, got "
                         f"{object_scale} and {max_objects}")  # fmt: skip
    shapes = _Shapes(object_scale, max_objects)

    root = Path(root)
    summary: dict[str, dict[str, int]] = {}
    for subset_index, (subset, count) in enumerate(zip(SUBSETS, (num_train, num_val), strict=True)):
        rng = np.random.default_rng([seed, subset_index])
        summary[subset] = _write_subset(root, subset, count, rng, min_size, max_size, shapes)
    summary["total"] = {
        key: sum(summary[subset][key] for subset in SUBSETS) for key in summary[SUBSETS[0]]
    }
    return summary


def _write_subset(
    root: Path,
    subset: str,
    count: int,
    rng: np.random.Generator,
    min_size: int,
    max_size: int,
    shapes: _Shapes,
) -> dict[str, int]:
    image_dir = root / "images" / subset
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)

    images: list[dict] = []
    annotations: list[dict] = []
    counts = dict.fromkeys(("images", "objects", "polygons", "rle", "crowd", "empty_images"), 0)
    for image_id in range(1, count + 1):
        width, height = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        pixels, objects = _render_image(rng, width, height, shapes)
        file_name = f"{subset}_{image_id:04d}.png"
        Image.fromarray(pixels).save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})

        for obj in objects:
            annotation = _annotation(obj, image_id, len(annotations) + 1)
            annotations.append(annotation)
            if obj.iscrowd:
                counts["crowd"] += 1
            else:
                counts["objects"] += 1
                counts["polygons" if obj.polygon is not None else "rle"] += 1
        counts["images"] += 1
        counts["empty_images"] += not objects

    coco = {
        "info": {"description": "instseg synthetic shapes", "version": "1.0"},
        "licenses": [],
        "categories": [
            {"id": CATEGORY_IDS[name], "name": name, "supercategory": "shape"}
            for name in CLASS_NAMES
        ],
        "images": images,
        "annotations": annotations,
    }
    text = json.dumps(coco, indent=1, sort_keys=True) + "\n"
    (root / "annotations" / f"instances_{subset}.json").write_text(text, encoding="utf-8")
    return counts


def _render_image(
    rng: np.random.Generator, width: int, height: int, shapes: _Shapes
) -> tuple[np.ndarray, list[_PlacedObject]]:
    canvas = _gradient_background(rng, width, height)
    objects: list[_PlacedObject] = []
    if rng.random() >= _EMPTY_IMAGE_PROB:
        # Dilated union of everything that must never be overlapped or touched.
        blocked = np.zeros((height, width), dtype=bool)
        if rng.random() < _CROWD_IMAGE_PROB:
            crowd = _place_crowd(rng, canvas)
            objects.append(crowd)
            blocked |= _dilate(crowd.full, _GAP_PX)
        for _ in range(int(rng.integers(1, shapes.max_objects + 1))):
            placed = _place_object(rng, canvas, objects, blocked, shapes.object_scale)
            if placed is not None and placed.polygon is not None:
                blocked |= _dilate(placed.full, _GAP_PX)
    noisy = canvas + rng.normal(0.0, _NOISE_SIGMA, size=canvas.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8), objects


def _gradient_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    start, end = rng.uniform(30.0, 225.0, size=(2, 3))
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    ramp = xs * np.cos(angle) + ys * np.sin(angle)
    ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1.0)
    return start + ramp[..., None] * (end - start)


# Place one shape, or return None when no placement keeps overlaps small.
def _place_object(
    rng: np.random.Generator,
    canvas: np.ndarray,
    objects: list[_PlacedObject],
    blocked: np.ndarray,
    object_scale: float = 1.0,
) -> _PlacedObject | None:
    height, width = canvas.shape[:2]
    name = CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
    as_polygon = rng.random() >= _RLE_OBJECT_PROB
    # Only RLE objects can be occluded: a polygon could not describe what stays visible.
    occludable = [obj for obj in objects if obj.polygon is None and not obj.iscrowd]
    for _ in range(_PLACEMENT_ATTEMPTS):
        size = rng.uniform(*_OBJECT_SIZE_RANGE) * object_scale * min(width, height)
        polygon = _shape_polygon(rng, name, size)
        centre = _random_centre(rng, polygon, width, height)
        flat = _flatten(polygon + centre)
        mask = _rasterize(flat, width, height)
        area = int(mask.sum())
        if area == 0 or (mask & blocked).any():
            continue
        overlaps = [int((mask & obj.visible).sum()) for obj in occludable]
        if sum(overlaps) > _MAX_OVERLAP_FRACTION * area:
            continue
        if any(
            obj.visible.sum() - overlap < _MIN_VISIBLE_FRACTION * obj.full.sum()
            for obj, overlap in zip(occludable, overlaps, strict=True)
        ):
            continue
        for obj in occludable:
            obj.visible &= ~mask
        _paint(rng, canvas, mask)
        placed = _PlacedObject(
            category_id=CATEGORY_IDS[name],
            full=mask,
            visible=mask.copy(),
            polygon=flat if as_polygon else None,
        )
        objects.append(placed)
        return placed
    return None


# Paint a cluster of small same-class shapes and return it as one crowd region.
def _place_crowd(rng: np.random.Generator, canvas: np.ndarray) -> _PlacedObject:
    height, width = canvas.shape[:2]
    short_side = min(width, height)
    name = CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
    spread = 0.15 * short_side
    cluster_centre = _random_centre(
        rng, np.array([[-spread, -spread], [spread, spread]]), width, height
    )
    region = np.zeros((height, width), dtype=bool)
    for _ in range(int(rng.integers(5, 9))):
        size = rng.uniform(*_CROWD_MEMBER_SIZE_RANGE) * short_side
        polygon = _shape_polygon(rng, name, size)
        offset = rng.uniform(-spread, spread, size=2)
        centre = np.clip(
            cluster_centre + offset,
            -polygon.min(axis=0) + 1,
            np.array([width, height]) - 2 - polygon.max(axis=0),
        )
        mask = _rasterize(_flatten(polygon + centre), width, height)
        _paint(rng, canvas, mask)
        region |= mask
    return _PlacedObject(
        category_id=CATEGORY_IDS[name], full=region, visible=region, polygon=None, iscrowd=True
    )


# Vertices (N, 2) of a shape about `size` across, centred on the origin.
def _shape_polygon(rng: np.random.Generator, name: str, size: float) -> np.ndarray:
    if name == "circle":
        angles = np.linspace(0.0, 2.0 * np.pi, _CIRCLE_VERTICES, endpoint=False)
        return 0.5 * size * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if name == "rectangle":
        half_w, half_h = 0.5 * size, 0.5 * size * rng.uniform(0.45, 0.9)
        corners = np.array(
            [[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]]
        )
    else:
        # Circumradius above size/2 so a triangle covers an area comparable to the others.
        angles = np.deg2rad(np.array([90.0, 210.0, 330.0]) + rng.uniform(-12.0, 12.0, size=3))
        corners = 0.6 * size * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    theta = rng.uniform(0.0, np.pi)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return corners @ rotation.T


# A centre that keeps the polygon at least one pixel inside the image.
def _random_centre(
    rng: np.random.Generator, polygon: np.ndarray, width: int, height: int
) -> np.ndarray:
    low = -polygon.min(axis=0) + 1
    high = np.array([width, height]) - 2 - polygon.max(axis=0)
    return rng.uniform(low, np.maximum(low, high))


def _flatten(points: np.ndarray) -> list[float]:
    # Rounded so the JSON stays short and the rasterised mask is exactly what a reader decodes.
    return [round(float(v), 2) for v in points.reshape(-1)]


def _rasterize(flat: list[float], width: int, height: int) -> np.ndarray:
    # pycocotools' own rasterisation, so the painted pixels equal what annToMask returns.
    rle = mask_utils.merge(mask_utils.frPyObjects([flat], height, width))
    return mask_utils.decode(rle).astype(bool)


# Fill `mask` with a random colour that stands out from what it covers and borders.
def _paint(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray) -> None:
    surroundings = canvas[_dilate(mask, _GAP_PX)]
    best_colour, best_contrast = None, -1.0
    for _ in range(_COLOUR_ATTEMPTS):
        colour = rng.integers(0, 256, size=3).astype(np.float64)
        contrast = float(np.percentile(np.linalg.norm(surroundings - colour, axis=1), 5))
        if contrast > best_contrast:
            best_colour, best_contrast = colour, contrast
        if contrast >= _MIN_CONTRAST:
            break
    canvas[mask] = best_colour


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    height, width = mask.shape
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy : dy + height, dx : dx + width]
    return out


def _annotation(obj: _PlacedObject, image_id: int, annotation_id: int) -> dict:
    height, width = obj.visible.shape
    encoded = mask_utils.encode(np.asfortranarray(obj.visible.astype(np.uint8)))
    if obj.iscrowd:
        segmentation: object = {
            "size": [height, width],
            "counts": _uncompressed_counts(obj.visible),
        }
    elif obj.polygon is not None:
        segmentation = [obj.polygon]
    else:
        segmentation = {"size": [height, width], "counts": encoded["counts"].decode("ascii")}
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": obj.category_id,
        "iscrowd": int(obj.iscrowd),
        "segmentation": segmentation,
        "area": int(mask_utils.area(encoded)),
        "bbox": [float(v) for v in mask_utils.toBbox(encoded)],
    }


# COCO's uncompressed RLE: run lengths over the column-major pixels, zeros first.
def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    # A leading background pixel makes the first run count zeros even when the mask starts set.
    pixels = np.concatenate([[0], mask.reshape(-1, order="F").astype(np.int8)])
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(pixels)) + 1, [pixels.size]])
    runs = np.diff(bounds)
    runs[0] -= 1
    return runs.tolist()
