"""Kubernetes reporter: the trainer merge-patches `status.progress` of its own resource.

Rate-limited (at most one patch per `min_interval` seconds for iteration events; start,
validation and final events are sent at once) and never fatal: a failed patch is logged and
the training goes on. The pod's service account may patch only this resource's status.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone

from instseg_contract import ENV_NAME, ENV_NAMESPACE, GROUP, PLURAL, VERSION

from instseg_trainer.reporting.events import (
    BatchSize,
    Epoch,
    Event,
    Exported,
    Final,
    Iteration,
    Progress,
    Start,
    Validation,
)

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
URGENT_EVENTS = {"start", "validation", "final"}
REQUEST_TIMEOUT = (5, 15)  # seconds: connect, read


def _finite(value, digits: int | None = None) -> float | None:
    """JSON has no NaN/inf and the API server rejects them: leave such values out. `digits`
    rounds what `kubectl get -o wide` shows (a loss of 2.8544, not 2.8544141448413334)."""
    if value is None or not math.isfinite(value):
        return None
    return float(value) if digits is None else round(float(value), digits)


def progress_patch(event: Event) -> dict | None:
    """The `status.progress` fields an event updates (None for events that update none)."""
    progress: dict = {}
    if isinstance(event, Progress):
        progress.update(
            epoch=event.epoch,
            totalEpochs=event.total_epochs,
            epochText=f"{event.epoch}/{event.total_epochs}",
            iteration=event.iteration,
        )
    if isinstance(event, Start):
        progress.update(totalEpochs=event.total_epochs, iteration=event.resumed_at_iteration,
                        batchSize=event.batch_size)  # fmt: skip
    if isinstance(event, BatchSize):
        progress.update(batchSize=event.batch_size, learningRate=event.learning_rate)
    if isinstance(event, (Iteration, Epoch)):
        progress.update(loss=_finite(event.loss, 4), learningRate=event.learning_rate)
    if isinstance(event, Iteration):
        progress.update(
            imagesPerSecond=_finite(event.images_per_second, 2),
            etaSeconds=int(event.eta_seconds or 0),
        )
    metrics: dict = {}
    if isinstance(event, Validation):
        m = event.metrics
        metrics.update(
            segmMap=m["segm"]["map"],
            segmMap50=m["segm"]["map50"],
            bboxMap=m["bbox"]["map"],
            bboxMap50=m["bbox"]["map50"],
            fMeasure=m.get("f_measure", {}).get("best", {}).get("f_measure"),
        )
    if isinstance(event, (Validation, Final)) and event.best:
        metrics.update(
            bestSegmMap=event.best.get("segm_map"),
            bestBboxMap=event.best.get("bbox_map"),
            bestEpoch=event.best.get("epoch"),
        )
    if isinstance(event, Final):
        progress.update(etaSeconds=0, epoch=event.epochs, iteration=event.iteration)
        if event.best_checkpoint:
            progress["bestCheckpoint"] = event.best_checkpoint
    if metrics:
        progress["metrics"] = {k: v for k, v in metrics.items() if v is not None}
    progress = {k: v for k, v in progress.items() if v is not None}
    return progress or None


class KubernetesStatusReporter:
    """Sends progress to `<namespace>/<name>` of InstanceSegTraining through `api`
    (a kubernetes CustomObjectsApi)."""

    def __init__(
        self,
        name: str,
        namespace: str,
        api,
        min_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name, self.namespace, self.api = name, namespace, api
        self.min_interval, self.clock = min_interval, clock
        self._pending: dict = {}
        self._last_sent: float | None = None
        self.failures = 0

    @classmethod
    def from_environment(cls) -> KubernetesStatusReporter | None:
        """In a pod started by the operator (its env names the resource), else None."""
        name, namespace = os.environ.get(ENV_NAME), os.environ.get(ENV_NAMESPACE)
        if not name or not namespace:
            return None
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException as e:
            # outside a pod (a trainer started by hand, or the test cluster's local
            # "kubelet"), an explicit KUBECONFIG names the credentials to report with
            if not os.environ.get("KUBECONFIG"):
                log.warning("%s is set but this is not a pod (%s): no status reports", ENV_NAME, e)
                return None
            try:
                config.load_kube_config()
            except (config.ConfigException, OSError) as e2:
                log.warning("cannot load $KUBECONFIG (%s): no status reports", e2)
                return None
        return cls(name, namespace, client.CustomObjectsApi())

    def report(self, event: Event) -> None:
        if isinstance(event, Exported):  # status.artifacts, at once
            self._patch({"artifacts": event.artifacts})
            return
        progress = progress_patch(event)
        if progress is None:
            return
        metrics = {**self._pending.get("metrics", {}), **progress.pop("metrics", {})}
        self._pending.update(progress)
        if metrics:
            self._pending["metrics"] = metrics
        urgent = event.kind in URGENT_EVENTS
        recent = self._last_sent is not None and (
            self.clock() - self._last_sent < self.min_interval
        )
        if urgent or not recent:
            self._send()

    def _send(self) -> None:
        if not self._pending:
            return
        self._pending["updatedAt"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._last_sent = self.clock()
        if self._patch({"progress": self._pending}):
            self._pending = {}

    def _patch(self, status: dict) -> bool:
        """Merge-patches the resource's status; False (logged) when it failed."""
        body = {"status": status}
        try:
            self.api.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, PLURAL, self.name, body,
                _content_type=MERGE_PATCH,
                # an unreachable API server must not hold up training (in DDP the other
                # ranks would hit their collective timeout)
                _request_timeout=REQUEST_TIMEOUT,
            )  # fmt: skip
        except Exception as e:  # the training matters more than its progress report
            self.failures += 1
            log.warning(
                "could not patch the status of %s/%s (%d failure(s)): %s",
                self.namespace, self.name, self.failures, str(e).splitlines()[0],
            )  # fmt: skip
            return False
        return True

    def close(self) -> None:
        self._send()
