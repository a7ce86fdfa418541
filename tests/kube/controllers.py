"""The emulator's controllers: a Job controller, a scheduler and a kubelet for one node.

They talk to the API server only over HTTP, like kube-controller-manager, kube-scheduler
and the kubelet: list+watch of Jobs and Pods (re-list when a watch ends), merge patches
to `/status` subresources, Events in core v1. A pod's container runs as a local process.

Job controller (batch/v1): keeps `min(parallelism, completions - succeeded)` pods active
(Indexed Jobs: one pod per pending index, annotation and label
`batch.kubernetes.io/job-completion-index`, `hostname: <job>-<i>`), replaces a failed pod
after `backoff_seconds * 2**(failures-1)` (at most 10 s), and writes `startTime`,
`active`, `ready`, `succeeded`, `failed`, `terminating`, `completedIndexes` and the
conditions `SuccessCriteriaMet`/`Complete`, `FailureTarget`/`Failed`
(`BackoffLimitExceeded`, `DeadlineExceeded`) and `Suspended` (`JobSuspended`/`JobResumed`)
as Kubernetes 1.31+ does. `spec.suspend` deletes the active pods (gracefully) and clears
`startTime`; resuming sets a new one. Pods the controller deletes itself (suspend, success,
failure) are not counted as failed; a pod deleted by someone else is, as in Kubernetes.
`podReplacementPolicy: Failed` (the default when a podFailurePolicy is set) creates no
replacement while a deleted pod still terminates; `TerminatingOrFailed` replaces at once.
`ttlSecondsAfterFinished` deletes the finished Job (propagation Background; the server
collects its pods).

Scheduler: a pod without `spec.nodeName` is bound to the node unless its nodeSelector does
not match the node's labels, its `nvidia.com/gpu` limits do not fit next to the pods
already on the node, or a PersistentVolumeClaim it mounts does not exist; then it gets
`PodScheduled False Unschedulable` with the real scheduler's message and a Warning Event
`FailedScheduling`, and is retried about every second. CPU and memory are not accounted,
and GPUs are only counted, not isolated (CUDA_VISIBLE_DEVICES is left alone).

Kubelet: an image whose name contains `does-not-exist` ends in `ErrImagePull` and then
`ImagePullBackOff` (the pod stays Pending). Otherwise each container runs as a process in
its own process group (so torchrun's workers get signals too):

- argv = `command + args` after Kubernetes `$(VAR)` expansion from the container's env
  (`$$` escapes, unknown references stay as written); without `command` the image's
  entrypoint is unknown, so `args` alone are run.
- env = this process's environment, with the directory of the running Python prepended to
  PATH (so `instseg`, `torchrun`, `python` resolve from the virtualenv), + the container's
  `env` (`value`, `valueFrom.fieldRef` incl. labels/annotations such as
  `batch.kubernetes.io/job-completion-index`, configMapKeyRef, secretKeyRef) and
  `envFrom`, + `HOSTNAME` and `KUBECONFIG` (a kubeconfig written per pod: server = the
  emulator, token `system:serviceaccount:<ns>:<serviceAccountName>`, which the server
  authorises with its RBAC objects). Indexed Jobs also get `JOB_COMPLETION_INDEX`.
  In-cluster config (`/var/run/secrets/...`) is not available to the process.
- volume mounts: the process cannot see `/data` or `/output`, so every mount is a host
  directory: persistentVolumeClaim → `root/volumes/<ns>/<claimName>[/<subPath>]`,
  emptyDir → `root/pods/<ns>/<pod>/volumes/<volume>`, configMap/secret → files written
  under `root/pods/<ns>/<pod>/volumes/<volume>`. Any argv element or env value that is a
  path under a mountPath (longest mountPath first, only at a path boundary, also after a
  `--flag=`) is rewritten to the host directory, and so is `workingDir` (which defaults to
  `root/pods/<ns>/<pod>`). Mounts at `/dev/shm` are not rewritten: the real one is fine.
- multi-node: every pod runs on this one node, and `<host>.<subdomain>[.<ns>.svc...]`
  names (torchrun's `--master-addr <job>-0.<service>`) cannot resolve, so in argv and env
  such a name (whole value, after `=`, or before `:port`) is rewritten to 127.0.0.1.
- hostPath volumes are the host's own directories.
- stdout+stderr go to `root/logs/<ns>/<pod>.log` (the server serves it as `kubectl logs`).
- a missing executable ends the container with exitCode 128, reason `StartError` (pod
  Failed); exit 0 → `Completed`/Succeeded, otherwise `Error`/Failed; a SIGKILL that the
  kubelet did not send is reported as `OOMKilled` (137).
- a pod with `deletionTimestamp`: SIGTERM to its process group, up to the grace period
  (capped at 30 s, Kubernetes' default), SIGKILL, final status written, then `DELETE` with
  grace period 0.
  Only `restartPolicy: Never` semantics are emulated (OnFailure/Always end like Never).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import pathlib
import random
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import aiohttp
import yaml

log = logging.getLogger("kube-emulator.controllers")

GPU = "nvidia.com/gpu"
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
JOB_NAME_KEY = "batch.kubernetes.io/job-name"
CONTROLLER_UID_KEY = "batch.kubernetes.io/controller-uid"
MAX_BACKOFF = 10.0
MAX_GRACE = 30.0  # Kubernetes' default terminationGracePeriodSeconds; shorter ones hold
SHUTDOWN_GRACE = 5.0
RESYNC = 0.25
SCHEDULE_RETRY = 1.0
NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # what Kubernetes' generateName draws from
MERGE = "application/merge-patch+json"
TERMINAL = ("Succeeded", "Failed")


# ---------------------------------------------------------------- pure helpers


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> float | None:
    """An RFC 3339 timestamp as a POSIX time."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def expand(text: str, values: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: `$$` is a literal `$`, `$(NAME)` is replaced when NAME
    is defined and kept as written otherwise, an unterminated `$(` is literal."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char != "$" or i + 1 >= n:
            out.append(char)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            end = text.find(")", i + 2)
            if end == -1:
                out.append("$(")
                i += 2
            else:
                name = text[i + 2 : end]
                out.append(values[name] if name in values else text[i : end + 1])
                i = end + 1
        else:
            out.append("$" + nxt)
            i += 2
    return "".join(out)


