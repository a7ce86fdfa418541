"""Status mapping, table-driven: Job and Pod states → phase, reason, message, conditions."""

from __future__ import annotations

import pytest

from instseg_operator.status import (
    build_conditions,
    current_refusal,
    derive_phase,
    training_status,
)

NOW, LATER = "2026-11-29T10:00:00Z", "2026-11-29T10:05:00Z"


def job(suspend=False, active=0, failed=0, conditions=(), start=None, completion=None,
        succeeded=0, terminating=0) -> dict:  # fmt: skip
    status = {"active": active, "failed": failed, "succeeded": succeeded,
              "terminating": terminating, "conditions": list(conditions)}  # fmt: skip
    if start:
        status["startTime"] = start
    if completion:
        status["completionTime"] = completion
    return {"metadata": {"name": "t-train"}, "spec": {"suspend": suspend}, "status": status}


def cond(kind: str, reason: str = "", message: str = "") -> dict:
    return {"type": kind, "status": "True", "reason": reason, "message": message}


def pod(phase="Pending", waiting=None, terminated=None, unschedulable=None,
        deleting=False) -> dict:  # fmt: skip
    status: dict = {"phase": phase, "conditions": [], "containerStatuses": []}
    if unschedulable:
        status["conditions"].append(
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": unschedulable}
        )  # fmt: skip
    state = {}
    if waiting:
        state["waiting"] = {"reason": waiting, "message": f"{waiting} details"}
    if terminated:
        state["terminated"] = terminated
    if state:
        status["containerStatuses"].append({"name": "trainer", "state": state})
    return {"metadata": {"deletionTimestamp": NOW} if deleting else {}, "status": status}


CASES = [
    ("no job yet", None, [], "Pending", "JobNotCreated"),
    ("job, pod not started", job(active=1), [pod()], "Pending", "Starting"),
    ("no node fits", job(active=1), [pod(unschedulable="0/3 nodes: insufficient nvidia.com/gpu")],
     "Pending", "Unschedulable"),
    ("bad image", job(active=1), [pod(waiting="ImagePullBackOff")], "Pending", "ImagePullBackOff"),
    ("training", job(active=1, start=NOW), [pod("Running")], "Running", "Training"),
    ("retrying after a failure", job(active=1, failed=1), [pod()], "Pending", "Restarting"),
    ("suspended", job(suspend=True), [], "Suspended", "Suspended"),
    ("suspended, pod deleted, Job controller not synced yet", job(suspend=True, active=1),
     [pod("Running", deleting=True)], "Suspended", "Suspended"),
    ("suspending, pod still up", job(suspend=True, active=1), [pod("Running")], "Running",
     "Training"),
    ("done", job(conditions=[cond("Complete")], completion=LATER), [pod("Succeeded")],
     "Succeeded", "Completed"),
    ("backoff limit", job(failed=4, conditions=[cond("Failed", "BackoffLimitExceeded",
     "Job has reached the specified backoff limit")]),
     [pod("Failed", terminated={"exitCode": 2, "reason": "Error", "finishedAt": NOW})],
     "Failed", "BackoffLimitExceeded"),
    ("deadline", job(conditions=[cond("Failed", "DeadlineExceeded", "Job was active longer")]),
     [], "Failed", "DeadlineExceeded"),
    ("trainer exited 0, Job not yet Complete", job(succeeded=1), [pod("Succeeded")], "Running",
     "Finishing"),
    ("trainer exited 0, Job controller not synced yet", job(active=1), [pod("Succeeded")],
     "Running", "Finishing"),
    ("trainer failed, Job controller not synced yet", job(active=1), [pod("Failed")],
     "Pending", "Restarting"),
    ("retry pod waiting after a failed one", job(active=1, failed=1),
     [pod("Failed"), pod()], "Pending", "Restarting"),
    ("resumed while the suspended trainer still saves its checkpoint", job(active=1),
     [pod("Running", deleting=True), pod()], "Pending", "Starting"),
    ("the trainer stopped by the suspension is not a failed attempt", job(active=1),
     [pod("Failed", deleting=True), pod()], "Pending", "Starting"),
    ("success decided (1.31+)", job(succeeded=1, conditions=[cond("SuccessCriteriaMet")]),
     [pod("Succeeded")], "Succeeded", "Completed"),
    ("failure decided (Kubernetes 1.31+)", job(failed=4, conditions=[cond("FailureTarget",
     "BackoffLimitExceeded", "limit")]), [], "Failed", "BackoffLimitExceeded"),
    ("out of memory", job(failed=1, conditions=[cond("Failed", "BackoffLimitExceeded", "limit")]),
     [pod("Failed", terminated={"exitCode": 137, "reason": "OOMKilled", "finishedAt": NOW})],
     "Failed", "OOMKilled"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "the_job", "pods", "phase", "reason"), CASES)
def test_phase_and_reason(case, the_job, pods, phase, reason) -> None:
    got_phase, got_reason, message = derive_phase(the_job, pods)
    assert (got_phase, got_reason) == (phase, reason), case
    assert message


