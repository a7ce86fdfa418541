"""The operator's calls to the Kubernetes API, on plain dicts, through the kubernetes client.

One place lists every (resource, verb) the operator uses (`API_USE`), so that the Helm
chart's ClusterRole can be checked against the code: it must grant exactly these.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import instseg_contract as contract
from kubernetes import client, config
from kubernetes.client.rest import ApiException

# kind → (API path prefix, plural); namespaced kinds only
KINDS = {
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Service": ("/api/v1", "services"),
    "Pod": ("/api/v1", "pods"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "Job": ("/apis/batch/v1", "jobs"),
    contract.KIND: (f"/apis/{contract.GROUP}/{contract.VERSION}", contract.PLURAL),
}

# (API group, resource) → verbs this module (and kopf, for the trainings) needs, with reasons;
# the chart's ClusterRole is tested against it
API_USE = {
    (contract.GROUP, contract.PLURAL): {
        "list",
        "watch",  # kopf watches trainings
        "get",  # re-read before deriving status
        "patch",  # kopf's progress annotations
    },
    # patch: phase, conditions, message; get: the operator creates Roles granting get+patch
    # here to trainers, and RBAC lets it grant only verbs it holds itself
    (contract.GROUP, f"{contract.PLURAL}/status"): {"get", "patch"},
    # children carry ownerReferences with blockOwnerDeletion; OwnerReferencesPermissionEnforcement
    # (hardened clusters, OpenShift) admits those only from who may update the owner's finalizers
    (contract.GROUP, f"{contract.PLURAL}/finalizers"): {"update"},
    ("batch", "jobs"): {"list", "watch", "get", "create", "patch", "delete"},
    ("", "pods"): {"list", "watch"},  # status is derived from the Job's pods (kopf's index)
    # create: a multi-node training whose worker ended evicts the others, so that the group
    # restarts together (group.py); evictions do not count against the Job's backoffLimit
    ("", "pods/eviction"): {"create"},
    ("", "persistentvolumeclaims"): {"get"},  # data and output volumes must exist
    ("", "serviceaccounts"): {"get", "create"},
    ("", "services"): {"get", "create"},  # headless Service of multi-node trainings
    ("rbac.authorization.k8s.io", "roles"): {"get", "create"},
    ("rbac.authorization.k8s.io", "rolebindings"): {"get", "create"},
    # create: kopf.event() posts core v1 Events; list: the Job controller's FailedCreate
    # Events say why a trainer pod cannot be created (Pod Security, quota, LimitRange, ...)
    ("", "events"): {"create", "list"},
}


class ApiError(Exception):
    """An API call failed; `status` is the HTTP code and `reason` the Status reason."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message

    @classmethod
    def from_exception(cls, e: ApiException) -> ApiError:
        try:
            body = json.loads(e.body or "{}")
        except ValueError:
            body = {}
        return cls(
            e.status or 0, body.get("reason") or str(e.reason), body.get("message") or str(e)
        )


def load_config() -> None:
    """In a pod: its service account; elsewhere: the kubeconfig ($KUBECONFIG or ~/.kube)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


class Cluster:
    """Typed-enough access to the objects the operator touches, as JSON dicts."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.api = api_client or client.ApiClient()

    def _path(self, kind: str, namespace: str, name: str | None = None, sub: str = "") -> str:
        prefix, plural = KINDS[kind]
        path = f"{prefix}/namespaces/{quote(namespace)}/{plural}"
        if name is not None:
            path += f"/{quote(name)}"
        return path + (f"/{sub}" if sub else "")

    def _call(self, method: str, path: str, body=None, query=None, content_type=None) -> dict:
        headers = {"Accept": "application/json"}
        if content_type or body is not None:
            headers["Content-Type"] = content_type or "application/json"
        method, url, headers, body, post = self.api.param_serialize(
            method=method, resource_path=path, query_params=query or [],
            header_params=headers, body=body, auth_settings=["BearerToken"],
        )  # fmt: skip
        try:
            response = self.api.call_api(method, url, headers, body, post, _request_timeout=30)
        except ApiException as e:
            raise ApiError.from_exception(e) from None
        data = response.read()
        if not 200 <= response.status < 300:
            raise ApiError.from_exception(ApiException(http_resp=response))
        return json.loads(data) if data else {}

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        """The object, or None when it does not exist."""
        try:
            return self._call("GET", self._path(kind, namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def failed_creates(self, namespace: str, job_uid: str) -> list[dict]:
        """The Job controller's FailedCreate Events for one Job (it could not create a pod)."""
        selector = f"involvedObject.uid={job_uid},reason=FailedCreate"
        path = f"/api/v1/namespaces/{quote(namespace)}/events"
        return self._call("GET", path, query=[("fieldSelector", selector)]).get("items") or []

    def create(self, manifest: dict) -> dict:
        meta = manifest["metadata"]
        return self._call("POST", self._path(manifest["kind"], meta["namespace"]), body=manifest)

    def patch(self, kind: str, namespace: str, name: str, patch: dict, sub: str = "") -> dict:
        return self._call(
            "PATCH", self._path(kind, namespace, name, sub), body=patch,
            content_type="application/merge-patch+json",
        )  # fmt: skip

    def delete(self, kind: str, namespace: str, name: str) -> None:
        """Deletes with background propagation (the garbage collector removes the children)."""
        try:
            self._call(
                "DELETE", self._path(kind, namespace, name),
                body={"kind": "DeleteOptions", "apiVersion": "v1",
                      "propagationPolicy": "Background"},
            )  # fmt: skip
        except ApiError as e:
            if e.status != 404:
                raise

    def evict(self, namespace: str, pod: str) -> bool:
        """Evicts a pod through the Eviction API (graceful, with the DisruptionTarget
        condition). False when a PodDisruptionBudget refuses it now (429); a pod already gone
        counts as evicted."""
        body = {"apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": pod, "namespace": namespace}}  # fmt: skip
        try:
            self._call("POST", self._path("Pod", namespace, pod, sub="eviction"), body=body)
        except ApiError as e:
            if e.status == 429:
                return False
            if e.status != 404:
                raise
        return True

    def patch_training_status(self, namespace: str, name: str, status: dict) -> dict:
        return self.patch(contract.KIND, namespace, name, {"status": status}, sub="status")
