"""The local kubelet: one Node of the real control plane whose pods run as local processes, and
the provisioner that gives PersistentVolumeClaims a host directory.

Node: registers Node `<node_name>` Ready with cpu, memory, pods and `nvidia.com/gpu`, renews its
Lease in kube-node-lease every 10 s and the Ready heartbeat every 30 s.

Pods (list+watch of `spec.nodeName=<node>`; the real scheduler binds them):
- an image whose reference contains `does-not-exist` cannot be pulled: ErrImagePull, then
  ImagePullBackOff, retried with back-off until the pod is deleted. Any other image is this
  machine: commands run from this Python environment (its bin directory first on PATH).
- the pod gets a network namespace (tests/kube/network.py); its hosts file names every running
  pod of its namespace that has `hostname` and `subdomain`, so `<job>-0.<service>` resolves.
- each container runs as `ip netns exec <netns> unshare --uts --mount sh -c <launch script>
  <argv>`: the script sets the hostname, bind-mounts the volumes at their mountPaths (read-only
  ones remounted ro), mounts a tmpfs for a Memory emptyDir, changes to workingDir (else the pod
  directory root/pods/<ns>/<pod>) and execs argv: one pid throughout, its own process group.
  The host is the image: a mountPath missing there is created as an empty directory, and a
  volume mounted over this Python environment hides it (the StartError says so).
- the process runs as the securityContext says (runAsUser/runAsGroup, fsGroup and
  supplementalGroups, no_new_privs), and fsGroup is applied to its volumes: identity.py.
- volumes: PVC → the hostPath/local path of its bound PV; emptyDir →
  root/pods/<ns>/<pod>/volumes/<name>; hostPath; configMap, secret, downwardAPI and projected
  ones (a TokenRequest token, kube-root-ca.crt, the namespace) as files under the pod's volume
  directory, so the ServiceAccount admission plugin's kube-api-access volume gives the process
  real in-cluster credentials at /var/run/secrets/kubernetes.io/serviceaccount.
- stdout+stderr append to root/logs/<ns>/<pod>.log, served for `kubectl logs` on
  https://<gateway>:<port>/containerLogs/<ns>/<pod>/<container> (the port is in the Node's
  daemonEndpoints).
- exit 0 → Completed; other codes → Error (with terminationMessagePolicy FallbackToLogsOnError
  the end of the log is the terminated state's message); a missing executable → 128
  StartError; a SIGKILL the kubelet did not send → 137 OOMKilled. Every restartPolicy ends
  like Never (no restarts), which is what Jobs use.
- deletion: Killing events, SIGTERM to each process group, SIGKILL after the grace period, the
  final status, then DELETE with grace period 0 and the pod's uid as precondition. A pod that
  vanishes from the API (forced deletion) is killed at once.

Volumes: the Kubelet also runs the DirectoryProvisioner (with its own credential), which gives
each claim of the storage class a PersistentVolume at root/volumes/<ns>/<claim>, owned by root
with mode 0755 like a fresh block device.

Not emulated: container restarts, probes, sidecar (restartPolicy Always) init containers,
hostNetwork, resource isolation (GPUs are only counted by the scheduler), token rotation, and
sharing a Memory emptyDir between the containers of a pod (each container gets its own tmpfs).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import ssl
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from kubernetes.utils import parse_quantity

from .identity import (
    Identity,
    RunAsRootRefused,
    apply_fs_group,
    container_identity,
    exec_prefix,
    image_view_lines,
)
from .network import PodAddress, PodNetwork

log = logging.getLogger("kube.kubelet")

KUBELET_VERSION = "v1.34.5"
RUNTIME_VERSION = "local://process"
PROVISIONER = "instseg.io/local-dir"
GPU = "nvidia.com/gpu"
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
UNPULLABLE = "does-not-exist"
STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
LEASE_RENEW_SECONDS = 10
LEASE_DURATION_SECONDS = 40
HEARTBEAT_SECONDS = 30
START_TIMEOUT = 60.0
SHUTDOWN_GRACE = 5.0
RETRY_SECONDS = 1.0
DEFAULT_GRACE = 30
DEFAULT_TOKEN_SECONDS = 3607
REQUEST_TIMEOUT = 30
WATCH_SECONDS = 300
TERMINAL = ("Succeeded", "Failed")
NODE_CONDITIONS = (  # type, status, reason, message: a healthy kubelet's
    ("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory"),
    ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
    ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
    ("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
)
NOT_FOUND = "executable file not found in $PATH"
# HOME of a container that does not run as root (the pod's own directory, mounted there)
HOME = "/tmp/local-kubelet-home"
# what every container runs from: this Python environment is the local kubelet's "image"
IMAGE_PATHS = sorted(
    {sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))}
)


# ---------------------------------------------------------------- pure helpers


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time() -> str:
    """A metav1.MicroTime (what Lease.spec.renewTime holds)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def expand(text: str, values: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: `$$` is a literal `$`, `$(NAME)` is replaced when NAME is
    defined and kept as written otherwise, an unterminated `$(` is literal."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] != "$" or i + 1 >= n:
            out.append(text[i])
            i += 1
        elif text[i + 1] == "$":
            out.append("$")
            i += 2
        elif text[i + 1] == "(" and text.find(")", i + 2) != -1:
            end = text.find(")", i + 2)
            name = text[i + 2 : end]
            out.append(values[name] if name in values else text[i : end + 1])
            i = end + 1
        else:
            out.append(text[i : i + 2])
            i += 2
    return "".join(out)


def qos_class(pod: dict) -> str:
    """Guaranteed, Burstable or BestEffort, computed as Kubernetes' GetPodQOS does."""
    spec = pod.get("spec") or {}
    requests: dict[str, Decimal] = {}
    limits: dict[str, Decimal] = {}
    guaranteed = True
    for container in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        resources = container.get("resources") or {}
        for kind, totals in (("requests", requests), ("limits", limits)):
            for name, value in (resources.get(kind) or {}).items():
                if name in ("cpu", "memory") and parse_quantity(value) != 0:
                    totals[name] = totals.get(name, Decimal(0)) + parse_quantity(value)
        found = {n for n, v in (resources.get("limits") or {}).items() if parse_quantity(v) != 0}
        guaranteed &= {"cpu", "memory"} <= found
    if not requests and not limits:
        return "BestEffort"
    if guaranteed and requests.keys() == limits.keys() and requests == limits:
        return "Guaranteed"
    return "Burstable"


def field_ref(pod: dict, path: str, pod_ip: str, host_ip: str) -> str:
    """The value of a downward-API `fieldRef.fieldPath`."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path not in simple:
        raise ContainerConfigError(f"unsupported fieldPath: {path}")
    return str(simple[path] or "")


def resource_field_ref(pod: dict, container_name: str, ref: dict, allocatable: dict) -> str:
    """The value of a `resourceFieldRef`: the container's request or limit over the divisor,
    rounded up; a limit that is not set is the node's allocatable amount."""
    resource = ref.get("resource", "")
    containers = (pod.get("spec") or {}).get("containers") or []
    container = next((c for c in containers if c.get("name") == container_name), {})
    section, _, kind = resource.partition(".")
    value = ((container.get("resources") or {}).get(section) or {}).get(kind)
    if value is None:
        value = allocatable.get(kind, "0") if section == "limits" else "0"
    divisor = parse_quantity(ref.get("divisor") or "1") or Decimal(1)  # the API's default is 0
    return str(math.ceil(parse_quantity(value) / divisor))


def pod_dns_names(pod: dict) -> list[str]:
    """`<hostname>.<subdomain>[.<ns>.svc[.cluster.local]]` of a pod with both set, longest
    first (what a headless Service's DNS gives it)."""
    spec, namespace = pod.get("spec") or {}, (pod.get("metadata") or {}).get("namespace")
    hostname, subdomain = spec.get("hostname"), spec.get("subdomain")
    if not hostname or not subdomain:
        return []
    short = f"{hostname}.{subdomain}"
    return [f"{short}.{namespace}.svc.cluster.local", f"{short}.{namespace}.svc", short]


def pod_hostname(pod: dict) -> str:
    """spec.hostname, else the pod's name cut to a valid hostname (63 characters)."""
    name = (pod.get("spec") or {}).get("hostname") or pod["metadata"]["name"]
    return name[:63].rstrip("-.")


def hosts_entries(
    pod: dict, ip: str, neighbours: list[tuple[dict, str]]
) -> list[tuple[str, list[str]]]:
    """A pod's hosts file entries: its own names, then those of each (pod, ip) neighbour that
    has a hostname and a subdomain."""
    entries = [(ip, [*pod_dns_names(pod), pod_hostname(pod)])]
    for other, other_ip in neighbours:
        names = pod_dns_names(other)
        if other["metadata"].get("uid") != pod["metadata"].get("uid") and names:
            entries.append((other_ip, names))
    return entries


@dataclass(frozen=True)
class Mount:
    """One mount of a container: a host path bound at `target`, or a tmpfs."""

    target: str
    source: str = ""
    read_only: bool = False
    tmpfs: bool = False
    size: str | None = None
    is_file: bool = False


def launch_script(
    hostname: str,
    mounts: list[Mount],
    workdir: str | None,
    fallback: str,
    image_view: Sequence[str] = (),
    run_as: Sequence[str] = (),
) -> str:
    """The shell script that turns a fresh UTS+mount namespace into the container's view of the
    host, then execs its argv ("$@") under the same pid, as `run_as` says (identity.py)."""
    q = shlex.quote
    # the pod's env may set PATH: the script's own tools come from the system directories
    lines = ["set -e", "container_path=$PATH", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
    lines.append(f"printf %s {q(hostname)} > /proc/sys/kernel/hostname")
    lines += image_view
    for mount in sorted(mounts, key=lambda m: m.target.rstrip("/").count("/")):
        target = q(mount.target)
        if mount.tmpfs:
            options = "mode=1777" + (f",size={mount.size}" if mount.size else "")
            lines += [f"mkdir -p {target}", f"mount -t tmpfs -o {options} tmpfs {target}"]
            continue
        if mount.is_file:
            lines += [
                f"mkdir -p {q(os.path.dirname(mount.target))}",
                f"[ -e {target} ] || : > {target}",
            ]
        else:
            lines.append(f"mkdir -p {target}")
        lines.append(f"mount --bind {q(mount.source)} {target}")
        if mount.read_only:
            lines.append(f"mount -o remount,bind,ro {target}")
    if workdir:
        lines.append(f"cd {q(workdir)} 2>/dev/null || cd {q(fallback)}")
    else:
        lines.append(f"cd {q(fallback)}")
    lines += ['PATH="$container_path"', " ".join(["exec", *map(q, run_as), '"$@"'])]
    return "\n".join(lines) + "\n"


def container_argv(tools: dict[str, str], netns: str, script: str, argv: list[str]) -> list[str]:
    """The command line of a container: its network namespace, fresh UTS and mount namespaces,
    the launch script, then `argv` (every step execs: the container keeps the first pid)."""
    return [
        tools["ip"], "netns", "exec", netns,
        tools["unshare"], "--uts", "--mount", "--propagation", "private",
        tools["sh"], "-c", script, "sh", *argv,
    ]  # fmt: skip


def host_path(path: str, mounts: list[Mount]) -> str:
    """Where the container path `path` lies on the host (the deepest bind mount above it)."""
    for mount in sorted(mounts, key=lambda m: len(m.target), reverse=True):
        target = mount.target.rstrip("/") or "/"
        if not mount.tmpfs and (path == target or path.startswith(target.rstrip("/") + "/")):
            return mount.source + path[len(target) :]
    return path


def find_executable(argv0: str, search_path: str, mounts: list[Mount], workdir: str) -> bool:
    """Whether `argv0` names an executable file in the container's view of the filesystem."""
    if "/" in argv0:
        candidates = [argv0 if argv0.startswith("/") else os.path.join(workdir, argv0)]
    else:
        candidates = [os.path.join(d, argv0) for d in search_path.split(os.pathsep) if d]
    for candidate in candidates:
        real = host_path(candidate, mounts)
        if os.path.isfile(real) and os.access(real, os.X_OK):
            return True
    return False


def start_error_message(argv0: str, mounts: list[Mount]) -> str:
    """What containerd says when the container's executable is missing, plus the reason when
    a volume hides the local kubelet's image (the Python environment containers run from)."""
    reason = f'exec: "{argv0}": {NOT_FOUND}' if argv0 else "exec: no command specified"
    for mount in mounts:
        hidden = [
            p
            for p in IMAGE_PATHS
            if p == mount.target or p.startswith(mount.target.rstrip("/") + "/")
        ]
        if hidden:
            reason += (
                f" (the volume mounted at {mount.target} hides {hidden[0]}, where the local "
                "kubelet's image lives: mount it elsewhere)"
            )
            break
    return (
        "failed to create containerd task: failed to create shim task: OCI runtime create failed: "
        f"runc create failed: unable to start container process: error during container init: "
        f"{reason}: unknown"
    )


def normalized_image(image: str) -> str:
    """`x/y:1` → `docker.io/x/y:1`, `y` → `docker.io/library/y:latest` (as containerd names)."""
    first, _, rest = image.partition("/")
    if not rest or ("." not in first and ":" not in first and first != "localhost"):
        image = "docker.io/" + (image if rest else "library/" + image)
    if ":" not in image.rsplit("/", 1)[-1] and "@" not in image:
        image += ":latest"
    return image


def pull_error_message(image: str) -> str:
    full = normalized_image(image)
    return (
        f'rpc error: code = NotFound desc = failed to pull and unpack image "{full}": failed to '
        f'resolve reference "{full}": {full}: not found'
    )


def terminated_state(code: int, killed_by_kubelet: bool, started: str, container_id: str) -> dict:
    """A container's `state.terminated` from a process return code (negative: a signal)."""
    exit_code = code if code >= 0 else 128 - code
    reason = "Completed" if code == 0 else "Error"
    if code == -signal.SIGKILL and not killed_by_kubelet:
        reason = "OOMKilled"
    return {
        "exitCode": exit_code,
        "reason": reason,
        "message": None,
        "startedAt": started,
        "finishedAt": now_iso(),
        "containerID": container_id,
    }


def log_tail(path: Path, max_lines: int = 80, max_bytes: int = 2048) -> str:
    """What terminationMessagePolicy FallbackToLogsOnError reports: the end of the log, at
    most 80 lines or 2048 bytes, whichever is smaller."""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - max_bytes))
            text = log.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-max_lines:])


