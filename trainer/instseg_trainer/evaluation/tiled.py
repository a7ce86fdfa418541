"""Inference over tiles (data.tiling): each image whole and each of its tiles are predicted,
the detections moved back into the image, merged with class-wise NMS (the model's own RoI
settings: IoU threshold, detections per image) and the kept masks pasted at the image's
size. Evaluation then scores full images, as without tiling."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torchvision.ops import batched_nms

from instseg_trainer.data.coco import ImageRecord
from instseg_trainer.data.dataset import load_rgb
from instseg_trainer.data.tiling import Tiling
from instseg_trainer.data.transforms import fitted_size, resize_image
from instseg_trainer.evaluation.evaluator import detections_to_numpy
from instseg_trainer.models.mask_rcnn import predict_batch, to_model_input

MASK_THRESHOLD = 0.5
CROPS_PER_BATCH = 4


class TiledImages(torch.utils.data.Dataset):
    """Item i → (the image's crops resized to the input size: whole image first, then its
    tiles; their windows (x0, y0, x1, y1); meta as InstanceSegDataset gives it)."""

    def __init__(self, records: list[ImageRecord], input_size: int, tiling: Tiling) -> None:
        self.records, self.input_size, self.tiling = records, input_size, tiling

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        if isinstance(index, tuple):  # an EpochSampler that flips: never at inference
            index = index[0]
        record = self.records[index]
        image = load_rgb(record)
        whole = (0, 0, image.width, image.height)
        windows = [whole, *self.tiling.windows(image.height, image.width)]
        windows = list(dict.fromkeys(windows))  # an image of one tile is predicted once
        crops = []
        for window in windows:
            crop = image.crop(window)
            pixels = resize_image(crop, fitted_size(crop.height, crop.width, self.input_size))
            crops.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous())
        meta = {"index": index, "image_id": record.image_id,
                "original_size": (image.height, image.width)}  # fmt: skip
        return crops, windows, meta


def collate_tiled(batch: list) -> tuple[tuple, ...]:
    return tuple(zip(*batch))


@torch.no_grad()
def predict_tiled(
    model: nn.Module, loader: Iterable, device: torch.device, amp_dtype: torch.dtype | None
) -> Iterator[tuple[dict, dict[str, np.ndarray]]]:
    """(meta, detections) per image of a TiledImages loader, as evaluator.predict yields."""
    model.eval()
    for crops_batch, windows_batch, metas in loader:
        for crops, windows, meta in zip(crops_batch, windows_batch, metas):
            found = []
            for start in range(0, len(crops), CROPS_PER_BATCH):
                chunk = crops[start : start + CROPS_PER_BATCH]
                boxes_of = windows[start : start + CROPS_PER_BATCH]
                sizes = [(w[3] - w[1], w[2] - w[0]) for w in boxes_of]
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    outputs = predict_batch(model, to_model_input(chunk, device), sizes,
                                            MASK_THRESHOLD)  # fmt: skip
                found.extend(zip(outputs, boxes_of))
            heads = model.roi_heads
            merged = merge_tiles(found, meta["original_size"], heads.nms_thresh,
                                 heads.detections_per_img)  # fmt: skip
            yield meta, detections_to_numpy(merged)


def merge_tiles(
    found: list, image_hw: tuple[int, int], nms_thresh: float, detections_per_img: int
) -> dict:
    """Detections of every crop (crop detections as tensors, window) → the image's: boxes
    moved by the window's corner, class-wise NMS at the model's IoU threshold, the best
    `detections_per_img`, masks at image size."""
    boxes, scores, labels, masks, corners = [], [], [], [], []
    for det, window in found:
        shift = torch.tensor([window[0], window[1], window[0], window[1]], dtype=torch.float32)
        boxes.append(det["boxes"].float().cpu() + shift)
        scores.append(det["scores"].float().cpu())
        labels.append(det["labels"].cpu())
        masks.extend(det["masks"].cpu())
        corners.extend([window] * len(det["scores"]))
    boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
    height, width = image_hw
    # (N, W, H) filled through transposes: the (N, H, W) view is column-major per mask, what
    # RLE encoding wants (as models.mask_rcnn.paste_binary_masks makes them)
    pasted = torch.zeros((len(keep), width, height), dtype=torch.bool)
    for row, index in enumerate(keep.tolist()):
        x0, y0, x1, y1 = corners[index]
        pasted[row, x0:x1, y0:y1] = masks[index].T
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep],
            "masks": pasted.transpose(1, 2)}  # fmt: skip