def rewrite_path(value: str, mounts: list[tuple[str, str]]) -> str:
    """`value` with a leading container path (or one after `--flag=`) under one of `mounts`
    ((mountPath, host dir), longest mountPath first) replaced by the host path."""
    prefix, sep, rest = "", "", value
    if not value.startswith("/") and "=" in value:
        prefix, sep, rest = value.partition("=")
    for mount_path, host in mounts:
        mount_path = mount_path.rstrip("/") or "/"
        if rest == mount_path:
            return prefix + sep + host
        if rest.startswith(mount_path + "/"):
            return prefix + sep + host.rstrip("/") + rest[len(mount_path) :]
    return value


def rewrite_pod_hostnames(value: str, subdomain: str | None, namespace: str) -> str:
    """`<host>.<subdomain>[.<ns>[.svc[.cluster.local]]]` (whole value, after `=`, or before
    `:port`) → 127.0.0.1: all pods of the emulator run on this host."""
    if not subdomain:
        return value
    pattern = (
        r"(^|=)[a-z0-9]([-a-z0-9]*[a-z0-9])?\."
        + re.escape(subdomain)
        + r"(\."
        + re.escape(namespace)
        + r"(\.svc(\.cluster\.local)?)?)?(?=$|:|/)"
    )
    return re.sub(pattern, r"\g<1>127.0.0.1", value)


def compress_indexes(indexes: set[int]) -> str:
    """{0, 1, 2, 5} → "0-2,5" (the format of status.completedIndexes)."""
    parts: list[str] = []
    ordered = sorted(indexes)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def parse_indexes(text: str | None) -> set[int]:
    out: set[int] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            low, high = part.split("-", 1)
            out.update(range(int(low), int(high) + 1))
        else:
            out.add(int(part))
    return out


def field_ref(pod: dict, path: str) -> str:
    """The value of a downward-API `fieldRef.fieldPath`."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.podIP": "127.0.0.1",
        "status.podIPs": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
        "status.hostIPs": "127.0.0.1",
    }
    if path in simple:
        return str(simple[path] or "")
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise ValueError(f"unsupported fieldPath {path!r}")


def quantity(value: Any) -> float:
    """A resource quantity as a number (enough for GPU counts)."""
    text = str(value)
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 1024, "Mi": 1024**2}
    for suffix, factor in suffixes.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def pod_gpus(pod: dict) -> float:
    total = 0.0
    for container in (pod.get("spec") or {}).get("containers") or []:
        resources = container.get("resources") or {}
        wanted = (resources.get("limits") or {}).get(GPU) or (resources.get("requests") or {}).get(
            GPU
        )
        if wanted is not None:
            total += quantity(wanted)
    return total


def is_terminal(pod: dict) -> bool:
    return (pod.get("status") or {}).get("phase") in TERMINAL


def is_deleting(obj: dict) -> bool:
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def is_ready(pod: dict) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def pod_index(pod: dict) -> int | None:
    meta = pod.get("metadata") or {}
    value = (meta.get("annotations") or {}).get(INDEX_KEY) or (meta.get("labels") or {}).get(
        INDEX_KEY
    )
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def owned_by(obj: dict, uid: str) -> bool:
    return any(
        ref.get("uid") == uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or []
    )


def key_of(obj: dict) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


def newer(candidate: dict, current: dict | None) -> bool:
    """Whether `candidate` is not older than `current` (by resourceVersion, when numeric)."""
    if current is None:
        return True
    try:
        return int(candidate["metadata"]["resourceVersion"]) >= int(
            current["metadata"]["resourceVersion"]
        )
    except (KeyError, TypeError, ValueError):
        return True


def set_condition(
    conditions: list[dict], kind: str, status: str, reason: str, message: str, now: str
) -> list[dict]:
    """A copy of `conditions` with `kind` set; lastTransitionTime moves on a status change."""
    out, found = [], False
    for condition in conditions:
        if condition.get("type") == kind:
            found = True
            changed = condition.get("status") != status
            condition = {
                **condition,
                "status": status,
                "reason": reason,
                "message": message,
                "lastProbeTime": now if changed else condition.get("lastProbeTime", now),
                "lastTransitionTime": now if changed else condition.get("lastTransitionTime", now),
            }
        out.append(condition)
    if not found:
        out.append(
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastProbeTime": now,
                "lastTransitionTime": now,
            }
        )
    return out


def condition_true(obj: dict, kind: str) -> dict | None:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


def random_suffix(length: int = 5) -> str:
    return "".join(random.choice(NAME_CHARS) for _ in range(length))


def build_pod(job: dict, index: int | None) -> dict:
    """The pod the Job controller creates from the Job's template (for `index` if Indexed)."""
    meta, spec = job["metadata"], job["spec"]
    template = spec.get("template") or {}
    tmeta = template.get("metadata") or {}
    name, uid = meta["name"], meta["uid"]
    labels = dict(tmeta.get("labels") or {})
    labels.update(
        {CONTROLLER_UID_KEY: uid, JOB_NAME_KEY: name, "controller-uid": uid, "job-name": name}
    )
    annotations = dict(tmeta.get("annotations") or {})
    pod_spec = json.loads(json.dumps(template.get("spec") or {}))
    generate = f"{name}-"
    if index is not None:
        labels[INDEX_KEY] = str(index)
        annotations[INDEX_KEY] = str(index)
        pod_spec["hostname"] = f"{name}-{index}"
        generate = f"{name}-{index}-"
        for container in pod_spec.get("containers") or []:
            env = container.setdefault("env", [])
            if not any(e.get("name") == "JOB_COMPLETION_INDEX" for e in env):
                env.append(
                    {
                        "name": "JOB_COMPLETION_INDEX",
                        "valueFrom": {
                            "fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_KEY}']"}
                        },
                    }
                )
    pod_meta: dict = {
        "name": generate[:58] + random_suffix(),
        "namespace": meta.get("namespace") or "default",
        "labels": labels,
        "ownerReferences": [
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": name,
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    if annotations:
        pod_meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": pod_spec}


# ---------------------------------------------------------------- HTTP


class ApiError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"{status}: {body[:300]}")
        self.status = status


class Api:
    def __init__(self, url: str, token: str):
        self.url = url.rstrip("/")
        self.session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            read_bufsize=2**22,
        )

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        params: dict | None = None,
    ) -> dict:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        timeout = aiohttp.ClientTimeout(total=30)
        async with self.session.request(
            method, self.url + path, data=data, headers=headers, params=params, timeout=timeout
        ) as resp:
            text = await resp.text()
            if resp.status >= 300:
                raise ApiError(resp.status, text)
            return json.loads(text) if text else {}

    async def close(self) -> None:
        await self.session.close()


def pod_path(namespace: str, name: str, sub: str = "") -> str:
    return f"/api/v1/namespaces/{namespace}/pods/{name}" + (f"/{sub}" if sub else "")


