"""What the emulator serves: resource descriptions, built-in kinds and their defaults."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@dataclass
class Resource:
    """One served resource of one group/version."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    subresources: tuple[str, ...] = ()
    # objects of several resources (versions, the events.k8s.io view) share one store
    store: tuple[str, str] = ("", "")
    schema: dict | None = None
    printer_columns: list[dict] = field(default_factory=list)
    crd: str | None = None
    verbs: list[str] = field(default_factory=lambda: list(VERBS))

    def __post_init__(self) -> None:
        self.singular = self.singular or self.kind.lower()
        if self.store == ("", ""):
            self.store = (self.group, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """`pods` or `instancesegtrainings.instseg.io`, as in server messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources


def _r(group, version, plural, kind, namespaced, short=(), cats=(), subs=(), **kw) -> Resource:
    return Resource(group, version, plural, kind, namespaced, short_names=list(short),
                    categories=list(cats), subresources=tuple(subs), **kw)  # fmt: skip


def builtin_resources() -> list[Resource]:
    return [
        _r("", "v1", "namespaces", "Namespace", False, ["ns"], subs=["status", "finalize"]),
        _r("", "v1", "pods", "Pod", True, ["po"], ["all"], ["status", "log"]),
        _r("", "v1", "services", "Service", True, ["svc"], ["all"], ["status"]),
        _r("", "v1", "serviceaccounts", "ServiceAccount", True, ["sa"]),
        _r("", "v1", "configmaps", "ConfigMap", True, ["cm"]),
        _r("", "v1", "secrets", "Secret", True),
        _r(
            "",
            "v1",
            "persistentvolumeclaims",
            "PersistentVolumeClaim",
            True,
            ["pvc"],
            subs=["status"],
        ),  # fmt: skip
        _r("", "v1", "events", "Event", True, ["ev"]),
        _r("", "v1", "nodes", "Node", False, ["no"], subs=["status"]),
        _r("events.k8s.io", "v1", "events", "Event", True, ["ev"], store=("", "events")),
        _r("batch", "v1", "jobs", "Job", True, cats=["all"], subs=["status"]),
        _r("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
        _r("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
        _r("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
        _r("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
        _r(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            False,
            ["crd", "crds"],
            subs=["status"],
        ),  # fmt: skip
        _r("coordination.k8s.io", "v1", "leases", "Lease", True),
    ]


def crd_resources(crd: dict) -> list[Resource]:
    """The resources a CustomResourceDefinition serves (one per served version)."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    served = []
    for version in spec.get("versions") or []:
        if not version.get("served", True):
            continue
        subresources = ["status"] if "status" in (version.get("subresources") or {}) else []
        if "scale" in (version.get("subresources") or {}):
            subresources.append("scale")
        served.append(
            Resource(
                group=spec["group"],
                version=version["name"],
                plural=names["plural"],
                kind=names["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                singular=names.get("singular", ""),
                short_names=list(names.get("shortNames") or []),
                categories=list(names.get("categories") or []),
                subresources=tuple(subresources),
                schema=(version.get("schema") or {}).get("openAPIV3Schema"),
                printer_columns=list(version.get("additionalPrinterColumns") or []),
                crd=crd["metadata"]["name"],
            )
        )
    return served


def crd_status(crd: dict) -> dict:
    names = copy.deepcopy((crd.get("spec") or {}).get("names") or {})
    names.setdefault("singular", names.get("kind", "").lower())
    names.setdefault("listKind", names.get("kind", "") + "List")
    now = crd["metadata"]["creationTimestamp"]
    storage = [v["name"] for v in crd["spec"].get("versions") or [] if v.get("storage")]
    conditions = [
        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
         "message": "no conflicts found", "lastTransitionTime": now},
        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
         "message": "the initial names have been accepted", "lastTransitionTime": now},
    ]  # fmt: skip
    return {"acceptedNames": names, "conditions": conditions, "storedVersions": storage}


def _normalise_quantities(pod_spec: dict) -> None:
    """The API server stores resource quantities as strings (`nvidia.com/gpu: 1` → "1"); typed
    clients (the kubernetes Python client's models) refuse numbers there."""
    for container in [*(pod_spec.get("containers") or []), *(pod_spec.get("initContainers") or [])]:
        for part in ("limits", "requests"):
            values = (container.get("resources") or {}).get(part) or {}
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    values[key] = str(value)


