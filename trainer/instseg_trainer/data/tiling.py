"""Tiling for large images with small objects (OTX's tiling pipeline).

An image is cut into square tiles of `size` pixels (in the image's own pixels) overlapping by
`overlap` of a tile; each tile is then one model input, resized to the template's input size
as any image is, so small objects keep more of their pixels. Training sees every tile that
holds an object, a fixed share of the empty ones, and each whole image; inference predicts
every tile and the whole image, moves the detections back into the image, merges them with
class-wise NMS and pastes the kept masks at the image's size (evaluation.tiled).

`auto_tiling` sizes the tiles from the objects' statistics, as OTX's adaptive tiling does,
and overlaps them by the largest objects' side so that each lies whole in some tile. OTX
feeds a tile at its own size and makes objects 3% of it (object_tile_ratio); here a tile is
resized to the template's input size, so the tile is what brings the typical object to
TARGET_OBJECT_SIDE pixels (the smallest anchor) at that size.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, replace

import numpy as np

from instseg_trainer.data.coco import ImageRecord
from instseg_trainer.errors import DataError

log = logging.getLogger(__name__)

TARGET_OBJECT_SIDE = 32  # px at the input size: the templates' smallest anchor
WORTH_TILING = 0.75  # tiles no larger than this share of the images' longer side
MAX_OVERLAP = 0.5
DEFAULT_OVERLAP = 0.2  # OTX's tile_overlap
EMPTY_TILE_SHARE = 0.1  # of the tiles without objects, the share training sees
MODES = ("off", "on", "auto")


@dataclass(frozen=True)
class Tiling:
    size: int  # tile side, in the image's pixels
    overlap: float  # of a tile, in [0, MAX_OVERLAP]

    def __post_init__(self) -> None:
        if self.size < 32:
            raise DataError(f"tile size {self.size} is too small: use at least 32 pixels")
        if not 0.0 <= self.overlap <= MAX_OVERLAP:
            raise DataError(f"tile overlap {self.overlap} must be within [0, {MAX_OVERLAP}]")

    def windows(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """The tiles (x0, y0, x1, y1) covering an image; the last row and column end at its
        edge; an image no larger than a tile is one window."""
        return [(x, y, min(x + self.size, width), min(y + self.size, height))
                for y in _starts(height, self.size, self.overlap)
                for x in _starts(width, self.size, self.overlap)]  # fmt: skip

    def to_dict(self) -> dict:
        return {"size": self.size, "overlap": self.overlap}


def _starts(length: int, size: int, overlap: float) -> list[int]:
    if length <= size:
        return [0]
    stride = max(1, round(size * (1 - overlap)))
    starts = list(range(0, length - size, stride))
    return starts + [length - size]


def object_sides(records: list[ImageRecord]) -> np.ndarray:
    """√area of each non-crowd object's box, in the image's pixels."""
    sides = [math.sqrt(max(inst.box[2] - inst.box[0], 0) * max(inst.box[3] - inst.box[1], 0))
             for record in records for inst in record.instances if not inst.crowd]  # fmt: skip
    return np.asarray([s for s in sides if s > 0], dtype=np.float64)


def auto_tiling(records: list[ImageRecord], input_size: int) -> Tiling | None:
    """Tiles sized from the objects (robust: 5th-95th percentile), or None when the tiles
    would be nearly as large as the images (tiling would not help)."""
    sides = object_sides(records)
    if not len(sides):
        return None
    low, typical, high = np.percentile(sides, [5, 50, 95])
    size = max(32, round(typical * input_size / TARGET_OBJECT_SIDE))
    longest = int(np.median([max(r.width, r.height) for r in records]))
    if size > WORTH_TILING * longest:
        return None
    overlap = min(MAX_OVERLAP, max(DEFAULT_OVERLAP, high / size))
    log.info("tiling: objects' sides %.0f/%.0f/%.0f px (5/50/95%%) → tiles of %d px, overlap "
             "%.2f, on images of %d px", low, typical, high, size, overlap, longest)  # fmt: skip
    return Tiling(size, round(overlap, 3))


def choose_tiling(mode: str, size: int | None, records: list[ImageRecord],
                  input_size: int) -> Tiling | None:  # fmt: skip
    """`--tiling off|on|auto` (with `--tile-size`) → the tiling to train with, or None."""
    if mode not in MODES:
        raise DataError(f"--tiling {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "off":
        return None
    if size is not None:
        return Tiling(size, DEFAULT_OVERLAP)
    found = auto_tiling(records, input_size)
    if found is None and mode == "on":
        longest = max(max(r.width, r.height) for r in records)
        return Tiling(max(32, longest // 2), DEFAULT_OVERLAP)  # asked for: 2 x 2 tiles
    if found is None:
        log.info("tiling auto: the objects are not small for these images; no tiling")
    return found


def tile_records(records: list[ImageRecord], tiling: Tiling, seed: int = 0) -> list[ImageRecord]:
    """Training records: each image whole, each of its tiles that holds an object's centre,
    and EMPTY_TILE_SHARE of the others (fixed seed)."""
    rng = random.Random(seed)
    tiled: list[ImageRecord] = []
    for record in records:
        tiled.append(record)
        windows = tiling.windows(record.height, record.width)
        if len(windows) == 1:
            continue
        for window in windows:
            if _holds_an_object(record, window) or rng.random() < EMPTY_TILE_SHARE:
                tiled.append(replace(record, window=window))
    return tiled


def _holds_an_object(record: ImageRecord, window: tuple[int, int, int, int]) -> bool:
    x0, y0, x1, y1 = window
    for inst in record.instances:
        cx, cy = (inst.box[0] + inst.box[2]) / 2, (inst.box[1] + inst.box[3]) / 2
        if not inst.crowd and x0 <= cx < x1 and y0 <= cy < y1:
            return True
    return False
