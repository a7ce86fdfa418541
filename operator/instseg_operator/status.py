"""Pure status mapping: the Job and its Pods → the training's phase, conditions and message.

State lives in the cluster (the Job and its Pods), never in the operator, so a restarted
operator derives the same status.
"""

from __future__ import annotations

import json
import re

from instseg_contract import FAILED, PENDING, RUNNING, SUCCEEDED, SUSPENDED

from .manifests import QUEUE_LABEL

# the trainer's loggers (`instseg`, `instseg_trainer.*`) in its JSON log lines
TRAINER_LOGGER = "instseg"
# reasons that mean a trainer pod was scheduled: Scheduled is True and never carries them
POD_REASONS = {
    "Training", "Finishing", "Completed", "Restarting", "OOMKilled", "BackoffLimitExceeded",
    "InvalidInput", "DeadlineExceeded", "ErrImagePull", "ImagePullBackOff", "InvalidImageName",
    "CreateContainerConfigError", "CreateContainerError", "CrashLoopBackOff",
}  # fmt: skip
# container waiting reasons that mean the pod will not start without the user's help
STUCK_REASONS = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
}


# what the API server answers when the Job controller cannot create the trainer pod (the
# FailedCreate Event's message) → the reason the training shows
REFUSALS = (
    ("violates PodSecurity", "PodSecurityViolation"),
    ("exceeded quota", "QuotaExceeded"),
    ("failed quota", "QuotaExceeded"),  # a quota on limits.* wants every pod to set them
    ("usage per Container", "LimitRangeViolation"),
    ("usage per Pod", "LimitRangeViolation"),
    ("no PriorityClass with name", "PriorityClassNotFound"),
    ("error looking up service account", "ServiceAccountNotFound"),
)
REFUSAL_REASONS = {reason for _, reason in REFUSALS} | {"PodCreationFailed"}
# what the user can change, per refusal
REFUSAL_ADVICE = {
    "PodSecurityViolation": "the namespace's Pod Security level forbids what the trainer pod "
    "asks for: drop it from spec.podTemplate, or train in a namespace that allows it",
    "QuotaExceeded": "free the namespace's quota (kubectl describe resourcequota) or ask for "
    "less in spec.resources; the Job retries by itself",
    "LimitRangeViolation": "keep spec.resources within the namespace's LimitRange "
    "(kubectl describe limitrange)",
    "PriorityClassNotFound": "create the PriorityClass, or correct "
    "spec.podTemplate.spec.priorityClassName",
    "ServiceAccountNotFound": "create the ServiceAccount, or correct "
    "spec.podTemplate.spec.serviceAccountName",
}
# the API server's prefix names a pod that never existed (each retry has a new name)
REFUSED_POD = re.compile(r'^pods "[^"]*" is forbidden: ')


def refusal_reason(message: str) -> str:
    return next((reason for text, reason in REFUSALS if text in message), "PodCreationFailed")


def phase_reason(status: dict) -> str | None:
    """The reason of the training's current phase (its Ready condition's)."""
    ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    return ready[0].get("reason") if ready else None


def current_refusal(events: list[dict], pods: list[dict]) -> str | None:
    """The message of the Job controller's latest FailedCreate Event, unless a pod was created
    since (the refusal is over)."""

    def when(event: dict) -> str:
        series = (event.get("series") or {}).get("lastObservedTime")
        return event.get("lastTimestamp") or series or event.get("eventTime") or ""

    refused = [e for e in events if e.get("reason") == "FailedCreate"]
    if not refused:
        return None
    latest = max(refused, key=when)
    created = [((p.get("metadata") or {}).get("creationTimestamp") or "")[:19] for p in pods]
    if any(stamp >= when(latest)[:19] for stamp in created):
        return None
    message = latest.get("message") or "the Job controller could not create the trainer pod"
    message = message.removeprefix("Error creating: ")  # the Job controller's own prefix
    return REFUSED_POD.sub("", message)


def _job_condition(job: dict, kind: str) -> dict | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


def _last_termination(pods: list[dict]) -> dict | None:
    """The most recent terminated trainer container among the pods (for exit codes)."""
    latest = None
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated") or (
                status.get("lastState") or {}
            ).get("terminated")
            if terminated and (
                latest is None or terminated.get("finishedAt", "") > latest.get("finishedAt", "")
            ):
                latest = terminated
    return latest


