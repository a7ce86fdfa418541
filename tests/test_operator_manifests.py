"""The operator's pure builders and the CRD: what a user's resource turns into."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from instseg_contract import API_VERSION

from instseg_operator import validation
from instseg_operator.manifests import (
    build_children,
    build_headless_service,
    build_role,
    build_training_job,
    job_name,
    trainer_pod_template,
)
from instseg_trainer.cli import EXIT_USER_ERROR, build_parser

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "crds" / "instancesegtrainings.yaml"


def _resource(**spec_overrides) -> dict:
    resource = yaml.safe_load((ROOT / "examples" / "training.yaml").read_text())
    resource["metadata"].update(namespace="team-a", uid="5f0c-uid")
    resource["spec"].update(spec_overrides)
    return resource


def _container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def test_single_gpu_job() -> None:
    job = build_training_job(_resource(), default_image="registry/instseg:1")
    assert job["metadata"]["name"] == "shapes-r50-train"
    assert job["metadata"]["namespace"] == "team-a"
    owner = job["metadata"]["ownerReferences"][0]
    assert owner == {
        "apiVersion": API_VERSION, "kind": "InstanceSegTraining", "name": "shapes-r50",
        "uid": "5f0c-uid", "controller": True, "blockOwnerDeletion": True,
    }  # fmt: skip
    assert "completionMode" not in job["spec"] and job["spec"]["completions"] == 1
    assert job["spec"]["backoffLimit"] == 3 and job["spec"]["suspend"] is False
    assert job["spec"]["podReplacementPolicy"] == "Failed"  # never two trainers at once
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "shapes-r50-trainer"
    container = _container(job)
    assert container["image"] == "registry/instseg:1"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1", "cpu": "8", "memory": "32Gi"}
    assert container["command"][:2] == ["instseg", "train"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["INSTSEG_RESOURCE_NAME"] == "shapes-r50"
    assert env["INSTSEG_RESOURCE_NAMESPACE"] == "team-a"
    # train and val share one claim: one volume, mounted twice with the sub path
    claims = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert [v["persistentVolumeClaim"]["claimName"] for v in claims] == ["datasets", "instseg-runs"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/data/train"]["subPath"] == "shapes" and mounts["/data/train"]["readOnly"]
    assert mounts["/output"]["subPath"] == "shapes-r50" and not mounts["/output"]["readOnly"]
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory" and mounts["/dev/shm"]["name"] == "shm"


def test_the_trainer_can_write_root_owned_volumes_as_the_images_user() -> None:
    pod = build_training_job(_resource())["spec"]["template"]["spec"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    trainer_stage = dockerfile[dockerfile.index(" AS trainer") :]
    user = trainer_stage[trainer_stage.index("\nUSER ") + 6 :].split()[0]
    context = pod["securityContext"]
    assert user == f"{context['runAsUser']}:{context['runAsGroup']}"
    # block storage and NFS hand out root-owned volumes: the kubelet gives them this group
    assert context["fsGroup"] == context["runAsGroup"] and context["runAsNonRoot"] is True
    assert context["fsGroupChangePolicy"] == "OnRootMismatch"  # no recursive chown each start


def test_bad_input_fails_at_once_and_disruptions_are_not_failures() -> None:
    job = build_training_job(_resource())
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail, ignore = rules
    # the trainer's own exit code for bad data or flags: a retry cannot fix it
    assert fail["action"] == "FailJob"
    assert fail["onExitCodes"] == {"containerName": "trainer", "operator": "In",
                                   "values": [EXIT_USER_ERROR]}  # fmt: skip
    assert _container(job)["name"] == "trainer"
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    # what the trainer printed last reaches the pod's status, and so the training's
    assert _container(job)["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_the_command_is_one_the_trainer_accepts() -> None:
    resource = _resource(hyperparameters={"epochs": 5, "learningRate": 0.02, "inputSize": 800})
    command = _container(build_training_job(resource))["command"]
    args = build_parser().parse_args(command[1:])
    assert args.command == "train" and args.template == "MaskRCNN-ResNet50"
    assert (args.epochs, args.learning_rate, args.input_size) == (5, 0.02, 800)
    assert args.train_data_roots == [Path("/data/train")] and args.output == Path("/output")


def test_without_val_data_the_trainer_splits_train() -> None:
    resource = _resource()
    del resource["spec"]["data"]["val"]
    jsonschema.Draft4Validator(_schema()).validate(resource)
    container = _container(build_training_job(resource))
    args = build_parser().parse_args(container["command"][1:])
    assert args.train_data_roots == [Path("/data/train")] and args.val_data_roots is None
    assert "/data/val" not in {m["mountPath"] for m in container["volumeMounts"]}


def test_multi_node_is_an_indexed_job_with_torchrun_and_a_headless_service() -> None:
    resource = _resource(workers=2, resources={"gpus": 4})
    job = build_training_job(resource)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == "shapes-r50-workers"
    command = _container(job)["command"]
    assert command[:3] == ["python", "-m", "instseg_trainer.launch"]  # torchrun, rejoining
    flags = dict(zip(command[3:17:2], command[4:17:2]))
    # elastic rendezvous hosted on worker 0
    assert flags == {
        "--nnodes": "2", "--nproc-per-node": "4", "--rdzv-backend": "c10d",
        "--rdzv-endpoint": "shapes-r50-train-0.shapes-r50-workers:29500",
        "--rdzv-id": "shapes-r50-train", "--max-restarts": "3", "-m": "instseg_trainer.cli",
    }  # fmt: skip
    build_parser().parse_args(command[command.index("instseg_trainer.cli") + 1 :])
    service = build_headless_service(resource)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    kinds = [c["kind"] for c in build_children(resource)]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "Service", "Job"]
    assert "Service" not in [c["kind"] for c in build_children(_resource())]


def test_names_are_deterministic_and_fit_dns_labels() -> None:
    long = "a" * 80
    assert job_name(long) == job_name(long)
    assert len(job_name(long)) <= 56  # room for "-<index>" hostnames of Indexed Jobs
    assert job_name(long) != job_name("a" * 79)


def test_a_long_name_gives_valid_labels_and_hostnames() -> None:
    import re

    name = "coco-maskrcnn-resnet50-" + "x" * 35 + ".v2-run"  # 65 characters, with a dot
    resource = _resource(workers=2)
    resource["metadata"]["name"] = name
    job = build_children(resource)[-1]
    label = job["metadata"]["labels"]["instseg.io/training"]
    assert len(label) <= 63 and re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", label)
    assert job["spec"]["template"]["metadata"]["annotations"]["instseg.io/training-name"] == name
    hostname = f"{job['metadata']['name']}-15"  # <job>-<index> for the 16th worker
    assert len(hostname) <= 63


def test_trainer_role_may_only_patch_its_own_status() -> None:
    role = build_role(_resource())
    assert role["rules"] == [
        {
            "apiGroups": ["instseg.io"],
            "resources": ["instancesegtrainings/status"],
            "resourceNames": ["shapes-r50"],
            "verbs": ["get", "patch"],
        }
    ]


def test_operator_package_never_imports_torch() -> None:
    code = (
        "import sys, instseg_operator.manifests, instseg_operator.status, "
        "instseg_operator.metrics; sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_example_resources_validate_against_the_crd() -> None:
    validator = jsonschema.Draft4Validator(_schema())
    for path in sorted((ROOT / "examples").glob("training*.yaml")):
        validator.validate(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda s: s.update(template="MaskRCNN-Swin"), "template"),
        (lambda s: s.update(workers=0), "workers"),
        (lambda s: s["resources"].update(gpus=-1), "gpus"),
        (lambda s: s.pop("data"), "data"),
        (lambda s: s["hyperparameters"].update(inputSize=100), "inputSize"),
        (lambda s: s["output"].update(claimName="Not_A_Name"), "claimName"),
    ],
)
def test_invalid_resources_are_rejected_naming_the_field(change, field) -> None:
    resource = copy.deepcopy(yaml.safe_load((ROOT / "examples" / "training.yaml").read_text()))
    change(resource["spec"])
    errors = list(jsonschema.Draft4Validator(_schema()).iter_errors(resource))
    assert errors
    assert any(field in "/".join(map(str, e.absolute_path)) + e.message for e in errors)


def test_printer_columns_point_at_schema_fields() -> None:
    crd = yaml.safe_load(CRD.read_text())
    version = crd["spec"]["versions"][0]
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names[:6] == ["Template", "Phase", "Reason", "Epoch", "Best mAP", "Age"]
    schema = version["schema"]["openAPIV3Schema"]
    for column in version["additionalPrinterColumns"]:
        node = schema
        # a filter such as [?(@.type=="Scheduled")], or [*], selects items of a list
        path = re.sub(r"\[(\?\(.*?\)|\*)\]", "[]", column["jsonPath"])
        for part in path.strip(".").split("."):
            if part == "metadata":
                break
            node = node["properties"][part.removesuffix("[]")]
            if part.endswith("[]"):
                node = node["items"]


# ------------------------------------------------------------------------ spec.podTemplate

OVERLAY = {
    "metadata": {"labels": {"team": "vision"}, "annotations": {"example.com/cost": "ml"}},
    "spec": {
        "imagePullSecrets": [{"name": "registry-creds"}],
        "runtimeClassName": "nvidia",
        "securityContext": {"supplementalGroups": [4000]},
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "gpu", "operator": "In", "values": ["a100"]}]}]}}},
        "volumes": [{"name": "weights", "persistentVolumeClaim": {"claimName": "backbones"}}],
        "containers": [
            {"name": "trainer",
             "env": [{"name": "HF_HOME", "value": "/weights/hf"},
                     {"name": "PYTHONUNBUFFERED", "value": "0"}],
             "envFrom": [{"secretRef": {"name": "wandb"}}],
             "volumeMounts": [{"name": "weights", "mountPath": "/weights", "readOnly": True}]},
            {"name": "log-shipper", "image": "fluent/fluent-bit:3"},
        ],
    },
}  # fmt: skip


def test_a_pod_template_is_merged_over_the_trainer_pod() -> None:
    job = build_training_job(_resource(podTemplate=OVERLAY))
    template = job["spec"]["template"]
    assert template["metadata"]["labels"]["team"] == "vision"
    assert template["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "instseg-operator"
    assert template["metadata"]["annotations"]["example.com/cost"] == "ml"
    pod = template["spec"]
    assert pod["imagePullSecrets"] == [{"name": "registry-creds"}]
    assert pod["runtimeClassName"] == "nvidia" and "nodeAffinity" in pod["affinity"]
    # maps merge key by key: the operator's restricted context stays, the user's adds
    assert pod["securityContext"]["supplementalGroups"] == [4000]
    assert pod["securityContext"]["fsGroup"] == 10001
    assert [v["name"] for v in pod["volumes"]] == ["pvc-0", "pvc-1", "shm", "weights"]
    trainer, sidecar = pod["containers"]
    assert trainer["name"] == "trainer" and sidecar["name"] == "log-shipper"
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert env["HF_HOME"] == "/weights/hf" and env["PYTHONUNBUFFERED"] == "0"  # by name
    assert env["INSTSEG_RESOURCE_NAME"] == "shapes-r50"
    assert trainer["envFrom"] == [{"secretRef": {"name": "wandb"}}]
    assert [m["mountPath"] for m in trainer["volumeMounts"]][-1] == "/weights"
    assert trainer["command"][:2] == ["instseg", "train"]
    assert validation.spec_problems(_resource(podTemplate=OVERLAY)["spec"], trainer_pod_template(
        _resource())) == []  # fmt: skip


PROTECTED = {
    "the trainer's command": ({"containers": [{"name": "trainer", "command": ["sh"]}]},
                              "spec.podTemplate.spec.containers[trainer].command"),
    "the trainer's image": ({"containers": [{"name": "trainer", "image": "x"}]},
                            "spec.podTemplate.spec.containers[trainer].image: the operator owns "
                            "it (set spec.image)"),
    "the output mount": ({"containers": [{"name": "trainer", "volumeMounts": [
        {"name": "scratch", "mountPath": "/output"}]}]}, "/output is the trainer's own mount"),
    "an operator volume": ({"volumes": [{"name": "shm", "emptyDir": {}}]},
                           "'shm' is a volume of the operator's"),
    "the service account": ({"serviceAccountName": "admin"},
                            "spec.podTemplate.spec.serviceAccountName: the operator owns it"),
    "the restart policy": ({"restartPolicy": "OnFailure"},
                           "spec.podTemplate.spec.restartPolicy: the operator owns it"),
    "a nameless container": ({"containers": [{"image": "busybox"}]},
                             "spec.podTemplate.spec.containers[0].name"),
}  # fmt: skip


@pytest.mark.parametrize("overlay, message", PROTECTED.values(), ids=PROTECTED.keys())
def test_a_pod_template_may_not_change_what_the_operator_owns(overlay, message) -> None:
    resource = _resource(podTemplate={"spec": overlay})
    found = validation.spec_problems(resource["spec"], trainer_pod_template(resource))
    assert any(message in problem for problem in found), found


def test_a_pod_template_label_may_not_replace_the_operators() -> None:
    resource = _resource(podTemplate={"metadata": {"labels": {"instseg.io/training": "x"}}})
    found = validation.spec_problems(resource["spec"], trainer_pod_template(resource))
    assert found == ["spec.podTemplate.metadata.labels[instseg.io/training]: the operator sets it"]


def test_resources_take_requests_limits_and_any_gpu_resource() -> None:
    resources = {
        "gpus": 2, "gpuResource": "amd.com/gpu", "memory": "32Gi",
        "requests": {"cpu": "4", "ephemeral-storage": "50Gi"},
        "limits": {"cpu": 8, "rdma/hca_shared_devices_a": "1"},
    }  # fmt: skip
    job = build_training_job(_resource(resources=resources))
    assert _container(job)["resources"] == {
        "limits": {"amd.com/gpu": "2", "memory": "32Gi", "cpu": "8",
                   "rdma/hca_shared_devices_a": "1"},
        "requests": {"memory": "32Gi", "cpu": "4", "ephemeral-storage": "50Gi"},
    }  # fmt: skip
    assert "--nproc-per-node" in _container(job)["command"]  # two GPUs, two processes
    bad = {"gpus": 1, "gpuResource": "gpu", "limits": {"nvidia.com/mig 1g": "1"},
           "requests": {"cpu": "four"}}  # fmt: skip
    found = validation.spec_problems(_resource(resources=bad)["spec"])
    assert found == [
        "spec.resources.requests[cpu]: 'four' is not a Kubernetes quantity",
        "spec.resources.limits: 'nvidia.com/mig 1g' is not a resource name: its name must be "
        "1-63 alphanumerics, '-', '_' or '.', alphanumeric at both ends",
        "spec.resources.gpuResource: 'gpu' is not an extended resource name (write e.g. "
        "nvidia.com/gpu, amd.com/gpu or nvidia.com/mig-1g.10gb)",
    ]


def test_spec_export_reaches_the_trainer_as_flags_it_parses() -> None:
    export = {"formats": ["onnx", "openvino"], "precision": "fp16", "optimize": True}
    command = _container(build_training_job(_resource(export=export)))["command"]
    args = build_parser().parse_args(command[1:])
    assert args.export == ["onnx", "openvino"] and args.export_precision == "fp16"
    assert args.export_optimize
    plain = _container(build_training_job(_resource()))["command"]
    assert "--export" not in plain