def job_path(namespace: str, name: str, sub: str = "") -> str:
    return f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}" + (f"/{sub}" if sub else "")


class Informer:
    """A cache of one resource kept by list+watch (re-listed whenever a watch ends)."""

    def __init__(self, api: Api, path: str, on_change, on_delete=None):
        self.api, self.path = api, path
        self.items: dict[tuple[str, str], dict] = {}
        self.on_change, self.on_delete = on_change, on_delete
        self.synced = asyncio.Event()

    def put(self, obj: dict) -> None:
        """Record an object the controller itself just wrote (fresher than the watch)."""
        key = key_of(obj)
        if newer(obj, self.items.get(key)):
            self.items[key] = obj

    async def run(self) -> None:
        while True:
            try:
                listing = await self.api.request("GET", self.path)
                self.items = {key_of(o): o for o in listing.get("items") or []}
                version = (listing.get("metadata") or {}).get("resourceVersion", "")
                self.synced.set()
                self.on_change()
                await self._watch(version)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the server restarted, a watch broke: re-list
                log.debug("watch of %s ended: %s", self.path, e)
                await asyncio.sleep(0.3)

    async def _watch(self, version: str) -> None:
        params = {"watch": "true", "allowWatchBookmarks": "true"}
        if version:
            params["resourceVersion"] = version
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=10)
        async with self.api.session.get(
            self.api.url + self.path, params=params, timeout=timeout
        ) as resp:
            if resp.status != 200:
                raise ApiError(resp.status, await resp.text())
            async for raw in resp.content:
                line = raw.strip()
                if not line:
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    return  # e.g. 410 Gone: re-list
                if kind == "BOOKMARK":
                    continue
                key = key_of(obj)
                if kind == "DELETED":
                    self.items.pop(key, None)
                    if self.on_delete:
                        self.on_delete(obj)
                elif newer(obj, self.items.get(key)):
                    self.items[key] = obj
                self.on_change()


# ---------------------------------------------------------------- state


@dataclass
class JobRecord:
    """What the Job controller remembers of a Job between passes (like its tracking
    finalizers): pods already counted, when the last failure happened."""

    failed_base: int
    counted_failed: set[str] = field(default_factory=set)
    counted_succeeded: set[str] = field(default_factory=set)
    succeeded_base: int = 0
    completed: set[int] = field(default_factory=set)
    last_failure: float = 0.0
    start: float | None = None
    expected: dict[str, float] = field(default_factory=dict)  # pods created, not yet seen
    deleted: set[str] = field(default_factory=set)  # pods this controller deleted
    vanished: list[dict] = field(default_factory=list)  # pods removed before they ended
    ttl_deleted: bool = False


@dataclass
class PodRuntime:
    """The kubelet's handle on one pod's processes."""

    uid: str
    namespace: str
    name: str
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    task: asyncio.Task | None = None
    killed: bool = False  # the kubelet sent the signal (deletion), so a SIGKILL is no OOM
    gone: bool = False  # the pod no longer exists: write no status


# ---------------------------------------------------------------- controllers


