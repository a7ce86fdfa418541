"""kopf handlers: an InstanceSegTraining → its children; Job and Pod events → its status;
its status → Prometheus series.

Run with `kopf run -m instseg_operator.handlers --all-namespaces` (or `instseg-operator`,
which adds the flags from the environment). The handlers are level-based: every decision is
taken from what the API server holds (the resource, its Job and the Job's Pods), never from
state this process made up, so a restarted operator carries on where the last one stopped.
Status is derived from the trainings' Jobs and Pods as kopf's indexes hold them (kept by the
watches, which every change of a Job or Pod also triggers a refresh from), so the hot path
reads only the training itself from the API server.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import instseg_contract as contract
import kopf
from prometheus_client import start_http_server

from . import group, manifests
from .cluster import ApiError, Cluster, load_config
from .metrics import TrainingMetrics
from .status import (
    REFUSAL_REASONS,
    build_conditions,
    current_refusal,
    phase_reason,
    training_status,
)
from .validation import claims, spec_problems

TRAINING = (contract.GROUP, contract.VERSION, contract.PLURAL)
# how long to wait before looking again for a missing volume
VOLUME_RETRY_SECONDS = 15
# how often every unfinished training's status is derived again, events or not
RESYNC_SECONDS = float(os.environ.get("INSTSEG_RESYNC_SECONDS", "60"))
# a Job whose pod the API server refuses changes nothing the watches see: trainings waiting
# for their pod are looked at this often
WAITING_RESYNC_SECONDS = float(os.environ.get("INSTSEG_WAITING_RESYNC_SECONDS", "10"))

METRICS = TrainingMetrics()
_state: dict[str, object] = {}
_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()
# (namespace, training) → (Job uid, time) of the last group restart carried out: the Job's
# record of it (group.RESTART_ANNOTATION) reaches the index only with the next watch event
_restarts_done: dict[tuple[str, str], tuple[str, datetime.datetime]] = {}
# (namespace, training) → the exported models an Event announced (status.artifacts' paths)
_exports_announced: dict[tuple[str, str], tuple[str, ...]] = {}


def cluster() -> Cluster:
    if "cluster" not in _state:
        load_config()
        _state["cluster"] = Cluster()
    return _state["cluster"]  # type: ignore[return-value]


def default_image() -> str:
    return os.environ.get("INSTSEG_TRAINER_IMAGE") or manifests.DEFAULT_IMAGE


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _plain(body: Mapping) -> dict:
    """A kopf Body (a read-only mapping) as the plain dict the pure builders take."""
    return {key: body[key] for key in body}


@contextmanager
def _training_lock(namespace: str, name: str) -> Iterator[None]:
    """One status writer per training at a time (Job and Pod events arrive concurrently)."""
    with _locks_guard:
        lock = _locks.setdefault((namespace, name), threading.Lock())
    with lock:
        yield


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: logging.Logger, **_) -> None:
    # handler progress and the last handled spec live in annotations under our own prefix;
    # kopf's default would also write status.kopf, which the CRD schema prunes
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=contract.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=contract.GROUP, key="last-handled-configuration"
    )
    # Events: only the ones posted explicitly below (one per transition), not log lines
    settings.posting.loggers = False
    # watch only our own Jobs and Pods, filtered by the API server (not every pod of the
    # cluster, filtered here)
    selector = ",".join(f"{key}={value}" for key, value in manifests.MANAGED_BY.items())
    settings.watching.label_selectors["batch", "jobs"] = selector
    settings.watching.label_selectors["", "pods"] = selector
    settings.execution.max_workers = int(os.environ.get("INSTSEG_MAX_WORKERS", "16"))
    if os.environ.get("INSTSEG_PEERING_PRIORITY"):
        settings.peering.priority = int(os.environ["INSTSEG_PEERING_PRIORITY"])
    elif settings.peering.priority == 0:
        # equal priorities make every replica pause; the replica that started first wins
        # instead, and a later one stays idle until the first is gone
        settings.peering.priority = 2**62 - time.time_ns() // 1000
    cluster()
    port = int(os.environ.get("INSTSEG_METRICS_PORT", "8000"))
    if port and "metrics" not in _state:
        start_http_server(port, addr=os.environ.get("INSTSEG_METRICS_ADDRESS", "0.0.0.0"))
        _state["metrics"] = port
        logger.info("Prometheus metrics on :%d/metrics", port)


def _set_status(
    training: dict, phase: str, reason: str, message: str, event_type: str | None
) -> None:
    """Writes an operator-decided status (before there is a Job) and posts an Event when
    the phase, reason or message changed."""
    meta, previous = training["metadata"], training.get("status") or {}
    generation = meta.get("generation", 1)
    unchanged = (
        previous.get("phase") == phase
        and previous.get("message") == message
        and previous.get("observedGeneration") == generation
    )
    if unchanged:
        return
    status = {
        "phase": phase,
        "message": message,
        "observedGeneration": generation,
        "conditions": build_conditions(
            previous.get("conditions", []), phase, reason, message, _now(), generation, False
        ),
    }
    cluster().patch_training_status(meta["namespace"], meta["name"], status)
    if phase != previous.get("phase"):
        METRICS.count_transition(training["spec"].get("template", ""), phase)
    if event_type:
        kopf.event(training, type=event_type, reason=reason, message=message)


def _owned_by(child: dict, training: dict) -> bool:
    uid = training["metadata"]["uid"]
    return any(ref.get("uid") == uid for ref in child["metadata"].get("ownerReferences") or [])


def _ensure_child(manifest: dict, training: dict, logger: logging.Logger) -> tuple[dict, bool]:
    """(the child in the cluster, whether it was created now). Creating is idempotent: the
    name is deterministic, so an AlreadyExists means an earlier attempt (or operator)
    created it."""
    kind, meta = manifest["kind"], manifest["metadata"]
    try:
        return cluster().create(manifest), True
    except ApiError as e:
        if e.status in (400, 422):
            # the API server refuses what the spec asks for: retrying cannot help
            message = f"the API server rejected the training's {kind}: {e.message}"
            _set_status(training, contract.FAILED, "JobRejected", message, "Warning")
            raise kopf.PermanentError(message) from None
        if e.status == 403:  # the operator's own RBAC: the platform team can fix it
            message = f"the operator may not create the training's {kind}: {e.message}"
            kopf.event(training, type="Warning", reason="Forbidden", message=message)
            raise kopf.TemporaryError(message, delay=60) from None
        if e.status != 409:
            raise
    existing = cluster().get(kind, meta["namespace"], meta["name"])
    if existing is None:  # deleted between the two calls
        raise kopf.TemporaryError(f"{kind} {meta['name']} vanished; retrying", delay=1)
    if not _owned_by(existing, training):
        if existing["metadata"].get("deletionTimestamp"):
            raise kopf.TemporaryError(f"waiting for the old {kind} {meta['name']} to go", delay=2)
        message = (
            f"a {kind} named {meta['name']} already exists and does not belong to this "
            "training; delete it or rename the training"
        )
        kopf.event(training, type="Warning", reason="NameConflict", message=message)
        raise kopf.TemporaryError(message, delay=30)
    logger.debug("%s %s exists already", kind, meta["name"])
    return existing, False


def _missing_volume(training: dict) -> str | None:
    meta = training["metadata"]
    for claim, field in claims(training["spec"]).items():
        if cluster().get("PersistentVolumeClaim", meta["namespace"], claim) is None:
            return (
                f'{field}: PersistentVolumeClaim "{claim}" not found in namespace '
                f'"{meta["namespace"]}"; create it (see examples/pvc.yaml) and the training '
                "starts by itself"
            )
    return None


def _finished(training: dict) -> bool:
    """Succeeded or Failed for the current spec: nothing to create, check or replace."""
    meta, status = training["metadata"], training.get("status") or {}
    return (
        status.get("phase") in (contract.SUCCEEDED, contract.FAILED)
        and status.get("observedGeneration") == meta.get("generation")
        and bool(status.get("jobName"))
    )


def ensure(training: dict, children: Children, logger: logging.Logger, retry: int = 0) -> None:
    """Brings the children of a training in line with its spec, then refreshes its status."""
    meta, spec = training["metadata"], training["spec"]
    namespace, name = meta["namespace"], meta["name"]
    if meta.get("deletionTimestamp"):
        return
    if _finished(training):
        # an operator restart or upgrade must neither re-run nor re-judge a finished training
        refresh(namespace, name, children, logger)
        return
    with _training_lock(namespace, name):
        job = cluster().get("Job", namespace, manifests.job_name(name))
        if job is not None and not _owned_by(job, training):
            job = None  # _ensure_child below reports the conflict
        problems = spec_problems(spec, manifests.trainer_pod_template(training, default_image()))
        if problems:
            message = "invalid spec: " + "; ".join(problems)
            if job is None:
                _set_status(training, contract.FAILED, "InvalidSpec", message, "Warning")
            else:  # the running Job goes on; the edit is refused
                kopf.event(training, type="Warning", reason="InvalidSpec", message=message)
            raise kopf.PermanentError(message)
        if job is None:
            missing = _missing_volume(training)
            if missing:
                _set_status(training, contract.PENDING, "VolumeNotFound", missing, "Warning")
                raise kopf.TemporaryError(missing, delay=VOLUME_RETRY_SECONDS)
        if job is None:
            *children, wanted = manifests.build_children(training, default_image())
            for manifest in children:
                _ensure_child(manifest, training, logger)
            job, created = _ensure_child(wanted, training, logger)
        else:
            created = False
            wanted = manifests.build_training_job(training, default_image())
            _update_job(job, wanted, training, retry)
    if created:
        workers = int(spec.get("workers", 1))
        gpus = int((spec.get("resources") or {}).get("gpus", 1))
        kopf.event(
            training, type="Normal", reason="JobCreated",
            message=f"created Job {job['metadata']['name']} "
                    f"({workers} worker(s) × {gpus} GPU(s), template {spec['template']})",
        )  # fmt: skip
        # the new Job's watch event derives the first status (no second round of calls here)
    else:
        refresh(namespace, name, children, logger)


def _update_job(job: dict, wanted: dict, training: dict, retry: int) -> None:
    """Suspend is patched in place, and only when the user changed it (a queue controller
    such as Kueue may have changed the Job's since). A Job's pod template is immutable: any
    other spec change means a new Job, and the trainer resumes from the checkpoint on the
    output volume — at once when no trainer runs yet, else once it stopped (suspended)."""
    meta = job["metadata"]
    suspend = wanted["spec"]["suspend"]
    applied = (meta.get("annotations") or {}).get(manifests.SUSPEND_ANNOTATION)
    if applied != str(suspend).lower():
        patch = {
            "metadata": {"annotations": {manifests.SUSPEND_ANNOTATION: str(suspend).lower()}},
            "spec": {"suspend": suspend},
        }
        cluster().patch("Job", meta["namespace"], meta["name"], patch)
        kopf.event(
            training, type="Normal", reason="Suspending" if suspend else "Resuming",
            message="suspending the Job (the trainer saves a checkpoint)" if suspend
                    else "resuming the Job from the last checkpoint",
        )  # fmt: skip
    digest = (meta.get("annotations") or {}).get(manifests.SPEC_HASH_ANNOTATION)
    if digest == wanted["metadata"]["annotations"][manifests.SPEC_HASH_ANNOTATION]:
        return
    if (training.get("status") or {}).get("phase") == contract.RUNNING and not suspend:
        if retry == 0:
            kopf.event(
                training, type="Warning", reason="SpecChangeWaiting",
                message="spec changed while the trainer runs: it applies once the training "
                        "is suspended (spec.suspend: true) or has finished",
            )  # fmt: skip
        raise kopf.TemporaryError("spec change waits for the trainer to stop", delay=30)
    cluster().delete("Job", meta["namespace"], meta["name"])
    kopf.event(
        training, type="Normal", reason="JobReplaced",
        message=f"spec changed: replacing Job {meta['name']}; training resumes from its "
                "last checkpoint",
    )  # fmt: skip
    raise kopf.TemporaryError("waiting for the old Job to be deleted", delay=1)


def _training_of(body: kopf.Body) -> str | None:
    annotations = body["metadata"].get("annotations") or {}
    return annotations.get(manifests.TRAINING_ANNOTATION)


@kopf.index("batch", "v1", "jobs", labels=manifests.MANAGED_BY)
def training_jobs(namespace: str, body: kopf.Body, **_) -> dict | None:
    """(namespace, training name) → its Jobs, as the watch last saw them."""
    name = _training_of(body)
    return {(namespace, name): _plain(body)} if name else None


@kopf.index("", "v1", "pods", labels=manifests.MANAGED_BY)
def job_pods(namespace: str, labels: Mapping, body: kopf.Body, **_) -> dict | None:
    """(namespace, Job uid) → its Pods, as the watch last saw them."""
    uid = labels.get("batch.kubernetes.io/controller-uid")
    return {(namespace, uid): _plain(body)} if uid else None


@dataclass(frozen=True)
class Children:
    """The kopf indexes a status refresh reads a training's Job and Pods from."""

    jobs: kopf.Index
    pods: kopf.Index

    def job(self, training: dict) -> dict | None:
        meta = training["metadata"]
        owned = [
            job
            for job in self.jobs.get((meta["namespace"], meta["name"]), [])
            if _owned_by(job, training)
        ]
        # a replaced Job lingers while it is deleted: the live one counts
        owned.sort(key=lambda job: bool(job["metadata"].get("deletionTimestamp")))
        return owned[0] if owned else None

    def pods_of(self, job: dict) -> list[dict]:
        return list(self.pods.get((job["metadata"]["namespace"], job["metadata"]["uid"]), []))


def refresh(namespace: str, name: str, children: Children, logger: logging.Logger) -> bool:
    """Derives the training's status from its Job and Pods and writes changes. The training is
    read now, inside the lock (a watch event's copy may be older than what the last refresh
    wrote); Job and Pods come from the watches' indexes, and any change to them refreshes
    again. False when the training's Job does not exist."""
    with _training_lock(namespace, name):
        training = cluster().get(contract.KIND, namespace, name)
        if training is None or training["metadata"].get("deletionTimestamp"):
            return True
        job = children.job(training)
        if job is None:
            # before the Job (ensure writes that status) or after its TTL deletion
            return False
        pods = children.pods_of(job)
        previous = training.get("status") or {}
        generation = training["metadata"].get("generation", 1)
        user_suspend = bool(training["spec"].get("suspend", False))
        try:
            _restart_group(training, job, pods, logger)
        except ApiError as e:  # the status below matters more; retried on the next event
            logger.warning("%s/%s: group restart failed: %s", namespace, name, e)
        refusal = _pod_refusal(job, pods)
        new = training_status(job, pods, previous, generation, _now(), user_suspend, refusal)
        if {k: previous.get(k) for k in new} == new:
            return True
        cluster().patch_training_status(namespace, name, new)
        _announce(training, previous, new, logger)
    return True


def _restart_group(training: dict, job: dict, pods: list[dict], logger: logging.Logger) -> None:
    """One worker of a multi-node training ended: the others are evicted, so that the whole
    group restarts from the checkpoint (group.py), and the Job records the restart."""
    meta, key = job["metadata"], (job["metadata"]["namespace"], training["metadata"]["name"])
    done_uid, done_at = _restarts_done.get(key, (None, None))
    restart = group.pending_restart(job, pods, done_at if done_uid == meta["uid"] else None)
    if restart is None:
        return
    refused = [p["metadata"]["name"] for p in restart.stale
               if not cluster().evict(meta["namespace"], p["metadata"]["name"])]  # fmt: skip
    if refused:  # a PodDisruptionBudget: tried again on the next event or resync
        logger.warning("%s/%s: eviction refused for now: %s", meta["namespace"], meta["name"],
                       ", ".join(refused))  # fmt: skip
        return
    annotation = {group.RESTART_ANNOTATION: group.format_time(restart.at)}
    cluster().patch("Job", meta["namespace"], meta["name"],
                    {"metadata": {"annotations": annotation}})  # fmt: skip
    _restarts_done[key] = (meta["uid"], restart.at)
    if restart.stale:
        logger.info("%s/%s: %s", meta["namespace"], meta["name"], restart.describe())
        kopf.event(training, type="Normal", reason="RestartingGroup", message=restart.describe())


def _pod_refusal(job: dict, pods: list[dict]) -> str | None:
    """Why the Job controller cannot create the trainer pod, while no pod runs or waits (one
    Event LIST, only then)."""
    status, spec = job.get("status") or {}, job.get("spec") or {}
    live = [p for p in pods if (p.get("status") or {}).get("phase") in ("Pending", "Running")]
    finished = status.get("completionTime") or any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    # a refused pod leaves a Job the Job controller has synced (startTime) short of pods
    waiting = status.get("startTime") and (status.get("active") or 0) < spec.get("parallelism", 1)
    if live or finished or spec.get("suspend") or not waiting:
        return None
    meta = job["metadata"]
    return current_refusal(cluster().failed_creates(meta["namespace"], meta["uid"]), pods)


def _announce(training: dict, previous: dict, new: dict, logger: logging.Logger) -> None:
    """An Event (and a log line) per phase change, and one when the API server starts
    refusing the trainer pod."""
    reason, before = phase_reason(new), previous.get("phase")
    earlier = phase_reason(previous)
    refused = reason in REFUSAL_REASONS and earlier != reason
    phase = new["phase"]
    if phase == before and not refused:
        return
    meta = training["metadata"]
    if phase != before:
        METRICS.count_transition(training["spec"].get("template", ""), phase)
    logger.info("%s/%s: %s → %s (%s)", meta["namespace"], meta["name"], before, phase,
                new["message"])  # fmt: skip
    kopf.event(
        training, type="Warning" if phase == contract.FAILED or refused else "Normal",
        reason=reason, message=f"{phase}: {new['message']}",
    )  # fmt: skip


@kopf.on.create(*TRAINING)
@kopf.on.resume(*TRAINING)
@kopf.on.update(*TRAINING, field="spec")
def reconcile(
    body: kopf.Body,
    reason: kopf.Reason,
    logger: logging.Logger,
    retry: int,
    training_jobs: kopf.Index,
    job_pods: kopf.Index,
    **_,
) -> None:
    """A training created, changed, or found at the operator's start: its children."""
    training = _plain(body)
    if reason == kopf.Reason.CREATE and retry == 0:
        METRICS.count_created(training["spec"].get("template", ""))
    with METRICS.reconcile_seconds.time():
        ensure(training, Children(training_jobs, job_pods), logger, retry)


@kopf.timer(*TRAINING, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
def resync(
    body: kopf.Body, logger: logging.Logger, training_jobs: kopf.Index, job_pods: kopf.Index, **_
) -> None:
    """Level-based safety net: a status write lost to an API error (watch-event handlers are
    not retried) or a Job deleted by hand is noticed within a minute."""
    training = _plain(body)
    meta, children = training["metadata"], Children(training_jobs, job_pods)
    with METRICS.reconcile_seconds.time():
        if _finished(training) or (training.get("status") or {}).get("phase") == contract.FAILED:
            return
        job_exists = refresh(meta["namespace"], meta["name"], children, logger)
        if not job_exists and (training.get("status") or {}).get("jobName"):
            ensure(training, children, logger)  # the Job went away before the training finished


def _waiting_for_pod(status: Mapping, **_) -> bool:
    return status.get("phase") == contract.PENDING and bool(status.get("jobName"))


@kopf.timer(*TRAINING, interval=WAITING_RESYNC_SECONDS, when=_waiting_for_pod)
def recheck_waiting(
    body: kopf.Body, logger: logging.Logger, training_jobs: kopf.Index, job_pods: kopf.Index, **_
) -> None:
    """A pending training's Job may be unable to create its pod (Pod Security, a quota, a
    LimitRange): the refusal reaches status within this interval."""
    meta = body["metadata"]
    with METRICS.reconcile_seconds.time():
        refresh(meta["namespace"], meta["name"], Children(training_jobs, job_pods), logger)


@kopf.on.event(*TRAINING)
def on_training_event(event: kopf.RawEvent, body: kopf.Body, **_) -> None:
    """Every change of a training (its progress patches included) updates its series, and
    models the trainer exported get an Event."""
    meta = body["metadata"]
    key = (meta["namespace"], meta["name"])
    if event["type"] == "DELETED":
        METRICS.forget(*key)
        with _locks_guard:
            _locks.pop(key, None)
            _restarts_done.pop(key, None)
            _exports_announced.pop(key, None)
    else:
        METRICS.observe(_plain(body))
        _announce_exports(_plain(body))


def _announce_exports(training: dict) -> None:
    artifacts = (training.get("status") or {}).get("artifacts") or []
    key = (training["metadata"]["namespace"], training["metadata"]["name"])
    names = tuple(a.get("path", "") for a in artifacts)
    with _locks_guard:
        if not artifacts or _exports_announced.get(key) == names:
            return
        _exports_announced[key] = names
    listed = "; ".join(
        f"{a.get('name')} at {a.get('path')} (val segm mAP {a.get('valSegmMap')})"
        for a in artifacts
    )
    kopf.event(training, type="Normal", reason="Exported", message=f"exported {listed}")


@kopf.on.event("batch", "v1", "jobs", labels=manifests.MANAGED_BY)
@kopf.on.event("", "v1", "pods", labels=manifests.MANAGED_BY)
def on_child_event(
    body: kopf.Body, logger: logging.Logger, training_jobs: kopf.Index, job_pods: kopf.Index, **_
) -> None:
    """A Job or Pod of a training changed: derive the training's status again."""
    name = _training_of(body)
    if name:
        with METRICS.reconcile_seconds.time():
            refresh(body["metadata"]["namespace"], name, Children(training_jobs, job_pods), logger)
