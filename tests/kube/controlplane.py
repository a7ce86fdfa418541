"""The real Kubernetes control plane, as processes: etcd, kube-apiserver, kube-controller-manager
and kube-scheduler from the one `kube-controlplane` binary that `make tools` builds from
Kubernetes' Go modules (tests/kube/controlplane/), configured like a hardened cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from .pki import CertificateAuthority, KeyPair, write_signing_key_pair

REPO = Path(__file__).resolve().parents[2]
BINARY = REPO / ".tools" / "bin" / "kube-controlplane"
SERVICE_RANGE = "10.96.0.0/16"
ISSUER = "https://kubernetes.default.svc.cluster.local"
# what hardened clusters enable on top of Kubernetes' defaults
ADMISSION_PLUGINS = (
    "NamespaceLifecycle,LimitRanger,ServiceAccount,PodSecurity,ResourceQuota,"
    "DefaultStorageClass,OwnerReferencesPermissionEnforcement,NodeRestriction,Priority,"
    "DefaultTolerationSeconds,StorageObjectInUseProtection,RuntimeClass"
)


class ControlPlaneError(RuntimeError):
    """A component did not start; the message names it and ends with its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def control_plane_binary() -> Path:
    """The built binary, or an error that says how to build it."""
    if BINARY.is_file():
        return BINARY
    hint = "run `make tools`"
    if not shutil.which("go"):
        hint = "install Go 1.24 or newer, then run `make tools`"
    raise ControlPlaneError(f"{BINARY} is missing: {hint} (it builds the Kubernetes control plane)")


