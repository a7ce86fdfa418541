"""The trainer's status reports, sent over real HTTP with the kubernetes client."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client

from instseg_trainer.reporting.events import (
    BatchSize,
    Exported,
    Final,
    Iteration,
    Start,
    Validation,
)
from instseg_trainer.reporting.kubernetes_status import KubernetesStatusReporter, progress_patch


class _ApiServer(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str, dict]] = []
        self.fail = False


class _Handler(BaseHTTPRequestHandler):
    def do_PATCH(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, self.headers["Content-Type"], body))
        code = 500 if self.server.fail else 200
        payload = json.dumps({} if code == 200 else {"message": "etcd unavailable"}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def api_server():
    server = _ApiServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _reporter(server: _ApiServer, clock) -> KubernetesStatusReporter:
    config = client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    api = client.CustomObjectsApi(client.ApiClient(config))
    return KubernetesStatusReporter("shapes", "team-a", api, min_interval=10.0, clock=clock)


def _iteration(i: int, loss: float = 1.0) -> Iteration:
    return Iteration(
        epoch=1, total_epochs=4, iteration=i, epoch_iteration=i, iterations_per_epoch=20,
        loss=loss, losses={"loss_mask": loss}, learning_rate=0.01, images_per_second=3.5,
        eta_seconds=99.6,
    )  # fmt: skip


VALIDATION = Validation(
    epoch=1, total_epochs=4, iteration=20,
    metrics={"segm": {"map": 0.31, "map50": 0.5}, "bbox": {"map": 0.3, "map50": 0.49},
             "f_measure": {"best": {"f_measure": 0.6, "threshold": 0.4}}},
    best={"epoch": 1, "segm_map": 0.31, "bbox_map": 0.3}, improved=True, learning_rate=0.01,
    seconds=2.0,
)  # fmt: skip
FINAL = Final(
    status="completed", epochs=4, iteration=80, best=VALIDATION.best,
    best_checkpoint="/output/best.pt", last_checkpoint="/output/last.pt", wall_seconds=60.0,
)  # fmt: skip


def test_rate_limited_merge_patches_of_own_status(api_server) -> None:
    now = [0.0]
    reporter = _reporter(api_server, lambda: now[0])
    reporter.report(_iteration(1))  # first one goes out
    now[0] = 3.0
    reporter.report(_iteration(2))  # within 10 s: held back
    now[0] = 6.0
    reporter.report(VALIDATION)  # validation: at once, with what was held back
    now[0] = 12.0
    reporter.report(_iteration(21))  # 6 s after the last patch: held
    now[0] = 17.0
    reporter.report(_iteration(22))  # 11 s: sent
    assert len(api_server.requests) == 3
    path, content_type, body = api_server.requests[0]
    assert path == "/apis/instseg.io/v1alpha1/namespaces/team-a/instancesegtrainings/shapes/status"
    assert content_type == "application/merge-patch+json"
    progress = body["status"]["progress"]
    assert progress["epochText"] == "1/4" and progress["etaSeconds"] == 99
    assert progress["imagesPerSecond"] == 3.5 and "updatedAt" in progress
    validation = api_server.requests[1][2]["status"]["progress"]
    assert validation["iteration"] == 20
    assert validation["metrics"] == {
        "segmMap": 0.31, "segmMap50": 0.5, "bboxMap": 0.3, "bboxMap50": 0.49, "fMeasure": 0.6,
        "bestSegmMap": 0.31, "bestBboxMap": 0.3, "bestEpoch": 1,
    }  # fmt: skip
    assert api_server.requests[2][2]["status"]["progress"]["iteration"] == 22


def test_a_failed_patch_is_logged_kept_and_never_raised(api_server, caplog) -> None:
    reporter = _reporter(api_server, lambda: 0.0)
    api_server.fail = True
    with caplog.at_level(logging.WARNING):
        reporter.report(VALIDATION)  # no exception reaches the training
    assert reporter.failures == 1 and "team-a/shapes" in caplog.text
    api_server.fail = False
    reporter.report(FINAL)
    progress = api_server.requests[-1][2]["status"]["progress"]
    assert progress["bestCheckpoint"] == "/output/best.pt" and progress["etaSeconds"] == 0
    assert progress["metrics"]["segmMap"] == 0.31  # the failed validation's data went out too


def test_non_finite_numbers_are_left_out() -> None:
    progress = progress_patch(_iteration(5, loss=float("nan")))
    assert "loss" not in progress and progress["iteration"] == 5
    json.dumps(progress, allow_nan=False)


def test_no_reporter_outside_a_pod(monkeypatch) -> None:
    monkeypatch.delenv("INSTSEG_RESOURCE_NAME", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    assert KubernetesStatusReporter.from_environment() is None
    monkeypatch.setenv("INSTSEG_RESOURCE_NAME", "x")
    monkeypatch.setenv("INSTSEG_RESOURCE_NAMESPACE", "y")
    assert KubernetesStatusReporter.from_environment() is None  # no service account here
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    assert KubernetesStatusReporter.from_environment() is None  # unreadable: no reports


def test_every_progress_field_survives_crd_pruning() -> None:
    from pathlib import Path

    import yaml

    crd_path = Path(__file__).parents[1] / "crds" / "instancesegtrainings.yaml"
    crd = yaml.safe_load(crd_path.read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    declared = status["properties"]["progress"]["properties"]
    start = Start(
        template="MaskRCNN-ResNet50", total_epochs=4, iterations_per_epoch=20, train_images=40,
        val_images=8, classes=["cell"], device="cpu", world_size=1, output="/output",
        resumed_at_iteration=0, batch_size=4,
    )  # fmt: skip
    changed = BatchSize(batch_size=2, previous_batch_size=4, learning_rate=0.01,
                        reason="out_of_memory")  # fmt: skip
    for event in (_iteration(1), VALIDATION, FINAL, start, changed):
        progress = progress_patch(event)
        assert set(progress) | {"updatedAt"} <= set(declared), event.kind
        assert set(progress.get("metrics", {})) <= set(declared["metrics"]["properties"])


def test_exported_models_are_patched_into_status_artifacts_at_once(api_server) -> None:
    reporter = _reporter(api_server, lambda: 0.0)
    reporter.report(_iteration(1))
    artifact = {
        "name": "onnx-fp32",
        "path": "/output/exported/model_fp32.onnx",
        "format": "onnx",
        "precision": "fp32",
        "sizeBytes": 10,
        "valSegmMap": 0.4,
    }
    reporter.report(Exported(artifacts=[artifact]))  # fmt: skip
    assert api_server.requests[-1][2] == {"status": {"artifacts": [artifact]}}
