"""A multi-node training restarts as one group.

When one worker of an Indexed Job ends (it failed, was evicted or deleted), the others would
wait in torchrun's re-rendezvous for a replacement and often time out, each then failing on
its own. Instead the operator evicts the group's other pods at once: the Eviction API marks
them with the DisruptionTarget condition, which the Job's podFailurePolicy ignores, so only
the worker that really failed counts against backoffLimit. The Job then replaces every
worker, and the new group resumes from `last.pt` together.

A group is the set of pods created before a restart. The time of the last restart is kept on
the Job (RESTART_ANNOTATION), so that the pods evicted by it, ending later, never start
another one, and a restarted operator derives the same decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from instseg_contract import GROUP

RESTART_ANNOTATION = f"{GROUP}/group-restarted-at"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
# a Job with one of these conditions True is ending: the Job controller stops its pods
FINISHING_CONDITIONS = ("Complete", "Failed", "FailureTarget", "SuccessCriteriaMet")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def format_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _ended_at(pod: dict) -> datetime | None:
    """When the pod stopped being a working member of its group: its container's end when it
    failed, the deletion request when it is being deleted; None while it works (or it
    succeeded: the group is finishing)."""
    meta, status = pod["metadata"], pod.get("status") or {}
    if status.get("phase") == "Failed":
        for container in status.get("containerStatuses") or []:
            finished = ((container.get("state") or {}).get("terminated") or {}).get("finishedAt")
            if finished:
                return parse_time(finished)
    if meta.get("deletionTimestamp"):
        grace = meta.get("deletionGracePeriodSeconds") or 0
        return parse_time(meta["deletionTimestamp"]) - timedelta(seconds=grace)
    if status.get("phase") == "Failed":  # failed before its container ran (evicted early)
        return parse_time(meta["creationTimestamp"])
    return None


def _is_live(pod: dict) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    return phase in ("Pending", "Running") and not pod["metadata"].get("deletionTimestamp")


@dataclass(frozen=True)
class GroupRestart:
    """A restart the operator must carry out: when, the worker that ended, who goes."""

    at: datetime
    trigger: dict
    stale: list[dict]

    def describe(self) -> str:
        worker = self.trigger["metadata"].get("labels", {}).get(INDEX_LABEL, "?")
        names = ", ".join(p["metadata"]["name"] for p in self.stale)
        return (
            f"worker {worker} ({self.trigger['metadata']['name']}) ended: restarting the "
            f"group's other pods ({names}) so that all resume from the last checkpoint"
        )


def _job_is_settled(job: dict) -> bool:
    """Suspended, single-worker or finished (failing included): nothing to restart."""
    spec, status = job.get("spec") or {}, job.get("status") or {}
    finishing = any(
        c.get("status") == "True" and c.get("type") in FINISHING_CONDITIONS
        for c in status.get("conditions") or []
    )
    return bool(spec.get("suspend")) or (spec.get("parallelism") or 1) <= 1 or finishing


def pending_restart(
    job: dict, pods: list[dict], known: datetime | None = None
) -> GroupRestart | None:
    """The restart this Job's pods call for that neither the Job records nor `known` (the
    last one carried out, where the Job's copy may be older) is, if any.

    Pods end in time order; one created after the last restart (a member of the current
    group) starts a new restart when it ends. The pods of the group it belonged to that still
    run are stale (none, when they all ended on their own)."""
    if _job_is_settled(job):
        return None
    recorded = (job["metadata"].get("annotations") or {}).get(RESTART_ANNOTATION)
    last = max(filter(None, (parse_time(recorded) if recorded else None, known)), default=None)
    trigger = None
    ended = [(at, pod) for pod in pods if (at := _ended_at(pod)) is not None]
    for at, pod in sorted(ended, key=lambda pair: pair[0]):
        if last is None or parse_time(pod["metadata"]["creationTimestamp"]) >= last:
            last, trigger = at, pod
    if trigger is None:
        return None
    stale = [
        pod for pod in pods
        if _is_live(pod) and parse_time(pod["metadata"]["creationTimestamp"]) < last
    ]  # fmt: skip
    return GroupRestart(last, trigger, stale)
