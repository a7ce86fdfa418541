"""`python -m tests.kube serve --root DIR --crds FILES...`: a standing local cluster (the real
control plane and the local kubelet) for trying the operator by hand; run from the
repository root, as root (each pod gets a network namespace). Ctrl-C stops everything."""

from __future__ import annotations

import argparse
import signal
import tempfile
import threading
from pathlib import Path

from .local import LocalCluster


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.kube")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run a local cluster until Ctrl-C")
    serve.add_argument("--root", type=Path, default=None, help="state, logs, volumes, kubeconfig")
    serve.add_argument("--kubeconfig", type=Path, default=None, help="where to write it")
    serve.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu of the node")
    serve.add_argument("--crds", type=Path, nargs="*", default=[], help="CRD files to create")
    args = parser.parse_args()
    root = (args.root or Path(tempfile.mkdtemp(prefix="instseg-cluster-"))).resolve()
    kubeconfig = args.kubeconfig.resolve() if args.kubeconfig else None
    cluster = LocalCluster(root, kubeconfig=kubeconfig, gpus=args.gpus, crds=tuple(args.crds))
    stop = threading.Event()
    for stop_signal in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored
        signal.signal(stop_signal, lambda *_: stop.set())
    with cluster:
        print(f"Kubernetes v1.34.5 at {cluster.server} (node 'local', {args.gpus} GPUs)")
        print(f"export KUBECONFIG={cluster.kubeconfig}")
        print(f"PersistentVolumeClaim <claim> in <ns> lives in {root / 'volumes'}/<ns>/<claim>")
        print(f"pod logs: kubectl logs, or {root / 'logs'}/<ns>/<pod>.log; Ctrl-C stops")
        while not stop.wait(1):
            pass


if __name__ == "__main__":
    main()
