"""A test cluster: the API emulator (tests/kube) with its Job controller and local kubelet,
our CRDs, the operator as a real `instseg-operator` process, and kubectl — as a user has.

Used by the operator's end-to-end tests and by benchmarks/operator_latency.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml

from tests.kube.emulator import Emulator

ROOT = Path(__file__).resolve().parents[1]
CRDS = [ROOT / "crds" / "instancesegtrainings.yaml", ROOT / "crds" / "kopf-peering.yaml"]
PEERING = {
    "apiVersion": "kopf.dev/v1",
    "kind": "ClusterKopfPeering",
    "metadata": {"name": "instseg"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def kubectl_binary() -> str | None:
    return os.environ.get("KUBECTL") or shutil.which("kubectl")


class Kubectl:
    """kubectl against the emulator, with its own cache directory."""

    def __init__(self, kubeconfig: Path, cache: Path) -> None:
        binary = kubectl_binary()
        if binary is None:
            raise RuntimeError("kubectl not found: run `make tools` (or set KUBECTL)")
        self.binary, self.kubeconfig = binary, kubeconfig
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
        return self("apply", "--validate=false", "-f", "-", stdin=text)

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


def start_cluster(root: Path, **emulator_options) -> tuple[Emulator, Kubectl]:
    """The emulator with our CRDs and the peering object installed."""
    emulator = Emulator(root / "cluster", **emulator_options)
    emulator.start()
    kubectl = Kubectl(emulator.kubeconfig, root / "kubectl-cache")
    for crd in CRDS:
        kubectl("apply", "--validate=false", "-f", str(crd))
    wait_for(
        "the InstanceSegTraining API",
        lambda: "instancesegtrainings" in kubectl("api-resources", check=False),
        timeout=30,
    )
    kubectl.apply(PEERING)
    return emulator, kubectl


def pvc(name: str, namespace: str = "default") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
