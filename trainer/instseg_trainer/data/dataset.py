"""Torch dataset over image records: decode, resize, flip, rasterise masks, collate."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from instseg_trainer.data.coco import ImageRecord
from instseg_trainer.data.transforms import fitted_size, resize_image, transform_instances
from instseg_trainer.errors import DataError


class InstanceSegDataset(torch.utils.data.Dataset):
    """Item `i` or `(i, flip)` → (uint8 CHW image, torchvision target, meta)."""

    def __init__(self, records: list[ImageRecord], input_size: int) -> None:
        self.records = records
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, bool]) -> tuple[torch.Tensor, dict, dict]:
        index, flip = key if isinstance(key, tuple) else (key, False)
        record = self.records[index]
        image = load_rgb(record)
        if record.window is not None:  # a tile (data.tiling): it is the image here
            image = image.crop(record.window)
        original_hw = (image.height, image.width)
        size_hw = fitted_size(*original_hw, self.input_size)
        pixels = resize_image(image, size_hw)
        if flip:
            pixels = pixels[:, ::-1]
        boxes, labels, masks = transform_instances(
            record.instances, original_hw, size_hw, flip, record.window
        )
        tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels + 1),  # torchvision reserves 0 for background
            "masks": torch.from_numpy(masks),
        }
        meta = {"index": index, "image_id": record.image_id, "original_size": original_hw}
        return tensor, target, meta


def load_rgb(record: ImageRecord) -> Image.Image:
    """The record's image as RGB; a clear error naming the file when it cannot be decoded."""
    try:
        with Image.open(record.path) as im:
            image = im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"image '{record.path}' cannot be read ({e}); replace or remove it") from e
    if (image.height, image.width) != (record.height, record.width):
        raise DataError(
            f"image '{record.path}' is {image.width}x{image.height} but its annotation says "
            f"{record.width}x{record.height}; fix 'width'/'height' of image id {record.image_id}"
        )
    return image


def collate(batch: list[tuple[Any, ...]]) -> tuple[tuple[Any, ...], ...]:
    """Detection batches stay lists: images differ in size and are padded by the model."""
    return tuple(zip(*batch))