class Controllers:
    def __init__(
        self,
        api_url: str,
        token: str,
        root: pathlib.Path,
        node_name: str,
        node_gpus: int,
        backoff_seconds: float,
    ):
        self.api_url, self.root = api_url.rstrip("/"), pathlib.Path(root)
        self.node_name, self.node_gpus, self.backoff = node_name, node_gpus, backoff_seconds
        self.api = Api(api_url, token)
        self.wake = asyncio.Event()
        self.jobs = Informer(self.api, "/apis/batch/v1/jobs", self.wake.set, self._job_deleted)
        self.pods = Informer(self.api, "/api/v1/pods", self.wake.set, self._pod_deleted)
        self.records: dict[str, JobRecord] = {}
        self.runtimes: dict[str, PodRuntime] = {}
        self.deleting: dict[str, asyncio.Task] = {}
        self.bound: set[str] = set()
        self.next_schedule: dict[str, float] = {}
        self.unschedulable_msg: dict[str, str] = {}
        self.tasks: set[asyncio.Task] = set()
        self.node_labels = {
            "kubernetes.io/hostname": node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "beta.kubernetes.io/os": "linux",
            "beta.kubernetes.io/arch": "amd64",
        }

    # ---- plumbing

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("controller task failed", exc_info=task.exception())

    async def quiet(self, method: str, path: str, body: Any = None, **kw) -> dict | None:
        """A request whose 404/409 (object gone, already there) is expected: None then."""
        try:
            return await self.api.request(method, path, body, **kw)
        except ApiError as e:
            if e.status in (404, 409, 410):
                return None
            log.warning("%s %s: %s", method, path, e)
            return None
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            log.debug("%s %s: %s", method, path, e)
            return None

    async def patch_status(self, path: str, status: dict) -> dict | None:
        return await self.quiet("PATCH", path + "/status", {"status": status}, content_type=MERGE)

    async def event(
        self, obj: dict, kind: str, reason: str, message: str, component: str, warning=False
    ) -> None:
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        now = now_iso()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta.get('name')}.{time.time_ns():x}", "namespace": namespace},
            "involvedObject": {
                "apiVersion": "v1" if kind == "Pod" else "batch/v1",
                "kind": kind,
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": reason,
            "message": message,
            "type": "Warning" if warning else "Normal",
            "source": {"component": component, "host": self.node_name},
            "reportingComponent": component,
            "reportingInstance": self.node_name,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.quiet("POST", f"/api/v1/namespaces/{namespace}/events", body)

    # ---- main loop

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self.register_node()
            self.spawn(self.jobs.run())
            self.spawn(self.pods.run())
            while not stop.is_set():
                self.wake.clear()
                if self.jobs.synced.is_set() and self.pods.synced.is_set():
                    try:
                        await self.pass_pods()
                        await self.pass_jobs()
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("controller pass failed")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(_first(stop, self.wake), RESYNC)
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        for runtime in self.runtimes.values():
            runtime.gone = True
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        procs = [p for r in self.runtimes.values() for p in r.procs]
        await _stop_processes(procs, SHUTDOWN_GRACE)
        await self.api.close()

    async def register_node(self) -> None:
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024
        except (ValueError, OSError):
            memory = 64 * 1024 * 1024
        capacity = {
            "cpu": str(os.cpu_count() or 1),
            "memory": f"{memory}Ki",
            "pods": "110",
            "ephemeral-storage": "100Gi",
            GPU: str(self.node_gpus),
        }
        now = now_iso()
        status = {
            "capacity": capacity,
            "allocatable": dict(capacity),
            "conditions": [
                {
                    "type": kind,
                    "status": value,
                    "reason": reason,
                    "message": message,
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
                for kind, value, reason, message in (
                    ("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
                    ("MemoryPressure", "False", "KubeletHasSufficientMemory", "ok"),
                    ("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
                    ("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
                )
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node_name},
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "v1.31.0-emulator",
                "containerRuntimeVersion": "emulator://1",
                "osImage": "emulator",
                "kernelVersion": os.uname().release,
                "kubeProxyVersion": "",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node_name, "labels": self.node_labels},
            "spec": {},
            "status": status,
        }
        for attempt in range(50):
            try:
                await self.api.request("POST", "/api/v1/nodes", body)
                break
            except ApiError as e:
                if e.status == 409:
                    break
                raise
            except aiohttp.ClientError:
                if attempt == 49:
                    raise
                await asyncio.sleep(0.1)
        await self.patch_status(f"/api/v1/nodes/{self.node_name}", status)

    def _job_deleted(self, job: dict) -> None:
        self.records.pop(job["metadata"].get("uid", ""), None)

    def _pod_deleted(self, pod: dict) -> None:
        uid = pod["metadata"].get("uid", "")
        self.bound.discard(uid)
        self.next_schedule.pop(uid, None)
        self.unschedulable_msg.pop(uid, None)
        for ref in pod["metadata"].get("ownerReferences") or []:
            record = self.records.get(ref.get("uid", ""))
            if record is not None:
                record.expected.pop(pod["metadata"].get("name"), None)
                record.vanished.append(pod)
        runtime = self.runtimes.get(uid)
        if runtime is not None and uid not in self.deleting:
            # removed without a graceful deletion (e.g. grace period 0): stop the process
            runtime.gone = True
            self.deleting[uid] = self.spawn(self.terminate(runtime, 0.0))

    # ---- scheduler + kubelet

    async def pass_pods(self) -> None:
        pods = list(self.pods.items.values())
        unscheduled = []
        for pod in pods:
            uid = pod["metadata"].get("uid", "")
            spec = pod.get("spec") or {}
            if is_deleting(pod):
                if uid not in self.deleting:
                    self.deleting[uid] = self.spawn(self.delete_pod(pod))
            elif not spec.get("nodeName") and uid not in self.bound:
                if not is_terminal(pod):
                    unscheduled.append(pod)
            elif (
                (spec.get("nodeName") or self.node_name) == self.node_name
                and uid not in self.runtimes
                and not is_terminal(pod)
            ):
                runtime = PodRuntime(uid, *key_of(pod))
                self.runtimes[uid] = runtime
                runtime.task = self.spawn(self.kubelet(runtime, pod))
        if unscheduled:
            node_labels = self.node_labels
            node = await self.quiet("GET", f"/api/v1/nodes/{self.node_name}")
            if node:
                node_labels = (node.get("metadata") or {}).get("labels") or {}
            for pod in sorted(
                unscheduled, key=lambda p: p["metadata"].get("creationTimestamp", "")
            ):
                uid = pod["metadata"]["uid"]
                if time.monotonic() >= self.next_schedule.get(uid, 0.0):
                    await self.schedule(pod, node_labels)

    def gpus_in_use(self) -> float:
        total = 0.0
        for pod in self.pods.items.values():
            uid = pod["metadata"].get("uid")
            on_node = (pod.get("spec") or {}).get("nodeName") == self.node_name or uid in self.bound
            if on_node and not is_terminal(pod):
                total += pod_gpus(pod)
        return total

    async def unschedulable_reason(self, pod: dict, node_labels: dict) -> str | None:
        spec, namespace = pod.get("spec") or {}, pod["metadata"].get("namespace")
        for volume in spec.get("volumes") or []:
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if claim:
                try:
                    await self.api.request(
                        "GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}"
                    )
                except ApiError as e:
                    if e.status != 404:
                        raise
                    return (
                        f'0/1 nodes are available: persistentvolumeclaim "{claim}" not found. '
                        "preemption: 0/1 nodes are available: "
                        "1 Preemption is not helpful for scheduling."
                    )
        selector = spec.get("nodeSelector") or {}
        if any(node_labels.get(k) != v for k, v in selector.items()) or not _affinity_matches(
            spec, node_labels
        ):
            return (
                "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. "
                "preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling."
            )
        wanted = pod_gpus(pod)
        if wanted and self.gpus_in_use() + wanted > self.node_gpus:
            return (
                f"0/1 nodes are available: 1 Insufficient {GPU}. preemption: 0/1 nodes are "
                "available: 1 No preemption victims found for incoming pod."
            )
        return None

    async def schedule(self, pod: dict, node_labels: dict) -> None:
        meta = pod["metadata"]
        namespace, name, uid = meta.get("namespace"), meta["name"], meta["uid"]
        reason = await self.unschedulable_reason(pod, node_labels)
        now = now_iso()
        if reason:
            self.next_schedule[uid] = time.monotonic() + SCHEDULE_RETRY
            if self.unschedulable_msg.get(uid) != reason:
                self.unschedulable_msg[uid] = reason
                conditions = set_condition(
                    (pod.get("status") or {}).get("conditions") or [],
                    "PodScheduled",
                    "False",
                    "Unschedulable",
                    reason,
                    now,
                )
                for c in conditions:
                    if c["type"] == "PodScheduled":
                        c["lastProbeTime"] = None
                patched = await self.patch_status(
                    pod_path(namespace, name), {"phase": "Pending", "conditions": conditions}
                )
                if patched:
                    self.pods.put(patched)
                await self.event(pod, "Pod", "FailedScheduling", reason, "default-scheduler", True)
            return
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "namespace": namespace},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
        }
        try:
            await self.api.request("POST", pod_path(namespace, name, "binding"), binding)
        except ApiError as e:
            if e.status in (404, 405):  # no binding subresource: set nodeName directly
                patched = await self.quiet(
                    "PATCH",
                    pod_path(namespace, name),
                    {"spec": {"nodeName": self.node_name}},
                    content_type=MERGE,
                )
                if patched is None:
                    return
            elif e.status == 409:
                return
            else:
                raise
        self.bound.add(uid)
        self.unschedulable_msg.pop(uid, None)
        conditions = set_condition(
            (pod.get("status") or {}).get("conditions") or [], "PodScheduled", "True", "", "", now
        )
        for c in conditions:
            if c["type"] == "PodScheduled":
                c.pop("reason", None)
                c.pop("message", None)
                c["lastProbeTime"] = None
        patched = await self.patch_status(
            pod_path(namespace, name), {"phase": "Pending", "conditions": conditions}
        )
        if patched:
            self.pods.put(patched)
        await self.event(
            pod,
            "Pod",
            "Scheduled",
            f"Successfully assigned {namespace}/{name} to {self.node_name}",
            "default-scheduler",
        )
        self.wake.set()

    def current_pod(self, runtime: PodRuntime) -> dict | None:
        pod = self.pods.items.get((runtime.namespace, runtime.name))
        if pod is None or pod["metadata"].get("uid") != runtime.uid:
            return None
        return pod

    async def write_pod_status(self, runtime: PodRuntime, status: dict) -> None:
        if runtime.gone:
            return
        patched = await self.patch_status(pod_path(runtime.namespace, runtime.name), status)
        if patched:
            self.pods.put(patched)

    async def kubelet(self, runtime: PodRuntime, pod: dict) -> None:
        pod = {**pod, "spec": {**(pod.get("spec") or {}), "nodeName": self.node_name}}
        spec = pod["spec"]
        namespace, name = runtime.namespace, runtime.name
        started = now_iso()
        base = {
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": (pod.get("status") or {}).get("startTime") or started,
            "qosClass": "BestEffort",
        }
        conditions = (pod.get("status") or {}).get("conditions") or []
        conditions = set_condition(conditions, "PodScheduled", "True", "", "", started)
        for kind in ("PodReadyToStartContainers", "Initialized"):
            conditions = set_condition(conditions, kind, "True", "", "", started)
        for kind in ("ContainersReady", "Ready"):
            conditions = set_condition(
                conditions, kind, "False", "ContainersNotReady", "containers not ready", started
            )
        containers = spec.get("containers") or []
        if not containers:
            return

        def statuses(state: dict, ready=False, started_=False) -> list[dict]:
            return [
                {
                    "name": c.get("name"),
                    "image": c.get("image"),
                    "imageID": "",
                    "ready": ready,
                    "restartCount": 0,
                    "started": started_,
                    "state": state,
                    "lastState": {},
                }
                for c in containers
            ]

        await self.write_pod_status(
            runtime,
            {
                **base,
                "phase": "Pending",
                "conditions": conditions,
                "containerStatuses": statuses({"waiting": {"reason": "ContainerCreating"}}),
            },
        )
        bad = [c.get("image", "") for c in containers if "does-not-exist" in c.get("image", "")]
        if bad:
            image = bad[0]
            message = (
                f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": '
                f'failed to resolve reference "{image}": {image}: not found'
            )
            await self.write_pod_status(
                runtime,
                {
                    "phase": "Pending",
                    "containerStatuses": statuses(
                        {"waiting": {"reason": "ErrImagePull", "message": message}}
                    ),
                },
            )
            await self.event(pod, "Pod", "Failed", f"Failed to pull image \"{image}\": {message}",
                             "kubelet", True)  # fmt: skip
            await asyncio.sleep(min(1.0, self.backoff * 2))
            backoff = f'Back-off pulling image "{image}"'
            await self.write_pod_status(
                runtime,
                {
                    "phase": "Pending",
                    "containerStatuses": statuses(
                        {"waiting": {"reason": "ImagePullBackOff", "message": backoff}}
                    ),
                },
            )
            await self.event(pod, "Pod", "BackOff", backoff, "kubelet", True)
            await asyncio.Event().wait()  # Pending until deleted
        try:
            prepared = [await self.prepare(pod, c) for c in containers]
        except _ConfigError as e:
            await self.write_pod_status(
                runtime,
                {
                    "phase": "Pending",
                    "containerStatuses": statuses(
                        {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
                    ),
                },
            )
            await self.event(pod, "Pod", "Failed", f"Error: {e}", "kubelet", True)
            await asyncio.Event().wait()
        logs = self.root / "logs" / namespace
        logs.mkdir(parents=True, exist_ok=True)
        results: list[dict] = []
        with open(logs / f"{name}.log", "ab") as out:
            for argv, env, cwd in prepared:
                if runtime.killed:
                    break
                try:
                    proc = await asyncio.create_subprocess_exec(
                        *argv,
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=out,
                        stderr=asyncio.subprocess.STDOUT,
                        env=env,
                        cwd=cwd,
                        start_new_session=True,
                    )
                except (OSError, ValueError, IndexError) as e:
                    argv0 = argv[0] if argv else ""
                    message = (
                        "failed to create containerd task: failed to create shim task: OCI "
                        "runtime create failed: runc create failed: unable to start container "
                        f'process: exec: "{argv0}": {_start_error(e)}: unknown'
                    )
                    results.append({"exitCode": 128, "reason": "StartError", "message": message})
                    await self.event(pod, "Pod", "Failed", f"Error: {message}", "kubelet", True)
                    break
                runtime.procs.append(proc)
                results.append({"pid": proc.pid})
            started = now_iso()
            running = [r for r in results if "pid" in r]
            if running and len(running) == len(results):
                for c in containers:
                    await self.event(
                        pod, "Pod", "Started", f"Started container {c.get('name')}", "kubelet"
                    )
                ready = conditions
                for kind in ("ContainersReady", "Ready"):
                    ready = set_condition(ready, kind, "True", "", "", started)
                for c in ready:
                    if c["status"] == "True":
                        c.pop("reason", None)
                        c.pop("message", None)
                await self.write_pod_status(
                    runtime,
                    {
                        **base,
                        "phase": "Running",
                        "conditions": ready,
                        "containerStatuses": [
                            {
                                **s,
                                "containerID": f"emulator://{r['pid']}",
                                "state": {"running": {"startedAt": started}},
                            }
                            for s, r in zip(statuses({}, True, True), results)
                        ],
                    },
                )
            codes = await asyncio.gather(*(p.wait() for p in runtime.procs))
        finished = now_iso()
        states = []
        for i, status in enumerate(statuses({})):
            if i < len(results) and "pid" in results[i]:
                code = codes[running.index(results[i])]
                exit_code = code if code >= 0 else 128 - code
                reason = "Completed" if code == 0 else "Error"
                if code == -signal.SIGKILL and not runtime.killed:
                    reason = "OOMKilled"
                terminated = {
                    "exitCode": exit_code,
                    "reason": reason,
                    "startedAt": started,
                    "finishedAt": finished,
                    "containerID": f"emulator://{results[i]['pid']}",
                }
            elif i < len(results):
                terminated = {**results[i], "startedAt": finished, "finishedAt": finished}
            else:  # never started (deleted first)
                terminated = {"exitCode": 137, "reason": "ContainerStatusUnknown",
                              "startedAt": finished, "finishedAt": finished}  # fmt: skip
            states.append({**status, "state": {"terminated": terminated}})
        succeeded = all(s["state"]["terminated"]["exitCode"] == 0 for s in states)
        done = conditions
        for kind in ("ContainersReady", "Ready"):
            done = set_condition(done, kind, "False", "PodCompleted", "", finished)
        await self.write_pod_status(
            runtime,
            {
                **base,
                "phase": "Succeeded" if succeeded else "Failed",
                "conditions": done,
                "containerStatuses": states,
            },
        )
        self.wake.set()

    async def prepare(self, pod: dict, container: dict) -> tuple[list[str], dict, str]:
        """argv, env and working directory of `container`, with mounts mapped to the host."""
        meta, spec = pod["metadata"], pod.get("spec") or {}
        namespace, name = meta.get("namespace") or "default", meta["name"]
        pod_dir = self.root / "pods" / namespace / name
        pod_dir.mkdir(parents=True, exist_ok=True)
        volumes = {v.get("name"): v for v in spec.get("volumes") or []}
        mounts: list[tuple[str, str]] = []
        for mount in container.get("volumeMounts") or []:
            mount_path = mount.get("mountPath") or ""
            volume = volumes.get(mount.get("name"))
            if volume is None or not mount_path.startswith("/"):
                continue
            host = await self.volume_host_dir(namespace, pod_dir, volume)
            if mount.get("subPath"):
                host = host / mount["subPath"]
                host.mkdir(parents=True, exist_ok=True)
            if mount_path.rstrip("/") == "/dev/shm":
                continue
            mounts.append((mount_path, str(host)))
        mounts.sort(key=lambda m: len(m[0].rstrip("/")), reverse=True)

        values: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix") or ""
            for kind in ("configMapRef", "secretRef"):
                ref = source.get(kind)
                if ref:
                    data = await self.config_data(namespace, kind, ref.get("name"), ref)
                    values.update({prefix + k: v for k, v in data.items()})
        for item in container.get("env") or []:
            values[item["name"]] = await self.env_value(pod, namespace, item, values)
        subdomain = spec.get("subdomain")
        for key, value in values.items():
            values[key] = rewrite_pod_hostnames(rewrite_path(value, mounts), subdomain, namespace)
        argv = [expand(a, values) for a in (container.get("command") or [])]
        argv += [expand(a, values) for a in (container.get("args") or [])]
        argv = [rewrite_pod_hostnames(rewrite_path(a, mounts), subdomain, namespace) for a in argv]

        kubeconfig = pod_dir / "kubeconfig"
        account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emulator", "cluster": {"server": self.api_url}}],
                    "users": [
                        {
                            "name": account,
                            "user": {"token": f"system:serviceaccount:{namespace}:{account}"},
                        }
                    ],
                    "contexts": [
                        {
                            "name": "emulator",
                            "context": {
                                "cluster": "emulator",
                                "user": account,
                                "namespace": namespace,
                            },
                        }
                    ],
                    "current-context": "emulator",
                }
            )
        )
        env = dict(os.environ)
        bindir = os.path.dirname(sys.executable)
        path = env.get("PATH", os.defpath)
        if bindir not in path.split(os.pathsep):
            env["PATH"] = bindir + os.pathsep + path
        env.pop("KUBECONFIG", None)
        env["HOSTNAME"] = spec.get("hostname") or name
        env["KUBECONFIG"] = str(kubeconfig)
        env.update(values)

        working = container.get("workingDir")
        if working:
            cwd = rewrite_path(working, mounts)
            if cwd == working and not os.path.isdir(working):
                cwd = str(pod_dir / "rootfs" / working.lstrip("/"))
            os.makedirs(cwd, exist_ok=True)
        else:
            cwd = str(pod_dir)
        return argv, env, cwd

    async def volume_host_dir(self, namespace: str, pod_dir: pathlib.Path, volume: dict):
        name = volume.get("name")
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        if claim:
            host = self.root / "volumes" / namespace / claim
        elif volume.get("hostPath"):
            host = pathlib.Path(volume["hostPath"].get("path") or "/")
        else:
            host = pod_dir / "volumes" / name
        host.mkdir(parents=True, exist_ok=True)
        for kind in ("configMap", "secret"):
            ref = volume.get(kind)
            if ref is not None:
                ref_name = ref.get("name") or ref.get("secretName")
                data = await self.config_data(namespace, kind + "Ref", ref_name, ref)
                items = ref.get("items")
                paths = {i["key"]: i.get("path", i["key"]) for i in items} if items else None
                for key, value in data.items():
                    if paths is None or key in paths:
                        target = host / (paths[key] if paths else key)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_text(value)
        return host

    async def config_data(self, namespace: str, kind: str, name: str, ref: dict) -> dict:
        plural = "secrets" if kind.startswith("secret") else "configmaps"
        try:
            obj = await self.api.request("GET", f"/api/v1/namespaces/{namespace}/{plural}/{name}")
        except ApiError as e:
            if e.status == 404 and ref.get("optional"):
                return {}
            if e.status == 404:
                raise _ConfigError(f'{plural[:-1].replace("configmap", "configmap")} "{name}" '
                                   "not found") from e  # fmt: skip
            raise
        data = dict(obj.get("data") or {})
        if plural == "secrets":
            data = {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}
            data.update(obj.get("stringData") or {})
        else:
            for k, v in (obj.get("binaryData") or {}).items():
                data[k] = base64.b64decode(v).decode(errors="replace")
        return data

    async def env_value(self, pod: dict, namespace: str, item: dict, values: dict) -> str:
        if "valueFrom" not in item:
            return expand(str(item.get("value", "")), values)
        source = item["valueFrom"]
        if "fieldRef" in source:
            return field_ref(pod, source["fieldRef"].get("fieldPath", ""))
        for kind in ("configMapKeyRef", "secretKeyRef"):
            ref = source.get(kind)
            if ref:
                data = await self.config_data(namespace, kind, ref.get("name"), ref)
                if ref.get("key") in data:
                    return data[ref["key"]]
                if ref.get("optional"):
                    return ""
                raise _ConfigError(f"couldn't find key {ref.get('key')} in {ref.get('name')}")
        if "resourceFieldRef" in source:
            resource = source["resourceFieldRef"].get("resource", "")
            section, _, res = resource.partition(".")
            for c in (pod.get("spec") or {}).get("containers") or []:
                value = ((c.get("resources") or {}).get(section) or {}).get(res)
                if value is not None:
                    return str(value)
            return "0"
        return ""

    async def delete_pod(self, pod: dict) -> None:
        meta = pod["metadata"]
        uid = meta.get("uid", "")
        runtime = self.runtimes.get(uid)
        if runtime is not None:
            grace = meta.get("deletionGracePeriodSeconds")
            if grace is None:
                grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
            await self.event(
                pod,
                "Pod",
                "Killing",
                "Stopping container "
                + ",".join(
                    c.get("name", "") for c in (pod.get("spec") or {}).get("containers") or []
                ),
                "kubelet",
            )
            await self.terminate(runtime, min(float(grace), MAX_GRACE))
        namespace, name = key_of(pod)
        await self.quiet(
            "DELETE",
            pod_path(namespace, name),
            {
                "apiVersion": "v1",
                "kind": "DeleteOptions",
                "gracePeriodSeconds": 0,
                "preconditions": {"uid": uid},
            },  # fmt: skip
            params={"gracePeriodSeconds": "0"},
        )

    async def terminate(self, runtime: PodRuntime, grace: float) -> None:
        """SIGTERM the pod's process groups, SIGKILL after `grace`, let the kubelet task
        write the final status."""
        runtime.killed = True
        await _stop_processes(runtime.procs, grace)
        task = runtime.task
        if task is not None and not task.done():
            if not runtime.procs:  # waiting for an image or config: nothing to write
                task.cancel()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), 5)
        for proc in runtime.procs:  # the whole group: workers that outlived their parent
            _signal_group(proc, signal.SIGKILL)

    # ---- Job controller

    async def pass_jobs(self) -> None:
        for job in list(self.jobs.items.values()):
            try:
                await self.reconcile_job(job)
            except ApiError as e:
                log.warning("job %s: %s", key_of(job), e)

    def job_pods(self, uid: str) -> list[dict]:
        return [p for p in self.pods.items.values() if owned_by(p, uid)]

    async def reconcile_job(self, job: dict) -> None:
        meta, spec = job["metadata"], job.get("spec") or {}
        status = job.get("status") or {}
        uid, (namespace, name) = meta.get("uid", ""), key_of(job)
        if is_deleting(job) or not uid:
            return
        record = self.records.get(uid)
        pods = self.job_pods(uid)
        if record is None:
            record = JobRecord(
                failed_base=int(status.get("failed") or 0),
                succeeded_base=int(status.get("succeeded") or 0),
                completed=parse_indexes(status.get("completedIndexes")),
            )
            # pods that ended before we saw the Job are already in its counts
            record.counted_failed = {p["metadata"]["uid"] for p in pods if is_terminal(p)}
            record.counted_succeeded = set(record.counted_failed)
            self.records[uid] = record
        now = now_iso()
        conditions = list(status.get("conditions") or [])
        if condition_true(job, "Complete") or condition_true(job, "Failed"):
            await self.finished_job(job, record)
            return

        indexed = spec.get("completionMode") == "Indexed"
        parallelism = spec.get("parallelism")
        parallelism = 1 if parallelism is None else int(parallelism)
        completions = spec.get("completions")
        if completions is None and spec.get("parallelism") is None:
            completions = 1
        completions = None if completions is None else int(completions)
        backoff_limit = int(
            spec.get("backoffLimit", 6) if spec.get("backoffLimit") is not None else 6
        )

        # ---- count what ended
        # a pod removed before it ended failed, unless this controller deleted it
        vanished = [
            p if is_terminal(p) else {**p, "status": {"phase": "Failed"}} for p in record.vanished
        ]
        record.vanished.clear()
        for pod in pods + vanished:
            pod_uid, phase = pod["metadata"]["uid"], (pod.get("status") or {}).get("phase")
            if phase == "Failed" and pod_uid not in record.counted_failed:
                record.counted_failed.add(pod_uid)
                if pod_uid not in record.deleted:
                    record.failed_base += 1
                    record.last_failure = time.monotonic()
            elif phase == "Succeeded" and pod_uid not in record.counted_succeeded:
                record.counted_succeeded.add(pod_uid)
                index = pod_index(pod)
                if indexed and index is not None:
                    record.completed.add(index)
                elif not indexed:
                    record.succeeded_base += 1
        for pod_name in list(record.expected):
            if (namespace, pod_name) in self.pods.items or time.monotonic() - record.expected[
                pod_name
            ] > 10:
                del record.expected[pod_name]
        failed = record.failed_base
        succeeded = len(record.completed) if indexed else record.succeeded_base
        active = [p for p in pods if not is_terminal(p) and not is_deleting(p)]
        terminating = [p for p in pods if not is_terminal(p) and is_deleting(p)]
        n_active = len(active) + len(record.expected)

        new_status: dict = {}
        start_time = status.get("startTime")
        failure = condition_true(job, "FailureTarget")
        success = condition_true(job, "SuccessCriteriaMet")
        deadline = spec.get("activeDeadlineSeconds")
        started_at = record.start or parse_time(start_time)
        if not failure and not success:
            if failed > backoff_limit:
                failure = {
                    "reason": "BackoffLimitExceeded",
                    "message": "Job has reached the specified backoff limit",
                }
            elif (
                deadline is not None
                and started_at is not None
                and not spec.get("suspend")
                and time.time() - started_at >= float(deadline)
            ):
                failure = {
                    "reason": "DeadlineExceeded",
                    "message": "Job was active longer than specified deadline",
                }
            if failure:
                conditions = set_condition(
                    conditions, "FailureTarget", "True", failure["reason"], failure["message"], now
                )
                await self.event(
                    job, "Job", failure["reason"], failure["message"], "job-controller", True
                )
        if not failure and not success:
            if indexed:
                done = completions is not None and len(record.completed) >= completions
            elif completions is None:
                done = succeeded > 0 and not active
            else:
                done = succeeded >= completions
            if done:
                success = {
                    "reason": "CompletionsReached",
                    "message": "Reached expected number of succeeded pods",
                }
                conditions = set_condition(
                    conditions, "SuccessCriteriaMet", "True", **success, now=now
                )

        if failure or success:
            for pod in active:
                await self.delete_child(job, pod)
            if not active and not terminating and not record.expected:
                ending = failure or success
                kind = "Failed" if failure else "Complete"
                conditions = set_condition(
                    conditions, kind, "True", ending["reason"], ending["message"], now
                )
                if success:
                    new_status["completionTime"] = now
                    await self.event(job, "Job", "Completed", "Job completed", "job-controller")
            n_active = 0 if not active else len(active)
        elif spec.get("suspend"):
            for pod in active:
                await self.delete_child(job, pod)
            if not condition_true(job, "Suspended"):
                conditions = set_condition(
                    conditions, "Suspended", "True", "JobSuspended", "Job suspended", now
                )
                await self.event(job, "Job", "Suspended", "Job suspended", "job-controller")
            record.start = None
            start_time = None
            new_status["startTime"] = None
            n_active = 0
        else:
            if condition_true(job, "Suspended"):
                conditions = set_condition(
                    conditions, "Suspended", "False", "JobResumed", "Job resumed", now
                )
                await self.event(job, "Job", "Resumed", "Job resumed", "job-controller")
                start_time = None
            if not start_time:
                record.start = time.time()
                start_time = now
                new_status["startTime"] = now
            wait = 0.0
            if failed:
                delay = min(self.backoff * 2 ** (failed - 1), MAX_BACKOFF)
                wait = record.last_failure + delay - time.monotonic() if record.last_failure else 0
            # podReplacementPolicy Failed (the default with a podFailurePolicy): no
            # replacement while a deleted pod still terminates
            policy = spec.get("podReplacementPolicy") or (
                "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed"
            )
            if wait <= 0 and not (policy == "Failed" and terminating):
                n_active += await self.manage_pods(
                    job, record, active, indexed, parallelism, completions, succeeded
                )
        new_status.update(
            {
                "active": n_active,
                "ready": sum(1 for p in active if is_ready(p)),
                "terminating": len(terminating),
                "succeeded": succeeded,
                "failed": failed,
                "conditions": conditions,
                "uncountedTerminatedPods": {},
            }
        )
        if not conditions and not status.get("conditions"):
            del new_status["conditions"]  # Kubernetes leaves an empty list out
        if indexed:
            new_status["completedIndexes"] = compress_indexes(record.completed)
        if "startTime" not in new_status and start_time:
            new_status["startTime"] = start_time
        if any(status.get(k) != v for k, v in new_status.items()):
            patched = await self.patch_status(job_path(namespace, name), new_status)
            if patched:
                self.jobs.put(patched)

    async def manage_pods(
        self,
        job: dict,
        record: JobRecord,
        active: list[dict],
        indexed: bool,
        parallelism: int,
        completions: int | None,
        succeeded: int,
    ) -> int:
        """Create the missing pods (delete surplus ones); the number created."""
        n_active = len(active) + len(record.expected)
        if indexed:
            busy = {pod_index(p) for p in active}
            for pod_name in record.expected:
                match = re.match(r".*-(\d+)-[a-z0-9]{5}$", pod_name)
                if match:
                    busy.add(int(match.group(1)))
            pending = [i for i in range(completions or 0) if i not in record.completed | busy]
            wanted = pending[: max(0, parallelism - n_active)]
        else:
            want = parallelism if completions is None else min(parallelism, completions - succeeded)
            if n_active > want:
                surplus = sorted(
                    active, key=lambda p: (p.get("status") or {}).get("phase") == "Running"
                )
                for pod in surplus[: n_active - want]:
                    await self.delete_child(job, pod)
            wanted = [None] * max(0, want - n_active)
        created = 0
        for index in wanted:
            pod = build_pod(job, index)
            for _ in range(3):
                result = await self.quiet(
                    "POST", f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods", pod
                )
                if result is not None:
                    break
                if key_of(job) not in self.jobs.items:
                    return created
                pod["metadata"]["name"] = pod["metadata"]["name"][:-5] + random_suffix()
            else:
                continue
            created += 1
            record.expected[result["metadata"]["name"]] = time.monotonic()
            self.pods.put(result)
            await self.event(
                job, "Job", "SuccessfulCreate", f"Created pod: {result['metadata']['name']}",
                "job-controller",
            )  # fmt: skip
        return created

    async def delete_child(self, job: dict, pod: dict) -> None:
        namespace, name = key_of(pod)
        record = self.records.get(job["metadata"].get("uid", ""))
        if record is not None:
            record.deleted.add(pod["metadata"].get("uid", ""))
        deleted = await self.quiet("DELETE", pod_path(namespace, name))
        if deleted is not None:
            if deleted.get("kind") == "Pod":
                self.pods.put(deleted)
            if record is not None:
                record.expected.pop(name, None)
            await self.event(
                job, "Job", "SuccessfulDelete", f"Deleted pod: {name}", "job-controller"
            )

    async def finished_job(self, job: dict, record: JobRecord) -> None:
        ttl = (job.get("spec") or {}).get("ttlSecondsAfterFinished")
        if ttl is None or record.ttl_deleted:
            return
        status = job.get("status") or {}
        ended = status.get("completionTime")
        if not ended:
            failed = condition_true(job, "Failed") or {}
            ended = failed.get("lastTransitionTime")
        ended_at = parse_time(ended) or time.time()
        if time.time() < ended_at + float(ttl):
            return
        record.ttl_deleted = True
        namespace, name = key_of(job)
        await self.quiet(
            "DELETE",
            job_path(namespace, name),
            {
                "apiVersion": "v1",
                "kind": "DeleteOptions",
                "propagationPolicy": "Background",
                "preconditions": {"uid": job["metadata"]["uid"]},
            },  # fmt: skip
            params={"propagationPolicy": "Background"},
        )