def _b64(value: str) -> bytes:
    return base64.b64decode(value)


# ---------------------------------------------------------------- errors


class ContainerConfigError(Exception):
    """A container's env refers to something missing (waiting: CreateContainerConfigError)."""


class VolumeNotReady(Exception):
    """A volume cannot be set up yet (waiting: ContainerCreating, Warning FailedMount)."""


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        try:
            message = json.loads(body).get("message") or body
        except (ValueError, AttributeError):
            message = body
        super().__init__(f"{status}: {message[:500]}")
        self.status, self.message = status, message


# ---------------------------------------------------------------- API client


class KubeClient:
    """JSON over HTTPS to the API server with a client certificate."""

    def __init__(self, server: str, ca_file: Path, cert_file: Path, key_file: Path) -> None:
        self.server = server.rstrip("/")
        self.ssl = ssl.create_default_context(cafile=str(ca_file))
        self.ssl.load_cert_chain(str(cert_file), str(key_file))
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # created inside the kubelet's event loop
            self._session = aiohttp.ClientSession(
                headers={"Accept": "application/json", "User-Agent": f"kubelet/{KUBELET_VERSION}"},
                connector=aiohttp.TCPConnector(ssl=self.ssl),
                read_bufsize=2**22,
            )
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict | None = None,
        content_type: str = "application/json",
    ) -> dict:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with self.session.request(
            method, self.server + path, data=data, headers=headers, params=params, timeout=timeout
        ) as answer:
            text = await answer.text()
            if answer.status >= 300:
                raise ApiError(answer.status, text)
            return json.loads(text) if text else {}

    async def watch(self, path: str, params: dict) -> AsyncIterator[dict]:
        """The events of one watch until the server ends it."""
        params = {
            **params,
            "watch": "true",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS + random.randint(0, 60)),
        }
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=WATCH_SECONDS + 90)
        async with self.session.get(self.server + path, params=params, timeout=timeout) as answer:
            if answer.status != 200:
                raise ApiError(answer.status, await answer.text())
            async for line in answer.content:
                if line.strip():
                    yield json.loads(line)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class Informer:
    """Objects of one list+watch, by uid. `on_event(kind, obj)` is called for every change
    (ADDED/MODIFIED, and DELETED also for objects that vanished between two lists)."""

    def __init__(
        self,
        client: KubeClient,
        path: str,
        on_event: Callable[[str, dict], None],
        params: dict | None = None,
    ) -> None:
        self.client, self.path, self.on_event = client, path, on_event
        self.params = params or {}
        self.items: dict[str, dict] = {}
        self.synced = asyncio.Event()

    async def run(self) -> None:
        backoff = 0.2
        while True:
            try:
                version = await self._relist()
                backoff = 0.2
                await self._watch(version)
            except asyncio.CancelledError:
                raise
            except ApiError as error:
                if error.status != 410:
                    log.warning("list/watch of %s: %s", self.path, error)
            except Exception as error:  # the connection broke: list again
                log.info("list/watch of %s ended: %r", self.path, error)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _relist(self) -> str:
        listing = await self.client.request("GET", self.path, params=self.params)
        fresh = {obj["metadata"]["uid"]: obj for obj in listing.get("items") or []}
        for uid in set(self.items) - set(fresh):
            self.on_event("DELETED", self.items.pop(uid))
        for uid, obj in fresh.items():
            self.items[uid] = obj
            self.on_event("MODIFIED", obj)
        self.synced.set()
        return (listing.get("metadata") or {}).get("resourceVersion", "")

    async def _watch(self, version: str) -> None:
        async for event in self.client.watch(
            self.path, {**self.params, "resourceVersion": version}
        ):
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                raise ApiError(obj.get("code") or 500, json.dumps(obj))
            if kind == "BOOKMARK":
                continue
            uid = obj["metadata"]["uid"]
            if kind == "DELETED":
                self.items.pop(uid, None)
            else:
                self.items[uid] = obj
            self.on_event(kind, obj)


