"""The emulator's HTTP side: an aiohttp application speaking the Kubernetes REST API
(discovery, CRUD, patch, watch, tables, pod logs) over the object store."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from pathlib import Path

import yaml
from aiohttp import web

from . import rbac
from .resources import Resource
from .selectors import SelectorError, field_selector, label_selector
from .store import ApiError, Change, Store
from .tables import to_table

BOOKMARK_SECONDS = 5.0
VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-emulator",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.23.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}
_PATCH_TYPES = {
    "application/merge-patch+json": "merge",
    "application/json-patch+json": "json",
    "application/strategic-merge-patch+json": "strategic",
}
_SUBRESOURCE_VERBS = {"status": ["get", "patch", "update"], "log": ["get"], "scale": ["get"]}


def _version_key(version: str) -> tuple:
    """Kubernetes version priority: GA > beta > alpha, higher numbers first."""
    match = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not match:
        return (3, 0, 0, version)
    stage = {None: 0, "beta": 1, "alpha": 2}[match.group(2)]
    return (stage, -int(match.group(1)), -int(match.group(3) or 0), version)


def _json(body: dict, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(body), status=status, content_type="application/json", charset=None
    )


def _error(error: ApiError) -> web.Response:
    return _json(error.status(), error.code)


class ApiServer:
    """Serves one Store; `root/logs/<ns>/<pod>.log` are the pod logs."""

    def __init__(self, root: Path, admin_token: str, store: Store | None = None) -> None:
        self.root = Path(root)
        self.admin_token = admin_token
        self.store = store or Store()
        self.closing = False
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)
        self.app.on_shutdown.append(self._on_shutdown)

    async def _on_shutdown(self, _app: web.Application) -> None:
        self.closing = True
        for queue in list(self.store.watchers):
            queue.put_nowait(None)

    # authentication and authorisation ---------------------------------------------------
    def _user(self, request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if token and token == self.admin_token:
            return "admin"
        parts = token.split(":")
        if len(parts) == 4 and token.startswith("system:serviceaccount:"):
            accounts = self.store.objects.get(("", "serviceaccounts"), {})
            if (parts[2], parts[3]) in accounts:
                return token
        raise ApiError(401, "Unauthorized", "Unauthorized")

    def _authorize(
        self,
        user: str,
        verb: str,
        resource: Resource,
        subresource: str | None,
        namespace: str | None,
        name: str | None,
    ) -> None:
        if user == "admin":
            return
        objects = self.store.objects
        group = "rbac.authorization.k8s.io"
        roles = {key: obj for key, obj in objects.get((group, "roles"), {}).items()}
        cluster_roles = {k[1]: obj for k, obj in objects.get((group, "clusterroles"), {}).items()}
        target = f"{resource.plural}/{subresource}" if subresource else resource.plural
        if rbac.authorize(
            user,
            verb,
            resource.group,
            target,
            namespace,
            name,
            roles,
            cluster_roles,
            objects.get((group, "rolebindings"), {}).values(),
            objects.get((group, "clusterrolebindings"), {}).values(),
        ):
            return
        subject = f'{resource.qualified} "{name}"' if name else resource.qualified
        scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
        raise ApiError(
            403,
            "Forbidden",
            f'{subject} is forbidden: User "{user}" cannot {verb} resource "{target}" in API '
            f'group "{resource.group}" {scope}',
            {"name": name or "", "group": resource.group, "kind": resource.plural},
        )

    # discovery ------------------------------------------------------------------------------
    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for resource in self.store.resources.values():
            versions = groups.setdefault(resource.group, [])
            if resource.version not in versions:
                versions.append(resource.version)
        return {group: sorted(versions, key=_version_key) for group, versions in groups.items()}

    def _api_group(self, group: str, versions: list[str]) -> dict:
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": entries, "preferredVersion": entries[0]}

    def _resource_list(self, group: str, version: str) -> dict:
        resources = []
        for resource in self.store.resources.values():
            if (resource.group, resource.version) != (group, version):
                continue
            entry = {
                "name": resource.plural,
                "singularName": resource.singular,
                "namespaced": resource.namespaced,
                "kind": resource.kind,
                "verbs": resource.verbs,
            }
            if resource.short_names:
                entry["shortNames"] = resource.short_names
            if resource.categories:
                entry["categories"] = resource.categories
            resources.append(entry)
            for sub in resource.subresources:
                resources.append(
                    {
                        "name": f"{resource.plural}/{sub}",
                        "singularName": "",
                        "namespaced": resource.namespaced,
                        "kind": resource.kind,
                        "verbs": _SUBRESOURCE_VERBS.get(sub, ["get", "update"]),
                    }
                )
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": resources,
        }

    def _discovery(self, request: web.Request, parts: list[str]) -> web.Response | None:
        groups = self._groups()
        if parts == ["api"]:
            address = request.host or "127.0.0.1"
            return _json(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": address}
                    ],
                }
            )
        if parts == ["api", "v1"]:
            return _json(self._resource_list("", "v1"))
        if parts == ["apis"]:
            named = [self._api_group(g, v) for g, v in groups.items() if g]
            return _json({"kind": "APIGroupList", "apiVersion": "v1", "groups": named})
        if len(parts) == 2 and parts[0] == "apis":
            if parts[1] not in groups or not parts[1]:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            group = self._api_group(parts[1], groups[parts[1]])
            return _json({"kind": "APIGroup", "apiVersion": "v1", **group})
        if len(parts) == 3 and parts[0] == "apis":
            if parts[2] not in groups.get(parts[1], []):
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return _json(self._resource_list(parts[1], parts[2]))
        return None

    # dispatch -------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._handle(request)
        except ApiError as error:
            return _error(error)
        except Exception as error:  # a bug of the emulator: say so the way a server would
            logging.getLogger(__name__).exception("emulator error on %s", request.path)
            return _error(ApiError(500, "InternalError", f"emulator error: {error!r}"))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        parts = [part for part in request.path.split("/") if part]
        if parts and parts[0] in ("healthz", "readyz", "livez"):
            return web.Response(text="ok")
        user = self._user(request)
        if parts == ["version"]:
            return _json(VERSION)
        if not parts or parts[0] not in ("api", "apis"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        discovered = self._discovery(request, parts)
        if discovered is not None:
            return discovered
        if parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        else:
            group, version, rest = parts[1], parts[2], parts[3:]
        watch = False
        if rest and rest[0] == "watch":
            watch, rest = True, rest[1:]
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            candidate = self.store.resource(group, version, rest[2])
            if candidate is not None and candidate.namespaced:
                namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        resource = self.store.resource(group, version, rest[0])
        if resource is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        if subresource is not None and subresource not in resource.subresources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if resource.namespaced and namespace is None and name is not None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        watch = watch or request.query.get("watch") in ("true", "1")
        verb = self._verb(request.method, name, watch)
        self._authorize(user, verb, resource, subresource, namespace, name)
        if subresource == "log":
            return await self._log(request, resource, namespace, name)
        if request.method == "GET":
            if watch:
                return await self._watch(request, resource, namespace, name)
            if name is not None:
                obj = self.store.present(resource, self.store.get(resource, namespace, name))
                if self._wants_table(request):
                    return _json(self._table(request, resource, [obj]))
                return _json(obj)
            return self._list(request, resource, namespace)
        dry_run = request.query.get("dryRun") == "All"
        if request.method == "POST" and name is None:
            body = await self._body(request)
            obj = self.store.create(resource, namespace, body, dry_run)
            return _json(self.store.present(resource, obj), 201)
        if request.method == "PUT" and name is not None:
            body = await self._body(request)
            obj = self.store.update(resource, namespace, name, body, subresource, dry_run)
            return _json(self.store.present(resource, obj))
        if request.method == "PATCH" and name is not None:
            content_type = request.content_type
            if content_type == "application/apply-patch+yaml":
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    "the emulator does not implement server-side apply "
                    "(application/apply-patch+yaml); use client-side kubectl apply",
                )
            patch_type = _PATCH_TYPES.get(content_type)
            if patch_type is None:
                raise ApiError(
                    415, "UnsupportedMediaType", f"the body of the request was in an unknown "
                    f"format - accepted media types include: {', '.join(_PATCH_TYPES)}"
                )  # fmt: skip
            if patch_type == "strategic" and resource.crd is not None:
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    "strategic merge patch is not supported for custom resources",
                )
            body = await self._body(request)
            obj = self.store.patch(
                resource, namespace, name, patch_type, body, subresource, dry_run
            )
            return _json(self.store.present(resource, obj))
        if request.method == "DELETE" and subresource is None:
            options = await self._delete_options(request)
            if name is not None:
                obj = self.store.delete(resource, namespace, name, options, dry_run)
                return _json(self.store.present(resource, obj))
            predicate = self._predicate(request)
            deleted = self.store.delete_collection(resource, namespace, predicate, options)
            return _json(self._list_body(resource, deleted))
        raise ApiError(
            405, "MethodNotAllowed", f"the server does not allow this method on the requested "
            f"resource ({request.method} {request.path})"
        )  # fmt: skip

    @staticmethod
    def _verb(method: str, name: str | None, watch: bool) -> str:
        if method == "GET":
            return "watch" if watch else ("get" if name is not None else "list")
        if method == "DELETE":
            return "delete" if name is not None else "deletecollection"
        return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())

    @staticmethod
    async def _body(request: web.Request) -> object:
        raw = await request.read()
        if not raw.strip():
            return None
        if "protobuf" in request.content_type or "cbor" in request.content_type:
            # client-go (kubectl create namespace ...) retries with JSON on 415
            raise ApiError(
                415, "UnsupportedMediaType",
                f"the body of the request was in an unknown format: {request.content_type}; "
                "this emulator speaks JSON only",
            )  # fmt: skip
        try:
            if "yaml" in request.content_type:
                return yaml.safe_load(raw)
            return json.loads(raw)
        except (ValueError, yaml.YAMLError) as error:
            raise ApiError(400, "BadRequest", f"the request body is invalid: {error}") from error

    async def _delete_options(self, request: web.Request) -> dict:
        options = await self._body(request)
        options = dict(options) if isinstance(options, dict) else {}
        query = request.query
        if "propagationPolicy" in query:
            options["propagationPolicy"] = query["propagationPolicy"]
        if "gracePeriodSeconds" in query:
            options["gracePeriodSeconds"] = int(query["gracePeriodSeconds"])
        if "orphanDependents" in query:
            options["orphanDependents"] = query["orphanDependents"] == "true"
        return options

    # lists, tables, watches -----------------------------------------------------------------
    def _predicate(self, request: web.Request, name: str | None = None):
        try:
            labels = label_selector(request.query.get("labelSelector"))
            fields = field_selector(request.query.get("fieldSelector"))
        except SelectorError as error:
            raise ApiError(400, "BadRequest", str(error)) from error
        if name is None:
            return lambda obj: labels(obj) and fields(obj)
        return lambda obj: labels(obj) and fields(obj) and obj["metadata"]["name"] == name

    @staticmethod
    def _wants_table(request: web.Request) -> bool:
        return "as=Table" in request.headers.get("Accept", "")

    def _table(
        self, request: web.Request, resource: Resource, objects: list[dict], headers: bool = True
    ) -> dict:
        include = request.query.get("includeObject", "PartialObjectMetadata")
        return to_table(resource, objects, str(self.store.rv), include, headers)

    def _list_body(self, resource: Resource, items: list[dict]) -> dict:
        return {
            "kind": f"{resource.kind}List",
            "apiVersion": resource.api_version,
            "metadata": {"resourceVersion": str(self.store.rv)},
            "items": items,
        }

    def _list(self, request: web.Request, resource: Resource, namespace: str | None):
        predicate = self._predicate(request)
        items = [self.store.present(resource, obj) for obj in self.store.list(resource, namespace)]
        items = [obj for obj in items if predicate(obj)]
        if self._wants_table(request):
            return _json(self._table(request, resource, items))
        return _json(self._list_body(resource, items))

    async def _watch(
        self, request: web.Request, resource: Resource, namespace: str | None, name: str | None
    ) -> web.StreamResponse:
        predicate = self._predicate(request, name)
        table = self._wants_table(request)
        bookmarks = request.query.get("allowWatchBookmarks") in ("true", "1")
        timeout = request.query.get("timeoutSeconds")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(timeout) if timeout else None
        since = request.query.get("resourceVersion") or "0"
        try:
            since_rv = int(since)
        except ValueError as error:
            raise ApiError(400, "BadRequest", f"invalid resourceVersion {since!r}") from error

        queue: asyncio.Queue = asyncio.Queue()
        self.store.watchers.add(queue)
        # snapshot synchronously: everything queued from here on is newer
        if since_rv == 0:
            backlog = [
                ("ADDED", obj, None)
                for obj in self.store.list(resource, namespace)
                if predicate(self.store.present(resource, obj))
            ]
        else:
            backlog = [
                (change.type, change.obj, change.old)
                for change in self.store.history
                if change.rv > since_rv and self._concerns(change, resource, namespace)
            ]
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        first = [True]

        async def send(kind: str, obj: dict) -> None:
            if kind == "BOOKMARK":
                body = obj
            elif table:
                body = self._table(request, resource, [obj], headers=first[0])
                first[0] = False
            else:
                body = obj
            line = json.dumps({"type": kind, "object": body}) + "\n"
            await response.write(line.encode())

        def translate(kind: str, obj: dict, old: dict | None) -> tuple[str, dict] | None:
            new_view = self.store.present(resource, obj)
            matches = predicate(new_view)
            if kind == "MODIFIED" and old is not None:
                matched = predicate(self.store.present(resource, old))
                if matched and not matches:
                    return "DELETED", new_view
                if matches and not matched:
                    return "ADDED", new_view
            return (kind, new_view) if matches else None

        def bookmark() -> dict:
            return {
                "kind": resource.kind,
                "apiVersion": resource.api_version,
                "metadata": {"resourceVersion": str(self.store.rv)},
            }

        try:
            await response.prepare(request)
            for kind, obj, old in backlog:
                event = translate(kind, obj, old)
                if event:
                    await send(*event)
            while not self.closing:
                wait = BOOKMARK_SECONDS if bookmarks else 1.0
                if deadline is not None:
                    wait = min(wait, deadline - loop.time())
                    if wait <= 0:
                        break
                try:
                    change = await asyncio.wait_for(queue.get(), timeout=max(wait, 0.01))
                except asyncio.TimeoutError:
                    transport = request.transport
                    if transport is None or transport.is_closing():
                        break
                    if bookmarks:
                        await send("BOOKMARK", bookmark())
                    continue
                if change is None:
                    break
                if not self._concerns(change, resource, namespace):
                    continue
                event = translate(change.type, change.obj, change.old)
                if event:
                    await send(*event)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self.store.watchers.discard(queue)
        return response

    @staticmethod
    def _concerns(change: Change, resource: Resource, namespace: str | None) -> bool:
        if change.store != resource.store:
            return False
        return namespace is None or change.namespace == namespace

    # pod logs -------------------------------------------------------------------------------
    async def _log(
        self, request: web.Request, resource: Resource, namespace: str | None, name: str | None
    ) -> web.StreamResponse:
        if request.method != "GET":
            raise ApiError(405, "MethodNotAllowed", "the log subresource only supports GET")
        pod = self.store.get(resource, namespace, name)
        path = self.root / "logs" / (namespace or "") / f"{name}.log"
        follow = request.query.get("follow") in ("true", "1")
        tail = request.query.get("tailLines")
        limit = request.query.get("limitBytes")
        container = ((pod.get("spec") or {}).get("containers") or [{}])[0].get("name", "")
        if not path.exists() and not follow:
            raise ApiError(
                400,
                "BadRequest",
                f'container "{container}" in pod "{name}" is waiting to start: ContainerCreating',
            )
        text = path.read_bytes() if path.exists() else b""
        if tail is not None:
            lines = text.splitlines(keepends=True)
            text = b"".join(lines[-int(tail) :]) if int(tail) > 0 else b""
        if limit is not None:
            text = text[: int(limit)]
        if not follow:
            return web.Response(body=text, content_type="text/plain")
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        position = path.stat().st_size if path.exists() else 0
        try:
            if text:
                await response.write(text)
            while not self.closing:
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                if path.exists() and path.stat().st_size > position:
                    with path.open("rb") as handle:
                        handle.seek(position)
                        chunk = handle.read()
                    position += len(chunk)
                    await response.write(chunk)
                    continue
                current = self.store.objects[resource.store].get((namespace or "", name))
                if current is None or current["metadata"]["uid"] != pod["metadata"]["uid"]:
                    break
                if (current.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    break
                await asyncio.sleep(0.2)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return response
