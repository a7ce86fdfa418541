"""The emulator's object store: CRUD with the API server's semantics, history for watches,
finalizers, graceful pod deletion, namespace termination and ownerReference garbage
collection. Every write makes a new dict, so stored objects and history are never mutated."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from . import patches
from .resources import (
    Resource,
    apply_defaults,
    builtin_resources,
    crd_resources,
    crd_status,
    event_from_events_v1,
    event_to_events_v1,
)
from .schema import apply_schema

StoreKey = tuple[str, str]
ObjKey = tuple[str, str]
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_TERMINAL = ("Succeeded", "Failed")


class ApiError(Exception):
    """An error the server answers with a `kind: Status` object."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict:
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def not_found(resource: Resource, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{resource.qualified} "{name}" not found',
        {"name": name, "group": resource.group, "kind": resource.plural},
    )


def conflict(resource: Resource, name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {resource.qualified} "{name}": the object has been '
        "modified; please apply your changes to the latest version and try again",
        {"name": name, "group": resource.group, "kind": resource.plural},
    )


def invalid(resource: Resource, name: str, errors: list[str]) -> ApiError:
    causes = []
    for error in errors:
        field, _, message = error.partition(": ")
        causes.append({"reason": "FieldValueInvalid", "message": message, "field": field})
    qualified = f"{resource.kind}.{resource.group}" if resource.group else resource.kind
    return ApiError(
        422,
        "Invalid",
        f'{qualified} "{name}" is invalid: {", ".join(errors)}',
        {"name": name, "group": resource.group, "kind": resource.kind, "causes": causes},
    )


def now_rfc3339() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Change:
    """One entry of the watch history."""

    rv: int
    store: StoreKey
    namespace: str
    type: str
    obj: dict
    old: dict | None