# ---------------------------------------------------------------- pod configuration


class ConfigReader:
    """The ConfigMaps and Secrets of one pod's namespace, each read once per attempt."""

    def __init__(self, client: KubeClient, namespace: str) -> None:
        self.client, self.namespace = client, namespace
        self._cache: dict[tuple[str, str], dict[str, bytes] | None] = {}

    async def data(self, plural: str, name: str) -> dict[str, bytes] | None:
        """The decoded data of configmaps/<name> or secrets/<name>; None when it is missing."""
        key = (plural, name)
        if key not in self._cache:
            try:
                obj = await self.client.request(
                    "GET", f"/api/v1/namespaces/{self.namespace}/{plural}/{name}"
                )
            except ApiError as error:
                if error.status != 404:
                    raise
                self._cache[key] = None
            else:
                self._cache[key] = _decoded_data(plural, obj)
        return self._cache[key]

    async def required(self, plural: str, name: str, optional: bool) -> dict[str, bytes]:
        data = await self.data(plural, name)
        if data is None and not optional:
            raise ContainerConfigError(f'{plural[:-1]} "{name}" not found')
        return data or {}

    async def key(self, plural: str, ref: dict) -> str | None:
        """The value of a configMapKeyRef/secretKeyRef; None for a missing optional one."""
        optional = bool(ref.get("optional"))
        data = await self.required(plural, ref.get("name", ""), optional)
        if ref.get("key") in data:
            return data[ref["key"]].decode(errors="replace")
        if optional:
            return None
        kind = "ConfigMap" if plural == "configmaps" else "Secret"
        raise ContainerConfigError(
            f"couldn't find key {ref.get('key')} in {kind} {self.namespace}/{ref.get('name')}"
        )


def _decoded_data(plural: str, obj: dict) -> dict[str, bytes]:
    if plural == "secrets":
        return {k: _b64(v) for k, v in (obj.get("data") or {}).items()}
    data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    data.update({k: _b64(v) for k, v in (obj.get("binaryData") or {}).items()})
    return data


@dataclass
class ContainerLaunch:
    """Everything needed to start one container."""

    argv: list[str]
    env: dict[str, str]
    mounts: list[Mount]
    workdir: str | None
    identity: Identity


@dataclass
class ContainerRecord:
    """What the kubelet reports of one container (an entry of containerStatuses)."""

    name: str
    image: str
    state: dict
    ready: bool = False
    started: bool = False
    container_id: str | None = None

    def set(self, kind: str, **details: Any) -> None:
        self.state = {kind: details}

    @property
    def kind(self) -> str:
        return next(iter(self.state))

    def status(self) -> dict:
        # null deletes the other states in a strategic merge patch
        state: dict = {"waiting": None, "running": None, "terminated": None, **self.state}
        status = {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "ready": self.ready,
            "started": self.started,
            "restartCount": 0,
            "state": state,
            "lastState": {},
        }
        if self.container_id:
            status["containerID"] = self.container_id
        return status


# ---------------------------------------------------------------- one pod


