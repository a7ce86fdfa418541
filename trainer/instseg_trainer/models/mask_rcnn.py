"""Mask R-CNN assembled from torchvision parts, configured by a template's `model` section."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign

from instseg_trainer.models.backbones import build_backbone
from instseg_trainer.models.losses import L1RegionProposalNetwork, L1RoIHeads

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
FEATURE_LEVELS = ["0", "1", "2", "3"]


class PreResizedTransform(GeneralizedRCNNTransform):
    """Normalise and pad to a multiple of 32, but never resize: the data pipeline already
    resized the image and rasterised the masks at that size (resizing full-size masks
    again here is the slow path we avoid)."""

    def resize(self, image, target=None):
        return image, target


def build_model(
    model_cfg: dict,
    num_classes: int,
    input_size: int,
    backbone_weights: str = "none",
    load_backbone_weights: bool = True,
) -> GeneralizedRCNN:
    """Mask R-CNN for `num_classes` object classes (background is added here).

    `load_backbone_weights=False` keeps the layout that `backbone_weights` implies (frozen
    norms when pretrained) without loading: for weights restored from a checkpoint.
    """
    backbone = build_backbone(
        model_cfg["backbone"],
        model_cfg["fpn_channels"],
        backbone_weights,
        model_cfg.get("drop_path_rate", 0.1),
        load_backbone_weights,
    )
    channels = backbone.out_channels
    rpn_cfg, roi_cfg, mask_cfg = model_cfg["rpn"], model_cfg["roi"], model_cfg["mask_head"]

    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in model_cfg["anchor_sizes"]),
        aspect_ratios=(tuple(model_cfg["aspect_ratios"]),) * len(model_cfg["anchor_sizes"]),
    )
    rpn = L1RegionProposalNetwork(
        anchors,
        RPNHead(channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=rpn_cfg["fg_iou_thresh"],
        bg_iou_thresh=rpn_cfg["bg_iou_thresh"],
        batch_size_per_image=rpn_cfg["batch_size_per_image"],
        positive_fraction=rpn_cfg["positive_fraction"],
        pre_nms_top_n={
            "training": rpn_cfg["pre_nms_top_n_train"],
            "testing": rpn_cfg["pre_nms_top_n_test"],
        },
        post_nms_top_n={
            "training": rpn_cfg["post_nms_top_n_train"],
            "testing": rpn_cfg["post_nms_top_n_test"],
        },
        nms_thresh=rpn_cfg["nms_thresh"],
    )
    representation = roi_cfg["representation_size"]
    roi_heads = L1RoIHeads(
        MultiScaleRoIAlign(FEATURE_LEVELS, output_size=7, sampling_ratio=2),
        TwoMLPHead(channels * 7 * 7, representation),
        FastRCNNPredictor(representation, num_classes + 1),
        fg_iou_thresh=roi_cfg["fg_iou_thresh"],
        bg_iou_thresh=roi_cfg["bg_iou_thresh"],
        batch_size_per_image=roi_cfg["batch_size_per_image"],
        positive_fraction=roi_cfg["positive_fraction"],
        bbox_reg_weights=None,
        score_thresh=roi_cfg["score_thresh"],
        nms_thresh=roi_cfg["nms_thresh"],
        detections_per_img=roi_cfg["detections_per_img"],
        mask_roi_pool=MultiScaleRoIAlign(FEATURE_LEVELS, output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(channels, [mask_cfg["channels"]] * mask_cfg["convs"], 1),
        mask_predictor=MaskRCNNPredictor(
            mask_cfg["channels"], mask_cfg["channels"], num_classes + 1
        ),
    )
    transform = PreResizedTransform(input_size, input_size, IMAGENET_MEAN, IMAGENET_STD)
    # under bf16 autocast, box deltas and mask logits would be decoded in bf16 (4 px steps
    # at 1024 px); heads hand float32 to torchvision's box coder and mask paste instead
    for head in (rpn.head, roi_heads.box_predictor, roi_heads.mask_predictor):
        head.register_forward_hook(_outputs_to_float32)
    return GeneralizedRCNN(backbone, rpn, roi_heads, transform)


def _outputs_to_float32(module: nn.Module, inputs, output):
    if isinstance(output, torch.Tensor):
        return output.float()
    return type(output)(_outputs_to_float32(module, inputs, o) for o in output)


def to_model_input(images: tuple[torch.Tensor, ...], device: torch.device) -> list[torch.Tensor]:
    """uint8 CHW images → float [0, 1] on the device (converted there: 4x less to copy)."""
    return [im.to(device, non_blocking=True).float().div_(255) for im in images]


@torch.no_grad()
def predict_batch(
    model: GeneralizedRCNN,
    images: list[torch.Tensor],
    original_sizes: list[tuple[int, int]],
    mask_threshold: float = 0.5,
) -> list[dict[str, torch.Tensor]]:
    """Detections with boxes in original-image coordinates and binary masks (bool, N x H x W)
    at original size.

    GeneralizedRCNN.forward would paste masks at the resized input size; running its steps
    here pastes once, at the size the user's image has.
    """
    image_list, _ = model.transform(images)
    features = model.backbone(image_list.tensors)
    proposals, _ = model.rpn(image_list, features)
    detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
    for det, size, original in zip(detections, image_list.image_sizes, original_sizes):
        det["boxes"] = resize_boxes(det["boxes"], size, original)
        if "masks" in det:
            det["masks"] = paste_binary_masks(det["masks"], det["boxes"], original, mask_threshold)
    return detections


def paste_binary_masks(
    masks: torch.Tensor, boxes: torch.Tensor, image_hw: tuple[int, int], threshold: float
) -> torch.Tensor:
    """(N, 1, M, M) mask probabilities → (N, H, W) bool masks, `> threshold`, pasted into boxes.

    The same pixels as torchvision's paste_masks_in_image followed by the threshold, without
    its costs: a float image per detection, a host sync per box coordinate on CUDA. Each mask
    is resized and thresholded inside its box only. The result is a transposed view of
    (N, W, H) storage, which is the column-major layout pycocotools encodes without a copy.
    """
    height, width = image_hw
    padded, scale = expand_masks(masks, padding=1)
    corners = expand_boxes(boxes, scale).to(torch.int64).tolist()  # one sync for all boxes
    pasted = torch.zeros((len(corners), width, height), dtype=torch.bool, device=masks.device)
    for out, mask, (x0, y0, x1, y1) in zip(pasted, padded, corners):
        # torchvision's arithmetic and slicing, with the box as Python ints
        w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        mask = F.interpolate(mask[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        left, right = max(x0, 0), min(x1 + 1, width)
        top, bottom = max(y0, 0), min(y1 + 1, height)
        inside = mask[top - y0 : bottom - y0, left - x0 : right - x0]
        out[left:right, top:bottom] = (inside > threshold).T
    return pasted.transpose(1, 2)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
