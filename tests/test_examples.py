"""The examples a user copies: accepted by the real API server (the CRD's schema and CEL rules,
server-side dry-run on the session's local cluster), consistent with each other, and bad
variants rejected with a clear message."""

from __future__ import annotations

import copy
from pathlib import Path

import instseg_contract as contract
import kubernetes_validate
import pytest
import yaml

from instseg_operator import manifests
from tests.cluster import KubeEnvironment

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TRAININGS = sorted(EXAMPLES.glob("training*.yaml"))
KUBE_VERSION = "1.34.0"


def load(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


def server_errors(kube: KubeEnvironment, resource: dict, *verb: str) -> str:
    """What the API server says of `resource` (server-side dry-run), "" when it accepts it."""
    command = verb or ("create", "--dry-run=server", "-f", "-")
    done = kube.kubectl(*command, stdin=yaml.safe_dump(resource), check=False)
    return "" if "created (server dry run)" in done or " patched" in done else done


def test_sample_data_job_is_valid_and_writes_where_the_trainings_read():
    (job,) = yaml.safe_load_all((EXAMPLES / "sample-data-job.yaml").read_text())
    kubernetes_validate.validate(job, KUBE_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    (mount,) = pod["containers"][0]["volumeMounts"]
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    target = pod["containers"][0]["args"][1]
    assert target == f"{mount['mountPath']}/shapes"
    data = load("training.yaml")["spec"]["data"]["train"]
    assert (claim, "shapes") == (data["claimName"], data["subPath"])


def test_the_trainings_are_there():
    assert [p.name for p in TRAININGS] == [
        "training-cpu.yaml",
        "training-kueue.yaml",
        "training-multinode.yaml",
        "training.yaml",
    ]


@pytest.mark.parametrize("path", TRAININGS, ids=lambda p: p.name)
def test_example_is_a_valid_training(path, kube):
    (training,) = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert (training["apiVersion"], training["kind"]) == (contract.API_VERSION, contract.KIND)
    assert server_errors(kube, training) == ""


def test_pvc_example_is_valid_and_holds_every_claim_the_trainings_use():
    claims = [doc for doc in yaml.safe_load_all((EXAMPLES / "pvc.yaml").read_text()) if doc]
    for claim in claims:
        kubernetes_validate.validate(claim, KUBE_VERSION, strict=True)
    names = {claim["metadata"]["name"] for claim in claims}
    for path in TRAININGS:
        spec = yaml.safe_load(path.read_text())["spec"]
        used = {spec["data"]["train"]["claimName"], spec["data"]["val"]["claimName"]}
        assert used | {spec["output"]["claimName"]} <= names, path.name


def test_single_gpu_example_makes_a_one_gpu_job():
    job = manifests.build_training_job({**load("training.yaml"), "metadata": _meta("shapes-r50")})
    (trainer,) = job["spec"]["template"]["spec"]["containers"]
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert job["spec"]["completions"] == 1
    assert trainer["command"][0] == "instseg"


def test_multinode_example_makes_two_workers_with_four_gpus_each():
    training = {**load("training-multinode.yaml"), "metadata": _meta("coco-r50-2x4")}
    children = manifests.build_children(training)
    job = children[-1]
    (trainer,) = job["spec"]["template"]["spec"]["containers"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert trainer["command"][3:7] == ["--nnodes", "2", "--nproc-per-node", "4"]
    assert "Service" in [child["kind"] for child in children]


def test_kueue_example_is_queued_and_suspended():
    training = load("training-kueue.yaml")
    # the phase the operator shows while Kueue holds the Job (status.derive_phase), said once
    text = (EXAMPLES / "training-kueue.yaml").read_text() + (
        ROOT / "docs" / "kubernetes.md"
    ).read_text()
    assert "shows phase Suspended" not in text and "phase `Suspended`.\n" not in text
    assert "phase Pending,\n# reason Queued" in text
    assert training["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
    assert training["spec"]["suspend"] is True
    meta = {**_meta("shapes-effnet-queued"), "labels": training["metadata"]["labels"]}
    job = manifests.build_training_job({**training, "metadata": meta})
    assert job["spec"]["suspend"] is True
    # Kueue finds the Job by its queue label and admits it by setting suspend false; the
    # operator records what it asked for, so it does not suspend an admitted Job again
    queue = training["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == queue
    assert job["metadata"]["annotations"][manifests.SUSPEND_ANNOTATION] == "true"


def _meta(name: str) -> dict:
    return {"name": name, "namespace": "team-a", "uid": "0000"}


# ------------------------------------------------------------------------ invalid resources


def _broken(change) -> dict:
    training = copy.deepcopy(load("training.yaml"))
    change(training["spec"])
    return training


INVALID = {
    "unknown template": (
        lambda spec: spec.update(template="MaskRCNN-ResNet18"),
        'spec.template: Unsupported value: "MaskRCNN-ResNet18": supported values: '
        '"MaskRCNN-EfficientNetB2B", "MaskRCNN-ResNet50", "MaskRCNN-ConvNeXt"',
    ),
    "negative GPUs": (
        lambda spec: spec["resources"].update(gpus=-1),
        "spec.resources.gpus: Invalid value: -1: spec.resources.gpus in body should be "
        "greater than or equal to 0",
    ),
    "zero workers": (
        lambda spec: spec.update(workers=0),
        "spec.workers: Invalid value: 0: spec.workers in body should be greater than or equal to 1",
    ),
    "more workers than an Indexed Job allows": (
        lambda spec: spec.update(workers=100001),
        "spec.workers in body should be less than or equal to 100000",
    ),
    "backoffLimit beyond int32": (
        lambda spec: spec.update(backoffLimit=2**31),
        "spec.backoffLimit in body should be less than or equal to 2147483647",
    ),
    "ttlSecondsAfterFinished beyond int32": (
        lambda spec: spec.update(ttlSecondsAfterFinished=2**31),
        "spec.ttlSecondsAfterFinished in body should be less than or equal to 2147483647",
    ),
    "activeDeadlineSeconds beyond int32": (
        lambda spec: spec.update(activeDeadlineSeconds=2**31),
        "spec.activeDeadlineSeconds in body should be less than or equal to 2147483647",
    ),
    "missing data": (lambda spec: spec.pop("data"), "spec.data: Required value"),
    "unknown tiling mode": (
        lambda spec: spec.setdefault("hyperparameters", {}).update(tiling="sometimes"),
        'spec.hyperparameters.tiling: Unsupported value: "sometimes"',
    ),
    "an IoU threshold above 1": (
        lambda spec: spec.setdefault("hyperparameters", {}).update(
            model={"rpn": {"nmsThresh": 1.5}}
        ),
        "spec.hyperparameters.model.rpn.nmsThresh in body should be less than or equal to 1",
    ),
    "missing claim": (
        lambda spec: spec["output"].pop("claimName"),
        "spec.output.claimName: Required value",
    ),
    "claim name with capitals": (
        lambda spec: spec["output"].update(claimName="Runs"),
        'spec.output.claimName: Invalid value: "Runs": spec.output.claimName in body should match',
    ),
    "subPath escaping the claim": (
        lambda spec: spec["data"]["train"].update(subPath="../other-team"),
        'spec.data.train.subPath: Invalid value: "string": subPath must be relative and must '
        "not contain '..'",
    ),
    "absolute subPath": (
        lambda spec: spec["output"].update(subPath="/runs"),
        'spec.output.subPath: Invalid value: "string": subPath must be relative',
    ),
    "input size not a multiple of 32": (
        lambda spec: spec["hyperparameters"].update(inputSize=500),
        "spec.hyperparameters.inputSize in body should be a multiple of 32",
    ),
    "INT8 export without the OpenVINO model": (
        lambda spec: spec.update(export={"formats": ["onnx"], "optimize": True}),
        "export.optimize (INT8) quantizes the OpenVINO model; add openvino to export.formats",
    ),
    "an unknown export format": (
        lambda spec: spec.update(export={"formats": ["tflite"]}),
        'spec.export.formats[0]: Unsupported value: "tflite"',
    ),
    "zero learning rate": (
        lambda spec: spec["hyperparameters"].update(learningRate=0),
        "spec.hyperparameters.learningRate in body should be greater than 0",
    ),
}


@pytest.mark.parametrize("change, message", INVALID.values(), ids=INVALID.keys())
def test_invalid_training_is_rejected_with_a_clear_message(change, message, kube):
    errors = server_errors(kube, _broken(change))
    assert message in errors


def test_running_training_refuses_a_spec_change_but_not_a_suspend(kube):
    training = {**load("training.yaml"), "metadata": {"name": "cel", "namespace": "default"}}
    kube.kubectl.apply(training)
    try:
        running = '{"status": {"phase": "Running"}}'
        kube.kubectl("patch", "ist", "cel", "--subresource=status", "--type=merge", "-p", running)
        patch = ("patch", "ist", "cel", "--type=merge", "-p")
        errors = server_errors(kube, {}, *patch, '{"spec": {"resources": {"gpus": 2}}}')
        assert "spec cannot change while the training is Running" in errors
        assert server_errors(kube, {}, *patch, '{"spec": {"suspend": true}}') == ""
    finally:
        kube.kubectl("delete", "ist", "cel", "--wait=false")