class PodWorker:
    """Runs one pod bound to this node, from its network namespace to its final status."""

    def __init__(self, kubelet: Kubelet, pod: dict) -> None:
        self.kubelet, self.pod = kubelet, pod
        meta, spec = pod["metadata"], pod.get("spec") or {}
        self.uid, self.namespace, self.name = meta["uid"], meta["namespace"], meta["name"]
        self.pod_dir = kubelet.root / "pods" / self.namespace / self.name
        self.init_records = [
            _record(c, "PodInitializing") for c in spec.get("initContainers") or []
        ]
        waiting = "PodInitializing" if self.init_records else "ContainerCreating"
        self.records = [_record(c, waiting) for c in spec.get("containers") or []]
        self.conditions: dict[str, dict] = {}
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.address: PodAddress | None = None
        self.phase = "Pending"
        self.start_time = (pod.get("status") or {}).get("startTime") or now_iso()
        self.killed = False  # the kubelet sent the signals: a SIGKILL is no OOM
        self.silent = False  # gone from the API, or the node shuts down: write no status
        self.running = False  # has a network address that other pods may resolve
        self.task: asyncio.Task | None = None
        self._sandbox: asyncio.Future | None = None
        self._last_warning = ""

    # ---- status

    def _set_condition(
        self, kind: str, status: str, reason: str | None = None, message: str | None = None
    ) -> None:
        old = self.conditions.get(kind) or next(
            (
                c
                for c in (self.pod.get("status") or {}).get("conditions") or []
                if c.get("type") == kind
            ),
            None,
        )
        changed = old is None or old.get("status") != status
        self.conditions[kind] = {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "lastProbeTime": None,
            "lastTransitionTime": now_iso() if changed else old.get("lastTransitionTime"),
        }

    def _set_readiness(self) -> None:
        done = self.phase in TERMINAL
        self._set_condition("PodReadyToStartContainers", "False" if done else "True")
        unfinished = [r.name for r in self.init_records if r.kind != "terminated"]
        if unfinished and not done:
            message = f"containers with incomplete status: [{' '.join(unfinished)}]"
            self._set_condition("Initialized", "False", "ContainersNotInitialized", message)
        else:
            self._set_condition("Initialized", "True")
        unready = [r.name for r in self.records if not r.ready]
        for kind in ("ContainersReady", "Ready"):
            if done:
                self._set_condition(kind, "False", "PodCompleted")
            elif unready:
                message = f"containers with unready status: [{' '.join(unready)}]"
                self._set_condition(kind, "False", "ContainersNotReady", message)
            else:
                self._set_condition(kind, "True")

    def _status(self) -> dict:
        self._set_readiness()
        gateway = self.kubelet.network.gateway
        status: dict = {
            "phase": self.phase,
            "hostIP": gateway,
            "hostIPs": [{"ip": gateway}],
            "startTime": self.start_time,
            "qosClass": (self.pod.get("status") or {}).get("qosClass") or qos_class(self.pod),
            "conditions": list(self.conditions.values()),
            "containerStatuses": [r.status() for r in self.records],
        }
        if self.address is not None:
            status["podIP"], status["podIPs"] = self.address.ip, [{"ip": self.address.ip}]
        if self.init_records:
            status["initContainerStatuses"] = [r.status() for r in self.init_records]
        return status

    async def write_status(self) -> None:
        """Patches pods/<name>/status; the uid in the patch keeps it off a same-named new pod."""
        if self.silent:
            return
        body = {"metadata": {"uid": self.uid}, "status": self._status()}
        path = f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status"
        for attempt in range(3):
            try:
                await self.kubelet.client.request("PATCH", path, body, content_type=STRATEGIC)
                return
            except ApiError as error:
                replaced = error.status == 422 and "metadata.uid" in error.message
                if error.status == 404 or replaced:  # gone, or a same-named pod took its place
                    self.silent = True
                else:
                    log.warning("status of pod %s/%s: %s", self.namespace, self.name, error)
                return
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                log.info(
                    "status of pod %s/%s (try %d): %r", self.namespace, self.name, attempt, error
                )
                await asyncio.sleep(0.5 * (attempt + 1))

    async def event(
        self, reason: str, message: str, warning: bool = False, container: str = ""
    ) -> None:
        if not self.silent:
            await self.kubelet.post_event(self.pod, reason, message, warning, container)

    # ---- life cycle

    def start(self) -> None:
        self.task = self.kubelet.spawn(self._run(), f"pod {self.namespace}/{self.name}")

    async def _run(self) -> None:
        try:
            await self._until_ready(self._create_sandbox)
            volumes = await self._until_ready(self._prepare_volumes)
            await self._pull_images()
            if await self._run_init_containers(volumes):
                await self._run_containers(volumes)
        finally:
            await self._release_sandbox()

    async def _create_sandbox(self) -> None:
        self.pod_dir.mkdir(parents=True, exist_ok=True)
        network = self.kubelet.network
        self._sandbox = asyncio.ensure_future(
            asyncio.to_thread(network.add_pod, self.uid, pod_hostname(self.pod))
        )
        self.address = await asyncio.shield(self._sandbox)
        self.running = True
        self.kubelet.refresh_hosts(self.namespace)
        await self.write_status()

    async def _release_sandbox(self) -> None:
        for process in self.processes.values():  # workers that outlived their parent
            _signal_group(process, signal.SIGKILL)
        if self._sandbox is not None:
            with contextlib.suppress(Exception):
                await self._sandbox  # a namespace still being made must exist before removal
            await asyncio.to_thread(self.kubelet.network.remove_pod, self.uid)
        self.running = False
        self.kubelet.refresh_hosts(self.namespace)

    async def _until_ready(self, prepare: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """`prepare()`'s result, retried (with the reason in the pod's status) while a volume
        or a config is missing or anything else fails."""
        while True:
            try:
                return await prepare()
            except VolumeNotReady as error:
                await self._report_waiting("ContainerCreating", None, "FailedMount", str(error))
            except ContainerConfigError as error:
                message = str(error)
                await self._report_waiting(
                    "CreateContainerConfigError", message, "Failed", f"Error: {message}"
                )
            except Exception as error:  # the API server hiccuped, or a bug here: say so, retry
                log.exception("preparing pod %s/%s", self.namespace, self.name)
                message = f"{type(error).__name__}: {error}"
                await self._report_waiting("CreateContainerError", message, "Failed", message)
            await asyncio.sleep(RETRY_SECONDS)

    async def _report_waiting(
        self, reason: str, message: str | None, event: str, text: str
    ) -> None:
        for record in self.records:
            if record.kind == "waiting":
                record.set("waiting", reason=reason, message=message)
        await self.write_status()
        if text != self._last_warning:  # one event per distinct problem, not one per retry
            self._last_warning = text
            await self.event(event, text, warning=True)

    async def _pull_images(self) -> None:
        """Waits forever (until deletion) when an image cannot be pulled."""
        containers = self.init_records + self.records
        missing = [r for r in containers if UNPULLABLE in r.image]
        for record in containers:
            if record not in missing:
                await self.event(
                    "Pulled",
                    f'Container image "{record.image}" already present on machine',
                    container=record.name,
                )
        if not missing:
            return
        delay = 10.0
        while True:
            for record in missing:
                await self._image_pull_failed(record)
            await asyncio.sleep(1.0)
            for record in missing:
                backoff = f'Back-off pulling image "{record.image}"'
                record.set(
                    "waiting",
                    reason="ImagePullBackOff",
                    message=f"{backoff}: ErrImagePull: {pull_error_message(record.image)}",
                )
                await self.event("BackOff", backoff, container=record.name)
                await self.event("Failed", "Error: ImagePullBackOff", True, record.name)
            await self.write_status()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 300.0)

    async def _image_pull_failed(self, record: ContainerRecord) -> None:
        message = pull_error_message(record.image)
        await self.event("Pulling", f'Pulling image "{record.image}"', container=record.name)
        record.set("waiting", reason="ErrImagePull", message=message)
        await self.write_status()
        await self.event(
            "Failed", f'Failed to pull image "{record.image}": {message}', True, record.name
        )
        await self.event("Failed", "Error: ErrImagePull", True, record.name)

    # ---- volumes

    async def _prepare_volumes(self) -> dict[str, Mount]:
        """Each volume of the pod as a mount template (target filled in per container)."""
        volumes: dict[str, Mount] = {}
        config = ConfigReader(self.kubelet.client, self.namespace)
        for volume in (self.pod.get("spec") or {}).get("volumes") or []:
            try:
                volumes[volume["name"]] = await self._prepare_volume(volume, config)
            except (ContainerConfigError, VolumeNotReady) as error:
                raise VolumeNotReady(
                    f'MountVolume.SetUp failed for volume "{volume["name"]}" : {error}'
                ) from error
        return volumes

    async def _prepare_volume(self, volume: dict, config: ConfigReader) -> Mount:
        mount = await self._volume_mount(volume, config)
        context = (self.pod.get("spec") or {}).get("securityContext") or {}
        fs_group = context.get("fsGroup")
        if fs_group is not None and mount.source and "hostPath" not in volume:
            policy = context.get("fsGroupChangePolicy")
            apply_fs_group(Path(mount.source), int(fs_group), policy, mount.read_only)
        return mount

    async def _volume_mount(self, volume: dict, config: ConfigReader) -> Mount:
        own_dir = self.pod_dir / "volumes" / volume["name"]
        if "persistentVolumeClaim" in volume:
            source = volume["persistentVolumeClaim"]
            path = await self._claim_path(source.get("claimName", ""))
            return Mount("", str(path), read_only=bool(source.get("readOnly")))
        if "hostPath" in volume:
            return Mount("", _host_path_volume(volume["hostPath"]))
        if "emptyDir" in volume:
            empty_dir = volume["emptyDir"] or {}
            if empty_dir.get("medium") == "Memory":
                return Mount("", tmpfs=True, size=empty_dir.get("sizeLimit"))
            own_dir.mkdir(parents=True, exist_ok=True)
            own_dir.chmod(0o777)  # as the kubelet makes an emptyDir: any user writes there
            return Mount("", str(own_dir))
        files = await self._volume_files(volume, config)
        if files is None:
            raise VolumeNotReady("volume type not supported by the local kubelet")
        _write_files(own_dir, files)
        return Mount("", str(own_dir), read_only=True)

    async def _claim_path(self, claim: str) -> Path:
        client, namespace = self.kubelet.client, self.namespace
        try:
            pvc = await client.request(
                "GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}"
            )
        except ApiError as error:
            if error.status == 404:
                raise VolumeNotReady(f'persistentvolumeclaim "{claim}" not found') from error
            raise
        volume_name = (pvc.get("spec") or {}).get("volumeName")
        if not volume_name or (pvc.get("status") or {}).get("phase") != "Bound":
            raise VolumeNotReady(f"PVC {namespace}/{claim} is not bound")
        pv = await client.request("GET", f"/api/v1/persistentvolumes/{volume_name}")
        spec = pv.get("spec") or {}
        path = (spec.get("hostPath") or {}).get("path") or (spec.get("local") or {}).get("path")
        if not path:
            raise VolumeNotReady(
                f"PersistentVolume {volume_name} has neither hostPath nor local: "
                "the local kubelet mounts only those"
            )
        Path(path).mkdir(parents=True, exist_ok=True)
        return Path(path)

    async def _volume_files(
        self, volume: dict, config: ConfigReader
    ) -> dict[str, tuple[bytes, int]] | None:
        """The files of a configMap, secret, downwardAPI or projected volume (None: another
        kind), as relative path → (content, mode)."""
        for kind in ("configMap", "secret", "downwardAPI"):
            if kind in volume:
                source = volume[kind] or {}
                return await self._source_files(
                    kind, source, source.get("defaultMode", 0o644), config
                )
        if "projected" not in volume:
            return None
        projected = volume["projected"] or {}
        mode = projected.get("defaultMode", 0o644)
        files: dict[str, tuple[bytes, int]] = {}
        for source in projected.get("sources") or []:
            for kind, part in source.items():
                files.update(await self._source_files(kind, part or {}, mode, config))
        return files

    async def _source_files(
        self, kind: str, source: dict, mode: int, config: ConfigReader
    ) -> dict[str, tuple[bytes, int]]:
        if kind == "serviceAccountToken":
            return {source.get("path", "token"): (await self._token(source), mode)}
        if kind == "downwardAPI":
            return {
                item["path"]: (self._downward_value(item).encode(), item.get("mode", mode))
                for item in source.get("items") or []
            }
        if kind not in ("configMap", "secret"):
            raise VolumeNotReady(f"projected source {kind} is not supported by the local kubelet")
        plural, name = (
            ("configmaps", source.get("name"))
            if kind == "configMap"
            else ("secrets", source.get("secretName") or source.get("name"))
        )
        data = await config.required(plural, name or "", bool(source.get("optional")))
        items = source.get("items")
        if not items:
            return {key: (value, mode) for key, value in data.items()}
        missing = [i["key"] for i in items if i["key"] not in data]
        if missing and not source.get("optional"):
            what = (
                "configmap references non-existent config"
                if kind == "configMap"
                else "secret references non-existent secret"
            )
            raise VolumeNotReady(f"{what} key: {missing[0]}")
        return {i["path"]: (data[i["key"]], i.get("mode", mode)) for i in items if i["key"] in data}

    def _downward_value(self, item: dict, container_name: str = "") -> str:
        ip = self.address.ip if self.address else ""
        if "fieldRef" in item:
            return field_ref(
                self.pod, item["fieldRef"].get("fieldPath", ""), ip, self.kubelet.network.gateway
            )
        ref = item.get("resourceFieldRef") or {}
        name = ref.get("containerName") or container_name
        return resource_field_ref(self.pod, name, ref, self.kubelet.allocatable)

    async def _token(self, source: dict) -> bytes:
        account = (self.pod.get("spec") or {}).get("serviceAccountName") or "default"
        spec: dict = {
            "expirationSeconds": source.get("expirationSeconds") or DEFAULT_TOKEN_SECONDS,
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": self.name,
                "uid": self.uid,
            },
        }
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        path = f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token"
        try:
            answer = await self.kubelet.client.request("POST", path, body)
        except ApiError as error:
            raise VolumeNotReady(f"failed to fetch token: {error.message}") from error
        return answer["status"]["token"].encode()

    # ---- containers

    async def _launch(self, container: dict, volumes: dict[str, Mount]) -> ContainerLaunch:
        config = ConfigReader(self.kubelet.client, self.namespace)
        values = await self._container_env(container, config)
        service = self.kubelet.service_env()
        argv = [
            expand(a, {**service, **values})
            for a in (container.get("command") or []) + (container.get("args") or [])
        ]
        env = {**self.kubelet.base_env(), **service, "HOSTNAME": pod_hostname(self.pod), **values}
        index = (self.pod["metadata"].get("annotations") or {}).get(INDEX_KEY)
        if index is not None:  # the Job controller injects it too; here for pods made by hand
            env.setdefault("JOB_COMPLETION_INDEX", index)
        mounts = []
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount.get("name"))
            if volume is not None:
                mounts.append(_container_mount(volume, mount, values))
        try:
            identity = container_identity(self.pod.get("spec") or {}, container)
        except RunAsRootRefused as error:
            raise ContainerConfigError(str(error)) from error
        if not identity.is_root and "HOME" not in values:
            # the image's home, writable by its user (the pod directory's parents are not
            # open to it: a mount)
            mounts.append(Mount(HOME, self._home(identity)))
            env["HOME"] = HOME
        return ContainerLaunch(argv, env, mounts, container.get("workingDir"), identity)

    def _image_stage(self) -> str:
        stage = self.pod_dir / "image"
        stage.mkdir(exist_ok=True)
        stage.chmod(0o755)
        return str(stage)

    def _home(self, identity: Identity) -> str:
        home = self.pod_dir / "home" / str(identity.uid)
        home.mkdir(parents=True, exist_ok=True)
        os.chown(home, identity.uid, identity.gid)
        return str(home)

    async def _container_env(self, container: dict, config: ConfigReader) -> dict[str, str]:
        values: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix") or ""
            for kind, plural in (("configMapRef", "configmaps"), ("secretRef", "secrets")):
                ref = source.get(kind)
                if ref:
                    data = await config.required(
                        plural, ref.get("name", ""), bool(ref.get("optional"))
                    )
                    values.update({prefix + k: v.decode(errors="replace") for k, v in data.items()})
        for item in container.get("env") or []:
            defined = {**self.kubelet.service_env(), **values}  # what `$(VAR)` may refer to
            value = await self._env_value(item, container, defined, config)
            if value is not None:
                values[item["name"]] = value
        return values

    async def _env_value(
        self, item: dict, container: dict, defined: dict[str, str], config: ConfigReader
    ) -> str | None:
        source = item.get("valueFrom")
        if source is None:
            return expand(str(item.get("value", "")), defined)
        if "fieldRef" in source or "resourceFieldRef" in source:
            return self._downward_value(source, container["name"])
        if "configMapKeyRef" in source:
            return await config.key("configmaps", source["configMapKeyRef"])
        if "secretKeyRef" in source:
            return await config.key("secrets", source["secretKeyRef"])
        raise ContainerConfigError(f"unsupported valueFrom in env {item.get('name')}")

    async def _start(
        self, record: ContainerRecord, launch: ContainerLaunch, log_file: Any
    ) -> asyncio.subprocess.Process | None:
        """Starts one container; None (and a StartError state) when its executable is missing."""
        argv0 = launch.argv[0] if launch.argv else ""
        search_path = launch.env.get("PATH", os.defpath)
        workdir = launch.workdir or str(self.pod_dir)
        if not argv0 or not find_executable(argv0, search_path, launch.mounts, workdir):
            message = start_error_message(argv0, launch.mounts)
            return await self._start_failed(record, message)
        identity, tools = launch.identity, self.kubelet.tools
        image_view = [] if identity.is_root else image_view_lines(IMAGE_PATHS, self._image_stage())
        script = launch_script(
            pod_hostname(self.pod), launch.mounts, launch.workdir, str(self.pod_dir),
            image_view, exec_prefix(tools["setpriv"], identity),
        )  # fmt: skip
        assert self.address is not None
        try:
            process = await asyncio.create_subprocess_exec(
                *container_argv(self.kubelet.tools, self.address.netns, script, launch.argv),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=launch.env,
                cwd=str(self.pod_dir),
                start_new_session=True,  # one process group: torchrun's workers get signals too
            )
        except OSError as error:
            return await self._start_failed(record, f"failed to start container: {error}")
        self.processes[record.name] = process
        record.container_id = f"local://{process.pid}"
        record.set("running", startedAt=now_iso())
        record.ready = record.started = True
        await self.event("Created", f"Created container: {record.name}", container=record.name)
        await self.event("Started", f"Started container {record.name}", container=record.name)
        return process

    async def _start_failed(self, record: ContainerRecord, message: str) -> None:
        now = now_iso()
        record.set(
            "terminated",
            exitCode=128,
            reason="StartError",
            message=message,
            startedAt=now,
            finishedAt=now,
        )
        await self.event("Failed", f"Error: {message}", True, record.name)

    async def _wait(self, record: ContainerRecord, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        _signal_group(process, signal.SIGKILL)  # what the container left behind dies with it
        started = record.state.get("running", {}).get("startedAt") or now_iso()
        terminated = terminated_state(code, self.killed, started, record.container_id or "")
        if code != 0 and self._container(record.name).get("terminationMessagePolicy") == (
            "FallbackToLogsOnError"
        ):
            terminated["message"] = log_tail(self.kubelet.log_path(self.namespace, self.name))
        record.set("terminated", **terminated)
        record.ready = False

    def _container(self, name: str) -> dict:
        spec = self.pod.get("spec") or {}
        containers = (spec.get("initContainers") or []) + (spec.get("containers") or [])
        return next((c for c in containers if c.get("name") == name), {})

    async def _run_init_containers(self, volumes: dict[str, Mount]) -> bool:
        """Runs the init containers one after the other; False (pod Failed) if one fails."""
        spec = self.pod.get("spec") or {}
        for container, record in zip(spec.get("initContainers") or [], self.init_records):
            launch = await self._until_ready(lambda c=container: self._launch(c, volumes))
            with self._open_log() as log_file:
                process = None if self.killed else await self._start(record, launch, log_file)
            if process is not None:
                await self.write_status()
                await self._wait(record, process)
            if record.kind != "terminated" or record.state["terminated"]["exitCode"] != 0:
                await self._finish()
                return False
            record.started = False
        for record in self.records:
            record.set("waiting", reason="ContainerCreating", message=None)
        await self.write_status()
        return True

    async def _run_containers(self, volumes: dict[str, Mount]) -> None:
        containers = (self.pod.get("spec") or {}).get("containers") or []
        launches = await self._until_ready(
            lambda: asyncio.gather(*(self._launch(c, volumes) for c in containers))
        )
        waits = []
        with self._open_log() as log_file:
            for record, launch in zip(self.records, launches):
                if self.killed:
                    break
                process = await self._start(record, launch, log_file)
                if process is not None:
                    waits.append(self._wait(record, process))
        if waits:
            self.phase = "Running"
            await self.write_status()
            await asyncio.gather(*waits)
        await self._finish()

    async def _finish(self) -> None:
        for record in self.init_records + self.records:
            record.ready = record.started = False
        exits = [r.state.get("terminated", {}).get("exitCode") for r in self.records]
        self.phase = "Succeeded" if exits and all(code == 0 for code in exits) else "Failed"
        await self.write_status()

    def _open_log(self) -> Any:
        path = self.kubelet.log_path(self.namespace, self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "ab")

    # ---- termination

    async def terminate(self, grace: float) -> None:
        """SIGTERM to every process group, SIGKILL after `grace` seconds; the pod task writes
        the final status when the processes are gone. A pod that runs nothing is just ended."""
        self.killed = True
        task = self.task
        if task is None or task.done():
            return
        live = [p for p in self.processes.values() if p.returncode is None]
        if not live and self.phase not in TERMINAL:  # not mid-way writing its final status
            task.cancel()
        for process in live:
            _signal_group(process, signal.SIGTERM)
        done, _ = await asyncio.wait({task}, timeout=max(grace, 0.0))
        if not done:
            for process in self.processes.values():
                _signal_group(process, signal.SIGKILL)
            await asyncio.wait({task}, timeout=10)


def _record(container: dict, waiting: str) -> ContainerRecord:
    return ContainerRecord(
        container["name"],
        container.get("image", ""),
        {"waiting": {"reason": waiting, "message": None}},
    )


def _container_mount(volume: Mount, mount: dict, env: dict[str, str]) -> Mount:
    read_only = volume.read_only or bool(mount.get("readOnly"))
    target = mount.get("mountPath", "")
    if volume.tmpfs:
        return Mount(target, tmpfs=True, size=volume.size)
    source = volume.source
    sub_path = mount.get("subPath") or expand(mount.get("subPathExpr") or "", env)
    if sub_path:
        source = _make_sub_path(volume.source, sub_path)
    return Mount(target, source, read_only, is_file=os.path.isfile(source))


def _make_sub_path(base: str, sub_path: str) -> str:
    """The kubelet creates a missing subPath, each directory with the volume root's mode (so
    an fsGroup's group may write there too; the setgid bit hands the group down)."""
    mode = stat.S_IMODE(os.stat(base).st_mode)
    path = base
    for part in Path(sub_path).parts:
        path = os.path.join(path, part)
        if not os.path.exists(path):
            os.mkdir(path)
            os.chmod(path, mode)
    return path


def _host_path_volume(source: dict) -> str:
    path, kind = source.get("path", "/"), source.get("type") or ""
    if kind == "DirectoryOrCreate":
        os.makedirs(path, exist_ok=True)
    elif kind == "FileOrCreate" and not os.path.exists(path):
        Path(path).touch()
    elif kind in ("Directory", "File") and not os.path.exists(path):
        raise VolumeNotReady(f"hostPath type check failed: {path} is not a {kind.lower()}")
    return path


def _write_files(directory: Path, files: dict[str, tuple[bytes, int]]) -> None:
    for relative, (content, mode) in files.items():
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(mode)


def _signal_group(process: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


# ---------------------------------------------------------------- logs over HTTPS


class LogServer:
    """Serves `GET /containerLogs/<ns>/<pod>/<container>` (what `kubectl logs` asks the API
    server for, which asks the kubelet) on the gateway address. `follow=true` streams until
    the pod's processes end; `tailLines` is honoured; any client certificate is accepted."""

    def __init__(self, kubelet: Kubelet, host: str, cert_file: Path, key_file: Path) -> None:
        self.kubelet = kubelet
        self.ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ssl.load_cert_chain(str(cert_file), str(key_file))
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, 0))
        self.port: int = self.socket.getsockname()[1]
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self._logs)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.SockSite(self._runner, self.socket, ssl_context=self.ssl).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self.socket.close()

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        namespace, pod = request.match_info["namespace"], request.match_info["pod"]
        path = self.kubelet.log_path(namespace, pod)
        if not path.is_file():
            raise web.HTTPNotFound(text=f"no logs of pod {namespace}/{pod}\n")
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        with open(path, "rb") as logs:
            text = logs.read()
            tail = request.query.get("tailLines")
            if tail is not None and tail.isdigit():
                text = b"".join(text.splitlines(keepends=True)[-int(tail) :]) if int(tail) else b""
            await response.write(text)
            while request.query.get("follow") == "true":
                running = self.kubelet.pod_running(namespace, pod)
                chunk = logs.read()
                if chunk:
                    await response.write(chunk)
                elif not running:
                    break
                else:
                    await asyncio.sleep(0.2)
        await response.write_eof()
        return response