def test_messages_say_when_the_old_trainer_still_saves_its_checkpoint() -> None:
    dying = pod("Running", deleting=True)
    _, _, suspending = derive_phase(job(suspend=True, terminating=1), [dying])
    assert suspending == "the Job is suspended; the trainer saves a checkpoint"
    phase, _, waiting = derive_phase(job(terminating=1), [dying])
    assert (phase, waiting) == ("Pending", "waiting for the previous trainer pod to save and exit")


def test_a_job_suspended_by_a_queue_is_queued_not_suspended() -> None:
    queued = job(suspend=True)
    queued["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-a"}
    phase, reason, message = derive_phase(queued, [], user_suspend=False)
    assert (phase, reason) == ("Pending", "Queued") and "queue team-a" in message
    # Kueue's convention: created with suspend true, the queue admits it
    assert derive_phase(queued, [], user_suspend=True)[:2] == ("Pending", "Queued")
    assert derive_phase(job(suspend=True), [], user_suspend=True)[:2] == ("Suspended", "Suspended")


def test_failure_message_carries_exit_code_and_advice() -> None:
    _, _, message = derive_phase(CASES[-1][1], CASES[-1][2])
    assert "exit code 137" in message and "spec.resources.memory" in message
    backoff = next(case for case in CASES if case[0] == "backoff limit")
    _, _, message = derive_phase(backoff[1], backoff[2])
    assert "backoff limit" in message and "exit code 2" in message


def test_conditions_keep_transition_times_until_status_changes() -> None:
    first = build_conditions([], "Pending", "Starting", "waiting", NOW, 1)
    assert {c["type"]: c["status"] for c in first} == {
        "Created": "True", "Scheduled": "False", "Running": "False", "Restarting": "False",
        "Succeeded": "False", "Failed": "False", "Suspended": "False", "Ready": "False",
    }  # fmt: skip
    second = build_conditions(first, "Running", "Training", "1 pod", LATER, 1)
    by_type = {c["type"]: c for c in second}
    assert by_type["Running"]["status"] == "True"
    assert by_type["Running"]["lastTransitionTime"] == LATER
    assert by_type["Failed"]["lastTransitionTime"] == NOW  # unchanged status keeps its time
    for c in second:
        assert c["reason"] and set(c) >= {"type", "status", "reason", "message",
                                          "lastTransitionTime"}  # fmt: skip


def test_training_status_fields() -> None:
    done = job(conditions=[cond("Complete")], start=NOW, completion=LATER)
    status = training_status(done, [pod("Succeeded")], {}, generation=3, now=LATER)
    assert status["phase"] == "Succeeded" and status["jobName"] == "t-train"
    assert status["startTime"] == NOW and status["completionTime"] == LATER
    assert status["observedGeneration"] == 3
    assert "completionTime" not in training_status(job(active=1), [pod("Running")], {}, 1, NOW)


def test_every_status_field_is_declared_in_the_crd() -> None:
    """Undeclared status fields are pruned by the API server: they would vanish silently."""
    from pathlib import Path

    import yaml

    crd = yaml.safe_load(
        (Path(__file__).parents[1] / "crds" / "instancesegtrainings.yaml").read_text()
    )
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    for _, the_job, pods, _, _ in CASES:
        status = training_status(the_job, pods, {}, 1, NOW)
        undeclared = set(status) - set(schema["properties"])
        assert not undeclared
        item = schema["properties"]["conditions"]["items"]["properties"]
        for condition in status["conditions"]:
            assert set(condition) <= set(item)


REFUSED = {
    "PodSecurityViolation": 'violates PodSecurity "restricted:latest": '
    "allowPrivilegeEscalation != false",
    "QuotaExceeded": "exceeded quota: gpus, requested: "
    "requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=0, limited: "
    "requests.nvidia.com/gpu=0",
    "LimitRangeViolation": "maximum memory usage per Container is 1Gi, but limit is 8Gi",
    "PriorityClassNotFound": "no PriorityClass with name urgent was found",
    "PodCreationFailed": "Internal error occurred: something else",
}


@pytest.mark.parametrize("reason", REFUSED)
def test_a_pod_the_api_server_refuses_says_why(reason: str) -> None:
    phase, got, message = derive_phase(job(start=NOW), [], refusal=REFUSED[reason])
    assert (phase, got) == ("Pending", reason)
    assert message.startswith(f"the API server refuses the trainer pod: {REFUSED[reason]}")
    if reason != "PodCreationFailed":  # what to change, where the reason says it
        assert "spec." in message or "kubectl describe" in message, message


