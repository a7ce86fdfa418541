"""Pure builders: an InstanceSegTraining resource → the manifests of its children.

No API calls here; handlers create what these return, and tests read them directly.
"""

from __future__ import annotations

import copy
import hashlib
import json

import instseg_contract as contract

from . import pod_template

DEFAULT_IMAGE = "ghcr.io/instseg/trainer:0.1.0"
MASTER_PORT = 29500
# how often the surviving workers of a multi-node training restart together (a worker pod
# died and was replaced) before their pods fail and the Job's backoffLimit takes over
MAX_GROUP_RESTARTS = 3
GPU_RESOURCE = "nvidia.com/gpu"  # spec.resources.gpuResource names another (amd.com/gpu, MIG)
DATA_MOUNT = "/data"
OUTPUT_MOUNT = "/output"
SHM_MOUNT = "/dev/shm"
# Job names end up in pod labels and, for Indexed Jobs, in hostnames `<job>-<index>` that must
# stay DNS labels (63): children names keep room for the index
# the trainer image's user (Dockerfile). Pod Security "restricted" admits the pod as it is;
# fsGroup lets that user write the root-owned volumes block storage and NFS hand out, and
# OnRootMismatch spares a large dataset volume the recursive chown on every start
TRAINER_UID = 10001
POD_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": TRAINER_UID,
    "runAsGroup": TRAINER_UID,
    "fsGroup": TRAINER_UID,
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}
MAX_NAME = 56
MAX_LABEL = 63
COMPLETION_INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"

# annotations: the full training name (labels stop at 63 characters) and a digest of the Job
# spec the operator built, to tell whether a spec change needs a new Job
TRAINING_ANNOTATION = f"{contract.GROUP}/training-name"
SPEC_HASH_ANNOTATION = f"{contract.GROUP}/spec-hash"
# the spec.suspend value the operator last applied to the Job: suspend is patched only when
# the user changes it, so a queue controller (Kueue) that unsuspends an admitted Job is not
# overridden by the next reconcile
SUSPEND_ANNOTATION = f"{contract.GROUP}/suspend-requested"
# labels copied from the training onto its Job, for Kueue to queue and prioritise it
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PASSED_LABELS = (QUEUE_LABEL, "kueue.x-k8s.io/priority-class")
# on every child: the operator watches only its own Jobs and Pods
RBAC_API_VERSION = "rbac.authorization.k8s.io/v1"
MANAGED_BY = {"app.kubernetes.io/managed-by": "instseg-operator"}


def child_name(owner: str, suffix: str) -> str:
    """`<owner>-<suffix>`, shortened with a stable hash when it would exceed 63 characters,
    so that the same resource always maps to the same child (no duplicate after a restart)."""
    name = f"{owner}-{suffix}"
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(owner.encode()).hexdigest()[:8]
    return f"{owner[: MAX_NAME - len(suffix) - 10].rstrip('-.')}-{digest}-{suffix}"


def label_value(name: str) -> str:
    """A training name as a label value: at most 63 characters, alphanumeric at both ends;
    longer names are shortened with a stable hash."""
    if len(name) <= MAX_LABEL:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: MAX_LABEL - 9].rstrip('-.')}-{digest}"


def job_name(owner: str) -> str:
    return child_name(owner, "train")


def service_name(owner: str) -> str:
    return child_name(owner, "workers")


def service_account_name(owner: str) -> str:
    return child_name(owner, "trainer")


def labels(owner: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "instseg",
        "app.kubernetes.io/component": "trainer",
        **MANAGED_BY,
        f"{contract.GROUP}/training": label_value(owner),
    }


