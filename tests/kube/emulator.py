"""`Emulator`: the API server (and optionally the Job controller and kubelet) in a
background thread, with an admin kubeconfig, for tests and for manual use."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import shutil
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from aiohttp import web

from .apiserver import ApiServer


def make_certificate(directory: Path) -> tuple[Path, Path] | None:
    """A self-signed certificate for 127.0.0.1 made with the openssl command, if present."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "apiserver.crt", directory / "apiserver.key"
    command = [
        openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "3650",
        "-subj", "/CN=kube-emulator", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, check=False)
    return (cert, key) if result.returncode == 0 else None


def write_kubeconfig(
    path: Path, url: str, token: str, namespace: str = "default", ca_file: Path | None = None
) -> Path:
    """A kubeconfig with cluster, user and context `emulator`."""
    cluster: dict = {"server": url}
    if ca_file is not None:
        cluster["certificate-authority-data"] = base64.b64encode(ca_file.read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": cluster}],
        "users": [{"name": "emulator", "user": {"token": token}}],
        "contexts": [
            {
                "name": "emulator",
                "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace},
            }
        ],
        "current-context": "emulator",
        "preferences": {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Emulator:
    """A Kubernetes API emulator serving on 127.0.0.1 (`url`, `admin_token`, `kubeconfig`)."""

    def __init__(
        self,
        root: Path,
        port: int = 0,
        controllers: bool = True,
        node_gpus: int = 8,
        backoff_seconds: float = 1.0,
        kubeconfig: Path | None = None,
    ) -> None:
        self.root = Path(root)
        self.port = port
        self.controllers = controllers
        self.node_gpus = node_gpus
        self.backoff_seconds = backoff_seconds
        self.admin_token = secrets.token_hex(16)
        self.kubeconfig = Path(kubeconfig) if kubeconfig else self.root / "kubeconfig"
        self.url = ""
        # kubectl (client-go) never sends a bearer token over plain http: the kubeconfig
        # points at a second, TLS listener with a self-signed certificate
        self.https_url = ""
        self._certificate: tuple[Path, Path] | None = None
        self.server: ApiServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._controllers_task: asyncio.Task | None = None

    # paths ------------------------------------------------------------------------------------
    def volume_dir(self, namespace: str, claim: str) -> Path:
        path = self.root / "volumes" / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log_path(self, namespace: str, pod: str) -> Path:
        return self.root / "logs" / namespace / f"{pod}.log"

    # lifecycle --------------------------------------------------------------------------------
    def start(self) -> Emulator:
        self.root.mkdir(parents=True, exist_ok=True)
        self._certificate = make_certificate(self.root / "pki")
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=30)
        if self._startup_error is not None:
            raise RuntimeError("the Kubernetes emulator failed to start") from self._startup_error
        if not self.url:
            raise RuntimeError("the Kubernetes emulator did not start within 30 s")
        ca_file = self._certificate[0] if self._certificate else None
        write_kubeconfig(
            self.kubeconfig, self.https_url or self.url, self.admin_token, ca_file=ca_file
        )
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as error:  # reported to start(); the thread must not die silently
            self._startup_error = error
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self.server = ApiServer(self.root, self.admin_token)
        self._runner = web.AppRunner(self.server.app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}"
        if self._certificate is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*self._certificate)
            tls_site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
            await tls_site.start()
            self.https_url = f"https://127.0.0.1:{self._runner.addresses[1][1]}"
        if self.controllers:
            from .controllers import run_controllers

            self._controllers_task = asyncio.ensure_future(
                run_controllers(
                    self.url,
                    self.admin_token,
                    self.root,
                    stop=self._stop,
                    node_gpus=self.node_gpus,
                    backoff_seconds=self.backoff_seconds,
                )
            )
        self._ready.set()
        await self._stop.wait()
        if self._controllers_task is not None:
            try:
                await asyncio.wait_for(self._controllers_task, timeout=15)
            except BaseException:  # noqa: BLE001 - stopping must go on whatever they raised
                self._controllers_task.cancel()
        await self._runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # conveniences -----------------------------------------------------------------------------
    def request(self, method: str, path: str, body: object = None, content_type: str = "") -> dict:
        """One admin request; returns the decoded JSON answer (raises HTTPError on errors)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.admin_token}")
        request.add_header("Content-Type", content_type or "application/json")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")

    def apply_crd_file(self, path: Path) -> list[str]:
        """Create (or replace) every CustomResourceDefinition in a YAML file."""
        names = []
        base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        for doc in yaml.safe_load_all(Path(path).read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            name = doc["metadata"]["name"]
            try:
                self.request("POST", base, doc)
            except urllib.error.HTTPError as error:
                if error.code != 409:
                    raise
                current = self.request("GET", f"{base}/{name}")
                doc["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                self.request("PUT", f"{base}/{name}", doc)
            names.append(name)
        return names