def apply_defaults(resource: Resource, obj: dict, uid: str) -> None:
    """What the real API server's create strategies fill in for built-in kinds."""
    kind, meta = resource.kind, obj["metadata"]
    if kind == "Pod":
        _normalise_quantities(obj.get("spec") or {})
    elif kind == "Job" and resource.group == "batch":
        _normalise_quantities(((obj.get("spec") or {}).get("template") or {}).get("spec") or {})
    if resource.group == "" and kind == "Namespace":
        meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        obj["status"] = {"phase": "Active"}
    elif kind == "Pod":
        spec = obj.setdefault("spec", {})
        spec.setdefault("restartPolicy", "Always")
        spec.setdefault("terminationGracePeriodSeconds", 30)
        spec.setdefault("dnsPolicy", "ClusterFirst")
        spec.setdefault("schedulerName", "default-scheduler")
        spec.setdefault("serviceAccountName", spec.get("serviceAccount", "default"))
        spec.setdefault("serviceAccount", spec["serviceAccountName"])
        for container in spec.get("containers") or []:
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("imagePullPolicy", "IfNotPresent")
        obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
    elif kind == "Job" and resource.group == "batch":
        spec = obj.setdefault("spec", {})
        spec.setdefault("parallelism", 1)
        if spec.get("completionMode") != "Indexed" or "completions" not in spec:
            spec.setdefault("completions", spec["parallelism"] if "completions" in spec else 1)
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
        controller_labels = {
            "batch.kubernetes.io/controller-uid": uid,
            "batch.kubernetes.io/job-name": meta["name"],
            "controller-uid": uid,
            "job-name": meta["name"],
        }
        if not spec.get("manualSelector"):
            spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
            template_meta = spec.setdefault("template", {}).setdefault("metadata", {})
            template_meta.setdefault("labels", {}).update(controller_labels)
        obj["status"] = {}
    elif kind == "PersistentVolumeClaim":
        spec = obj.setdefault("spec", {})
        spec.setdefault("volumeMode", "Filesystem")
        spec.setdefault("volumeName", f"pvc-{uid}")
        storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
        obj["status"] = {
            "phase": "Bound",
            "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
            "capacity": {"storage": storage},
        }
    elif kind == "Service":
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        if spec.get("clusterIP") != "None":
            spec.setdefault("clusterIP", f"10.96.{random.randint(0, 255)}.{random.randint(1, 254)}")
        spec.setdefault("sessionAffinity", "None")
        obj["status"] = {"loadBalancer": {}}
    elif kind == "Secret":
        obj.setdefault("type", "Opaque")
    elif kind == "Event" and resource.group == "":
        obj.setdefault("count", 1)
        obj.setdefault("type", "Normal")


def _micro_time(event: dict) -> str | None:
    when = event.get("firstTimestamp") or event["metadata"].get("creationTimestamp")
    return when.replace("Z", ".000000Z") if when and when.endswith("Z") else when


def event_to_events_v1(event: dict) -> dict:
    """A core v1 Event as the events.k8s.io/v1 view shows it."""
    source = event.get("source") or {}
    view = {
        "kind": "Event",
        "apiVersion": "events.k8s.io/v1",
        "metadata": event.get("metadata", {}),
        "eventTime": event.get("eventTime") or _micro_time(event),
        "reportingController": event.get("reportingComponent") or source.get("component", ""),
        "reportingInstance": event.get("reportingInstance") or source.get("host", ""),
        "action": event.get("action"),
        "reason": event.get("reason"),
        "regarding": event.get("involvedObject"),
        "related": event.get("related"),
        "note": event.get("message"),
        "type": event.get("type"),
        "deprecatedSource": source or None,
        "deprecatedFirstTimestamp": event.get("firstTimestamp"),
        "deprecatedLastTimestamp": event.get("lastTimestamp"),
        "deprecatedCount": event.get("count"),
        "series": event.get("series"),
    }
    return {key: value for key, value in view.items() if value is not None}


def event_from_events_v1(view: dict) -> dict:
    event = {
        "kind": "Event",
        "apiVersion": "v1",
        "metadata": view.get("metadata", {}),
        "eventTime": view.get("eventTime"),
        "reportingComponent": view.get("reportingController"),
        "reportingInstance": view.get("reportingInstance"),
        "action": view.get("action"),
        "reason": view.get("reason"),
        "involvedObject": view.get("regarding") or {},
        "related": view.get("related"),
        "message": view.get("note"),
        "type": view.get("type"),
        "source": view.get("deprecatedSource"),
        "firstTimestamp": view.get("deprecatedFirstTimestamp"),
        "lastTimestamp": view.get("deprecatedLastTimestamp"),
        "count": view.get("deprecatedCount"),
        "series": view.get("series"),
    }
    return {key: value for key, value in event.items() if value is not None}
