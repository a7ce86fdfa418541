"""Mask R-CNN assembled from torchvision parts, configured by a template's `model` section."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
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
) -> list[dict[str, torch.Tensor]]:
    """Detections with boxes in original-image coordinates and masks pasted at original size.

    GeneralizedRCNN.forward would paste masks at the resized input size; running its steps
    here lets torchvision's postprocess paste once, at the size the user's image has.
    """
    image_list, _ = model.transform(images)
    features = model.backbone(image_list.tensors)
    proposals, _ = model.rpn(image_list, features)
    detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
    return model.transform.postprocess(detections, image_list.image_sizes, original_sizes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
