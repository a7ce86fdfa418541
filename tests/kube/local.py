"""`LocalCluster`: the whole local Kubernetes in one context manager — a pod network, the
real control plane, a default StorageClass whose claims are directories, and the local
kubelet that runs pods as processes. Used by the tests, the benchmarks and
`python -m tests.kube serve`."""

from __future__ import annotations

import time
import urllib.error
from pathlib import Path

import yaml

from .controlplane import ControlPlane
from .kubelet import Kubelet
from .network import PodNetwork

STORAGE_CLASS = "local-dir"
PROVISIONER = "instseg.io/local-dir"


def default_storage_class() -> dict:
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": STORAGE_CLASS,
            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
        },
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    }


class LocalCluster:
    """A one-node cluster under `root`: claim `<c>` in namespace `<ns>` is the directory
    `root/volumes/<ns>/<c>`, pod logs are `root/logs/<ns>/<pod>.log`, the admin kubeconfig is
    `kubeconfig` (default `root/kubeconfig`). `controllers` is kube-controller-manager's
    --controllers (a benchmark that plays the Job controller itself passes
    "*,-job-controller")."""

    def __init__(
        self,
        root: Path,
        kubeconfig: Path | None = None,
        gpus: int = 8,
        crds: tuple[Path, ...] = (),
        controllers: str = "*",
    ) -> None:
        self.root = Path(root).resolve()
        self.network = PodNetwork(self.root)
        self.control_plane = ControlPlane(
            self.root / "control-plane",
            self.network.gateway,
            kubeconfig or self.root / "kubeconfig",
            controllers=controllers,
        )
        self.gpus, self.crds = gpus, crds
        self.kubelet: Kubelet | None = None

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    @property
    def server(self) -> str:
        return self.control_plane.server

    def volume_dir(self, namespace: str, claim: str) -> Path:
        path = self.root / "volumes" / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log_path(self, namespace: str, pod: str) -> Path:
        return self.root / "logs" / namespace / f"{pod}.log"

    def request(self, method: str, path: str, body: object = None, content_type: str = ""):
        return self.control_plane.request(method, path, body, content_type)

    def start(self) -> LocalCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self.network.setup()
        self.control_plane.start()
        self.request("POST", "/apis/storage.k8s.io/v1/storageclasses", default_storage_class())
        self.kubelet = self._make_kubelet().start()
        for path in self.crds:
            self.apply_crd_file(path)
        return self

    def _make_kubelet(self) -> Kubelet:
        plane = self.control_plane
        node = "local"
        client = plane.ca.issue("kubelet", f"system:node:{node}", ("system:nodes",))
        serving = plane.ca.issue("kubelet-serving", node, server_ips=(self.network.gateway,))
        return Kubelet(
            server=plane.server, ca_file=plane.ca.cert, cert_file=client.cert,
            key_file=client.key, root=self.root, network=self.network, node_name=node,
            gpus=self.gpus, storage_class=STORAGE_CLASS,
            provisioner_cert_file=plane.admin.cert, provisioner_key_file=plane.admin.key,
            serving_cert_file=serving.cert, serving_key_file=serving.key,
        )  # fmt: skip

    def stop(self) -> None:
        if self.kubelet is not None:
            self.kubelet.stop()
        self.control_plane.stop()
        self.network.teardown()

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def apply_crd_file(self, path: Path, timeout: float = 30) -> list[str]:
        """Creates every CustomResourceDefinition in a YAML file and waits until it is served."""
        base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        names = []
        for doc in yaml.safe_load_all(Path(path).read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                try:
                    self.request("POST", base, doc)
                except urllib.error.HTTPError as error:
                    if error.code != 409:
                        raise
                names.append(doc["metadata"]["name"])
        deadline = time.monotonic() + timeout
        for name in names:
            while not self._established(f"{base}/{name}"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"CustomResourceDefinition {name} not Established")
                time.sleep(0.2)
        return names

    def _established(self, path: str) -> bool:
        conditions = (self.request("GET", path).get("status") or {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)
