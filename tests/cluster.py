"""A test cluster as a user has one: the real control plane with the local kubelet
(tests/kube), the chart's CRDs and RBAC applied from `helm template`, the operator as a real
`instseg-operator` process with the chart's ServiceAccount token, and kubectl.

Used by the operator's end-to-end tests and by the operator benchmarks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.kube.controlplane import free_port, write_kubeconfig
from tests.kube.local import LocalCluster

ROOT = Path(__file__).resolve().parents[1]
OPERATOR_NAMESPACE = "instseg-system"
# what the operator needs from the chart; its Deployment is replaced by a local process
CHART_KINDS = {"CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
               "Role", "RoleBinding", "ClusterKopfPeering", "KopfPeering"}  # fmt: skip


def wait_for(
    what: str,
    check: Callable[[], object],
    timeout: float,
    every: float = 0.2,
    ignore: tuple[type[BaseException], ...] = (),
):
    """Polls `check` until it returns something truthy; fails naming `what` on timeout.
    Exceptions of the `ignore` types count as "not yet" (the last one is reported)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except ignore as e:
            last = e
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def tool(name: str) -> str | None:
    """kubectl or helm: $KUBECTL/$HELM, then PATH, then what `make tools` fetched."""
    local = ROOT / ".tools" / "bin" / name
    found = os.environ.get(name.upper()) or shutil.which(name)
    return found or (str(local) if local.is_file() else None)


def kubectl_binary() -> str | None:
    return tool("kubectl")


class Kubectl:
    """kubectl with its own kubeconfig and cache directory."""

    def __init__(self, kubeconfig: Path, cache: Path) -> None:
        binary = kubectl_binary()
        if binary is None:
            raise RuntimeError("kubectl not found: run `make tools` (or set KUBECTL)")
        self.binary, self.kubeconfig, self.cache = binary, kubeconfig, cache
        self.env = {**os.environ, "KUBECACHEDIR": str(cache), "KUBECONFIG": str(kubeconfig)}

    def __call__(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        done = subprocess.run(
            [self.binary, *args], input=stdin, capture_output=True, text=True,
            env=self.env, timeout=300,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {done.stderr or done.stdout}")
        return done.stdout if check else done.stdout + done.stderr

    def apply(self, *objects: dict) -> str:
        text = yaml.safe_dump_all(list(objects))
        return self("apply", "-f", "-", stdin=text)

    def json(self, *args: str) -> dict:
        return json.loads(self("get", *args, "-o", "json"))


class OperatorProcess:
    """`instseg-operator` in its own process, as the Deployment runs it."""

    def __init__(self, kubeconfig: Path, log: Path, *extra: str, priority: int | None = None):
        self.metrics_port, self.probe_port = free_port(), free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "INSTSEG_METRICS_PORT": str(self.metrics_port),
            "INSTSEG_METRICS_ADDRESS": "127.0.0.1",
            "INSTSEG_TRAINER_IMAGE": "ghcr.io/instseg/trainer:test",
        }
        if priority is not None:
            env["INSTSEG_PEERING_PRIORITY"] = str(priority)
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "instseg_operator",
             f"--liveness=http://127.0.0.1:{self.probe_port}/healthz", *extra],
            stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )  # fmt: skip

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the operator exited: {self.log.read_text()[-3000:]}")
        try:
            url = f"http://127.0.0.1:{self.probe_port}/healthz"
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 60) -> OperatorProcess:
        wait_for("the operator's liveness probe", self.healthy, timeout)
        return self

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def render_chart(*values: str) -> list[dict]:
    """`helm template` of charts/instseg into the operator's namespace, CRDs included."""
    helm = tool("helm")
    if helm is None:
        raise RuntimeError("helm not found: run `make tools` (or set HELM)")
    command = [helm, "template", "instseg", str(ROOT / "charts" / "instseg"),
               "--namespace", OPERATOR_NAMESPACE, "--include-crds", *values]  # fmt: skip
    rendered = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def install_chart(cluster: LocalCluster, kubectl: Kubectl, *values: str) -> Path:
    """Applies what the chart renders for the operator (CRDs, ServiceAccount, RBAC, peering)
    and returns a kubeconfig with a token of the chart's ServiceAccount: the operator then
    runs with exactly the chart's permissions."""
    kubectl.apply({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": OPERATOR_NAMESPACE}})  # fmt: skip
    objects = [o for o in render_chart(*values) if o["kind"] in CHART_KINDS]
    crds = [o for o in objects if o["kind"] == "CustomResourceDefinition"]
    kubectl.apply(*crds)
    for crd in crds:
        kubectl("wait", "--for=condition=Established", f"crd/{crd['metadata']['name']}")
    kubectl.apply(*[o for o in objects if o["kind"] != "CustomResourceDefinition"])
    (account,) = [o for o in objects if o["kind"] == "ServiceAccount"]
    name = account["metadata"]["name"]
    token = kubectl("create", "token", name, "-n", OPERATOR_NAMESPACE, "--duration=24h").strip()
    path = kubectl.cache.parent / "operator.kubeconfig"
    return write_kubeconfig(path, cluster.server, cluster.control_plane.ca.cert, token)


@dataclass
class KubeEnvironment:
    """The local cluster with the chart installed, an admin kubectl, and the kubeconfig the
    operator runs with (the chart's ServiceAccount)."""

    root: Path
    cluster: LocalCluster
    kubectl: Kubectl
    operator_kubeconfig: Path

    def stop(self) -> None:
        self.cluster.stop()


def start_cluster(root: Path, controllers: str = "*") -> KubeEnvironment:
    cluster = LocalCluster(root / "cluster", controllers=controllers).start()
    try:
        kubectl = Kubectl(cluster.kubeconfig, root / "kubectl-cache")
        return KubeEnvironment(root, cluster, kubectl, install_chart(cluster, kubectl))
    except BaseException:
        cluster.stop()
        raise


def pvc(name: str, namespace: str = "default") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
