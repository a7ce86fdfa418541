"""The emulator's Job controller, scheduler and kubelet (tests/kube/controllers.py).

Pure parts first (expansion, path and hostname rewriting, pod building); then Jobs and
Pods driven through the kubernetes client against a running emulator, whose pods run as
local processes.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.cluster import pvc
from tests.cluster import wait_for as wait_until
from tests.kube.controllers import (
    INDEX_KEY,
    SHUTDOWN_GRACE,
    build_pod,
    compress_indexes,
    expand,
    field_ref,
    parse_indexes,
    rewrite_path,
    rewrite_pod_hostnames,
    set_condition,
)

NS = "default"
PY = sys.executable


# ---------------------------------------------------------------- pure parts


def test_expand_follows_kubernetes_rules():
    values = {"A": "1", "JOB_COMPLETION_INDEX": "3"}
    assert expand("--rank=$(JOB_COMPLETION_INDEX)", values) == "--rank=3"
    assert expand("$(A)$(A)", values) == "11"
    assert expand("$$(A)", values) == "$(A)"  # escaped
    assert expand("$(MISSING)", values) == "$(MISSING)"  # unknown: kept
    assert expand("$(A", values) == "$(A"  # unterminated: literal
    assert expand("cost: $5 $", values) == "cost: $5 $"
    assert expand("$$$$", values) == "$$"


def test_rewrite_path_longest_mount_first_at_boundaries():
    mounts = [("/data/train", "/h/train"), ("/output", "/h/out"), ("/data", "/h/data")]
    assert rewrite_path("/output", mounts) == "/h/out"
    assert rewrite_path("/output/ckpt/last.pt", mounts) == "/h/out/ckpt/last.pt"
    assert rewrite_path("/data/train/images", mounts) == "/h/train/images"
    assert rewrite_path("/data/val", mounts) == "/h/data/val"
    assert rewrite_path("/outputs", mounts) == "/outputs"  # not a path boundary
    assert rewrite_path("--output=/output/x", mounts) == "--output=/h/out/x"
    assert rewrite_path("relative/output", mounts) == "relative/output"
    assert rewrite_path("/dev/shm", mounts) == "/dev/shm"


def test_pod_hostnames_resolve_to_localhost():
    assert rewrite_pod_hostnames("job-0.workers", "workers", "ns") == "127.0.0.1"
    assert rewrite_pod_hostnames("job-0.workers:29500", "workers", "ns") == "127.0.0.1:29500"
    assert rewrite_pod_hostnames("job-0.workers.ns.svc", "workers", "ns") == "127.0.0.1"
    assert rewrite_pod_hostnames("--addr=job-1.workers", "workers", "ns") == "--addr=127.0.0.1"
    assert rewrite_pod_hostnames("job-0.workersx", "workers", "ns") == "job-0.workersx"
    assert rewrite_pod_hostnames("job-0.workers", None, "ns") == "job-0.workers"


def test_completed_indexes_round_trip():
    assert compress_indexes({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert compress_indexes(set()) == ""
    assert parse_indexes("0-2,5,7-8") == {0, 1, 2, 5, 7, 8}


def test_field_ref_and_conditions():
    pod = {
        "metadata": {
            "name": "p",
            "namespace": "n",
            "uid": "u",
            "labels": {"a": "b"},
            "annotations": {INDEX_KEY: "1"},
        },
        "spec": {"nodeName": "emulator"},
    }
    assert field_ref(pod, "metadata.name") == "p"
    assert field_ref(pod, f"metadata.annotations['{INDEX_KEY}']") == "1"
    assert field_ref(pod, "metadata.labels['a']") == "b"
    assert field_ref(pod, "spec.serviceAccountName") == "default"
    assert field_ref(pod, "status.podIP") == "127.0.0.1"
    first = set_condition([], "Suspended", "True", "JobSuspended", "Job suspended", "t1")
    same = set_condition(first, "Suspended", "True", "JobSuspended", "Job suspended", "t2")
    flipped = set_condition(same, "Suspended", "False", "JobResumed", "Job resumed", "t3")
    assert same[0]["lastTransitionTime"] == "t1"
    assert flipped[0]["lastTransitionTime"] == "t3" and flipped[0]["reason"] == "JobResumed"


def test_build_pod_for_indexed_job():
    job = {
        "metadata": {"name": "train", "namespace": "ns", "uid": "uid-1"},
        "spec": {
            "completionMode": "Indexed",
            "template": {
                "metadata": {"labels": {"app": "x"}},
                "spec": {"subdomain": "workers", "containers": [{"name": "c", "image": "i"}]},
            },
        },
    }
    pod = build_pod(job, 1)
    meta = pod["metadata"]
    assert meta["name"].startswith("train-1-") and len(meta["name"]) == len("train-1-") + 5
    assert meta["labels"]["job-name"] == "train" and meta["labels"]["controller-uid"] == "uid-1"
    assert meta["labels"][INDEX_KEY] == meta["annotations"][INDEX_KEY] == "1"
    assert meta["ownerReferences"][0]["uid"] == "uid-1"
    assert meta["ownerReferences"][0]["controller"] is True
    assert pod["spec"]["hostname"] == "train-1" and pod["spec"]["subdomain"] == "workers"
    env = pod["spec"]["containers"][0]["env"]
    assert env[0]["name"] == "JOB_COMPLETION_INDEX"
    assert build_pod({**job, "spec": {**job["spec"], "completionMode": "NonIndexed"}}, None)[
        "metadata"
    ]["name"].startswith("train-")


# ---------------------------------------------------------------- against the emulator

kubernetes = pytest.importorskip("kubernetes")
emulator_module = pytest.importorskip("tests.kube.emulator")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    emulator = emulator_module.Emulator(
        tmp_path_factory.mktemp("kube"), controllers=True, backoff_seconds=0.2
    )
    emulator.start()
    try:
        api = kubernetes.config.new_client_from_config(str(emulator.kubeconfig))
        yield emulator, kubernetes.client.CoreV1Api(api), kubernetes.client.BatchV1Api(api)
    finally:
        emulator.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def wait_for(check, timeout: float = 15.0):
    """Poll `check` until it returns something truthy (an ApiException means not yet)."""
    ignore = (kubernetes.client.ApiException,)
    return wait_until(repr(check), check, timeout, every=0.05, ignore=ignore)


def create_pvc(core, name: str) -> None:
    core.create_namespaced_persistent_volume_claim(NS, pvc(name, NS))


def pod_spec(command, *, claim=None, env=(), image="python:3.11", **extra) -> dict:
    container = {"name": "main", "image": image, "command": list(command), "env": list(env)}
    spec = {"restartPolicy": "Never", "containers": [container], **extra}
    if claim:
        container["volumeMounts"] = [{"name": "out", "mountPath": "/output", "subPath": "run"}]
        spec["volumes"] = [{"name": "out", "persistentVolumeClaim": {"claimName": claim}}]
    return spec


def make_job(name: str, command, *, claim=None, env=(), template_extra=None, **spec) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": pod_spec(command, claim=claim, env=env, **(template_extra or {})),
            },
            **spec,
        },
    }


def job_condition(batch, name: str, kind: str):
    job = batch.read_namespaced_job_status(name, NS)
    for condition in job.status.conditions or []:
        if condition.type == kind and condition.status == "True":
            return condition
    return None


def job_pods(core, name: str) -> list:
    return core.list_namespaced_pod(NS, label_selector=f"job-name={name}").items


def pod_events(core, pod: str, reason: str) -> list:
    events = core.list_namespaced_event(NS).items
    return [e for e in events if e.involved_object.name == pod and e.reason == reason]


def test_node_is_registered(cluster):
    _, core, _ = cluster
    node = wait_for(lambda: core.read_node("emulator"))
    assert node.metadata.labels["kubernetes.io/os"] == "linux"
    assert node.status.capacity["nvidia.com/gpu"] == "8"
    assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)


def test_job_runs_to_completion(cluster):
    emulator, core, batch = cluster
    name, claim = unique("ok"), unique("out")
    create_pvc(core, claim)
    code = (
        "import os, sys, pathlib\n"
        "pathlib.Path(sys.argv[1]).write_text(os.environ['POD_NAME'])\n"
        "pathlib.Path(os.environ['OUT'], 'env.txt').write_text(os.environ['POD_NAME'])\n"
        "print('hello from', os.environ['POD_NAME'], os.environ['MODE'])\n"
    )
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "OUT", "value": "/output"},
        {"name": "MODE", "value": "mode-$(OUT)"},
    ]
    batch.create_namespaced_job(
        NS, make_job(name, [PY, "-c", code, "/output/result.txt"], claim=claim, env=env)
    )
    wait_for(lambda: job_condition(batch, name, "Complete"))
    job = batch.read_namespaced_job_status(name, NS)
    assert job.status.succeeded == 1 and not job.status.active
    assert job.status.start_time and job.status.completion_time
    (pod,) = job_pods(core, name)
    assert pod.status.phase == "Succeeded"
    assert pod.spec.node_name == "emulator"
    assert pod.metadata.owner_references[0].uid == job.metadata.uid
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0
    assert pod.status.container_statuses[0].state.terminated.reason == "Completed"
    out = emulator.volume_dir(NS, claim) / "run"
    assert (out / "result.txt").read_text() == pod.metadata.name
    assert (out / "env.txt").read_text() == pod.metadata.name
    log = core.read_namespaced_pod_log(pod.metadata.name, NS)
    assert f"hello from {pod.metadata.name} mode-/output" in log


def test_failing_job_hits_backoff_limit(cluster):
    _, core, batch = cluster
    name = unique("fail")
    batch.create_namespaced_job(
        NS, make_job(name, [PY, "-c", "import sys; print('boom'); sys.exit(3)"], backoffLimit=1)
    )
    condition = wait_for(lambda: job_condition(batch, name, "Failed"))
    assert condition.reason == "BackoffLimitExceeded"
    assert condition.message == "Job has reached the specified backoff limit"
    pods = job_pods(core, name)
    assert len(pods) == 2 and all(p.status.phase == "Failed" for p in pods)
    assert {p.status.container_statuses[0].state.terminated.exit_code for p in pods} == {3}
    assert batch.read_namespaced_job_status(name, NS).status.failed == 2


def test_missing_command_is_a_start_error(cluster):
    _, core, batch = cluster
    name = unique("nocmd")
    batch.create_namespaced_job(NS, make_job(name, ["no-such-command-xyz"]))
    wait_for(lambda: job_condition(batch, name, "Failed"))
    (pod,) = job_pods(core, name)
    terminated = pod.status.container_statuses[0].state.terminated
    assert pod.status.phase == "Failed"
    assert (terminated.exit_code, terminated.reason) == (128, "StartError")


def test_active_deadline(cluster):
    _, core, batch = cluster
    name = unique("slow")
    job = make_job(name, [PY, "-c", "import time; time.sleep(60)"], activeDeadlineSeconds=1)
    batch.create_namespaced_job(NS, job)
    condition = wait_for(lambda: job_condition(batch, name, "Failed"), timeout=10)
    assert condition.reason == "DeadlineExceeded"
    assert condition.message == "Job was active longer than specified deadline"
    wait_for(lambda: not job_pods(core, name))


def test_suspend_terminates_gracefully_and_resume_completes(cluster):
    emulator, core, batch = cluster
    name, claim = unique("susp"), unique("out")
    create_pvc(core, claim)
    code = (
        "import os, signal, sys, time, pathlib\n"
        "out = pathlib.Path(sys.argv[1])\n"
        "if (out / 'checkpoint').exists():\n"
        "    print('resumed'); sys.exit(0)\n"
        "def stop(*_):\n"
        "    (out / 'checkpoint').write_text('saved'); sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "(out / 'started').write_text('yes')\n"
        "while True: time.sleep(0.05)\n"
    )
    batch.create_namespaced_job(NS, make_job(name, [PY, "-c", code, "/output"], claim=claim))
    out = emulator.volume_dir(NS, claim) / "run"
    wait_for(lambda: (out / "started").exists())
    (first,) = job_pods(core, name)
    batch.patch_namespaced_job(name, NS, {"spec": {"suspend": True}})
    suspended = wait_for(lambda: job_condition(batch, name, "Suspended"))
    assert (suspended.reason, suspended.message) == ("JobSuspended", "Job suspended")
    wait_for(lambda: (out / "checkpoint").exists())
    status = wait_for(
        lambda: (s := batch.read_namespaced_job_status(name, NS).status).active in (0, None) and s
    )
    assert not status.failed and status.start_time is None
    wait_for(lambda: not job_pods(core, name))  # the suspended pod is gone
    batch.patch_namespaced_job(name, NS, {"spec": {"suspend": False}})
    wait_for(lambda: job_condition(batch, name, "Complete"))
    job = batch.read_namespaced_job_status(name, NS)
    resumed = [c for c in job.status.conditions if c.type == "Suspended"][0]
    assert (resumed.status, resumed.reason) == ("False", "JobResumed")
    assert not job.status.failed and job.status.start_time
    (second,) = job_pods(core, name)
    assert second.metadata.name != first.metadata.name
    assert "resumed" in core.read_namespaced_pod_log(second.metadata.name, NS)


@pytest.mark.parametrize("policy", ["Failed", "TerminatingOrFailed"])
def test_pod_replacement_policy_decides_whether_a_resumed_pod_waits(cluster, policy):
    """Suspended, then resumed while the old pod still saves its checkpoint: with `Failed`
    the new pod starts after the old one ended (and finds the checkpoint); with the default
    `TerminatingOrFailed` it starts beside the dying one."""
    emulator, core, batch = cluster
    name, claim = unique("repl"), unique("out")
    create_pvc(core, claim)
    code = (
        "import signal, sys, time, pathlib\n"
        "out = pathlib.Path(sys.argv[1])\n"
        "if (out / 'checkpoint').exists():\n"
        "    print('resumed'); sys.exit(0)\n"
        "if (out / 'started').exists():\n"
        "    print('overlap'); sys.exit(0)\n"
        "def stop(*_):\n"
        "    time.sleep(2); (out / 'checkpoint').write_text('saved'); sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "(out / 'started').write_text('yes')\n"
        "while True: time.sleep(0.05)\n"
    )
    job = make_job(name, [PY, "-c", code, "/output"], claim=claim, podReplacementPolicy=policy)
    batch.create_namespaced_job(NS, job)
    out = emulator.volume_dir(NS, claim) / "run"
    wait_for(lambda: (out / "started").exists())
    batch.patch_namespaced_job(name, NS, {"spec": {"suspend": True}})
    wait_for(lambda: job_condition(batch, name, "Suspended"))
    batch.patch_namespaced_job(name, NS, {"spec": {"suspend": False}})  # at once
    wait_for(lambda: job_condition(batch, name, "Complete"), timeout=30)
    (second,) = [p for p in job_pods(core, name) if p.status.phase == "Succeeded"]
    expected = "resumed" if policy == "Failed" else "overlap"
    assert expected in core.read_namespaced_pod_log(second.metadata.name, NS)


def test_indexed_job(cluster):
    emulator, core, batch = cluster
    name, claim = unique("idx"), unique("out")
    create_pvc(core, claim)
    code = (
        "import sys, pathlib\n"
        "pathlib.Path(sys.argv[1], 'rank-' + sys.argv[2]).write_text(' '.join(sys.argv[3:]))\n"
    )
    env = [
        {
            "name": "JOB_COMPLETION_INDEX",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_KEY}']"}},
        }
    ]
    command = [PY, "-c", code, "/output", "$(JOB_COMPLETION_INDEX)", "--master-addr"]
    command.append(f"{name}-0.workers")
    job = make_job(
        name,
        command,
        claim=claim,
        env=env,
        template_extra={"subdomain": "workers"},
        completionMode="Indexed",
        completions=2,
        parallelism=2,
    )
    batch.create_namespaced_job(NS, job)
    wait_for(lambda: job_condition(batch, name, "Complete"))
    job = batch.read_namespaced_job_status(name, NS)
    assert job.status.completed_indexes == "0-1" and job.status.succeeded == 2
    pods = job_pods(core, name)
    assert sorted(p.metadata.annotations[INDEX_KEY] for p in pods) == ["0", "1"]
    assert sorted(p.spec.hostname for p in pods) == [f"{name}-0", f"{name}-1"]
    out = emulator.volume_dir(NS, claim) / "run"
    assert (out / "rank-0").read_text() == "--master-addr 127.0.0.1"
    assert (out / "rank-1").exists()


def test_node_selector_mismatch_is_unschedulable(cluster):
    _, core, _ = cluster
    name = unique("sel")
    spec = pod_spec([PY, "-c", "pass"], nodeSelector={"gpu-type": "h100"})
    core.create_namespaced_pod(NS, {"metadata": {"name": name}, "spec": spec})

    def unschedulable():
        conditions = core.read_namespaced_pod_status(name, NS).status.conditions or []
        return [c for c in conditions if c.type == "PodScheduled" and c.status == "False"]

    (condition,) = wait_for(unschedulable)
    assert condition.reason == "Unschedulable"
    assert "didn't match Pod's node affinity/selector" in condition.message
    (event,) = wait_for(lambda: pod_events(core, name, "FailedScheduling"))
    assert event.type == "Warning"
    core.delete_namespaced_pod(name, NS)
    wait_for(lambda: not [p for p in core.list_namespaced_pod(NS).items if p.metadata.name == name])


def test_too_many_gpus_is_unschedulable(cluster):
    _, core, _ = cluster
    name = unique("gpu")
    spec = pod_spec([PY, "-c", "pass"])
    spec["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "9"}}
    core.create_namespaced_pod(NS, {"metadata": {"name": name}, "spec": spec})

    def message():
        conditions = core.read_namespaced_pod_status(name, NS).status.conditions or []
        return next((c.message for c in conditions if c.reason == "Unschedulable"), None)

    assert "1 Insufficient nvidia.com/gpu" in wait_for(message)
    core.delete_namespaced_pod(name, NS)


def test_missing_pvc_then_created(cluster):
    emulator, core, _ = cluster
    name, claim = unique("late"), unique("claim")
    code = "import sys, pathlib; pathlib.Path(sys.argv[1]).write_text('done')"
    spec = pod_spec([PY, "-c", code, "/output/x"], claim=claim)
    core.create_namespaced_pod(NS, {"metadata": {"name": name}, "spec": spec})

    def message():
        conditions = core.read_namespaced_pod_status(name, NS).status.conditions or []
        return next((c.message for c in conditions if c.reason == "Unschedulable"), None)

    assert f'persistentvolumeclaim "{claim}" not found' in wait_for(message)
    create_pvc(core, claim)
    wait_for(lambda: core.read_namespaced_pod_status(name, NS).status.phase == "Succeeded")
    assert (emulator.volume_dir(NS, claim) / "run" / "x").read_text() == "done"


def test_missing_image_backs_off(cluster):
    _, core, _ = cluster
    name = unique("img")
    spec = pod_spec([PY, "-c", "pass"], image="x/does-not-exist:1")
    core.create_namespaced_pod(NS, {"metadata": {"name": name}, "spec": spec})

    def waiting():
        statuses = core.read_namespaced_pod_status(name, NS).status.container_statuses or []
        state = statuses[0].state.waiting if statuses else None
        return state if state and state.reason == "ImagePullBackOff" else None

    state = wait_for(waiting)
    assert state.message == 'Back-off pulling image "x/does-not-exist:1"'
    assert core.read_namespaced_pod_status(name, NS).status.phase == "Pending"
    core.delete_namespaced_pod(name, NS)
    wait_for(lambda: not [p for p in core.list_namespaced_pod(NS).items if p.metadata.name == name])


def test_ttl_after_finished_deletes_the_job(cluster):
    _, core, batch = cluster
    name = unique("ttl")
    batch.create_namespaced_job(NS, make_job(name, [PY, "-c", "pass"], ttlSecondsAfterFinished=0))

    def gone():
        try:
            batch.read_namespaced_job(name, NS)
        except kubernetes.client.ApiException as e:
            return e.status == 404
        return False

    wait_for(gone)
    wait_for(lambda: not job_pods(core, name))


def test_deleting_a_job_kills_its_process(cluster):
    _, core, batch = cluster
    name = unique("del")
    batch.create_namespaced_job(NS, make_job(name, [PY, "-c", "import time; time.sleep(60)"]))

    def running_pid():
        pods = job_pods(core, name)
        if pods and pods[0].status.phase == "Running":
            return int(pods[0].status.container_statuses[0].container_id.rsplit("/", 1)[1])
        return None

    pid = wait_for(running_pid)
    os.kill(pid, 0)  # alive
    batch.delete_namespaced_job(name, NS, propagation_policy="Background")
    wait_for(lambda: not job_pods(core, name))

    def dead():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(dead)


def test_operator_job_is_mapped_to_the_host(tmp_path):
    """The operator's own multi-node Job: mounts, index and rendezvous address mapped."""
    import asyncio

    from instseg_operator.manifests import build_training_job
    from tests.kube.controllers import Controllers

    resource = {
        "metadata": {"name": "demo", "namespace": "ns", "uid": "u-1"},
        "spec": {
            "template": "maskrcnn_r50_fpn",
            "workers": 2,
            "resources": {"gpus": 1},
            "data": {
                "train": {"claimName": "datasets", "subPath": "coco/train"},
                "val": {"claimName": "datasets", "subPath": "coco/val"},
            },
            "output": {"claimName": "runs"},
        },
    }
    job = build_training_job(resource)
    job["metadata"]["uid"] = "job-uid"
    pod = build_pod(job, 1)
    pod["metadata"]["uid"] = "pod-uid"

    async def prepare():
        controllers = Controllers("http://127.0.0.1:1", "t", tmp_path, "emulator", 8, 1.0)
        try:
            return await controllers.prepare(pod, pod["spec"]["containers"][0])
        finally:
            await controllers.api.close()

    argv, env, cwd = asyncio.run(prepare())
    volumes = tmp_path / "volumes" / "ns"
    assert argv[0] == "torchrun"
    assert argv[argv.index("--node-rank") + 1] == "1"
    assert argv[argv.index("--master-addr") + 1] == "127.0.0.1"
    assert argv[argv.index("--train-data-roots") + 1] == str(volumes / "datasets/coco/train")
    assert argv[argv.index("--val-data-roots") + 1] == str(volumes / "datasets/coco/val")
    assert argv[argv.index("--output") + 1] == str(volumes / "runs")
    assert env["JOB_COMPLETION_INDEX"] == "1"
    assert env["INSTSEG_RESOURCE_NAME"] == "demo"
    assert env["HOSTNAME"] == "demo-train-1"
    assert "system:serviceaccount:ns:demo-trainer" in Path(env["KUBECONFIG"]).read_text()
    assert os.path.dirname(PY) in env["PATH"].split(os.pathsep)
    assert cwd == str(tmp_path / "pods" / "ns" / pod["metadata"]["name"])