def _last_line(text: str | None) -> str:
    """The trainer's own last words (its error line) from a termination message. Of JSON log
    lines (what the trainer writes in a pod), the message of the last one the trainer's
    `instseg` loggers wrote (torchrun's own lines come after a worker's error), else of the
    last line."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return ""
    entries = [entry for entry in map(_json_entry, lines) if entry is not None]
    trainers = [e for e in entries if str(e.get("logger", "")).startswith(TRAINER_LOGGER)]
    last = trainers[-1] if trainers else _json_entry(lines[-1])
    said = last.get("message") if last is not None else None
    return (said.strip() if isinstance(said, str) else lines[-1])[:500]


def _json_entry(line: str) -> dict | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def _waiting_problem(pods: list[dict]) -> tuple[str, str] | None:
    for pod in pods:
        status = pod.get("status") or {}
        for condition in status.get("conditions") or []:
            if (
                condition.get("type") == "PodScheduled"
                and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"
            ):
                return "Unschedulable", condition.get("message", "no node fits the pod")
        for container in status.get("containerStatuses") or []:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_REASONS:
                return waiting["reason"], waiting.get("message", waiting["reason"])
    return None


def _failure(failed: dict, pods: list[dict]) -> tuple[str, str, str]:
    """(Failed, reason, message) from the Job's failure condition and the trainer's exit."""
    reason = failed.get("reason", "Failed")
    message = failed.get("message", "the training Job failed")
    if reason == "PodFailurePolicy":  # the FailJob rule: the trainer's exit for bad input
        reason = "InvalidInput"
        message = "the trainer stopped on a problem with its input; a retry cannot fix it"
    terminated = _last_termination(pods)
    if terminated:
        detail = f"last trainer exit code {terminated.get('exitCode')}"
        if terminated.get("reason") == "OOMKilled":
            reason, detail = "OOMKilled", detail + " (OOMKilled: raise spec.resources.memory)"
        said = _last_line(terminated.get("message"))
        message = f"{message}; {detail}" + (f": {said}" if said else "")
    return FAILED, reason, message


def derive_phase(
    job: dict | None,
    pods: list[dict],
    user_suspend: bool | None = None,
    refusal: str | None = None,
) -> tuple[str, str, str]:
    """(phase, reason, message) from the Job and its Pods. `user_suspend` is the training's
    spec.suspend: a Job suspended without the user asking is queued (Kueue), not Suspended.
    None means "as the Job says" (no queue in between). `refusal` is what the API server
    answered the Job controller's last attempt to create a pod (`current_refusal`)."""
    if job is None:
        return PENDING, "JobNotCreated", "the training Job has not been created yet"
    # Kubernetes ≥ 1.31 sets FailureTarget / SuccessCriteriaMet first, then Failed / Complete
    # once the pods are gone: both mean the outcome is decided
    failed = _job_condition(job, "Failed") or _job_condition(job, "FailureTarget")
    if failed:
        return _failure(failed, pods)
    if _job_condition(job, "Complete") or _job_condition(job, "SuccessCriteriaMet"):
        return SUCCEEDED, "Completed", "training finished"
    spec, status = job.get("spec") or {}, job.get("status") or {}
    # a pod being deleted (the Job suspended or replaced, the node drained) is on its way out:
    # it neither runs the training nor counts as a failed attempt
    dying = [p for p in pods if (p.get("metadata") or {}).get("deletionTimestamp")]
    pods = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    phases = [(p.get("status") or {}).get("phase") for p in pods]
    live = "Pending" in phases or "Running" in phases
    # suspended once no pod is left to stop (the Job's `active` count lags the pods' deletion)
    if spec.get("suspend") and not (status.get("active") and live):
        return _suspended(job, user_suspend, bool(status.get("terminating") or dying))
    problem = _waiting_problem(pods)
    if problem:
        return PENDING, problem[0], problem[1]
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    if running:
        return RUNNING, "Training", f"{len(running)} trainer pod(s) running"
    # the pods' own phases lead the Job's counters: between a pod's exit and the Job
    # controller's next sync the Job still counts it active, so decide from the pods too
    waiting = "Pending" in phases
    if (status.get("succeeded") or "Succeeded" in phases) and not waiting:
        # the trainer exited 0 and the Job controller has not written Complete yet
        return RUNNING, "Finishing", "the trainer finished; the Job is completing"
    if refusal and not live:
        return _refused(refusal)
    failures = max(status.get("failed") or 0, phases.count("Failed"))
    if failures:
        return PENDING, "Restarting", f"{failures} failed attempt(s); retrying"
    if status.get("terminating") or dying:
        # podReplacementPolicy Failed: the new pod waits for the old trainer to exit
        return PENDING, "Starting", "waiting for the previous trainer pod to save and exit"
    return PENDING, "Starting", "waiting for the trainer pod to start"