def test_a_refusal_ends_once_a_pod_is_created_after_it() -> None:
    event = {"reason": "FailedCreate", "message": REFUSED["QuotaExceeded"],
             "lastTimestamp": NOW}  # fmt: skip
    assert current_refusal([event], []) == REFUSED["QuotaExceeded"]
    prefixed = {**event, "message": "Error creating: " + REFUSED["QuotaExceeded"]}
    assert current_refusal([prefixed], []) == REFUSED["QuotaExceeded"]  # the Job controller's
    # the refused pod's name changes at each retry and never existed: left out
    named = {**event, "message": 'pods "t-train-5qxfp" is forbidden: ' + REFUSED["QuotaExceeded"]}
    assert current_refusal([named], []) == REFUSED["QuotaExceeded"]
    later = pod("Failed")
    later["metadata"]["creationTimestamp"] = LATER
    assert current_refusal([event], [later]) is None
    # a refusal after the last pod (a retry refused by a quota filled meanwhile) counts
    assert current_refusal([{**event, "lastTimestamp": LATER}], [{**later, "metadata": {
        "creationTimestamp": NOW}}]) == REFUSED["QuotaExceeded"]  # fmt: skip
    # a running pod wins over any refusal
    assert derive_phase(job(active=1), [pod("Running")], refusal="x")[:2] == ("Running", "Training")


def test_bad_input_fails_at_once_with_the_trainers_own_words() -> None:
    rule = cond("Failed", "PodFailurePolicy", "Container trainer for pod t/t-train-x failed "
                "with exit code 2 matching FailJob rule at index 0")  # fmt: skip
    said = "INFO loading\ninstseg train: error: /data/train: no COCO annotations found\n"
    failed = pod("Failed", terminated={"exitCode": 2, "reason": "Error", "message": said})
    phase, reason, message = derive_phase(job(failed=1, conditions=[rule]), [failed])
    assert (phase, reason) == ("Failed", "InvalidInput")
    assert message.endswith(
        "last trainer exit code 2: instseg train: error: /data/train: no COCO annotations found"
    )


def test_the_trainers_words_are_the_message_of_its_last_json_log_line() -> None:
    rule = cond("Failed", "PodFailurePolicy", "exit code 2 matching FailJob rule at index 0")
    said = (
        '{"time": "2026-11-30T21:00:00.100Z", "level": "INFO", "logger": "x", "message": "go"}\n'
        '{"time": "2026-11-30T21:00:00.200Z", "level": "ERROR", "logger": "instseg", '
        '"message": "instseg train: error: dataset root \'/data/train\' does not exist"}\n'
    )
    failed = pod("Failed", terminated={"exitCode": 2, "reason": "Error", "message": said})
    _, _, message = derive_phase(job(failed=1, conditions=[rule]), [failed])
    assert message.endswith(
        "last trainer exit code 2: instseg train: error: dataset root '/data/train' does not exist"
    )
    # under torchrun, torchrun's own lines follow the worker's error: the trainer's counts
    torchrun = ('{"time": "2026-11-30T21:00:00.300Z", "level": "ERROR", "logger": '
                '"torch.distributed.elastic.multiprocessing.api", "message": "failed (exitcode: '
                '2) local_rank: 0 (pid: 17141) of binary: /opt/venv/bin/python"}\n')  # fmt: skip
    both = said + torchrun
    failed = pod("Failed", terminated={"exitCode": 2, "reason": "Error", "message": both})
    _, _, message = derive_phase(job(failed=1, conditions=[rule]), [failed])
    assert message.endswith("dataset root '/data/train' does not exist")


def _conditions(phase: str, reason: str, created: bool = True) -> dict[str, tuple[str, str]]:
    made = build_conditions([], phase, reason, f"{reason} message", NOW, 1, created)
    return {c["type"]: (c["status"], c["reason"]) for c in made}


def test_conditions_tools_read() -> None:
    # Ready: the summary kstatus, Argo CD, Flux and `kubectl wait` read
    assert _conditions("Succeeded", "Completed")["Ready"] == ("True", "Completed")
    assert _conditions("Running", "Training")["Ready"] == ("False", "Training")
    before_job = _conditions("Pending", "VolumeNotFound", created=False)
    assert before_job["Created"] == ("False", "VolumeNotFound")
    assert _conditions("Pending", "Restarting")["Restarting"] == ("True", "Restarting")


@pytest.mark.parametrize("reason", ["OOMKilled", "BackoffLimitExceeded", "InvalidInput"])
def test_the_scheduling_condition_never_carries_a_trainers_reason(reason: str) -> None:
    conditions = _conditions("Failed", reason)
    assert conditions["Scheduled"] == ("True", "PodScheduled")
    assert conditions["Failed"] == ("True", reason) and conditions["Ready"] == ("False", reason)
    # and says why a pod is not scheduled yet
    assert _conditions("Pending", "Unschedulable")["Scheduled"] == ("False", "Unschedulable")
    assert _conditions("Pending", "QuotaExceeded")["Scheduled"] == ("False", "QuotaExceeded")


def test_status_counts_the_trainer_pods_that_failed() -> None:
    retried = training_status(job(active=1, failed=2, start=NOW), [pod("Running")], {}, 1, NOW)
    assert retried["restarts"] == 2 and retried["phase"] == "Running"
    assert "restarts" not in training_status(None, [], {}, 1, NOW)