def owner_reference(resource: dict) -> dict:
    meta = resource["metadata"]
    return {
        "apiVersion": contract.API_VERSION,
        "kind": contract.KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(resource: dict, name: str) -> dict:
    meta = resource["metadata"]
    return {
        "name": name,
        "namespace": meta["namespace"],
        "labels": labels(meta["name"]),
        "ownerReferences": [owner_reference(resource)],
    }


def _child(resource: dict, api_version: str, kind: str, name: str) -> dict:
    """A child object's apiVersion, kind and metadata (owned by `resource`)."""
    return {"apiVersion": api_version, "kind": kind, "metadata": _metadata(resource, name)}


def trainer_command(spec: dict, job: str, service: str) -> list[str]:
    """The container command: `instseg train ...`, under torchrun (through the trainer's
    launcher, instseg_trainer/launch.py) when more than one process trains (several GPUs per
    pod, or several pods)."""
    train = [
        contract.TRAIN_COMMAND,
        spec["template"],
        contract.TRAIN_DATA_FLAG, f"{DATA_MOUNT}/train",
        *([contract.VAL_DATA_FLAG, f"{DATA_MOUNT}/val"] if spec["data"].get("val") else []),
        contract.OUTPUT_FLAG, OUTPUT_MOUNT,
        contract.DEVICE_FLAG, "auto",
    ]  # fmt: skip
    for key, flag in contract.HYPERPARAMETER_FLAGS.items():
        value = (spec.get("hyperparameters") or {}).get(key)
        if value is not None:
            train += [flag, str(value)]
    train += _setting_flags(spec.get("hyperparameters") or {})
    train += _export_flags(spec.get("export"))
    workers = int(spec.get("workers", 1))
    gpus = int((spec.get("resources") or {}).get("gpus", 1))
    if workers == 1 and gpus <= 1:
        return [contract.TRAINER_SCRIPT, *train]
    if workers == 1:
        rendezvous = ["--standalone"]
    else:
        # elastic rendezvous hosted by worker 0's agent; when a worker pod ends, the operator
        # restarts the whole group (group.py) and all resume from last.pt
        rendezvous = [
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{job}-0.{service}:{MASTER_PORT}",
            "--rdzv-id", job, "--max-restarts", str(MAX_GROUP_RESTARTS),
        ]  # fmt: skip
    return [
        "python", "-m", contract.LAUNCHER_MODULE,
        "--nnodes", str(workers),
        "--nproc-per-node", str(max(gpus, 1)),
        *rendezvous,
        "-m", contract.TRAINER_MODULE,
        *train,
    ]  # fmt: skip


def _export_flags(export: dict | None) -> list[str]:
    """spec.export as the trainer's flags: it exports after training."""
    if not export:
        return []
    flags = [contract.EXPORT_FLAG, ",".join(export["formats"])]
    flags += [contract.EXPORT_PRECISION_FLAG, export.get("precision", "fp32")]
    return flags + ([contract.EXPORT_OPTIMIZE_FLAG] if export.get("optimize") else [])


def _setting_flags(hyperparameters: dict) -> list[str]:
    """`--set PATH=VALUE` for every other template value spec.hyperparameters sets (nested
    objects such as model.rpn by their dotted keys); values as JSON, which the trainer reads."""
    given = dict(_dotted(hyperparameters))
    flags = []
    for key, path in contract.TEMPLATE_SETTINGS.items():
        if given.get(key) is not None:
            flags += [contract.SET_FLAG, f"{path}={json.dumps(given[key])}"]
    return flags


def _dotted(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _volumes(spec: dict) -> tuple[list[dict], list[dict]]:
    """PVC volumes (one per distinct claim) and the mounts of train, val (when given) and
    output."""
    places = {
        f"{DATA_MOUNT}/train": (spec["data"]["train"], True),
        f"{DATA_MOUNT}/val": (spec["data"].get("val"), True),
        OUTPUT_MOUNT: (spec["output"], False),
    }
    claims: dict[str, str] = {}
    volumes, mounts = [], []
    for path, (source, read_only) in places.items():
        if source is None:
            continue
        claim = source["claimName"]
        if claim not in claims:
            claims[claim] = f"pvc-{len(claims)}"
            volumes.append({"name": claims[claim], "persistentVolumeClaim": {"claimName": claim}})
        mount = {"name": claims[claim], "mountPath": path, "readOnly": read_only}
        if source.get("subPath"):
            mount["subPath"] = source["subPath"]
        mounts.append(mount)
    # DataLoader workers share batches through /dev/shm; the default 64 MiB is too small
    volumes.append({"name": "shm", "emptyDir": {"medium": "Memory"}})
    mounts.append({"name": "shm", "mountPath": SHM_MOUNT})
    return volumes, mounts


def _resources(spec: dict) -> dict:
    """cpu and memory as both request and limit, `gpus` of the GPU resource as a limit, then
    the explicit `requests` and `limits` maps (any resource: MIG profiles, rdma/*,
    ephemeral-storage) over them."""
    wanted = spec.get("resources") or {}
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    gpus = int(wanted.get("gpus", 1))
    if gpus > 0:
        # a quantity: the API server stores strings
        limits[wanted.get("gpuResource") or GPU_RESOURCE] = str(gpus)
    for key in ("cpu", "memory"):
        if wanted.get(key) is not None:
            requests[key] = limits[key] = str(wanted[key])
    requests.update({k: str(v) for k, v in (wanted.get("requests") or {}).items()})
    limits.update({k: str(v) for k, v in (wanted.get("limits") or {}).items()})
    return {kind: values for kind, values in (("limits", limits), ("requests", requests)) if values}


def _trainer_container(resource: dict, default_image: str, mounts: list[dict]) -> dict:
    meta, spec = resource["metadata"], resource["spec"]
    owner = meta["name"]
    workers = int(spec.get("workers", 1))
    env = [
        {"name": contract.ENV_NAME, "value": owner},
        {"name": contract.ENV_NAMESPACE, "value": meta["namespace"]},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if workers > 1:
        env.append(
            {
                "name": "JOB_COMPLETION_INDEX",
                "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX_FIELD}},
            }
        )
    return {
        "name": pod_template.TRAINER,
        "image": spec.get("image") or default_image,
        "imagePullPolicy": spec.get("imagePullPolicy", "IfNotPresent"),
        "command": trainer_command(spec, job_name(owner), service_name(owner)),
        "env": env,
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "ports": [{"name": "rendezvous", "containerPort": MASTER_PORT}] if workers > 1 else [],
        "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
        # the trainer's last log lines (its error) become the terminated state's message
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def trainer_pod_template(resource: dict, default_image: str = DEFAULT_IMAGE) -> dict:
    """The trainer's pod template (metadata and spec) as the operator builds it, before the
    user's spec.podTemplate is merged in."""
    meta, spec = resource["metadata"], resource["spec"]
    owner = meta["name"]
    volumes, mounts = _volumes(spec)
    pod_spec: dict = {
        "serviceAccountName": service_account_name(owner),
        "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
        "restartPolicy": "Never",
        "containers": [_trainer_container(resource, default_image, mounts)],
        "volumes": volumes,
    }
    for key in ("nodeSelector", "tolerations", "priorityClassName"):
        if spec.get(key):
            pod_spec[key] = spec[key]
    if int(spec.get("workers", 1)) > 1:
        pod_spec["subdomain"] = service_name(owner)  # pods resolve as <job>-<index>.<service>
    return {
        "metadata": {"labels": labels(owner), "annotations": {TRAINING_ANNOTATION: owner}},
        "spec": pod_spec,
    }


def build_training_job(resource: dict, default_image: str = DEFAULT_IMAGE) -> dict:
    """The batch/v1 Job that runs the trainer for `resource` (Indexed when workers > 1)."""
    meta, spec = resource["metadata"], resource["spec"]
    owner = meta["name"]
    workers = int(spec.get("workers", 1))
    template = trainer_pod_template(resource, default_image)
    job_spec: dict = {
        "parallelism": workers,
        "completions": workers,
        "backoffLimit": int(spec.get("backoffLimit", 3)),
        "suspend": bool(spec.get("suspend", False)),
        # a replacement pod (resume after suspend, retry after eviction) starts only once the
        # old trainer has exited: two trainers never share the output directory, and the new
        # one resumes from the checkpoint the old one saved on SIGTERM (Kubernetes >= 1.29)
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": _pod_failure_policy(),
        "template": pod_template.apply(template, spec.get("podTemplate")),
    }
    if workers > 1:
        job_spec["completionMode"] = "Indexed"
    for key in ("activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        if spec.get(key) is not None:
            job_spec[key] = int(spec[key])
    metadata = _metadata(resource, job_name(owner))
    for key in PASSED_LABELS:
        if key in (meta.get("labels") or {}):
            metadata["labels"][key] = meta["labels"][key]
    metadata["annotations"] = {
        TRAINING_ANNOTATION: owner,
        SPEC_HASH_ANNOTATION: spec_hash(spec),
        SUSPEND_ANNOTATION: str(job_spec["suspend"]).lower(),
    }
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def _pod_failure_policy() -> dict:
    """Bad input fails the training at once (no retry can fix it); a disruption (eviction,
    preemption, a drained node) does not count against backoffLimit: the next pod resumes
    from the checkpoint."""
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": "trainer",
                    "operator": "In",
                    "values": [contract.EXIT_USER_ERROR],
                },
            },
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]
    }


def spec_hash(spec: dict) -> str:
    """Digest of the training's spec except `suspend` (patched in place). Taken from the spec,
    not from the built Job, so that a new operator version or default image never replaces
    the Jobs of existing trainings."""
    fixed = {key: value for key, value in spec.items() if key != "suspend"}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:16]


