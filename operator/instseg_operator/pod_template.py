"""`spec.podTemplate`: labels, annotations and a pod-spec overlay that the user merges over the
trainer pod the operator builds (env, envFrom, volumes and mounts, imagePullSecrets, affinity,
topologySpreadConstraints, securityContext, schedulerName, runtimeClassName, sidecars, ...).

Merging follows Kubernetes' strategic merge for pod specs: lists of named things (containers,
env, volumes, volumeMounts, ports, imagePullSecrets) merge by name, maps merge key by key,
anything else the overlay replaces. What the operator owns is protected, each with an error
that says what to set instead.
"""

from __future__ import annotations

import copy

TRAINER = "trainer"
# list fields merged by an entry's key (the rest are replaced whole)
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}
# pod fields the operator sets for the trainer to work, with what to use instead
OWNED_POD_FIELDS = {
    "restartPolicy": "the Job needs Never",
    "serviceAccountName": "the trainer patches its status with its own ServiceAccount",
    "serviceAccount": "the trainer patches its status with its own ServiceAccount",
    "subdomain": "multi-node rendezvous uses the headless Service",
    "hostname": "multi-node rendezvous uses the Job's pod hostnames",
}
OWNED_TRAINER_FIELDS = {
    "command": "set spec.template and spec.hyperparameters",
    "args": "set spec.template and spec.hyperparameters",
    "image": "set spec.image",
}


def _merge_list_into(target: list, overlay: list, key: str) -> None:
    index = {item.get(key): i for i, item in enumerate(target) if isinstance(item, dict)}
    for item in overlay:
        if isinstance(item, dict) and item.get(key) in index:
            _merge_into(target[index[item[key]]], item)
        else:
            target.append(copy.deepcopy(item))


def _merge_into(target: dict, overlay: dict) -> None:
    """Merges `overlay` into `target` in place (strategic-merge style); `overlay` is copied,
    never shared."""
    for key, value in overlay.items():
        current = target.get(key)
        if key in MERGE_KEYS and isinstance(current, list) and isinstance(value, list):
            _merge_list_into(current, value, MERGE_KEYS[key])
        elif isinstance(current, dict) and isinstance(value, dict):
            _merge_into(current, value)
        else:
            target[key] = copy.deepcopy(value)


def _trainer_overlay(spec: dict) -> dict:
    containers = spec.get("containers") or []
    return next((c for c in containers if isinstance(c, dict) and c.get("name") == TRAINER), {})


def problems(template: dict | None, built: dict) -> list[str]:
    """What in `spec.podTemplate` would change what the operator owns in `built`, the pod
    template (metadata and spec) it made for the trainer."""
    template = template or {}
    spec = template.get("spec") or {}
    where = "spec.podTemplate.spec"
    found = [
        f"{where}.{field}: the operator owns it ({why})"
        for field, why in OWNED_POD_FIELDS.items()
        if field in spec
    ]
    for i, container in enumerate(spec.get("containers") or []):
        if not isinstance(container, dict) or not container.get("name"):
            found.append(f"{where}.containers[{i}].name: every container needs a name")
    trainer = _trainer_overlay(spec)
    found += [
        f"{where}.containers[{TRAINER}].{field}: the operator owns it ({why})"
        for field, why in OWNED_TRAINER_FIELDS.items()
        if field in trainer
    ]
    built_spec = built["spec"]
    owned_paths = {m["mountPath"] for m in built_spec["containers"][0].get("volumeMounts") or []}
    for mount in trainer.get("volumeMounts") or []:
        if mount.get("mountPath") in owned_paths:
            found.append(
                f"{where}.containers[{TRAINER}].volumeMounts: {mount['mountPath']} is the "
                "trainer's own mount (data, output or /dev/shm); mount elsewhere"
            )
    owned_volumes = {v["name"] for v in built_spec.get("volumes") or []}
    for volume in spec.get("volumes") or []:
        if volume.get("name") in owned_volumes:
            found.append(
                f"{where}.volumes: {volume['name']!r} is a volume of the operator's; "
                "choose another name"
            )
    labels = (template.get("metadata") or {}).get("labels") or {}
    for key in sorted(labels.keys() & built["metadata"].get("labels", {}).keys()):
        found.append(f"spec.podTemplate.metadata.labels[{key}]: the operator sets it")
    return found


def apply(pod_template: dict, template: dict | None) -> dict:
    """The Job's pod template (metadata + spec) with the user's `spec.podTemplate` merged in."""
    template = template or {}
    merged = copy.deepcopy(pod_template)
    metadata = template.get("metadata") or {}
    for key in ("labels", "annotations"):
        if metadata.get(key):
            merged["metadata"][key] = {**metadata[key], **merged["metadata"].get(key, {})}
    if template.get("spec"):
        _merge_into(merged["spec"], template["spec"])
    return merged