def _suspended(job: dict, user_suspend: bool | None, stopping: bool) -> tuple[str, str, str]:
    """A suspended Job: queued (Kueue: created suspended with a queue label, unsuspended on
    admission; or suspended although the user did not ask), else Suspended."""
    queue = ((job.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL)
    if queue or user_suspend is False:
        where = f"queue {queue}" if queue else "its queue"
        return PENDING, "Queued", f"waiting for admission in {where} (the Job is suspended)"
    if stopping:
        return SUSPENDED, "Suspended", "the Job is suspended; the trainer saves a checkpoint"
    return SUSPENDED, "Suspended", "the Job is suspended; set spec.suspend false to resume"


def _refused(refusal: str) -> tuple[str, str, str]:
    """The API server refuses the trainer pod: why, and what to change."""
    reason = refusal_reason(refusal)
    advice = REFUSAL_ADVICE.get(reason)
    message = f"the API server refuses the trainer pod: {refusal}"
    return PENDING, reason, f"{message}; {advice}" if advice else message


def _condition_states(phase: str, reason: str, created: bool) -> dict[str, bool]:
    return {
        "Created": created,
        "Scheduled": reason in POD_REASONS,
        "Running": phase == RUNNING,
        "Restarting": reason == "Restarting",
        "Succeeded": phase == SUCCEEDED,
        "Failed": phase == FAILED,
        "Suspended": phase == SUSPENDED,
        "Ready": phase == SUCCEEDED,
    }


def _condition_reason(kind: str, on: bool, reason: str, message: str) -> tuple[str, str]:
    if kind == "Ready" or (on and kind not in ("Created", "Scheduled")):
        return reason, message
    if kind == "Created":
        return ("JobCreated", "") if on else (reason, message)
    if kind == "Scheduled":  # why not yet, never a trainer's reason
        return ("PodScheduled", "") if on else (reason, message)
    return "NotApplicable", ""


def build_conditions(
    previous: list[dict],
    phase: str,
    reason: str,
    message: str,
    now: str,
    generation: int,
    created: bool = True,
) -> list[dict]:
    """metav1.Condition list; lastTransitionTime moves only when a condition's status does.
    `created`: whether the training's Job exists."""
    before = {c["type"]: c for c in previous or []}
    conditions = []
    for kind, on in _condition_states(phase, reason, created).items():
        status = "True" if on else "False"
        old = before.get(kind)
        why, text = _condition_reason(kind, on, reason, message)
        conditions.append(
            {
                "type": kind,
                "status": status,
                "reason": why,
                "message": text,
                "lastTransitionTime": (
                    old["lastTransitionTime"] if old and old["status"] == status else now
                ),
                "observedGeneration": generation,
            }
        )
    return conditions


def training_status(
    job: dict | None,
    pods: list[dict],
    previous: dict,
    generation: int,
    now: str,
    user_suspend: bool | None = None,
    refusal: str | None = None,
) -> dict:
    """The status fields the operator owns (progress is the trainer's)."""
    phase, reason, message = derive_phase(job, pods, user_suspend, refusal)
    job_status = (job or {}).get("status") or {}
    status = {
        "phase": phase,
        "message": message,
        "observedGeneration": generation,
        "conditions": build_conditions(
            previous.get("conditions", []), phase, reason, message, now, generation, job is not None
        ),
    }
    if job is not None:
        status["jobName"] = job["metadata"]["name"]
        # trainer pods that failed and were replaced (a lost worker of a multi-node training
        # included); evictions and preemptions are not failures
        status["restarts"] = int(job_status.get("failed") or 0)
    if job_status.get("startTime"):
        status["startTime"] = job_status["startTime"]
    if phase in (SUCCEEDED, FAILED):
        status["completionTime"] = job_status.get("completionTime") or previous.get(
            "completionTime", now
        )
    return status
