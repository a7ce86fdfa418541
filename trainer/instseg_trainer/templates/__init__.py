"""The three Mask R-CNN templates: YAML recipes in the package, found by name or OTX id."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from instseg_trainer.errors import TemplateError

_FILES = ("efficientnet_b2b.yaml", "resnet50.yaml", "convnext.yaml")


@dataclass(frozen=True)
class Template:
    name: str
    otx_id: str
    summary: str
    input_size: int
    model: dict
    hyperparameters: dict
    published: dict  # OTX's published complexity: gflops, size_mb and an optional note
    start: str = "imagenet"  # what a training starts from: imagenet (backbone) or coco

    def with_overrides(self, **overrides) -> Template:
        """A copy with hyperparameters (or `input_size`) replaced; None values are ignored."""
        settings = {
            key if key == "input_size" else f"hyperparameters.{key}": value
            for key, value in overrides.items() if value is not None
        }  # fmt: skip
        return self.with_settings(settings)

    def settings(self) -> dict[str, Any]:
        """Every value a user may set (`--set PATH=VALUE`), by dotted path: input_size,
        hyperparameters.*, and model.* except the backbone (another backbone is another
        template)."""
        values = {"input_size": self.input_size}
        values |= dict(_leaves(self.hyperparameters, "hyperparameters."))
        values |= dict(_leaves(self.model, "model."))
        del values["model.backbone"]
        return values

    def with_settings(self, settings: dict[str, Any]) -> Template:
        """A copy with the values at these dotted paths replaced, each checked against the
        type of the template's own value (an integer stays an integer; a real number takes
        either)."""
        known = self.settings()
        tree = {"input_size": self.input_size, "hyperparameters": self.hyperparameters,
                "model": self.model}  # fmt: skip
        tree = copy.deepcopy(tree)
        for given, value in settings.items():
            path = _resolve(self.name, given, known)
            if path == "model.backbone":
                raise TemplateError(
                    f"{self.name}: the backbone is the template's; choose another template "
                    f"(`instseg templates`) instead of setting 'model.backbone'"
                )
            *parents, leaf = path.split(".")
            node = tree
            for key in parents:
                node = node[key]
            node[leaf] = _typed(self.name, path, value, known[path])
        _check(self.name, tree["input_size"], tree["hyperparameters"], tree["model"])
        return Template(self.name, self.otx_id, self.summary, tree["input_size"], tree["model"],
                        tree["hyperparameters"], self.published, self.start)  # fmt: skip


def _resolve(name: str, given: str, known: dict[str, Any]) -> str:
    """The full path of a setting given by its path or by a unique ending of it
    (momentum → hyperparameters.momentum, rpn.nms_thresh → model.rpn.nms_thresh)."""
    if given in known or given == "model.backbone":
        return given
    endings = [path for path in known if path.endswith(f".{given}")]
    if len(endings) == 1:
        return endings[0]
    if endings:
        raise TemplateError(f"{name}: setting '{given}' is ambiguous: {', '.join(endings)}")
    raise TemplateError(f"{name}: unknown setting '{given}'; known: {', '.join(sorted(known))}")


def _leaves(tree: dict, prefix: str):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _typed(name: str, path: str, value: Any, current: Any) -> Any:
    """`value` as the type of the template's `current` value, or a TemplateError."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(current, bool):
        ok = isinstance(value, bool)
    elif isinstance(current, int):
        ok = number and float(value).is_integer()
        value = int(value) if ok else value
    elif isinstance(current, float):
        ok = number
        value = float(value) if ok else value
    elif isinstance(current, list):
        ok = isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
    else:
        ok = isinstance(value, str)
    if not ok:
        raise TemplateError(
            f"{name}: setting '{path}' takes a value like {current!r}, got {value!r}"
        )
    return value


