"""What the operator checks beyond the CRD schema, and the command line it runs kopf with."""

from __future__ import annotations

import copy

import pytest

from instseg_operator.__main__ import _args, kopf_argv
from instseg_operator.validation import claims, spec_problems

SPEC = {
    "template": "MaskRCNN-ResNet50",
    "data": {"train": {"claimName": "datasets"}, "val": {"claimName": "datasets"}},
    "output": {"claimName": "runs"},
    "resources": {"gpus": 1, "cpu": "8", "memory": "32Gi"},
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "image": "registry.example.com:5000/ml/instseg-trainer:0.1.0",
    "hyperparameters": {"backboneWeights": "/weights/r50.pth"},
}


def _with(path: str, value) -> dict:
    spec = copy.deepcopy(SPEC)
    *parents, last = path.split(".")
    node = spec
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return spec


def test_a_good_spec_has_no_problems() -> None:
    assert spec_problems(SPEC) == []
    assert spec_problems({"template": "MaskRCNN-ResNet50", "resources": {"cpu": "500m"}}) == []


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("resources.cpu", "eight", "spec.resources.cpu: 'eight' is not a Kubernetes quantity"),
        ("resources.memory", "32GB", "spec.resources.memory: '32GB' is not a Kubernetes quantity"),
        ("image", "Registry/UPPER:tag", "spec.image: 'Registry/UPPER:tag' is not a valid image"),
        ("image", "trainer:bad tag", "spec.image: 'trainer:bad tag'"),
        ("nodeSelector", {"bad key!": "x"}, "spec.nodeSelector: label key 'bad key!' is invalid"),
        ("nodeSelector", {"zone": "-x-"}, "spec.nodeSelector[zone]: value '-x-' is not a valid"),
        ("tolerations.0.operator", "Maybe", "spec.tolerations[0].operator: 'Maybe' must be"),
        ("tolerations.0.effect", "NoWay", "spec.tolerations[0].effect: 'NoWay' must be one of"),
        ("tolerations.0", {"operator": "Equal"}, "spec.tolerations[0]: an empty key needs"),
        ("hyperparameters.backboneWeights", "r50.pth", "spec.hyperparameters.backboneWeights"),
        ("hyperparameters.weights", "best.pt", "spec.hyperparameters.weights: 'best.pt' must be"),
        ("template", "MaskRCNN-ConvNeXt", None),  # valid as such
    ],
)
def test_each_bad_field_is_named(path: str, value, expected: str | None) -> None:
    problems = spec_problems(_with(path, value))
    if expected is None:
        assert problems == []
        return
    assert len(problems) == 1 and problems[0].startswith(expected), problems


@pytest.mark.parametrize(
    ("template", "hyperparameters", "expected"),
    [
        ("MaskRCNN-EfficientNetB2B", {"weights": "coco"}, "fits the MaskRCNN-ResNet50 template"),
        ("MaskRCNN-ResNet50", {"model": {"dropPathRate": 0.1}}, "only the ConvNeXt template"),
    ],
)
def test_values_that_fit_only_some_templates_are_refused(template, hyperparameters, expected):
    spec = {"template": template, "hyperparameters": hyperparameters}
    problems = spec_problems(spec)
    assert len(problems) == 1 and expected in problems[0], problems
    assert (
        spec_problems(
            {
                **spec,
                "template": "Custom_Counting_Instance_Segmentation_MaskRCNN_"
                + ("ResNet50" if "coco" in str(hyperparameters) else "ConvNeXt"),
            }
        )
        == []
    )


def test_claims_name_the_first_field_using_them() -> None:
    expected = {"datasets": "spec.data.train.claimName", "runs": "spec.output.claimName"}
    assert claims(SPEC) == expected


def test_operator_flags_default_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("INSTSEG_NAMESPACES", raising=False)
    argv = kopf_argv(_args([]))
    assert argv[:3] == ["run", "-m", "instseg_operator.handlers"]
    assert "--all-namespaces" in argv and "--peering=instseg" in argv
    assert "--liveness=http://0.0.0.0:8080/healthz" in argv
    monkeypatch.setenv("INSTSEG_NAMESPACES", "team-a, team-b")
    argv = kopf_argv(_args(["--standalone", "--liveness", ""]))
    assert "--namespace=team-a" in argv and "--namespace=team-b" in argv
    assert "--all-namespaces" not in argv and "--standalone" in argv
    assert not any(a.startswith("--liveness") for a in argv)
    assert "--namespace=x" in kopf_argv(_args(["-n", "x"]))
