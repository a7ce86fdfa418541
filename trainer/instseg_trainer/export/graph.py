"""What an exported model computes, as one torch module traced to ONNX.

Inputs: `image`, uint8 (3, H, W) RGB already resized so that its longer side is the
template's input size (instseg_trainer.data.transforms.fitted_size / resize_image, PIL
bilinear), and `original_size`, int64 (2,) = the user's image (height, width).

Inside the graph: scaling to [0, 1], ImageNet normalisation, padding to a multiple of 32,
backbone + FPN, RPN (anchors, box decoding, NMS), RoI heads (box decoding, class-wise NMS,
score threshold, top detections), the mask head, and the boxes scaled to `original_size`.

Outputs: `boxes` float (N, 4) xyxy in original pixels, `labels` int64 (N,) from 1 (0 is the
background), `scores` float (N,), `masks` float (N, 1, 28, 28) mask probabilities inside each
box. Pasting those into the image and thresholding at 0.5 is the post-processing step
(runtime.py, the same code as PyTorch inference: models.mask_rcnn.paste_binary_masks).
"""

from __future__ import annotations

import warnings
from unittest import mock

import torch
import torchvision
from torch import nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

INPUTS = ("image", "original_size")
OUTPUTS = ("boxes", "labels", "scores", "masks")
OPSET = 17


class InferenceGraph(nn.Module):
    def __init__(self, model: GeneralizedRCNN) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, image: torch.Tensor, original_size: torch.Tensor):
        model = self.model
        image_list, _ = model.transform([image.float() / 255])
        features = model.backbone(image_list.tensors)
        proposals, _ = model.rpn(image_list, features)
        (detections,), _ = model.roi_heads(features, proposals, image_list.image_sizes)
        # as resize_boxes, with sizes the tracer keeps as tensors (not constants)
        resized = torch._shape_as_tensor(image)[1:].to(torch.float32)
        scale_y, scale_x = (original_size.to(torch.float32) / resized).unbind()
        boxes = detections["boxes"] * torch.stack([scale_x, scale_y, scale_x, scale_y])
        return boxes, detections["labels"], detections["scores"], detections["masks"]


def _batched_nms_without_branch(boxes, scores, idxs, iou_threshold):
    """torchvision's batched_nms (boxes of each class offset apart, one NMS) as straight-line
    ops. torchvision's own guards the empty case with a scripted `if`, which becomes an ONNX
    If; OpenVINO's CPU plugin returns one uninitialised detection from that If's empty
    branch. Here the offset's maximum includes a 0, so no input is ever empty, and NMS
    over no boxes keeps none."""
    max_coordinate = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()
    boxes_for_nms = boxes + (idxs.to(boxes) * (max_coordinate + 1))[:, None]
    return torchvision.ops.nms(boxes_for_nms, scores, iou_threshold)


def export_onnx(model: GeneralizedRCNN, input_size: int, path) -> None:
    """Traces the model (TorchScript-based exporter: the detection heads' data-dependent
    shapes are what it handles) to ONNX with dynamic height, width and detection count."""
    graph = InferenceGraph(model)
    example = torch.zeros((3, input_size, input_size), dtype=torch.uint8)
    example_size = torch.tensor([input_size, input_size], dtype=torch.int64)
    dynamic = {"image": {1: "height", 2: "width"}} | {name: {0: "detections"} for name in OUTPUTS}
    without_branch = mock.patch("torchvision.ops.boxes.batched_nms", _batched_nms_without_branch)
    with torch.no_grad(), warnings.catch_warnings(), without_branch:
        # the tracer's notes on the detection heads' Python arithmetic: the graph is checked
        # against PyTorch by tests/test_export.py instead
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, (example, example_size), str(path), dynamo=False, opset_version=OPSET,
            input_names=list(INPUTS), output_names=list(OUTPUTS), dynamic_axes=dynamic,
        )  # fmt: skip
