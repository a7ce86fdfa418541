"""torchvision classification backbones with an FPN on top, for the three templates."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.ops import misc as misc_nn_ops

from instseg_trainer.errors import TemplateError

BACKBONES = ("resnet50", "efficientnet_b2", "convnext_tiny")

_IMAGENET_WEIGHTS = {
    "resnet50": models.ResNet50_Weights.IMAGENET1K_V1,
    "efficientnet_b2": models.EfficientNet_B2_Weights.IMAGENET1K_V1,
    "convnext_tiny": models.ConvNeXt_Tiny_Weights.IMAGENET1K_V1,
}


def build_backbone(
    name: str,
    fpn_channels: int,
    weights: str = "none",
    drop_path_rate: float = 0.1,
    load_weights: bool = True,
) -> BackboneWithFPN:
    """Backbone + FPN. `weights` is "imagenet", "none" (random init) or a state-dict path.

    With pretrained weights the batch norms are frozen (detection batches are too small to
    re-estimate them) and, for ResNet-50, so is the first stage; from scratch every norm
    layer trains. `load_weights=False` builds that same layout without loading anything,
    for weights that come from an instseg checkpoint next.
    """
    if name not in BACKBONES:
        raise TemplateError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}")
    weights = normalise_weights(weights)
    pretrained = weights != "none"
    if not load_weights:
        weights = "none"
    norm = misc_nn_ops.FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    if name == "resnet50":
        if fpn_channels != 256:
            raise TemplateError(f"resnet50 uses torchvision's 256-channel FPN, not {fpn_channels}")
        fpn = resnet_fpn_backbone(
            backbone_name="resnet50",
            weights=None,
            norm_layer=norm,
            trainable_layers=3 if pretrained else 5,
        )
        _load_weights(fpn.body, name, weights)  # the body keeps ResNet's parameter names
        return fpn
    if name == "efficientnet_b2":
        body = models.efficientnet_b2(weights=None, norm_layer=norm)
        _load_weights(body, name, weights)
        # stages at strides 4/8/16/32; the 1408-channel head conv is classification-only
        features = body.features[:8]
        return BackboneWithFPN(
            features, {"2": "0", "3": "1", "5": "2", "7": "3"}, [24, 48, 120, 352], fpn_channels
        )
    body = models.convnext_tiny(weights=None, stochastic_depth_prob=drop_path_rate)
    _load_weights(body, name, weights)
    return BackboneWithFPN(
        body.features, {"1": "0", "3": "1", "5": "2", "7": "3"}, [96, 192, 384, 768], fpn_channels
    )


def normalise_weights(weights: str) -> str:
    """ "imagenet"/"none" in any case, else a path that must exist."""
    if weights.lower() in ("imagenet", "none"):
        return weights.lower()
    if not Path(weights).is_file():
        raise TemplateError(
            f"--backbone-weights '{weights}': expected imagenet, none, or the path of an "
            f"existing torchvision state-dict file"
        )
    return weights


def _load_weights(model: nn.Module, name: str, weights: str) -> None:
    if weights == "none":
        return
    if weights == "imagenet":
        try:
            state = _IMAGENET_WEIGHTS[name].get_state_dict(progress=False)
        except Exception as e:  # no network, proxy, hub outage: say what to do instead
            raise TemplateError(
                f"could not download ImageNet weights for {name} ({e}); pass "
                f"--backbone-weights PATH to a torchvision state dict, or none (train from scratch)"
            ) from e
    else:
        path = Path(weights)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise TemplateError(f"--backbone-weights: cannot load '{path}': {e}") from e
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if missing:
        raise TemplateError(
            f"backbone weights do not fit {name}: {len(missing)} missing keys (e.g. {missing[0]}); "
            f"pass a torchvision {name} classification state dict"
        )
