"""`python -m tests.kube serve --port 8088 --root DIR --kubeconfig PATH`: a standing
emulator for trying the operator by hand (run from the repository root)."""

from __future__ import annotations

import argparse
import tempfile
import threading
from pathlib import Path

from .emulator import Emulator


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.kube")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the Kubernetes API emulator until Ctrl-C")
    serve.add_argument("--port", type=int, default=8088, help="plain-http port (0: any)")
    serve.add_argument("--root", type=Path, default=None, help="logs, volumes, kubeconfig")
    serve.add_argument("--kubeconfig", type=Path, default=None, help="where to write it")
    serve.add_argument("--no-controllers", action="store_true", help="no Job controller/kubelet")
    serve.add_argument("--gpus", type=int, default=8, help="GPUs of the emulated node")
    serve.add_argument("--crds", type=Path, nargs="*", default=[], help="CRD files to create")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="kube-emulator-"))
    emulator = Emulator(
        root,
        port=args.port,
        controllers=not args.no_controllers,
        node_gpus=args.gpus,
        kubeconfig=args.kubeconfig.resolve() if args.kubeconfig else None,
    )
    emulator.start()
    for crd_file in args.crds:
        emulator.apply_crd_file(crd_file)
    print(f"Kubernetes API emulator at {emulator.https_url or emulator.url} (http: {emulator.url})")
    print(f"export KUBECONFIG={emulator.kubeconfig}")
    print(f"PersistentVolumeClaim <claim> in <namespace> lives in {root / 'volumes'}/<ns>/<claim>")
    print(f"pod logs: {root / 'logs'}/<ns>/<pod>.log; Ctrl-C stops")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()


if __name__ == "__main__":
    main()