class _ConfigError(Exception):
    """A container's config refers to something missing (CreateContainerConfigError)."""


async def _stop_processes(procs: list, grace: float) -> None:
    """SIGTERM each live process group, SIGKILL what still runs after `grace` seconds."""
    live = [p for p in procs if p.returncode is None]
    for proc in live:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in live:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), max(0.01, deadline - time.monotonic()))
        if proc.returncode is None:
            _signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 2)


def _start_error(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "executable file not found in $PATH"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, IndexError):
        return "no command specified"
    return str(error)


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _affinity_matches(spec: dict, labels: dict) -> bool:
    """requiredDuringSchedulingIgnoredDuringExecution node affinity (matchExpressions)."""
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = required.get("nodeSelectorTerms") or []
    if not terms:
        return True
    for term in terms:
        ok = True
        for expr in term.get("matchExpressions") or []:
            key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
            has = key in labels
            ok &= {
                "In": has and labels.get(key) in values,
                "NotIn": not has or labels.get(key) not in values,
                "Exists": has,
                "DoesNotExist": not has,
            }.get(op, False)
        if ok:
            return True
    return False


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def run_controllers(
    api_url: str,
    token: str,
    root: pathlib.Path,
    *,
    stop: asyncio.Event,
    node_name: str = "emulator",
    node_gpus: int = 8,
    backoff_seconds: float = 1.0,
) -> None:
    """Run the node, scheduler, kubelet and Job controller until `stop` is set; then stop
    every pod process (SIGTERM, SIGKILL after 5 s) and close the HTTP session."""
    controllers = Controllers(api_url, token, root, node_name, node_gpus, backoff_seconds)
    await controllers.run(stop)