# ---------------------------------------------------------------- PV provisioner


class DirectoryProvisioner:
    """Provisions a PersistentVolume for each unbound claim of `storage_class` (or annotated
    for provisioner `instseg.io/local-dir`): hostPath root/volumes/<ns>/<claim>, reclaim
    policy Delete, pre-bound to the claim (the PV controller binds them). A Released volume it
    provisioned is deleted as an object; its directory (the user's data) stays, and a claim of
    the same name gets it back. Needs a credential that may create PersistentVolumes."""

    def __init__(
        self,
        client: KubeClient,
        root: Path,
        storage_class: str,
        spawn: Callable[[Coroutine, str], asyncio.Task],
    ) -> None:
        self.client, self.root, self.storage_class = client, Path(root), storage_class
        self.spawn = spawn  # runs a coroutine as a logged background task
        self.claims = Informer(client, "/api/v1/persistentvolumeclaims", self._on_claim)
        self.volumes = Informer(client, "/api/v1/persistentvolumes", self._on_volume)
        self._busy: set[str] = set()

    async def run(self) -> None:
        await asyncio.gather(self.claims.run(), self.volumes.run())

    def wants(self, claim: dict) -> bool:
        meta, spec = claim.get("metadata") or {}, claim.get("spec") or {}
        annotations = meta.get("annotations") or {}
        ours = spec.get("storageClassName") == self.storage_class or PROVISIONER in (
            annotations.get("volume.kubernetes.io/storage-provisioner"),
            annotations.get("volume.beta.kubernetes.io/storage-provisioner"),
        )
        return ours and not spec.get("volumeName") and not meta.get("deletionTimestamp")

    def _on_claim(self, kind: str, claim: dict) -> None:
        uid = claim["metadata"]["uid"]
        if kind != "DELETED" and self.wants(claim) and uid not in self._busy:
            self._busy.add(uid)
            self.spawn(self._provision(claim), f"provision {claim['metadata']['name']}")

    def _on_volume(self, kind: str, volume: dict) -> None:
        meta, status = volume["metadata"], volume.get("status") or {}
        released = status.get("phase") == "Released" and not meta.get("deletionTimestamp")
        ours = (meta.get("annotations") or {}).get("pv.kubernetes.io/provisioned-by") == PROVISIONER
        delete = (volume.get("spec") or {}).get("persistentVolumeReclaimPolicy") == "Delete"
        if kind != "DELETED" and released and ours and delete:
            self.spawn(self._delete(meta["name"]), f"delete volume {meta['name']}")

    async def _provision(self, claim: dict) -> None:
        try:
            volume = self.volume_for(claim)
            path = Path(volume["spec"]["hostPath"]["path"])
            path.mkdir(parents=True, exist_ok=True)
            # root's and 0755, like a fresh filesystem on a block device: a pod that does not
            # run as root writes there only through fsGroup
            path.chmod(0o755)
            try:
                await self.client.request("POST", "/api/v1/persistentvolumes", volume)
                log.info("provisioned %s at %s", volume["metadata"]["name"], path)
            except ApiError as error:
                if error.status != 409:
                    raise
        finally:
            self._busy.discard(claim["metadata"]["uid"])

    def volume_for(self, claim: dict) -> dict:
        """The PersistentVolume provisioned for `claim`."""
        meta, spec = claim["metadata"], claim.get("spec") or {}
        namespace, name = meta["namespace"], meta["name"]
        storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
        return {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": f"pvc-{meta['uid']}",
                "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
            },
            "spec": {
                "capacity": {"storage": storage},
                "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                "volumeMode": spec.get("volumeMode") or "Filesystem",
                "storageClassName": spec.get("storageClassName") or self.storage_class,
                "persistentVolumeReclaimPolicy": "Delete",
                "hostPath": {
                    "path": str(self.root / "volumes" / namespace / name),
                    "type": "DirectoryOrCreate",
                },
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": namespace,
                    "name": name,
                    "uid": meta["uid"],
                },
            },
        }

    async def _delete(self, name: str) -> None:
        try:
            await self.client.request("DELETE", f"/api/v1/persistentvolumes/{name}")
            log.info("deleted released volume %s (its directory stays)", name)
        except ApiError as error:
            if error.status != 404:
                raise