def build_headless_service(resource: dict) -> dict:
    """The headless Service that gives multi-node pods stable DNS names for rendezvous."""
    owner = resource["metadata"]["name"]
    return {
        **_child(resource, "v1", "Service", service_name(owner)),
        "spec": {
            "clusterIP": "None",
            "selector": {f"{contract.GROUP}/training": label_value(owner)},
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
            # workers must find each other before they are Ready
            "publishNotReadyAddresses": True,
        },
    }


def build_service_account(resource: dict) -> dict:
    owner = resource["metadata"]["name"]
    return _child(resource, "v1", "ServiceAccount", service_account_name(owner))


def build_role(resource: dict) -> dict:
    """May read and patch the status of this one training, nothing else."""
    owner = resource["metadata"]["name"]
    return {
        **_child(resource, RBAC_API_VERSION, "Role", service_account_name(owner)),
        "rules": [
            {
                "apiGroups": [contract.GROUP],
                "resources": [f"{contract.PLURAL}/status"],
                "resourceNames": [owner],
                "verbs": ["get", "patch"],
            }
        ],
    }


def build_role_binding(resource: dict) -> dict:
    owner = resource["metadata"]["name"]
    name = service_account_name(owner)
    return {
        **_child(resource, RBAC_API_VERSION, "RoleBinding", name),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [
            {
                "kind": "ServiceAccount",
                "name": name,
                "namespace": resource["metadata"]["namespace"],
            }
        ],
    }


def build_children(resource: dict, default_image: str = DEFAULT_IMAGE) -> list[dict]:
    """Everything a training needs, in creation order (RBAC before the Job that uses it)."""
    children = [build_service_account(resource), build_role(resource), build_role_binding(resource)]
    if int(resource["spec"].get("workers", 1)) > 1:
        children.append(build_headless_service(resource))
    children.append(build_training_job(resource, default_image))
    return children
