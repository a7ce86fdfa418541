"""The contract between operator and trainer (instseg_contract) is what the CRD declares and
what both sides use."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import instseg_contract as contract
import yaml

from instseg_operator.manifests import trainer_command
from instseg_operator.status import build_conditions
from instseg_trainer.cli import build_parser
from instseg_trainer.reporting.events import (
    BatchSize,
    Epoch,
    Exported,
    Final,
    Iteration,
    Start,
    Validation,
)
from instseg_trainer.reporting.kubernetes_status import progress_patch
from instseg_trainer.templates import all_templates, get_template

ROOT = Path(__file__).resolve().parents[1]
CRD = yaml.safe_load((ROOT / "crds" / "instancesegtrainings.yaml").read_text())
(VERSION,) = CRD["spec"]["versions"]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]["properties"]


def test_the_crd_names_the_contracts_resource() -> None:
    names = CRD["spec"]["names"]
    assert (CRD["spec"]["group"], VERSION["name"]) == (contract.GROUP, contract.VERSION)
    assert (names["kind"], names["plural"]) == (contract.KIND, contract.PLURAL)


def test_phases_and_conditions_are_the_contracts() -> None:
    assert tuple(SCHEMA["status"]["properties"]["phase"]["enum"]) == contract.PHASES
    conditions = build_conditions([], contract.RUNNING, "Training", "", "now", 1, True)
    assert tuple(c["type"] for c in conditions) == contract.CONDITION_TYPES


def _dotted_properties(schema: dict, prefix: str = "") -> dict[str, dict]:
    found = {}
    for key, value in schema["properties"].items():
        if value.get("type") == "object":
            found |= _dotted_properties(value, f"{prefix}{key}.")
        else:
            found[f"{prefix}{key}"] = value
    return found


def test_every_template_value_is_a_crd_hyperparameter_that_reaches_the_trainer() -> None:
    declared = _dotted_properties(SCHEMA["spec"]["properties"]["hyperparameters"])
    assert set(declared) == set(contract.HYPERPARAMETER_FLAGS) | set(contract.TEMPLATE_SETTINGS)
    flagged = {"input_size"} | {f"hyperparameters.{k}" for k in (
        "epochs", "batch_size", "learning_rate", "warmup_iterations", "early_stopping_patience",
        "backbone_weights")}  # fmt: skip
    for template in all_templates():  # every value, either a flag or a setting
        reachable = flagged | set(contract.TEMPLATE_SETTINGS.values())
        assert set(template.settings()) <= reachable, template.name
    values = {"model": {"rpn": {"nmsThresh": 0.6}, "anchorSizes": [16, 32, 64, 128, 256]},
              "momentum": 0.95, "minLearningRate": 1e-6, "weightDecay": 1e-5}  # fmt: skip
    spec = {"template": "MaskRCNN-ResNet50", "data": {"train": {"claimName": "d"}},
            "hyperparameters": values}  # fmt: skip
    args = build_parser().parse_args(trainer_command(spec, "job", "service")[1:])
    template = get_template(args.template).with_settings(dict(args.set))
    assert template.hyperparameters["momentum"] == 0.95
    assert template.model["rpn"]["nms_thresh"] == 0.6
    assert template.model["anchor_sizes"] == [16, 32, 64, 128, 256]
    assert template.hyperparameters["min_learning_rate"] == 1e-6  # JSON's 1e-06, not a string
    assert template.hyperparameters["weight_decay"] == 1e-5


def test_the_hyperparameters_with_flags_reach_the_trainer_as_flags_it_parses() -> None:
    values = {key: 3 for key in contract.HYPERPARAMETER_FLAGS}
    values |= {
        "backboneWeights": "none",
        "learningRate": 0.01,
        "autoBatchSize": True,
        "tiling": "auto",
        "tileSize": 512,
    }
    data = {"train": {"claimName": "datasets"}, "val": {"claimName": "datasets"}}
    spec = {"template": "MaskRCNN-ResNet50", "data": data, "hyperparameters": values}
    command = trainer_command(spec, "job", "service")
    assert command[0] == contract.TRAINER_SCRIPT
    args = build_parser().parse_args(command[1:])
    assert (args.epochs, args.batch_size, args.learning_rate) == (3, 3, 0.01)
    assert args.auto_batch_size is True and (args.tiling, args.tile_size) == ("auto", 512)
    for flag in contract.HYPERPARAMETER_FLAGS.values():
        assert flag in command


def test_progress_fields_are_the_crds() -> None:
    progress = SCHEMA["status"]["properties"]["progress"]["properties"]
    assert set(progress) == set(contract.PROGRESS_FIELDS)
    assert set(progress["metrics"]["properties"]) == set(contract.PROGRESS_METRIC_FIELDS)
    validation = Validation(
        epoch=2, total_epochs=3, iteration=8,
        metrics={"segm": {"map": 0.5, "map50": 0.7}, "bbox": {"map": 0.4, "map50": 0.6},
                 "f_measure": {"best": {"f_measure": 0.6}}},
        best={"epoch": 2, "segm_map": 0.5, "bbox_map": 0.4}, improved=True, learning_rate=0.01,
        seconds=1.0,
    )  # fmt: skip
    patch = progress_patch(validation)
    assert set(patch) <= set(contract.PROGRESS_FIELDS)
    assert set(patch["metrics"]) == set(contract.PROGRESS_METRIC_FIELDS)


def test_the_contract_needs_only_the_standard_library() -> None:
    tree = ast.parse(Path(contract.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}  # fmt: skip
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}  # fmt: skip
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}


def test_the_trainers_events_are_the_contracts_kinds() -> None:
    kinds = tuple(
        kind.kind for kind in (Start, Iteration, Epoch, Validation, Final, Exported, BatchSize)
    )
    assert kinds == contract.EVENT_KINDS


def test_artifact_fields_are_the_crds() -> None:
    artifacts = SCHEMA["status"]["properties"]["artifacts"]["items"]["properties"]
    assert tuple(artifacts) == contract.ARTIFACT_FIELDS
