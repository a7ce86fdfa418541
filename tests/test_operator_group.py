"""A multi-node training's group restart: which pods the operator evicts, and when not."""

from __future__ import annotations

from instseg_operator.group import RESTART_ANNOTATION, pending_restart


def at(second: int) -> str:
    return f"2026-11-30T10:{second // 60:02d}:{second % 60:02d}Z"


def job(parallelism: int = 2, restarted: int | None = None, **spec) -> dict:
    annotations = {RESTART_ANNOTATION: at(restarted)} if restarted is not None else {}
    return {
        "metadata": {"name": "t-train", "namespace": "ns", "annotations": annotations},
        "spec": {"parallelism": parallelism, "completions": parallelism, **spec},
        "status": {},
    }


def pod(name: str, created: int, phase: str = "Running", finished: int | None = None,
        deleting: int | None = None, grace: int = 30) -> dict:  # fmt: skip
    meta = {"name": name, "creationTimestamp": at(created),
            "labels": {"batch.kubernetes.io/job-completion-index": name[-1]}}  # fmt: skip
    if deleting is not None:  # deletionTimestamp is the request's time plus the grace period
        meta["deletionTimestamp"] = at(deleting + grace)
        meta["deletionGracePeriodSeconds"] = grace
    status: dict = {"phase": phase}
    if finished is not None:
        terminated = {"exitCode": 1, "finishedAt": at(finished)}
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]
    return {"metadata": meta, "status": status}


def stale_names(the_job: dict, pods: list[dict]) -> list[str] | None:
    restart = pending_restart(the_job, pods)
    return None if restart is None else [p["metadata"]["name"] for p in restart.stale]


def test_a_failed_worker_restarts_the_others() -> None:
    pods = [pod("w-0", 0), pod("w-1", 0, "Failed", finished=100)]
    restart = pending_restart(job(), pods)
    assert restart is not None and restart.at.second == 40  # 100 s = 10:01:40
    assert [p["metadata"]["name"] for p in restart.stale] == ["w-0"]
    assert "worker 1 (w-1) ended" in restart.describe()


def test_a_deleted_or_evicted_worker_restarts_the_others_before_it_ends() -> None:
    pods = [pod("w-0", 0), pod("w-1", 0, deleting=100), pod("w-2", 0, "Pending")]
    assert stale_names(job(parallelism=3), pods) == ["w-0", "w-2"]


def test_the_evicted_pods_ending_starts_no_second_restart() -> None:
    # w-1 failed at 100 (recorded); w-0 was evicted and ends at 110, after w-1's replacement
    pods = [
        pod("w-0", 0, "Failed", finished=110),
        pod("w-1", 0, "Failed", finished=100),
        pod("w-1", 101),
    ]
    assert pending_restart(job(restarted=100), pods) is None
    # the same without the record, while the failed pod that started it is still listed
    assert stale_names(job(), pods) == []


def test_a_member_of_the_new_group_that_fails_restarts_it_again() -> None:
    pods = [
        pod("w-0", 0, "Failed", finished=110),
        pod("w-1", 0, "Failed", finished=100),
        pod("w-1", 101),
        pod("w-0", 111, "Failed", finished=200),
    ]
    restart = pending_restart(job(restarted=100), pods)
    assert restart is not None and [p["metadata"]["creationTimestamp"] for p in restart.stale] \
        == [at(101)]  # fmt: skip


def test_a_replacement_created_in_the_second_of_the_failure_is_not_stale() -> None:
    pods = [pod("w-0", 0), pod("w-1", 0, "Failed", finished=100), pod("w-1", 100, "Pending")]
    assert stale_names(job(), pods) == ["w-0"]


def test_nothing_restarts_for_one_worker_a_suspended_job_or_a_finishing_one() -> None:
    pods = [pod("w-0", 0), pod("w-1", 0, "Failed", finished=100)]
    assert pending_restart(job(parallelism=1), pods[1:]) is None
    assert pending_restart(job(suspend=True), pods) is None
    failing = job()
    failing["status"]["conditions"] = [{"type": "FailureTarget", "status": "True"}]
    assert pending_restart(failing, pods) is None


def test_a_worker_that_succeeded_restarts_nothing() -> None:
    done = pod("w-1", 0, "Succeeded", finished=100)
    assert pending_restart(job(), [pod("w-0", 0), done]) is None


def test_a_restart_carried_out_is_not_repeated_before_the_job_records_it() -> None:
    pods = [pod("w-0", 0), pod("w-1", 0, "Failed", finished=100)]
    first = pending_restart(job(), pods)
    assert first is not None
    assert pending_restart(job(), pods, known=first.at) is None
    # the pod that started it ends later than its deletion was asked for: still the same one
    pods[1] = pod("w-1", 0, "Failed", finished=130, deleting=100)
    assert pending_restart(job(), pods, known=first.at) is None
