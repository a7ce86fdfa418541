"""The three Mask R-CNN templates: YAML recipes in the package, found by name or OTX id."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from importlib import resources

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

    def with_overrides(self, **overrides) -> Template:
        """A copy with hyperparameters (or `input_size`) replaced; None values are ignored."""
        hyper = copy.deepcopy(self.hyperparameters)
        input_size = self.input_size
        for key, value in overrides.items():
            if value is None:
                continue
            if key == "input_size":
                input_size = int(value)
            elif key in hyper:
                hyper[key] = type(hyper[key])(value) if hyper[key] is not None else value
            else:
                known = ", ".join(sorted(hyper))
                raise TemplateError(f"unknown hyperparameter '{key}'; known: {known}, input_size")
        _check(self.name, input_size, hyper)
        return Template(
            self.name, self.otx_id, self.summary, input_size, self.model, hyper, self.published
        )


def _check(name: str, input_size: int, hyper: dict) -> None:
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
    if not 0.0 <= hyper["flip_probability"] <= 1.0:
        raise TemplateError(f"{name}: 'flip_probability' must be within [0, 1]")


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