def write_kubeconfig(path: Path, server: str, ca: Path, credentials: KeyPair | str) -> Path:
    """A kubeconfig with one cluster, one user (a client certificate, or a bearer token) and
    one context in namespace default."""
    if isinstance(credentials, KeyPair):
        user = {"client-certificate": str(credentials.cert), "client-key": str(credentials.key)}
    else:
        user = {"token": credentials}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "local", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": "user", "user": user}],
        "contexts": [
            {
                "name": "local",
                "context": {"cluster": "local", "user": "user", "namespace": "default"},
            }
        ],
        "current-context": "local",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class ControlPlane:
    """etcd, kube-apiserver (on `address`), kube-controller-manager and kube-scheduler under
    `root`: pki/, etcd/, logs/<component>.log, and the admin kubeconfig at `kubeconfig`."""

    def __init__(
        self, root: Path, address: str, kubeconfig: Path | None = None, controllers: str = "*"
    ) -> None:
        self.root, self.address, self.controllers = Path(root), address, controllers
        self.pki = self.root / "pki"
        self.logs = self.root / "logs"
        self.kubeconfig = Path(kubeconfig) if kubeconfig else self.root / "kubeconfig"
        self.port, self.server = 0, ""  # chosen at start, once `address` exists
        self.processes: dict[str, subprocess.Popen] = {}

    # certificates -------------------------------------------------------------------------
    def _issue_certificates(self) -> None:
        self.ca = CertificateAuthority(self.pki)
        ips = (self.address, "127.0.0.1", "10.96.0.1")
        dns = ("kubernetes", "kubernetes.default", "kubernetes.default.svc", "localhost",
               "kubernetes.default.svc.cluster.local")  # fmt: skip
        self.serving = self.ca.issue("apiserver", "kube-apiserver", server_ips=ips, server_dns=dns)
        self.admin = self.ca.issue("admin", "kubernetes-admin", ("system:masters",))
        self.kubelet_client = self.ca.issue(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",)
        )
        self.service_account_keys = write_signing_key_pair(self.pki)
        write_kubeconfig(self.kubeconfig, self.server, self.ca.cert, self.admin)

    def component_kubeconfig(self, name: str, common_name: str, groups=()) -> Path:
        pair = self.ca.issue(name, common_name, tuple(groups))
        return write_kubeconfig(self.pki / f"{name}.kubeconfig", self.server, self.ca.cert, pair)

    # processes ----------------------------------------------------------------------------
    def _spawn(self, component: str, *flags: str) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{component}.log").open("ab")
        self.processes[component] = subprocess.Popen(
            [str(control_plane_binary()), component, *flags],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=self.root, start_new_session=True,
        )  # fmt: skip

    def _check_alive(self, component: str) -> None:
        process = self.processes[component]
        if process.poll() is not None:
            tail = (self.logs / f"{component}.log").read_text(errors="replace")[-3000:]
            raise ControlPlaneError(f"{component} exited with {process.returncode}:\n{tail}")

    def _start_etcd(self) -> str:
        client, peer = free_port(), free_port()
        client_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
        self._spawn(
            "etcd", "--name=default", f"--data-dir={self.root / 'etcd'}",
            f"--listen-client-urls={client_url}", f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}", "--log-level=warn",
            # a throw-away test store: durability on power loss buys nothing here
            "--unsafe-no-fsync",
        )  # fmt: skip
        return client_url

    def _start_apiserver(self, etcd_url: str) -> None:
        pki = self.pki
        self._spawn(
            "kube-apiserver",
            f"--etcd-servers={etcd_url}",
            f"--bind-address={self.address}", f"--advertise-address={self.address}",
            f"--secure-port={self.port}", f"--cert-dir={pki}",
            f"--tls-cert-file={self.serving.cert}", f"--tls-private-key-file={self.serving.key}",
            f"--client-ca-file={self.ca.cert}",
            "--authorization-mode=Node,RBAC", "--anonymous-auth=false",
            f"--enable-admission-plugins={ADMISSION_PLUGINS}",
            f"--service-account-issuer={ISSUER}",
            f"--service-account-key-file={self.service_account_keys.cert}",
            f"--service-account-signing-key-file={self.service_account_keys.key}",
            f"--service-cluster-ip-range={SERVICE_RANGE}",
            f"--kubelet-client-certificate={self.kubelet_client.cert}",
            f"--kubelet-client-key={self.kubelet_client.key}",
            f"--kubelet-certificate-authority={self.ca.cert}",
            "--kubelet-preferred-address-types=InternalIP",
            "--profiling=false", "--v=1",
        )  # fmt: skip

    def _start_controllers(self) -> None:
        manager = self.component_kubeconfig("controller-manager", "system:kube-controller-manager")
        scheduler = self.component_kubeconfig("scheduler", "system:kube-scheduler")
        self._spawn(
            "kube-controller-manager",
            f"--kubeconfig={manager}", f"--authentication-kubeconfig={manager}",
            f"--authorization-kubeconfig={manager}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            f"--service-account-private-key-file={self.service_account_keys.key}",
            f"--root-ca-file={self.ca.cert}", "--use-service-account-credentials=true",
            f"--controllers={self.controllers}", "--leader-elect=false",
            "--profiling=false", "--v=1",
        )  # fmt: skip
        self._spawn(
            "kube-scheduler",
            f"--kubeconfig={scheduler}", f"--authentication-kubeconfig={scheduler}",
            f"--authorization-kubeconfig={scheduler}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            "--leader-elect=false", "--profiling=false", "--v=1",
        )  # fmt: skip

    def start(self, timeout: float = 120) -> ControlPlane:
        self.root.mkdir(parents=True, exist_ok=True)
        control_plane_binary()
        self.port = free_port(self.address)
        self.server = f"https://{self.address}:{self.port}"
        self._issue_certificates()
        self._start_apiserver(self._start_etcd())
        self._wait("kube-apiserver's /readyz", self._ready, timeout, "etcd", "kube-apiserver")
        self._start_controllers()
        # pods need the namespace's default ServiceAccount and the kube-root-ca.crt ConfigMap,
        # which the controller-manager's controllers create
        self._wait("the controller-manager", self._controllers_ready, timeout,
                   "kube-controller-manager", "kube-scheduler")  # fmt: skip
        return self

    def _wait(self, what: str, ready, timeout: float, *components: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for component in components:
                self._check_alive(component)
            if ready():
                return
            time.sleep(0.25)
        logs = {c: (self.logs / f"{c}.log").read_text(errors="replace")[-2000:] for c in components}
        raise ControlPlaneError(f"{what} not ready after {timeout:.0f} s; logs: {logs}")

    def _ready(self) -> bool:
        try:
            return self.request("GET", "/readyz") == "ok"
        except (OSError, urllib.error.URLError):
            return False

    def _controllers_ready(self) -> bool:
        try:
            self.request("GET", "/api/v1/namespaces/default/serviceaccounts/default")
            self.request("GET", "/api/v1/namespaces/default/configmaps/kube-root-ca.crt")
            return True
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return False
            raise

    def stop(self) -> None:
        """Stops the components, the newest first (SIGTERM, then SIGKILL after 10 s)."""
        for component, process in reversed(list(self.processes.items())):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            del self.processes[component]

    def __enter__(self) -> ControlPlane:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # admin requests -------------------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca.cert))
        context.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        return context

    def request(self, method: str, path: str, body: object = None, content_type: str = ""):
        """One request as the admin; JSON answers decoded, others as text."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.server + path, data=data, method=method)
        request.add_header("Content-Type", content_type or "application/json")
        request.add_header("Accept", "application/json")
        with urllib.request.urlopen(request, timeout=30, context=self.ssl_context()) as answer:
            text = answer.read().decode()
        kind = answer.headers.get("Content-Type", "")
        return json.loads(text) if "json" in kind else text
