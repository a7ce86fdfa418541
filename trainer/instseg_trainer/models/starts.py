"""Where a new training's weights start, beyond its backbone's (`--weights`):
- an instseg checkpoint (best.pt, last.pt), of the same classes or of others;
- torchvision's COCO-trained Mask R-CNN (ResNet-50 FPN, the architecture of the ResNet50
  template), by name (`coco`: downloaded into torch's cache) or from its file (air-gapped
  clusters: a path on a volume).

Class-incremental starts (OTX's incremental learning): every layer is loaded except the
class-specific ones (the box classifier, the box regressor and the mask predictor), whose
rows are kept for the background and for every class the new list shares with the old one,
by name; a new class keeps its fresh initialisation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from instseg_trainer.engine.checkpoint import FORMAT, read_weights_file
from instseg_trainer.errors import CheckpointError

log = logging.getLogger(__name__)

COCO = "coco"
COCO_TEMPLATE = "MaskRCNN-ResNet50"
# class-specific layers → rows per class (row block 0 is the background)
CLASS_LAYERS = {
    "roi_heads.box_predictor.cls_score": 1,
    "roi_heads.box_predictor.bbox_pred": 4,
    "roi_heads.mask_predictor.mask_fcn_logits": 1,
}


@dataclass(frozen=True)
class StartWeights:
    source: str  # what the user gave, for messages
    weights: dict[str, torch.Tensor]
    class_names: list[str]  # without the background


def read_start(given: str | Path, template: str) -> StartWeights:
    """The weights `--weights` names: `coco`, an instseg checkpoint or a torchvision Mask
    R-CNN state dict (.pth)."""
    if str(given) == COCO:
        _check_coco_fits(template, COCO)
        return StartWeights(COCO, _download_coco(), _coco_class_names())
    path = Path(given)
    state = read_weights_file(path, f"--weights '{path}'", " (a checkpoint, or 'coco')")
    if isinstance(state, dict) and state.get("format") == FORMAT:
        weights = state.get("ema") or state.get("model")
        if weights is None:
            raise CheckpointError(f"--weights '{path}' holds no model weights")
        return StartWeights(str(path), weights, list(state.get("class_names") or []))
    if isinstance(state, dict) and "roi_heads.box_predictor.cls_score.weight" in state:
        _check_coco_fits(template, str(path))
        return StartWeights(str(path), state, _torchvision_class_names(path, state))
    raise CheckpointError(
        f"--weights '{path}' is neither an instseg checkpoint nor a torchvision Mask R-CNN "
        f"state dict; use best.pt or last.pt of a training, or 'coco'"
    )


def load_start(model: nn.Module, start: StartWeights, class_names: list[str]) -> None:
    """Loads `start` into `model`, class-incrementally when the class lists differ."""
    weights = {k: v for k, v in start.weights.items() if not k.endswith("num_batches_tracked")}
    if start.class_names != class_names:
        try:
            weights = adapt_class_layers(weights, model.state_dict(), start.class_names,
                                         class_names)  # fmt: skip
        except CheckpointError as e:
            raise CheckpointError(f"{_does_not_fit(start.source)} ({e})") from e
        kept = [name for name in class_names if name in start.class_names]
        new = [name for name in class_names if name not in start.class_names]
        log.info(
            "class-incremental start from %s: every layer loaded; the class layers keep the "
            "background and %d class(es) %s, and initialise %d new: %s", start.source,
            len(kept), kept[:10], len(new), new[:10],
        )  # fmt: skip
    missing, unexpected = _load(model, weights, start.source)
    if missing or unexpected:
        raise CheckpointError(
            f"{_does_not_fit(start.source)} (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def _does_not_fit(source: str) -> str:
    """The start of the message when the start weights do not fit the model."""
    if source == COCO:
        return (
            "torchvision's COCO Mask R-CNN (the template's start) does not fit the model as "
            "--set changed it; start from --backbone-weights imagenet instead"
        )
    return (
        f"--weights '{source}' does not fit the model built here; was it trained with another "
        f"template or other model settings?"
    )


def adapt_class_layers(
    weights: dict[str, torch.Tensor],
    fresh: dict[str, torch.Tensor],
    old_classes: list[str],
    new_classes: list[str],
) -> dict[str, torch.Tensor]:
    """`weights` with the class-specific tensors rebuilt for `new_classes`: from `fresh` (the
    new model's initialisation), with the row blocks of the background and of each class
    found in `old_classes` (by name) copied from `weights`."""
    adapted = dict(weights)
    old_row = {name: index + 1 for index, name in enumerate(old_classes)}
    shared = [(new + 1, old_row[name]) for new, name in enumerate(new_classes) if name in old_row]
    for layer, rows in CLASS_LAYERS.items():
        for kind in ("weight", "bias"):
            key = f"{layer}.{kind}"
            if key not in weights:
                continue
            if fresh[key].shape[1:] != weights[key].shape[1:]:
                raise CheckpointError(
                    f"'{key}' is {tuple(weights[key].shape)} in the start weights but "
                    f"{tuple(fresh[key].shape)} here: the heads' settings differ"
                )
            tensor = fresh[key].clone()
            for new_index, old_index in [(0, 0), *shared]:  # the background, shared classes
                tensor[new_index * rows : (new_index + 1) * rows] = weights[key][
                    old_index * rows : (old_index + 1) * rows
                ]
            adapted[key] = tensor
    return adapted


def _load(model: nn.Module, weights: dict, source: str) -> tuple[list[str], list[str]]:
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shapes differ
        reasons = "; ".join(line.strip() for line in str(e).splitlines()[1:4])
        raise CheckpointError(f"{_does_not_fit(source)} ({reasons})") from e
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    return missing, list(result.unexpected_keys)


def _check_coco_fits(template: str, source: str) -> None:
    if template != COCO_TEMPLATE:
        raise CheckpointError(
            f"--weights '{source}': torchvision's COCO Mask R-CNN is ResNet-50 FPN; it fits "
            f"{COCO_TEMPLATE}, not {template}"
        )


def _coco_weights():
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    return MaskRCNN_ResNet50_FPN_Weights.COCO_V1


def _coco_class_names() -> list[str]:
    return list(_coco_weights().meta["categories"][1:])  # [0] is the background


def _torchvision_class_names(path: Path, state: dict) -> list[str]:
    rows = state["roi_heads.box_predictor.cls_score.weight"].shape[0]
    if rows == len(_coco_weights().meta["categories"]):
        return _coco_class_names()
    raise CheckpointError(
        f"--weights '{path}' is a torchvision Mask R-CNN with {rows - 1} classes whose names "
        f"it does not hold; only COCO's ({len(_coco_class_names())}) are known"
    )


def _download_coco() -> dict[str, torch.Tensor]:
    weights = _coco_weights()
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # no network, a proxy, a full disk: all end the same way here
        file_name = weights.url.rsplit("/", 1)[-1]
        raise CheckpointError(
            f"cannot download torchvision's COCO Mask R-CNN ({weights.url}): {e}; on a machine "
            f"without internet, download it elsewhere and pass --weights /path/to/{file_name} "
            f"(or start from --backbone-weights imagenet/none)"
        ) from e