def _check(name: str, input_size: int, hyper: dict, model: dict) -> None:
    if input_size < 64 or input_size % 32:
        raise TemplateError(
            f"{name}: input_size {input_size} must be a multiple of 32 and at least 64"
        )
    positive = ("epochs", "batch_size", "learning_rate")
    for key in positive:
        if hyper[key] <= 0:
            raise TemplateError(f"{name}: hyperparameter '{key}' must be > 0, got {hyper[key]}")
    for key in ("warmup_iterations", "early_stopping_patience", "plateau_patience"):
        if hyper[key] < 0:
            raise TemplateError(f"{name}: hyperparameter '{key}' must be >= 0, got {hyper[key]}")
    fractions = {f"hyperparameters.{k}": hyper[k] for k in FRACTIONS["hyperparameters"]}
    for head in ("rpn", "roi"):
        fractions |= {f"model.{head}.{k}": model[head][k] for k in FRACTIONS[head]}
    if "drop_path_rate" in model:
        fractions["model.drop_path_rate"] = model["drop_path_rate"]
    for path, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            raise TemplateError(f"{name}: '{path}' must be within [0, 1], got {value}")
    _check_schedule(name, hyper)
    _check_model(name, model)


def _check_model(name: str, model: dict) -> None:
    for head in ("rpn", "roi"):
        if model[head]["bg_iou_thresh"] > model[head]["fg_iou_thresh"]:
            raise TemplateError(
                f"{name}: 'model.{head}.bg_iou_thresh' ({model[head]['bg_iou_thresh']}) must "
                f"not exceed 'model.{head}.fg_iou_thresh' ({model[head]['fg_iou_thresh']})"
            )
    if len(model["anchor_sizes"]) != 5:
        raise TemplateError(
            f"{name}: 'model.anchor_sizes' needs 5 sizes, one per FPN level, got "
            f"{model['anchor_sizes']}"
        )
    counts = dict(_leaves(model, "model."))
    for path, value in counts.items():
        values = value if isinstance(value, list) else [value]
        if path not in FRACTION_PATHS and any(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0 for v in values
        ):
            raise TemplateError(f"{name}: '{path}' must be > 0, got {value}")


def _check_schedule(name: str, hyper: dict) -> None:
    """What torch's schedulers and clipping require of the recipe."""
    if not 0.0 < hyper["plateau_factor"] < 1.0:
        raise TemplateError(f"{name}: 'hyperparameters.plateau_factor' must be within (0, 1)")
    if not 0.0 < hyper["warmup_ratio"] <= 1.0:
        raise TemplateError(f"{name}: 'hyperparameters.warmup_ratio' must be within (0, 1]")
    for key in ("grad_clip_norm", "weight_decay", "min_learning_rate", "early_stopping_start"):
        if hyper[key] < 0:
            raise TemplateError(f"{name}: 'hyperparameters.{key}' must be >= 0 (0: off)")


# values that are probabilities, IoU thresholds or momenta
FRACTIONS = {
    "hyperparameters": ("flip_probability", "warmup_ratio", "plateau_factor", "momentum",
                        "ema_epoch_momentum"),
    "rpn": ("fg_iou_thresh", "bg_iou_thresh", "positive_fraction", "nms_thresh"),
    "roi": ("fg_iou_thresh", "bg_iou_thresh", "positive_fraction", "score_thresh",
            "nms_thresh"),
}  # fmt: skip
FRACTION_PATHS = {f"model.{head}.{key}" for head in ("rpn", "roi") for key in FRACTIONS[head]}
FRACTION_PATHS.add("model.drop_path_rate")


def _load(file_name: str) -> Template:
    text = resources.files(__package__).joinpath(file_name).read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    return Template(
        name=raw["name"],
        otx_id=raw["otx_id"],
        summary=raw["summary"],
        input_size=int(raw["input_size"]),
        model=raw["model"],
        hyperparameters=raw["hyperparameters"],
        published=raw["otx_published"],
        start=raw.get("start", "imagenet"),
    )


def all_templates() -> list[Template]:
    return [_load(f) for f in _FILES]


def get_template(name: str) -> Template:
    """A template by its name (MaskRCNN-ResNet50) or OTX id, case-insensitively."""
    for template in all_templates():
        if name.lower() in (template.name.lower(), template.otx_id.lower()):
            return template
    names = ", ".join(t.name for t in all_templates())
    raise TemplateError(f"unknown template '{name}'; choose one of {names} (or their OTX ids)")