# ---------------------------------------------------------------- the kubelet


class Kubelet:
    """The node `node_name` of the local cluster (see the module docstring).

    `cert_file`/`key_file`: the kubelet's client certificate (CN `system:node:<node_name>`,
    O `system:nodes`). `provisioner_cert_file`/`provisioner_key_file`: a credential that may
    create and delete PersistentVolumes, for the DirectoryProvisioner this kubelet runs
    (default: the kubelet's own, which the Node authorizer refuses). `serving_cert_file`/
    `serving_key_file`: the log server's certificate for the gateway address (default: the
    client certificate; the API server does not verify it without
    `--kubelet-certificate-authority`)."""

    def __init__(
        self,
        *,
        server: str,
        ca_file: Path,
        cert_file: Path,
        key_file: Path,
        root: Path,
        network: PodNetwork,
        node_name: str = "local",
        gpus: int = 8,
        cpu: str = "16",
        memory: str = "64Gi",
        storage_class: str = "local-dir",
        provisioner_cert_file: Path | None = None,
        provisioner_key_file: Path | None = None,
        serving_cert_file: Path | None = None,
        serving_key_file: Path | None = None,
    ) -> None:
        self.server, self.root, self.network = server, Path(root), network
        self.node_name, self.storage_class = node_name, storage_class
        self.api_port = str(urlsplit(server).port or 443)
        self.allocatable = {
            "cpu": cpu,
            "memory": memory,
            "pods": "110",
            GPU: str(gpus),
            "ephemeral-storage": "100Gi",
        }
        self._serving = (serving_cert_file or cert_file, serving_key_file or key_file)
        self.tools = _tool_paths()
        self.client = KubeClient(server, ca_file, cert_file, key_file)
        self.provisioner_client = KubeClient(
            server, ca_file, provisioner_cert_file or cert_file, provisioner_key_file or key_file
        )
        self.log_server: LogServer | None = None
        self.node: dict = {}
        self.workers: dict[str, PodWorker] = {}
        self._tasks: set[asyncio.Task] = set()
        self._deleting: set[str] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._last_error = "none"  # why the node is not registered yet

    # ---- public

    def start(self) -> Kubelet:
        """Starts the kubelet thread; returns once the Node is registered Ready."""
        if self._thread is not None:
            return self
        self._started.clear()
        self._start_error = None
        self._thread = threading.Thread(
            target=self._thread_main, name=f"kubelet-{self.node_name}", daemon=True
        )
        self._thread.start()
        self._started.wait(START_TIMEOUT + 10)
        if self._start_error is not None:
            self.stop()
            raise RuntimeError(
                f"the local kubelet could not start: {self._start_error}"
            ) from self._start_error
        return self

    def stop(self) -> None:
        """Stops every pod (SIGTERM, SIGKILL after 5 s), removes their network namespaces and
        ends the thread. Safe to call twice."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None and self._stop_event is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(self._stop_event.set)
        thread.join(timeout=SHUTDOWN_GRACE + 30)
        if thread.is_alive():
            log.error("the kubelet thread did not end")
        self._thread = None

    def log_path(self, namespace: str, pod: str) -> Path:
        return self.root / "logs" / namespace / f"{pod}.log"

    # ---- thread and loop

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()
            self._started.set()

    async def _main(self) -> None:
        self._stop_event = asyncio.Event()
        try:
            await asyncio.wait_for(self._start_services(), START_TIMEOUT)
        except asyncio.TimeoutError:
            self._start_error = TimeoutError(
                f"node {self.node_name} not Ready within {START_TIMEOUT:.0f} s "
                f"(last error: {self._last_error})"
            )
        except Exception as error:
            self._start_error = error
        else:
            self._started.set()
            await self._stop_event.wait()
        finally:
            self._started.set()
            await self._shutdown()

    async def _start_services(self) -> None:
        """Log server, Node (schedulable), heartbeats, pods, volume provisioner."""
        self.log_server = LogServer(self, self.network.gateway, *self._serving)
        await self.log_server.start()
        await self._register_node()
        await self._until_schedulable()
        selector = {"fieldSelector": f"spec.nodeName={self.node_name}"}
        pods = Informer(self.client, "/api/v1/pods", self._on_pod, selector)
        provisioner = DirectoryProvisioner(
            self.provisioner_client, self.root, self.storage_class, self.spawn
        )
        self.spawn(self._heartbeats(), "node heartbeats")
        self.spawn(pods.run(), "pod informer")
        self.spawn(provisioner.run(), "volume provisioner")
        await pods.synced.wait()

    def spawn(self, coroutine: Coroutine, name: str) -> asyncio.Task:
        """A background task whose failure is logged, never lost."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)

        def done(finished: asyncio.Task) -> None:
            self._tasks.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                log.error("%s failed", name, exc_info=finished.exception())

        task.add_done_callback(done)
        return task

    async def _shutdown(self) -> None:
        workers = list(self.workers.values())
        for worker in workers:
            worker.silent = True
        await asyncio.gather(
            *(w.terminate(SHUTDOWN_GRACE) for w in workers), return_exceptions=True
        )
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in workers:  # a pod task cancelled before its own clean-up ran
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.network.remove_pod, worker.uid)
        if self.log_server is not None:
            await self.log_server.stop()
        await self.client.close()
        await self.provisioner_client.close()

    # ---- node

    def node_manifest(self) -> dict:
        hostname_labels = {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
        }
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node_name, "labels": hostname_labels},
            "spec": {},
            "status": self.node_status(),
        }

    def node_status(self) -> dict:
        now = now_iso()
        port = self.log_server.port if self.log_server else 0
        return {
            "capacity": dict(self.allocatable),
            "allocatable": dict(self.allocatable),
            "conditions": [
                {
                    "type": kind,
                    "status": status,
                    "reason": reason,
                    "message": message,
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
                for kind, status, reason, message in NODE_CONDITIONS
            ],
            "addresses": [
                {"type": "InternalIP", "address": self.network.gateway},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "osImage": "local",
                "kernelVersion": os.uname().release,
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "containerRuntimeVersion": RUNTIME_VERSION,
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }

    async def _register_node(self) -> None:
        """Creates the Node (or, for a restarted kubelet, patches its status); retried while
        the API server is unreachable or not ready, refused requests raise."""
        while True:
            try:
                try:
                    self.node = await self.client.request(
                        "POST", "/api/v1/nodes", self.node_manifest()
                    )
                except ApiError as error:
                    if error.status != 409:
                        raise
                    self.node = await self._patch_node_status(self.node_status())
                return
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
                self._last_error = f"{type(error).__name__}: {error}"
            except ApiError as error:
                if error.status not in (429, 500, 503):
                    raise
                self._last_error = str(error)
            await asyncio.sleep(0.5)

    async def _until_schedulable(self) -> None:
        """Waits until the node lifecycle controller has lifted the not-ready taint that the
        API server puts on every new Node (pods created from then on schedule at once)."""
        while True:
            node = await self.client.request("GET", f"/api/v1/nodes/{self.node_name}")
            taints = (node.get("spec") or {}).get("taints") or []
            if not any(t.get("key") == "node.kubernetes.io/not-ready" for t in taints):
                return
            await asyncio.sleep(0.25)

    async def _patch_node_status(self, status: dict) -> dict:
        path = f"/api/v1/nodes/{self.node_name}/status"
        return await self.client.request("PATCH", path, {"status": status}, content_type=STRATEGIC)

    async def _heartbeats(self) -> None:
        """Lease every 10 s, Ready's lastHeartbeatTime every 30 s: the node lifecycle
        controller never sees the node as not ready."""
        last_status = time.monotonic()
        while True:
            try:
                await self._renew_lease()
                if time.monotonic() - last_status >= HEARTBEAT_SECONDS:
                    now = now_iso()  # conditions merge by type: their transition times stay
                    beats = [{"type": c[0], "lastHeartbeatTime": now} for c in NODE_CONDITIONS]
                    await self._patch_node_status({"conditions": beats})
                    last_status = time.monotonic()
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
                log.warning("node heartbeat: %r", error)
            await asyncio.sleep(LEASE_RENEW_SECONDS)

    async def _renew_lease(self) -> None:
        base = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
        spec = {
            "holderIdentity": self.node_name,
            "leaseDurationSeconds": LEASE_DURATION_SECONDS,
            "renewTime": micro_time(),
        }
        try:
            await self.client.request(
                "PATCH", f"{base}/{self.node_name}", {"spec": spec}, content_type=MERGE
            )
        except ApiError as error:
            if error.status != 404:
                raise
            owner = {
                "apiVersion": "v1",
                "kind": "Node",
                "name": self.node_name,
                "uid": self.node["metadata"]["uid"],
            }
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": self.node_name,
                    "namespace": "kube-node-lease",
                    "ownerReferences": [owner],
                },
                "spec": spec,
            }
            await self.client.request("POST", base, lease)

    async def post_event(
        self, pod: dict, reason: str, message: str, warning: bool, container: str
    ) -> None:
        meta = pod["metadata"]
        now = now_iso()
        involved = {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "resourceVersion": meta.get("resourceVersion"),
        }
        if container:
            involved["fieldPath"] = f"spec.containers{{{container}}}"
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{meta['name']}.{time.time_ns():x}",
                "namespace": meta["namespace"],
            },
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "type": "Warning" if warning else "Normal",
            "source": {"component": "kubelet", "host": self.node_name},
            "reportingComponent": "kubelet",
            "reportingInstance": self.node_name,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.client.request(
                "POST", f"/api/v1/namespaces/{meta['namespace']}/events", body
            )
        except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as error:
            log.info("event %s of pod %s: %r", reason, meta["name"], error)

    # ---- pods

    def _on_pod(self, kind: str, pod: dict) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        worker = self.workers.get(uid)
        if kind == "DELETED":
            self.workers.pop(uid, None)
            self._deleting.discard(uid)
            if worker is not None:  # removed without waiting for us: kill at once
                worker.silent = True
                self.spawn(worker.terminate(0), f"kill pod {meta['name']}")
            return
        if worker is not None:
            worker.pod = pod
        if meta.get("deletionTimestamp"):
            if uid not in self._deleting:
                self._deleting.add(uid)
                self.spawn(self._delete_pod(pod, worker), f"delete pod {meta['name']}")
        elif worker is None and (pod.get("status") or {}).get("phase") not in TERMINAL:
            worker = self.workers[uid] = PodWorker(self, pod)
            worker.start()

    async def _delete_pod(self, pod: dict, worker: PodWorker | None) -> None:
        """Graceful deletion: stop the containers, write their final status, then remove the
        pod object (the API server waits for this)."""
        meta, spec = pod["metadata"], pod.get("spec") or {}
        if worker is not None:
            grace = meta.get("deletionGracePeriodSeconds")
            if grace is None:
                grace = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE)
            for name, process in worker.processes.items():
                if process.returncode is None:
                    await worker.event("Killing", f"Stopping container {name}", container=name)
            await worker.terminate(float(grace))
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": meta["uid"]},
        }
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
        for attempt in range(5):  # the pod stays Terminating until this goes through
            try:
                await self.client.request("DELETE", path, body)
                return
            except ApiError as error:
                if error.status in (404, 409):  # gone already, or a same-named new pod
                    return
                log.warning("deleting pod %s (try %d): %s", meta["name"], attempt, error)
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                log.warning("deleting pod %s (try %d): %r", meta["name"], attempt, error)
            await asyncio.sleep(1.0)

    def refresh_hosts(self, namespace: str) -> None:
        """Rewrites the hosts file of every running pod of `namespace`."""
        running = [
            (w.pod, w.address)
            for w in self.workers.values()
            if w.namespace == namespace and w.running and w.address is not None
        ]
        neighbours = [(pod, address.ip) for pod, address in running]
        for pod, address in running:
            self.network.set_hosts(address.netns, hosts_entries(pod, address.ip, neighbours))

    def pod_running(self, namespace: str, name: str) -> bool:
        return any(
            w.namespace == namespace and w.name == name and w.task and not w.task.done()
            for w in self.workers.values()
        )

    def service_env(self) -> dict[str, str]:
        """What the `kubernetes` Service's env vars tell a pod: where the API server is."""
        host, port = self.network.gateway, self.api_port
        return {
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": f"tcp://{host}:{port}",
            "KUBERNETES_PORT_443_TCP": f"tcp://{host}:{port}",
            "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
            "KUBERNETES_PORT_443_TCP_ADDR": host,
            "KUBERNETES_PORT_443_TCP_PORT": port,
        }

    def base_env(self) -> dict[str, str]:
        """This process's environment, with this Python's bin directory first on PATH."""
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        bin_dir = os.path.dirname(sys.executable)
        path = env.get("PATH", os.defpath)
        env["PATH"] = bin_dir + os.pathsep + path if bin_dir not in path.split(os.pathsep) else path
        return env


def _tool_paths() -> dict[str, str]:
    """Absolute paths of what starts a container (PATH may lack /usr/sbin)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
    names = ("ip", "unshare", "sh", "setpriv")
    tools = {name: shutil.which(name, path=search) for name in names}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        raise RuntimeError(
            f"the local kubelet needs {', '.join(missing)} (iproute2, util-linux) to run pods"
        )
    return {name: str(path) for name, path in tools.items()}