def test_sigkill_not_sent_by_the_kubelet_is_oom(cluster):
    _, core, _ = cluster
    name = unique("oom")
    code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    core.create_namespaced_pod(NS, {"metadata": {"name": name}, "spec": pod_spec([PY, "-c", code])})
    wait_for(lambda: core.read_namespaced_pod_status(name, NS).status.phase == "Failed")
    terminated = core.read_namespaced_pod_status(name, NS).status.container_statuses[0]
    assert (terminated.state.terminated.exit_code, terminated.state.terminated.reason) == (
        137,
        "OOMKilled",
    )


def test_pod_deleted_by_a_user_counts_as_failed_and_is_replaced(cluster):
    _, core, batch = cluster
    name = unique("evict")
    job = make_job(name, [PY, "-c", "import time; time.sleep(60)"], backoffLimit=2)
    batch.create_namespaced_job(NS, job)
    (first,) = wait_for(lambda: [p for p in job_pods(core, name) if p.status.phase == "Running"])
    core.delete_namespaced_pod(first.metadata.name, NS)
    wait_for(lambda: batch.read_namespaced_job_status(name, NS).status.failed == 1)
    (second,) = wait_for(
        lambda: [p for p in job_pods(core, name) if p.status.phase == "Running"], timeout=10
    )
    assert second.metadata.name != first.metadata.name
    batch.delete_namespaced_job(name, NS, propagation_policy="Foreground")
    wait_for(lambda: not job_pods(core, name))


def test_stopping_the_emulator_stops_pod_processes(tmp_path):
    emulator = emulator_module.Emulator(tmp_path, controllers=True, backoff_seconds=0.2)
    emulator.start()
    try:
        api = kubernetes.config.new_client_from_config(str(emulator.kubeconfig))
        core = kubernetes.client.CoreV1Api(api)
        code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
        core.create_namespaced_pod(
            NS, {"metadata": {"name": "stubborn"}, "spec": pod_spec([PY, "-c", code])}
        )

        def pid():
            status = core.read_namespaced_pod_status("stubborn", NS).status
            if status.phase == "Running":
                return int(status.container_statuses[0].container_id.rsplit("/", 1)[1])
            return None

        running = wait_for(pid)
    finally:
        started = time.monotonic()
        emulator.stop()
    # the SIGTERM grace, then SIGKILL: well before the process would have ended by itself
    assert time.monotonic() - started < SHUTDOWN_GRACE + 15
    with pytest.raises(ProcessLookupError):
        os.kill(running, 0)
