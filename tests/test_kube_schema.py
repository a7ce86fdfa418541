"""The emulator's CRD schema handling: pruning, defaults, OpenAPI and CEL validation."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tests.kube.schema import (
    apply_schema,
    column_value,
    load_crds,
    validate_crd_file,
    validate_resource,
)

ROOT = Path(__file__).resolve().parents[1]
CRD_FILE = ROOT / "crds" / "instancesegtrainings.yaml"
CRD = load_crds(CRD_FILE)[0]
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
EXAMPLE = yaml.safe_load((ROOT / "examples" / "training.yaml").read_text())
RUNNING_MESSAGE = (
    '<nil>: Invalid value: "object": spec cannot change while the training is Running, except '
    "spec.suspend; suspend it first, or create a new InstanceSegTraining"
)
NOT_CHECKED = (
    '<nil>: Invalid value: "null": some validation rules were not checked because the object '
    "was invalid; correct the existing errors to complete validation"
)


def example(**spec_changes) -> dict:
    resource = copy.deepcopy(EXAMPLE)
    resource["spec"].update(spec_changes)
    return resource


def with_path(path: str, value) -> dict:
    """The example with `value` set at a dotted path (None deletes the key)."""
    resource = copy.deepcopy(EXAMPLE)
    *parents, last = path.split(".")
    node = resource
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        del node[last]
    else:
        node[last] = value
    return resource


def test_crd_file_loads_with_anchors_and_merge_keys():
    pairs = validate_crd_file(CRD_FILE)
    assert [name for name, _ in pairs] == ["instancesegtrainings.instseg.io/v1alpha1"]
    spec = pairs[0][1]["properties"]["spec"]["properties"]
    output = spec["output"]
    assert output["required"] == ["claimName"]
    assert output["description"].startswith("Where checkpoints")
    assert spec["data"]["properties"]["val"]["properties"]["subPath"]["x-kubernetes-validations"]


def test_crd_file_with_a_broken_rule_is_rejected(tmp_path):
    broken = copy.deepcopy(CRD)
    broken["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"] = [
        {"rule": "self.spec ==", "message": "x"}
    ]
    path = tmp_path / "crd.yaml"
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(ValueError, match="does not compile"):
        validate_crd_file(path)


def test_example_is_valid_and_defaulted():
    new, errors = apply_schema(SCHEMA, EXAMPLE)
    assert errors == []
    assert validate_resource(CRD, EXAMPLE) == []
    spec = new["spec"]
    assert (spec["workers"], spec["backoffLimit"], spec["suspend"]) == (1, 3, False)
    assert spec["resources"] == {"gpus": 1, "cpu": "8", "memory": "32Gi"}
    assert new["metadata"] == EXAMPLE["metadata"]
    assert EXAMPLE["spec"].get("workers") is None, "the input must not be modified"


def test_resources_defaults_only_when_given():
    resource = example()
    del resource["spec"]["resources"]
    new, errors = apply_schema(SCHEMA, resource)
    assert errors == [] and "resources" not in new["spec"]
    new, errors = apply_schema(SCHEMA, example(resources={}))
    assert errors == [] and new["spec"]["resources"] == {"gpus": 1}


def test_unknown_fields_are_pruned_and_known_status_kept():
    resource = example(colour="blue", tolerations=[{"key": "gpu", "effect": "NoSchedule"}])
    resource["spec"]["data"]["train"]["extra"] = 1
    resource["metadata"]["labels"] = {"a": "b"}
    resource["status"] = {
        "kopf": {"progress": {}},
        "phase": "Running",
        "progress": {"foo": 1, "epoch": 2, "metrics": {"bestSegmMap": 0.5, "other": 1}},
    }
    new, errors = apply_schema(SCHEMA, resource)
    assert errors == []
    assert "colour" not in new["spec"] and "extra" not in new["spec"]["data"]["train"]
    assert new["spec"]["tolerations"] == [{"key": "gpu", "effect": "NoSchedule"}]
    assert new["metadata"]["labels"] == {"a": "b"}
    assert new["status"] == {
        "phase": "Running",
        "progress": {"epoch": 2, "metrics": {"bestSegmMap": 0.5}},
    }


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            "spec.template",
            "Unknown",
            'spec.template: Unsupported value: "Unknown": supported values: '
            '"MaskRCNN-EfficientNetB2B", "MaskRCNN-ResNet50", "MaskRCNN-ConvNeXt", '
            '"Custom_Counting_Instance_Segmentation_MaskRCNN_EfficientNetB2B", '
            '"Custom_Counting_Instance_Segmentation_MaskRCNN_ResNet50", '
            '"Custom_Counting_Instance_Segmentation_MaskRCNN_ConvNeXt"',
        ),
        (
            "spec.workers",
            0,
            "spec.workers: Invalid value: 0: spec.workers in body should be greater than or "
            "equal to 1",
        ),
        (
            "spec.workers",
            "2",
            'spec.workers: Invalid value: "string": spec.workers in body must be of type '
            'integer: "string"',
        ),
        (
            "spec.workers",
            1.5,
            'spec.workers: Invalid value: "number": spec.workers in body must be of type '
            'integer: "number"',
        ),
        (
            "spec.suspend",
            1,
            'spec.suspend: Invalid value: "integer": spec.suspend in body must be of type '
            'boolean: "integer"',
        ),
        (
            "spec.resources.gpus",
            -1,
            "spec.resources.gpus: Invalid value: -1: spec.resources.gpus in body should be "
            "greater than or equal to 0",
        ),
        (
            "spec.hyperparameters.learningRate",
            0,
            "spec.hyperparameters.learningRate: Invalid value: 0: "
            "spec.hyperparameters.learningRate in body should be greater than 0",
        ),
        (
            "spec.hyperparameters.inputSize",
            100,
            "spec.hyperparameters.inputSize: Invalid value: 100: spec.hyperparameters.inputSize "
            "in body should be a multiple of 32",
        ),
        (
            "spec.data.train.claimName",
            "Bad_Name",
            'spec.data.train.claimName: Invalid value: "Bad_Name": spec.data.train.claimName in '
            "body should match '^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$'",
        ),
        (
            "spec.output.claimName",
            "a" * 254,
            "spec.output.claimName: Too long: may not be more than 253 bytes",
        ),
        (
            "spec.imagePullPolicy",
            "Sometimes",
            'spec.imagePullPolicy: Unsupported value: "Sometimes": supported values: "Always", '
            '"IfNotPresent", "Never"',
        ),
        ("spec.data.val", None, "spec.data.val: Required value"),
        ("spec.template", None, "spec.template: Required value"),
        (
            "spec.nodeSelector",
            {"zone": 3},
            'spec.nodeSelector.zone: Invalid value: "integer": spec.nodeSelector.zone in body '
            'must be of type string: "integer"',
        ),
        (
            "status.startTime",
            "yesterday",
            'status.startTime: Invalid value: "yesterday": status.startTime in body must be of '
            'type date-time: "yesterday"',
        ),
    ],
)
def test_each_schema_constraint_reports_like_the_apiserver(path, value, expected):
    errors = validate_resource(CRD, with_path(path, value))
    assert expected in errors
    blocking = any(kind in expected for kind in ("Required", "Unsupported", "type", "Too long"))
    assert errors == ([expected, NOT_CHECKED] if blocking else [expected])


def test_empty_claim_name_breaks_min_length_and_pattern():
    assert validate_resource(CRD, with_path("spec.output.claimName", "")) == [
        'spec.output.claimName: Invalid value: "": spec.output.claimName in body should be at '
        "least 1 chars long",
        'spec.output.claimName: Invalid value: "": spec.output.claimName in body should match '
        "'^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$'",
    ]


def test_missing_spec_is_required():
    resource = copy.deepcopy(EXAMPLE)
    del resource["spec"]
    assert validate_resource(CRD, resource) == ["spec: Required value", NOT_CHECKED]


@pytest.mark.parametrize("field", ["data.train", "data.val", "output"])
@pytest.mark.parametrize("sub_path", ["../x", "a/../b", "/abs"])
def test_sub_path_rule(field, sub_path):
    resource = copy.deepcopy(EXAMPLE)
    node = resource["spec"]
    for key in field.split("."):
        node = node[key]
    node["subPath"] = sub_path
    assert validate_resource(CRD, resource) == [
        f'spec.{field}.subPath: Invalid value: "string": subPath must be relative and must not '
        "contain '..'"
    ]


@pytest.mark.parametrize(
    ("changes", "old_phase", "allowed"),
    [
        ({"template": "MaskRCNN-ConvNeXt"}, "Running", False),
        ({"workers": 2}, "Running", False),
        ({"hyperparameters": {"epochs": 25, "batchSize": 4}}, "Running", False),
        (
            {"hyperparameters": {"epochs": 24, "batchSize": 4, "learningRate": 0.01}},
            "Running",
            False,
        ),
        ({"resources": {"gpus": 2, "cpu": "8", "memory": "32Gi"}}, "Running", False),
        ({"resources": {"gpus": 1, "cpu": 8, "memory": "32Gi"}}, "Running", False),
        ({"output": {"claimName": "other"}}, "Running", False),
        ({"suspend": True}, "Running", True),
        ({}, "Running", True),
        ({"template": "MaskRCNN-ConvNeXt"}, "Pending", True),
        ({"template": "MaskRCNN-ConvNeXt"}, "Suspended", True),
        ({"template": "MaskRCNN-ConvNeXt"}, None, True),
    ],
)
def test_spec_is_immutable_while_running(changes, old_phase, allowed):
    old, errors = apply_schema(SCHEMA, EXAMPLE)
    assert errors == []
    if old_phase:
        old["status"] = {"phase": old_phase}
    new = copy.deepcopy(old)
    new["spec"].update(changes)
    errors = validate_resource(CRD, new, old)
    assert errors == ([] if allowed else [RUNNING_MESSAGE])


def test_create_never_runs_the_transition_rule():
    resource = example()
    resource["status"] = {"phase": "Running"}
    assert validate_resource(CRD, resource) == []


def test_tolerations_keep_unknown_fields():
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    new, errors = apply_schema(SCHEMA, example(tolerations=tolerations))
    assert errors == [] and new["spec"]["tolerations"] == tolerations


def test_conditions_are_a_map_list_keyed_by_type():
    condition = {
        "type": "Ready",
        "status": "True",
        "reason": "Done",
        "message": "ok",
        "lastTransitionTime": "2024-05-01T10:00:00.5+02:00",
    }
    resource = example()
    resource["status"] = {"conditions": [condition, dict(condition, status="False")]}
    assert validate_resource(CRD, resource) == [
        'status.conditions[1]: Duplicate value: map[string]interface {}{"type":"Ready"}'
    ]
    resource["status"]["conditions"][1]["type"] = "Failed"
    assert validate_resource(CRD, resource) == []
    del resource["status"]["conditions"][1]["reason"]
    assert validate_resource(CRD, resource)[0] == "status.conditions[1].reason: Required value"


def test_wrong_group_or_kind_or_version():
    assert validate_resource(CRD, dict(EXAMPLE, apiVersion="other.io/v1alpha1"))
    assert validate_resource(CRD, dict(EXAMPLE, kind="Job"))
    assert validate_resource(CRD, dict(EXAMPLE, apiVersion="instseg.io/v9"))


# ---------------------------------------------------------------------------- generic cases

GENERIC = {
    "type": "object",
    "properties": {
        "n": {"type": "number", "maximum": 10, "exclusiveMaximum": True},
        "i": {"type": "integer", "maximum": 5},
        "s": {"type": "string", "maxLength": 3},
        "opt": {"type": "string", "nullable": True},
        "d": {"type": "string", "default": "x"},
        "list": {
            "type": "array",
            "minItems": 1,
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "size": {"type": "integer", "default": 7},
                },
            },
        },
        "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
        "labels": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "properties": {"v": {"type": "string", "default": "d"}},
            },
        },
        "free": {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
            "properties": {"known": {"type": "object", "properties": {"a": {"type": "string"}}}},
        },
        "ios": {"x-kubernetes-int-or-string": True},
        "embedded": {
            "type": "object",
            "x-kubernetes-embedded-resource": True,
            "properties": {"spec": {"type": "object"}},
        },
    },
}


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"n": 3, "i": 5.0, "ios": 3}, {"n": 3, "i": 5.0, "ios": 3, "d": "x"}),
        ({"d": None, "opt": None}, {"d": "x", "opt": None}),
        ({"s": None}, {"d": "x"}),
        ({"list": [{"name": "a", "junk": 1}]}, {"d": "x", "list": [{"name": "a", "size": 7}]}),
        ({"labels": {"k": {"w": 1}}}, {"d": "x", "labels": {"k": {"v": "d"}}}),
        (
            {"free": {"any": {"deep": [1]}, "known": {"a": "b", "zap": 1}}},
            {"d": "x", "free": {"any": {"deep": [1]}, "known": {"a": "b"}}},
        ),
        (
            {"embedded": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "x": 1}},
            {"d": "x", "embedded": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}},
        ),
        (
            {"apiVersion": "a/v1", "kind": "K", "other": 1},
            {"apiVersion": "a/v1", "kind": "K", "d": "x"},
        ),
    ],
)
def test_generic_pruning_and_defaults(obj, expected):
    new, errors = apply_schema(GENERIC, obj)
    assert errors == []
    assert new == expected


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"n": 10}, "n: Invalid value: 10: n in body should be less than 10"),
        ({"n": 12.5}, "n: Invalid value: 12.5: n in body should be less than 10"),
        ({"n": True}, 'n: Invalid value: "boolean": n in body must be of type number: "boolean"'),
        ({"i": 6}, "i: Invalid value: 6: i in body should be less than or equal to 5"),
        ({"i": 2.5}, 'i: Invalid value: "number": i in body must be of type integer: "number"'),
        ({"s": "long"}, "s: Too long: may not be more than 3 bytes"),
        ({"list": []}, "list: Invalid value: 0: list in body should have at least 1 items"),
        ({"list": [{}, {}, {}]}, "list: Too many: must have at most 2 items"),
        (
            {"list": [3]},
            'list[0]: Invalid value: "integer": list[0] in body must be of type object: "integer"',
        ),
        (
            {"list": [None]},
            'list[0]: Invalid value: "null": list[0] in body must be of type object: "null"',
        ),
        ({"tags": ["a", "b", "a"]}, 'tags[2]: Duplicate value: "a"'),
        (
            {"ios": 1.5},
            'ios: Invalid value: "number": ios in body must be of type integer,string: "number"',
        ),
    ],
)
def test_generic_validation(obj, expected):
    assert expected in apply_schema(GENERIC, obj)[1]


def test_bad_input_never_raises():
    for obj in ({"list": "x"}, {"labels": [1]}, {"free": 3}, {"embedded": []}, {"n": {}}):
        _, errors = apply_schema(GENERIC, obj)
        assert errors
    _, errors = apply_schema(SCHEMA, {"spec": [], "metadata": "x", "status": 1})
    assert errors


def cel_schema(*rules: dict, **props) -> dict:
    return {
        "type": "object",
        "properties": props
        or {
            "a": {"type": "integer"},
            "m": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "x-kubernetes-validations": list(rules),
    }


@pytest.mark.parametrize(
    ("rule", "obj", "expected"),
    [
        ({"rule": "self.a > 1"}, {"a": 2}, []),
        (
            {"rule": "self.a > 1"},
            {"a": 1},
            ['<nil>: Invalid value: "object": failed rule: self.a > 1'],
        ),
        (
            {"rule": "self.a > 1", "message": "too small", "fieldPath": ".a"},
            {"a": 1},
            ['a: Invalid value: "object": too small'],
        ),
        (
            {"rule": "self.a > 1", "messageExpression": "'a is ' + string(self.a)"},
            {"a": 1},
            ['<nil>: Invalid value: "object": a is 1'],
        ),
        (
            {"rule": "self.a > 1", "reason": "FieldValueForbidden", "message": "no"},
            {"a": 1},
            ["<nil>: Forbidden: no"],
        ),
        ({"rule": "!has(self.a) || self.a > 0"}, {}, []),
        ({"rule": "self.m.all(k, self.m[k].startsWith('x'))"}, {"m": {"p": "xy"}}, []),
        ({"rule": "self.m.exists(k, k == 'q') && size(self.m) == 1"}, {"m": {"q": ""}}, []),
        ({"rule": "self.m.size() == 0"}, {"m": {}}, []),
        (
            {"rule": "self.a.b == 1"},
            {"a": 1},
            ["does not support field selection"],
        ),
        ({"rule": "self.a =="}, {"a": 1}, ["evaluating rule: self.a =="]),
    ],
)
def test_cel_rules(rule, obj, expected):
    errors = apply_schema(cel_schema(rule), obj)[1]
    assert len(errors) == len(expected)
    for error, text in zip(errors, expected):
        assert text in error


def test_cel_numbers_follow_the_schema_type():
    schema = cel_schema(
        {"rule": "self.x == 2.0 && self.i == 2"}, x={"type": "number"}, i={"type": "integer"}
    )
    assert apply_schema(schema, {"x": 2, "i": 2.0})[1] == []


def test_cel_transition_rule_needs_the_old_value():
    schema = cel_schema({"rule": "self.a >= oldSelf.a", "message": "a may not decrease"})
    assert apply_schema(schema, {"a": 1})[1] == []
    assert apply_schema(schema, {"a": 1}, {"a": 1})[1] == []
    assert apply_schema(schema, {"a": 1}, {"a": 2})[1] == [
        '<nil>: Invalid value: "object": a may not decrease'
    ]
    nested = {
        "type": "object",
        "properties": {
            "n": {
                "type": "object",
                "properties": {"v": {"type": "string"}},
                "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "immutable"}],
            }
        },
    }
    assert apply_schema(nested, {"n": {"v": "b"}}, {})[1] == []
    assert apply_schema(nested, {"n": {"v": "b"}}, {"n": {"v": "a"}})[1] == [
        'n: Invalid value: "object": immutable'
    ]


@pytest.mark.parametrize(
    ("json_path", "expected"),
    [
        (".spec.template", "MaskRCNN-ResNet50"),
        (".spec.tolerations[0].key", "gpu"),
        ("{.spec.data.train.claimName}", "datasets"),
        (".status.progress.metrics.bestSegmMap", 0.25),
        (".status.progress.loss", None),
        (".metadata.creationTimestamp", "2024-05-01T10:00:00Z"),
        (".spec.tolerations[3].key", None),
        (".spec.template.foo", None),
    ],
)
def test_column_value(json_path, expected):
    resource = example(tolerations=[{"key": "gpu"}])
    resource["metadata"]["creationTimestamp"] = "2024-05-01T10:00:00Z"
    resource["status"] = {"progress": {"metrics": {"bestSegmMap": 0.25}}}
    assert column_value(resource, json_path) == expected
