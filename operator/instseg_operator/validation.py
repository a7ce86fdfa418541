"""Checks of a training's spec that the CRD schema cannot express.

Each problem names the field and what would fix it. The API server has already applied the
schema (types, enums, minimums, CEL rules); these catch values that the Job would otherwise
be rejected for, or that would leave a pod stuck with a less helpful message.
"""

from __future__ import annotations

import re

from . import pod_template

# resource.Quantity: a signed decimal number with an optional binary, decimal or exponent suffix
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")
# a container image reference: [registry[:port]/]path[:tag][@digest], lower-case path
IMAGE = re.compile(
    r"^(?:[a-zA-Z0-9.-]+(?::\d+)?/)?[a-z0-9]+(?:[._-]+[a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*(?::[\w][\w.-]{0,127})?(?:@[a-z0-9]+:[a-f0-9]{32,})?$"
)
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
TOLERATION_OPERATORS = {"Exists", "Equal"}
TOLERATION_EFFECTS = {"NoSchedule", "PreferNoSchedule", "NoExecute"}


def _label_key_problem(key: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN.match(prefix)):
        return "its prefix must be a DNS subdomain"
    if not name or len(name) > 63 or not LABEL_NAME.match(name):
        return "its name must be 1-63 alphanumerics, '-', '_' or '.', alphanumeric at both ends"
    return None


def _quantity_problems(spec: dict) -> list[str]:
    resources = spec.get("resources") or {}
    problems = []
    for key in ("cpu", "memory"):
        value = resources.get(key)
        if value is not None and not QUANTITY.match(str(value)):
            problems.append(
                f"spec.resources.{key}: {value!r} is not a Kubernetes quantity "
                f"(write e.g. {'8 or 500m' if key == 'cpu' else '32Gi or 16000Mi'})"
            )
    for kind in ("requests", "limits"):
        for name, value in (resources.get(kind) or {}).items():
            problem = _label_key_problem(name)  # resource names are shaped like label keys
            if problem:
                problems.append(
                    f"spec.resources.{kind}: {name!r} is not a resource name: {problem}"
                )
            if not QUANTITY.match(str(value)):
                problems.append(
                    f"spec.resources.{kind}[{name}]: {value!r} is not a Kubernetes quantity"
                )
    gpu = resources.get("gpuResource")
    if gpu and (_label_key_problem(gpu) or "/" not in gpu):
        problems.append(
            f"spec.resources.gpuResource: {gpu!r} is not an extended resource name "
            "(write e.g. nvidia.com/gpu, amd.com/gpu or nvidia.com/mig-1g.10gb)"
        )
    return problems


def _scheduling_problems(spec: dict) -> list[str]:
    problems = []
    for key, value in (spec.get("nodeSelector") or {}).items():
        problem = _label_key_problem(key)
        if problem:
            problems.append(f"spec.nodeSelector: label key {key!r} is invalid: {problem}")
        if len(str(value)) > 63 or not LABEL_VALUE.match(str(value)):
            problems.append(
                f"spec.nodeSelector[{key}]: value {value!r} is not a valid label value "
                "(at most 63 alphanumerics, '-', '_' or '.', alphanumeric at both ends)"
            )
    for i, toleration in enumerate(spec.get("tolerations") or []):
        where = f"spec.tolerations[{i}]"
        operator = toleration.get("operator", "Equal")
        if operator not in TOLERATION_OPERATORS:
            problems.append(f"{where}.operator: {operator!r} must be Exists or Equal")
        if operator == "Exists" and toleration.get("value"):
            problems.append(f"{where}.value: must be empty when operator is Exists")
        effect = toleration.get("effect")
        if effect and effect not in TOLERATION_EFFECTS:
            problems.append(
                f"{where}.effect: {effect!r} must be one of {', '.join(sorted(TOLERATION_EFFECTS))}"
            )
        if toleration.get("key") and _label_key_problem(toleration["key"]):
            problems.append(f"{where}.key: {toleration['key']!r} is not a valid label key")
        if not toleration.get("key") and operator != "Exists":
            problems.append(f"{where}: an empty key needs operator Exists (tolerate everything)")
    priority = spec.get("priorityClassName")
    if priority and (len(priority) > 253 or not DNS_SUBDOMAIN.match(priority)):
        problems.append(f"spec.priorityClassName: {priority!r} is not a valid PriorityClass name")
    return problems


def spec_problems(spec: dict, built_pod: dict | None = None) -> list[str]:
    """Every problem of `spec` the schema cannot catch; empty when the spec is usable.
    `built_pod` is the trainer's pod template as the operator builds it, which
    spec.podTemplate may extend but not change."""
    problems = _quantity_problems(spec) + _scheduling_problems(spec)
    if built_pod is not None:
        problems += pod_template.problems(spec.get("podTemplate"), built_pod)
    image = spec.get("image")
    if image is not None and not IMAGE.match(image):
        problems.append(
            f"spec.image: {image!r} is not a valid image reference "
            "(e.g. ghcr.io/instseg/trainer:0.1.0)"
        )
    hyperparameters = spec.get("hyperparameters") or {}
    weights = hyperparameters.get("backboneWeights")
    if weights is not None and weights not in ("imagenet", "none") and not weights.startswith("/"):
        problems.append(
            f"spec.hyperparameters.backboneWeights: {weights!r} must be imagenet, none, "
            "or an absolute path inside the trainer container"
        )
    return problems + _start_problems(spec)


def _start_problems(spec: dict) -> list[str]:
    """spec.hyperparameters values that fit only some templates, or only some forms."""
    hyperparameters = spec.get("hyperparameters") or {}
    template, start = str(spec.get("template", "")), hyperparameters.get("weights")
    problems = []
    if start is not None and start != "coco" and not start.startswith("/"):
        problems.append(
            f"spec.hyperparameters.weights: {start!r} must be coco or an absolute path inside "
            "the trainer container (a checkpoint or torchvision's COCO Mask R-CNN file)"
        )
    if start == "coco" and not template.endswith("ResNet50"):
        problems.append(
            "spec.hyperparameters.weights: coco (torchvision's COCO Mask R-CNN, ResNet-50 FPN) "
            f"fits the MaskRCNN-ResNet50 template only, not {template}"
        )
    model = hyperparameters.get("model") or {}
    if model.get("dropPathRate") is not None and not template.endswith("ConvNeXt"):
        problems.append(
            f"spec.hyperparameters.model.dropPathRate: only the ConvNeXt template has it, not "
            f"{template}"
        )
    return problems


def claims(spec: dict) -> dict[str, str]:
    """PersistentVolumeClaim name → the first spec field that refers to it."""
    fields = {
        "spec.data.train.claimName": (spec.get("data") or {}).get("train") or {},
        "spec.data.val.claimName": (spec.get("data") or {}).get("val") or {},
        "spec.output.claimName": spec.get("output") or {},
    }
    found: dict[str, str] = {}
    for field, source in fields.items():
        claim = source.get("claimName")
        if claim and claim not in found:
            found[claim] = field
    return found