def _content(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _validate_schema(resource: Resource, obj: dict, old: dict | None) -> tuple[dict, list[str]]:
    if resource.schema is None:
        return obj, []
    return apply_schema(resource.schema, obj, old)


class Store:
    def __init__(self) -> None:
        self.rv = 0
        self.objects: dict[StoreKey, dict[ObjKey, dict]] = {}
        self.resources: dict[tuple[str, str, str], Resource] = {}
        self.history: list[Change] = []
        self.watchers: set[asyncio.Queue] = set()
        self.uids: dict[str, tuple[StoreKey, ObjKey]] = {}
        self._collecting = False
        for resource in builtin_resources():
            self.register(resource)
        for name in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.create(self.resource("", "v1", "namespaces"), None, {"metadata": {"name": name}})

    # resources ---------------------------------------------------------------------------
    def register(self, resource: Resource) -> None:
        self.resources[(resource.group, resource.version, resource.plural)] = resource
        self.objects.setdefault(resource.store, {})

    def resource(self, group: str, version: str, plural: str) -> Resource | None:
        return self.resources.get((group, version, plural))

    def resource_for_store(self, store: StoreKey) -> Resource:
        return next(r for r in self.resources.values() if r.store == store and r.group == store[0])

    def _serve_crd(self, crd: dict, old: dict | None) -> None:
        if old is not None:
            for key in [k for k, r in self.resources.items() if r.crd == old["metadata"]["name"]]:
                del self.resources[key]
        for resource in crd_resources(crd):
            self.register(resource)

    def _unserve_crd(self, crd: dict) -> None:
        name = crd["metadata"]["name"]
        served = [k for k, r in self.resources.items() if r.crd == name]
        if not served:
            return
        resource = self.resources[served[0]]
        for key in served:
            del self.resources[key]
        # the real server first deletes the instances (waiting on their finalizers)
        for (namespace, obj_name), obj in list(self.objects.get(resource.store, {}).items()):
            self._remove(resource, namespace, obj_name, obj, collect=False)
        self.objects.pop(resource.store, None)

    # reading -----------------------------------------------------------------------------
    def get(self, resource: Resource, namespace: str | None, name: str) -> dict:
        obj = self.objects.get(resource.store, {}).get((namespace or "", name))
        if obj is None:
            raise not_found(resource, name)
        return obj

    def list(self, resource: Resource, namespace: str | None) -> list[dict]:
        items = self.objects.get(resource.store, {})
        return [
            obj for (ns, _), obj in sorted(items.items()) if namespace is None or ns == namespace
        ]

    def present(self, resource: Resource, obj: dict) -> dict:
        """The stored object as the resource's group/version shows it."""
        if resource.group == "events.k8s.io":
            return event_to_events_v1(obj)
        return {**obj, "apiVersion": resource.api_version, "kind": resource.kind}

    def _stored_form(self, resource: Resource, body: dict) -> dict:
        if resource.group == "events.k8s.io":
            return event_from_events_v1(body)
        return body

    def _commit(self, resource: Resource, kind: str, obj: dict, old: dict | None) -> dict:
        self.rv += 1
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self.rv)
        key = (meta.get("namespace", ""), meta["name"])
        bucket = self.objects.setdefault(resource.store, {})
        if kind == "DELETED":
            bucket.pop(key, None)
            self.uids.pop(meta["uid"], None)
        else:
            bucket[key] = obj
            self.uids[meta["uid"]] = (resource.store, key)
        change = Change(self.rv, resource.store, key[0], kind, obj, old)
        self.history.append(change)
        for queue in self.watchers:
            queue.put_nowait(change)
        return obj

    # writing -----------------------------------------------------------------------------
    def _check_body(self, resource: Resource, body: object, name: str | None) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the request body must be a JSON object")
        kind = body.get("kind")
        api_version = body.get("apiVersion")
        expected = "v1" if resource.group == "events.k8s.io" and api_version == "v1" else None
        if kind and kind != resource.kind:
            raise ApiError(
                400, "BadRequest", f"the kind of the object ({kind}) does not match {resource.kind}"
            )
        if api_version and api_version not in (resource.api_version, expected):
            served = {r.api_version for r in self.resources.values() if r.store == resource.store}
            if api_version not in served:
                raise ApiError(
                    400,
                    "BadRequest",
                    f"the API version in the data ({api_version}) does not match the expected "
                    f"API version ({resource.api_version})",
                )
        body = copy.deepcopy(body)
        if not isinstance(body.get("metadata", {}), dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        body.setdefault("metadata", {})
        if name is not None and body["metadata"].get("name", name) != name:
            raise ApiError(
                400,
                "BadRequest",
                f"the name of the object ({body['metadata']['name']}) does not match the name "
                f"on the URL ({name})",
            )
        return body

    def _check_namespace(self, resource: Resource, namespace: str | None, body: dict) -> None:
        if not resource.namespaced:
            body["metadata"].pop("namespace", None)
            return
        given = body["metadata"].get("namespace")
        if given and given != namespace:
            raise ApiError(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the "
                "request",
            )
        body["metadata"]["namespace"] = namespace

    def create(
        self, resource: Resource, namespace: str | None, body: object, dry_run: bool = False
    ) -> dict:
        body = self._stored_form(resource, self._check_body(resource, body, None))
        self._check_namespace(resource, namespace, body)
        meta = body["metadata"]
        if resource.namespaced:
            ns_obj = self.objects[("", "namespaces")].get(("", namespace))
            if ns_obj is None:
                raise ApiError(
                    404,
                    "NotFound",
                    f'namespaces "{namespace}" not found',
                    {"name": namespace, "kind": "namespaces"},
                )
            if ns_obj["metadata"].get("deletionTimestamp"):
                raise ApiError(
                    403,
                    "Forbidden",
                    f'{resource.plural} "{meta.get("name", "")}" is forbidden: unable to create '
                    f"new content in namespace {namespace} because it is being terminated",
                )
        if not meta.get("name"):
            if not meta.get("generateName"):
                required = "metadata.name: Required value: name or generateName is required"
                raise invalid(resource, "", [required])
            alphabet = string.ascii_lowercase + string.digits
            suffix = "".join(random.choice(alphabet) for _ in range(5))
            meta["name"] = meta["generateName"] + suffix
        name = meta["name"]
        if not _NAME.match(name) or len(name) > 253:
            raise invalid(
                resource,
                name,
                [
                    f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain must '
                    "consist of lower case alphanumeric characters, '-' or '.', and must start "
                    "and end with an alphanumeric character"
                ],
            )
        if (namespace or "", name) in self.objects.get(resource.store, {}):
            raise ApiError(
                409,
                "AlreadyExists",
                f'{resource.qualified} "{name}" already exists',
                {"name": name, "group": resource.group, "kind": resource.plural},
            )
        for key in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(key, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        meta["generation"] = 1
        body["apiVersion"], body["kind"] = resource.api_version, resource.kind
        if resource.group == "events.k8s.io":
            body["apiVersion"] = "v1"
        if resource.has_status and resource.crd is not None:
            body.pop("status", None)
        apply_defaults(resource, body, meta["uid"])
        body, errors = _validate_schema(resource, body, None)
        if errors:
            raise invalid(resource, name, errors)
        if resource.kind == "CustomResourceDefinition":
            body = self._check_crd(resource, body)
        if dry_run:
            return body
        stored = self._commit(resource, "ADDED", body, None)
        if meta.get("ownerReferences"):
            # the garbage collector removes an object whose owners are all gone, also one
            # created after its owner was deleted (a controller racing the deletion)
            self.collect_garbage()
        if resource.kind == "CustomResourceDefinition":
            self._serve_crd(stored, None)
        if resource.kind == "Namespace" and resource.group == "":
            sa = self.resource("", "v1", "serviceaccounts")
            self.create(sa, name, {"metadata": {"name": "default"}})
        return stored

    def _check_crd(self, resource: Resource, crd: dict) -> dict:
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        errors = []
        if not spec.get("group") or not names.get("plural") or not names.get("kind"):
            errors.append("spec: Required value: group, names.plural and names.kind are required")
        elif crd["metadata"]["name"] != f"{names['plural']}.{spec['group']}":
            errors.append(
                f'metadata.name: Invalid value: "{crd["metadata"]["name"]}": must be '
                'spec.names.plural+"."+spec.group'
            )
        if not spec.get("versions"):
            errors.append("spec.versions: Required value: must have exactly one storage version")
        if errors:
            raise invalid(resource, crd["metadata"]["name"], errors)
        crd["status"] = crd_status(crd)
        return crd

    def _pod_waits_for_kubelet(self, obj: dict) -> bool:
        return bool(
            obj.get("kind") == "Pod"
            and (obj.get("spec") or {}).get("nodeName")
            and obj["metadata"].get("deletionGracePeriodSeconds", 0) > 0
        )

    def update(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        body: object,
        subresource: str | None = None,
        dry_run: bool = False,
    ) -> dict:
        current = self.get(resource, namespace, name)
        body = self._stored_form(resource, self._check_body(resource, body, name))
        self._check_namespace(resource, namespace, body)
        given_rv = body["metadata"].get("resourceVersion")
        if given_rv and given_rv != current["metadata"]["resourceVersion"]:
            raise conflict(resource, name)
        if subresource == "status":
            new = copy.deepcopy(current)
            if "status" in body:
                new["status"] = body["status"]
            else:
                new.pop("status", None)
        else:
            new = body
            kept = ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds")
            for key in kept + ("generation",):
                new["metadata"].pop(key, None)
                if key in current["metadata"]:
                    new["metadata"][key] = current["metadata"][key]
            new["metadata"]["name"] = name
            if resource.has_status:
                new.pop("status", None)
                if "status" in current:
                    new["status"] = current["status"]
        new["apiVersion"], new["kind"] = current["apiVersion"], current["kind"]
        new["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        if resource.group == "events.k8s.io":
            new["apiVersion"] = "v1"
        new, errors = _validate_schema(resource, new, current)
        if errors:
            raise invalid(resource, name, errors)
        if resource.kind == "CustomResourceDefinition" and subresource is None:
            new = self._check_crd(resource, new)
        if _content(new) != _content(current):
            new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        if new == current or dry_run:
            return new
        meta = new["metadata"]
        if (
            meta.get("deletionTimestamp")
            and not meta.get("finalizers")
            and not self._pod_waits_for_kubelet(new)
            and resource.kind != "Namespace"
        ):
            return self._remove(resource, namespace, name, new)
        stored = self._commit(resource, "MODIFIED", new, current)
        if resource.kind == "CustomResourceDefinition":
            self._serve_crd(stored, current)
        if meta.get("deletionTimestamp"):
            self.collect_garbage()
        return stored

    def patch(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        patch_type: str,
        patch: object,
        subresource: str | None = None,
        dry_run: bool = False,
    ) -> dict:
        current = self.present(resource, self.get(resource, namespace, name))
        try:
            if patch_type == "json":
                patched = patches.json_patch(current, patch)
            elif patch_type == "strategic":
                patched = patches.strategic_merge_patch(current, patch)
            else:
                patched = patches.merge_patch(current, patch)
        except patches.PatchError as error:
            raise ApiError(422, "Invalid", str(error)) from error
        except (KeyError, TypeError, AttributeError) as error:
            raise ApiError(400, "BadRequest", f"invalid patch: {error}") from error
        if not isinstance(patched, dict):
            raise ApiError(400, "BadRequest", "the patch does not result in an object")
        patched.setdefault("metadata", {})
        if (patched["metadata"].get("resourceVersion") or "") != current["metadata"][
            "resourceVersion"
        ]:
            if patched["metadata"].get("resourceVersion"):
                raise conflict(resource, name)
            patched["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        return self.update(resource, namespace, name, patched, subresource, dry_run)

    # deleting ----------------------------------------------------------------------------
    def dependents(self, uid: str) -> list[tuple[Resource, dict]]:
        found = []
        for store_key, bucket in self.objects.items():
            for obj in bucket.values():
                refs = obj["metadata"].get("ownerReferences") or []
                if any(ref.get("uid") == uid for ref in refs):
                    found.append((self.resource_for_store(store_key), obj))
        return found

    def delete(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        options: dict | None = None,
        dry_run: bool = False,
    ) -> dict:
        options = options or {}
        current = self.get(resource, namespace, name)
        meta = current["metadata"]
        preconditions = options.get("preconditions") or {}
        if preconditions.get("uid") and preconditions["uid"] != meta["uid"]:
            raise ApiError(
                409,
                "Conflict",
                f"Precondition failed: UID in precondition: {preconditions['uid']}, "
                f"UID in object meta: {meta['uid']}",
            )
        if (
            preconditions.get("resourceVersion")
            and preconditions["resourceVersion"] != meta["resourceVersion"]
        ):
            raise conflict(resource, name)
        if dry_run:
            return current
        policy = options.get("propagationPolicy")
        if policy is None and options.get("orphanDependents") is not None:
            policy = "Orphan" if options["orphanDependents"] else "Background"
        if policy is None:
            # batch/v1 Jobs still orphan their pods by default, as in the real server
            policy = "Orphan" if resource.kind == "Job" and resource.group == "batch" else None
        if policy == "Orphan":
            self._orphan_dependents(meta["uid"])
        new = copy.deepcopy(current)
        finalizers = list(meta.get("finalizers") or [])
        if policy == "Foreground" and "foregroundDeletion" not in finalizers:
            finalizers.append("foregroundDeletion")
        grace = options.get("gracePeriodSeconds")
        graceful = (
            resource.kind == "Pod"
            and (current.get("spec") or {}).get("nodeName")
            and (current.get("status") or {}).get("phase") not in _TERMINAL
            and grace != 0
        )
        is_namespace = resource.kind == "Namespace" and resource.group == ""
        if not finalizers and not graceful and not is_namespace:
            return self._remove(resource, namespace, name, current)
        if meta.get("deletionTimestamp"):
            if grace == 0 and resource.kind == "Pod":
                new["metadata"]["deletionGracePeriodSeconds"] = 0
            else:
                return current
        else:
            new["metadata"]["deletionTimestamp"] = now_rfc3339()
            if graceful:
                default = (current.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
                new["metadata"]["deletionGracePeriodSeconds"] = grace if grace else default
            else:
                new["metadata"]["deletionGracePeriodSeconds"] = 0
            if is_namespace:
                new["status"] = {"phase": "Terminating"}
        new["metadata"]["finalizers"] = finalizers
        if not finalizers:
            del new["metadata"]["finalizers"]
            if not self._pod_waits_for_kubelet(new) and not is_namespace:
                return self._remove(resource, namespace, name, new)
        stored = self._commit(resource, "MODIFIED", new, current)
        if is_namespace:
            self._empty_namespace(name)
        self.collect_garbage()
        return stored

    def _orphan_dependents(self, uid: str) -> None:
        for dep_resource, dep in self.dependents(uid):
            new = copy.deepcopy(dep)
            refs = [r for r in new["metadata"]["ownerReferences"] if r.get("uid") != uid]
            if refs:
                new["metadata"]["ownerReferences"] = refs
            else:
                del new["metadata"]["ownerReferences"]
            self._commit(dep_resource, "MODIFIED", new, dep)

    def _empty_namespace(self, namespace: str) -> None:
        for store_key, bucket in list(self.objects.items()):
            for (ns, name), obj in list(bucket.items()):
                if ns == namespace and not obj["metadata"].get("deletionTimestamp"):
                    resource = self.resource_for_store(store_key)
                    if (ns, name) in self.objects[store_key]:
                        self.delete(resource, ns, name, {"propagationPolicy": "Background"})

    def _remove(
        self, resource: Resource, namespace: str | None, name: str, obj: dict, collect: bool = True
    ) -> dict:
        stored = self._commit(resource, "DELETED", obj, obj)
        if resource.kind == "CustomResourceDefinition":
            self._unserve_crd(stored)
        if collect:
            self.collect_garbage()
        return stored

    def collect_garbage(self) -> None:
        """Background, foreground and namespace deletion until nothing changes."""
        if self._collecting:
            return
        self._collecting = True
        try:
            changed = True
            while changed:
                changed = self._collect_once()
        finally:
            self._collecting = False

    def _collect_once(self) -> bool:
        for store_key, bucket in list(self.objects.items()):
            if not bucket:
                continue
            resource = self.resource_for_store(store_key)
            for (ns, name), obj in list(bucket.items()):
                meta = obj["metadata"]
                refs = meta.get("ownerReferences") or []
                orphaned = refs and all(ref.get("uid") not in self.uids for ref in refs)
                if orphaned and not meta.get("deletionTimestamp"):
                    self.delete(resource, ns, name, {"propagationPolicy": "Background"})
                    return True
                foreground = "foregroundDeletion" in (meta.get("finalizers") or [])
                if foreground and self._foreground_step(resource, obj):
                    return True
        namespaces = self.resource("", "v1", "namespaces")
        for (_, name), ns_obj in list(self.objects[("", "namespaces")].items()):
            if ns_obj["metadata"].get("deletionTimestamp") and not any(
                ns == name for bucket in self.objects.values() for ns, _ in bucket
            ):
                self._remove(namespaces, None, name, ns_obj, collect=False)
                return True
        return False

    def _foreground_step(self, resource: Resource, obj: dict) -> bool:
        uid = obj["metadata"]["uid"]
        blocking = False
        for dep_resource, dep in self.dependents(uid):
            if not dep["metadata"].get("deletionTimestamp"):
                dep_meta = dep["metadata"]
                self.delete(
                    dep_resource,
                    dep_meta.get("namespace"),
                    dep_meta["name"],
                    {"propagationPolicy": "Foreground"},
                )
                return True
            refs = dep["metadata"].get("ownerReferences") or []
            if any(r.get("uid") == uid and r.get("blockOwnerDeletion") for r in refs):
                blocking = True
        if blocking:
            return False
        new = copy.deepcopy(obj)
        new["metadata"]["finalizers"].remove("foregroundDeletion")
        meta = new["metadata"]
        if not meta["finalizers"]:
            del meta["finalizers"]
            if not self._pod_waits_for_kubelet(new):
                self._remove(resource, meta.get("namespace"), meta["name"], new, collect=False)
                return True
        self._commit(resource, "MODIFIED", new, obj)
        return True

    def delete_collection(
        self,
        resource: Resource,
        namespace: str | None,
        predicate: Callable[[dict], bool],
        options: dict | None = None,
    ) -> list[dict]:
        deleted = []
        for obj in self.list(resource, namespace):
            if predicate(self.present(resource, obj)):
                meta = obj["metadata"]
                if (meta.get("namespace", ""), meta["name"]) in self.objects[resource.store]:
                    deleted.append(
                        self.delete(resource, meta.get("namespace"), meta["name"], options)
                    )
        return deleted
