"""Measured model complexity: FLOPs with torch's FLOP counter, parameters, fp32 size."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from instseg_trainer.models.mask_rcnn import build_model, count_parameters
from instseg_trainer.templates import Template

DEFAULT_CLASSES = 80


@torch.no_grad()
def measure_complexity(template: Template, num_classes: int = DEFAULT_CLASSES) -> dict:
    """GFLOPs (2 x multiply-adds) of one image at the template's input size.

    Counted on the meta device (no arithmetic is done): backbone, FPN and RPN head on the
    square input, the box head on the template's test-time proposal count and the mask
    head on its detection count. RoIAlign and NMS are not counted.
    """
    size = template.input_size
    with torch.device("meta"):
        model = build_model(template.model, num_classes, size).eval()
        image = torch.zeros(1, 3, size, size)
        proposals = template.model["rpn"]["post_nms_top_n_test"]
        detections = template.model["roi"]["detections_per_img"]
        channels = model.backbone.out_channels
        with FlopCounterMode(display=False) as counter:
            features = model.backbone(image)
            model.rpn.head(list(features.values()))
            box_features = model.roi_heads.box_head(torch.zeros(proposals, channels, 7, 7))
            model.roi_heads.box_predictor(box_features)
            mask_features = model.roi_heads.mask_head(torch.zeros(detections, channels, 14, 14))
            model.roi_heads.mask_predictor(mask_features)
    params = count_parameters(model)
    return {
        "gflops": counter.get_total_flops() / 1e9,
        "parameters": params,
        "size_mb": params * 4 / 1e6,
        "input_size": size,
        "proposals": proposals,
        "detections": detections,
    }
