"""The operator end to end on a real Kubernetes control plane (tests/kube): kubectl and the
kubernetes client against kube-apiserver, the real Job controller, garbage collector and
scheduler, the operator as its own process with the chart's ServiceAccount and RBAC, and the
real trainer run by the local kubelet on tiny sample data.

The session's cluster and one operator serve the module; each test uses its own namespace.
"""

from __future__ import annotations

import copy
import json
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import instseg_contract as contract
import pytest
import yaml

from instseg_trainer.sample_data import write_sample_dataset
from tests.cluster import (
    ROOT,
    KubeEnvironment,
    OperatorProcess,
    free_port,
    kubectl_binary,
    pvc,
    render_chart,
    wait_for,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(kubectl_binary() is None, reason="kubectl missing: run `make tools`"),
]
EXAMPLE = yaml.safe_load((ROOT / "examples" / "training.yaml").read_text())
# a few CPU seconds per epoch: 4 training images of 64-96 px, batches of 2
TINY = {"epochs": 1, "batchSize": 2, "inputSize": 64, "backboneWeights": "none",
        "warmupIterations": 1}  # fmt: skip
TIMEOUT = 240


class Cluster:
    def __init__(self, kube: KubeEnvironment, root: Path) -> None:
        self.kube, self.root = kube, root
        self.local, self.kubectl = kube.cluster, kube.kubectl
        self.operator = self.start_operator()

    def start_operator(
        self, *extra: str, priority: int | None = None, log: str = "operator.log"
    ) -> OperatorProcess:
        path = self.root / log
        return OperatorProcess(self.kube.operator_kubeconfig, path, *extra, priority=priority)

    def restart_operator(self, sig: int = signal.SIGKILL) -> None:
        self.operator.stop(sig)
        # a killed replica leaves its peering record behind for kopf's lifetime (60 s), and
        # an older record outranks a newer one: the replacement outranks it explicitly, so it
        # acts at once (a graceful stop removes the record)
        priority = 2**62 if sig == signal.SIGKILL else None
        # stopped by close() even if it never gets healthy
        self.operator = self.start_operator(priority=priority)
        self.operator.wait_healthy()

    def namespace(self, name: str, with_data: bool = True, labels: dict | None = None) -> str:
        meta = {"name": name, "labels": labels or {}}
        self.kubectl.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
        if with_data:
            self.kubectl.apply(pvc("datasets", name), pvc("instseg-runs", name))
            data = self.local.volume_dir(name, "datasets") / "shapes"
            write_sample_dataset(data, num_train=4, num_val=2, seed=1, min_size=64, max_size=96)
        return name

    def get(self, namespace: str, name: str) -> dict:
        return self.kubectl.json("ist", name, "-n", namespace)

    def progress(self, namespace: str, name: str) -> dict:
        return (self.get(namespace, name).get("status") or {}).get("progress") or {}

    def phases(self, namespace: str) -> list[str | None]:
        items = self.kubectl.json("ist", "-n", namespace)["items"]
        return [(item.get("status") or {}).get("phase") for item in items]

    def wait_phase(self, namespace: str, name: str, phase: str, timeout: float = TIMEOUT) -> dict:
        self.kubectl(
            "wait", f"--for=jsonpath={{.status.phase}}={phase}", f"ist/{name}", "-n", namespace,
            f"--timeout={int(timeout)}s",
        )  # fmt: skip
        return self.get(namespace, name)

    def jobs(self, namespace: str) -> list[dict]:
        selector = "app.kubernetes.io/managed-by=instseg-operator"
        return self.kubectl.json("jobs", "-n", namespace, "-l", selector)["items"]

    def events(self, namespace: str, name: str) -> list[dict]:
        field = f"involvedObject.name={name},involvedObject.kind={contract.KIND}"
        return self.kubectl.json("events", "-n", namespace, "--field-selector", field)["items"]

    def wait_event(self, namespace: str, name: str, reason: str, count: int = 1) -> list[dict]:
        """The training's Events once `reason` is among them (kopf posts Events from a queue,
        a moment after the status write that a phase wait sees)."""

        def posted() -> list[dict] | None:
            events = self.events(namespace, name)
            return events if [e["reason"] for e in events].count(reason) >= count else None

        return wait_for(f"a {reason} Event for {namespace}/{name}", posted, timeout=30)

    def transitions(self, namespace: str, name: str) -> list[str]:
        """The phases the operator wrote, in order (from its log: `ns/name: A → B (...)`)."""
        marker = f"] {namespace}/{name}: "
        lines = [line for line in self.log_text().splitlines() if marker in line]
        return [line.split(marker)[1].split(" (")[0].split(" → ")[1] for line in lines]

    def log_text(self) -> str:
        return "".join(p.read_text() for p in sorted(self.root.glob("*.log")))

    def close(self) -> None:
        self.operator.stop()


@pytest.fixture(scope="module")
def cluster(kube: KubeEnvironment, tmp_path_factory: pytest.TempPathFactory):
    env = Cluster(kube, tmp_path_factory.mktemp("operator"))
    try:
        env.operator.wait_healthy()
        yield env
    finally:
        env.close()


def training(name: str, namespace: str, **spec) -> dict:
    resource = copy.deepcopy(EXAMPLE)
    resource["metadata"] = {"name": name, "namespace": namespace}
    resource["spec"]["hyperparameters"] = dict(TINY)
    resource["spec"].update(spec)
    return resource


def test_example_trains_to_success_and_delete_cleans_up(cluster: Cluster) -> None:
    ns = cluster.namespace("e2e")
    cluster.kubectl.apply(training("shapes-r50", ns, export={"formats": ["onnx"]}))
    job = wait_for("the Job", lambda: cluster.jobs(ns), timeout=30)[0]
    assert job["metadata"]["name"] == "shapes-r50-train"
    (owner,) = job["metadata"]["ownerReferences"]
    resource = cluster.get(ns, "shapes-r50")
    assert owner["kind"] == contract.KIND and owner["uid"] == resource["metadata"]["uid"]
    assert owner["controller"] is True
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/instseg/trainer:test"  # the operator's default
    assert container["command"][:3] == ["instseg", "train", "MaskRCNN-ResNet50"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": contract.ENV_NAME, "value": "shapes-r50"} in container["env"]
    assert pod["serviceAccountName"] == "shapes-r50-trainer"
    assert {v["name"] for v in pod["volumes"]} == {"pvc-0", "pvc-1", "shm"}
    assert job["spec"]["backoffLimit"] == 3  # the CRD's default, filled in by the API server

    done = cluster.wait_phase(ns, "shapes-r50", "Succeeded")
    status = done["status"]
    assert status["jobName"] == "shapes-r50-train" and status["completionTime"]
    assert status["observedGeneration"] == done["metadata"]["generation"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True"
    assert conditions["Running"]["status"] == "False"
    assert conditions["Created"]["status"] == conditions["Scheduled"]["status"] == "True"
    cluster.kubectl("wait", "--for=condition=Ready", "ist/shapes-r50", "-n", ns, "--timeout=5s")
    progress = status["progress"]  # written by the trainer in the pod, with its own token
    assert progress["epochText"] == "1/1" and progress["totalEpochs"] == 1
    assert "bestSegmMap" in progress["metrics"]
    run = cluster.local.volume_dir(ns, "instseg-runs") / "shapes-r50"
    assert progress["bestCheckpoint"] == "/output/best.pt"  # the claim's subPath in the pod
    assert (run / "best.pt").is_file() and (run / "metrics.jsonl").is_file()
    # spec.export: the trainer exported best.pt in the pod and listed it, scored on val
    (artifact,) = status["artifacts"]
    assert artifact["name"] == "onnx-fp32" and artifact["format"] == "onnx"
    assert artifact["path"] == "/output/exported/model_fp32.onnx"
    assert artifact["sizeBytes"] == (run / "exported" / "model_fp32.onnx").stat().st_size
    assert 0 <= artifact["valSegmMap"] <= 1
    assert "onnx-fp32" in cluster.kubectl("get", "ist", "shapes-r50", "-n", ns, "-o", "wide")
    (exported,) = [e for e in cluster.wait_event(ns, "shapes-r50", "Exported")
                   if e["reason"] == "Exported"]  # fmt: skip
    assert "/output/exported/model_fp32.onnx" in exported["message"]

    table = cluster.kubectl("get", "ist", "-n", ns)
    assert "Succeeded" in table and "1/1" in table and "MaskRCNN-ResNet50" in table
    described = cluster.kubectl("describe", "ist", "shapes-r50", "-n", ns)
    assert "JobCreated" in described
    reasons = [e["reason"] for e in cluster.wait_event(ns, "shapes-r50", "Completed")]
    assert "JobCreated" in reasons
    # one Event per phase change, and the phase never goes back to Pending once Running
    assert reasons.count("Completed") == 1
    phases = cluster.transitions(ns, "shapes-r50")
    assert phases[-1] == "Succeeded" and "Pending" not in phases[phases.index("Running") :]

    labels = f'name="shapes-r50",namespace="{ns}",template="MaskRCNN-ResNet50"'
    epoch = f"instseg_training_epoch{{{labels}}} 1.0"
    wait_for("the training's series", lambda: epoch in cluster.operator.metrics(), timeout=30)
    metrics = cluster.operator.metrics()
    assert f"instseg_training_progress_ratio{{{labels}}} 1.0" in metrics
    assert 'instseg_trainings_succeeded_total{template="MaskRCNN-ResNet50"} 1.0' in metrics

    cluster.kubectl("delete", "ist", "shapes-r50", "-n", ns)
    wait_for("the children to go", lambda: not cluster.jobs(ns), timeout=30)
    for kind in ("serviceaccounts", "roles", "rolebindings", "pods"):
        names = [o["metadata"]["name"] for o in cluster.kubectl.json(kind, "-n", ns)["items"]]
        assert not [n for n in names if n.startswith("shapes-r50")], (kind, names)
    wait_for(
        "the series to go",
        lambda: 'name="shapes-r50"' not in cluster.operator.metrics(),
        timeout=30,
    )


def test_bad_spec_fails_without_a_job_and_missing_volume_waits(cluster: Cluster) -> None:
    ns = cluster.namespace("bad-spec")
    bad = training("bad-cpu", ns, resources={"gpus": 1, "cpu": "eight"})
    cluster.kubectl.apply(bad)
    failed = cluster.wait_phase(ns, "bad-cpu", "Failed", timeout=60)
    assert "spec.resources.cpu: 'eight' is not a Kubernetes quantity" in failed["status"]["message"]
    events = cluster.wait_event(ns, "bad-cpu", "InvalidSpec")
    warnings = [e for e in events if e["type"] == "Warning"]
    assert warnings and warnings[0]["reason"] == "InvalidSpec"
    assert not cluster.jobs(ns)

    # a volume that does not exist yet: Pending and a Warning, then it starts by itself
    waiting = training("no-volume", ns, output={"claimName": "later"}, suspend=True)
    cluster.kubectl.apply(waiting)
    pending = wait_for(
        "the VolumeNotFound status",
        lambda: (s := cluster.get(ns, "no-volume").get("status") or {}).get("message") and s,
        timeout=60,
    )
    assert pending["phase"] == "Pending"
    assert 'spec.output.claimName: PersistentVolumeClaim "later" not found' in pending["message"]
    assert not cluster.jobs(ns)
    cluster.kubectl.apply(pvc("later", ns))
    cluster.wait_phase(ns, "no-volume", "Suspended", timeout=60)
    assert [j["metadata"]["name"] for j in cluster.jobs(ns)] == ["no-volume-train"]


def test_bad_data_fails_at_once_with_the_trainers_message(cluster: Cluster) -> None:
    ns = cluster.namespace("failing")
    cluster.kubectl.apply(pvc("empty", ns))
    broken = training("no-data", ns, backoffLimit=3)
    broken["spec"]["data"] = {"train": {"claimName": "empty"}, "val": {"claimName": "empty"}}
    cluster.kubectl.apply(broken)
    failed = cluster.wait_phase(ns, "no-data", "Failed")
    conditions = {c["type"]: c for c in failed["status"]["conditions"]}
    # the trainer's exit code for bad input fails the Job at once (podFailurePolicy FailJob),
    # and its own error line (the pod's termination message) reaches the training's status
    assert conditions["Failed"]["reason"] == "InvalidInput"
    message = failed["status"]["message"]
    assert "last trainer exit code 2: instseg train: error: " in message, message
    (job,) = cluster.jobs(ns)
    assert job["status"]["failed"] == 1  # no retry although backoffLimit allows 3
    events = cluster.wait_event(ns, "no-data", "InvalidInput")
    warning = [e for e in events if e["type"] == "Warning"]
    assert warning and warning[-1]["reason"] == "InvalidInput"


def test_an_evicted_trainer_is_not_a_failure_and_resumes(cluster: Cluster) -> None:
    ns = cluster.namespace("evicted")
    resource = training("drained", ns, backoffLimit=0)
    resource["spec"]["hyperparameters"]["epochs"] = 3
    cluster.kubectl.apply(resource)
    cluster.wait_phase(ns, "drained", "Running")
    wait_for("a first validation", lambda: cluster.progress(ns, "drained").get("metrics"), TIMEOUT)
    (pod,) = cluster.kubectl.json("pods", "-n", ns)["items"]
    name = pod["metadata"]["name"]
    # what `kubectl drain` does: the Eviction API marks the pod DisruptionTarget
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": name, "namespace": ns}}  # fmt: skip
    cluster.local.request("POST", f"/api/v1/namespaces/{ns}/pods/{name}/eviction", eviction)
    done = cluster.wait_phase(ns, "drained", "Succeeded", timeout=2 * TIMEOUT)
    assert done["status"]["progress"]["epochText"] == "3/3"
    (job,) = cluster.jobs(ns)
    assert not job["status"].get("failed")  # backoffLimit 0, yet the eviction did not count
    run = cluster.local.volume_dir(ns, "instseg-runs") / "shapes-r50"
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    starts = [e["resumed_at_iteration"] for e in events if e["event"] == "start"]
    assert len(starts) == 2 and starts[1] > 0  # the new pod resumed from last.pt


def test_a_pod_template_reaches_the_trainer_pod(cluster: Cluster) -> None:
    ns = cluster.namespace("overlay")
    settings = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "settings", "namespace": ns},
        "data": {"team": "vision"},
    }
    cluster.kubectl.apply(settings)
    overlay = {
        "metadata": {"labels": {"team": "vision"}},
        "spec": {
            "imagePullSecrets": [{"name": "registry-creds"}],
            "volumes": [{"name": "settings", "configMap": {"name": "settings"}}],
            "containers": [{"name": "trainer",
                            "env": [{"name": "TEAM", "valueFrom": {"configMapKeyRef": {
                                "name": "settings", "key": "team"}}}],
                            "volumeMounts": [{"name": "settings", "mountPath": "/settings"}]}],
        },
    }  # fmt: skip
    owned = {"spec": {"containers": [{"name": "trainer", "command": ["sh", "-c", "true"]}]}}
    cluster.kubectl.apply(
        training("merged", ns, podTemplate=overlay), training("hijack", ns, podTemplate=owned)
    )
    failed = cluster.wait_phase(ns, "hijack", "Failed", timeout=60)
    assert (
        "spec.podTemplate.spec.containers[trainer].command: the operator owns it"
        in (failed["status"]["message"])
    )
    done = cluster.wait_phase(ns, "merged", "Succeeded")  # the API server took the merged pod
    assert done["status"]["progress"]["epochText"] == "1/1"
    (pod,) = cluster.kubectl.json("pods", "-n", ns, "-l", "team=vision")["items"]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "registry-creds"}]
    trainer = pod["spec"]["containers"][0]
    mounts = {m["mountPath"]: m["name"] for m in trainer["volumeMounts"]}
    assert mounts["/settings"] == "settings" and mounts["/output"] == "pvc-1"
    assert trainer["command"][:2] == ["instseg", "train"]


def test_pods_that_cannot_start_say_why(cluster: Cluster) -> None:
    ns = cluster.namespace("stuck")
    nowhere = training("nowhere", ns, nodeSelector={"nvidia.com/gpu.product": "H100"})
    no_image = training("no-image", ns, image="registry.example.com/does-not-exist:1")
    cluster.kubectl.apply(nowhere, no_image)

    def reason(name: str) -> str | None:
        conditions = (cluster.get(ns, name).get("status") or {}).get("conditions") or []
        return next((c["reason"] for c in conditions if c["type"] == "Ready"), None)

    wait_for("Unschedulable", lambda: reason("nowhere") == "Unschedulable", timeout=60)
    status = cluster.get(ns, "nowhere")["status"]
    assert status["phase"] == "Pending" and "node(s) didn't match" in status["message"]
    wait_for(
        "ImagePullBackOff", lambda: reason("no-image") in ("ImagePullBackOff", "ErrImagePull"), 60
    )
    assert "does-not-exist" in cluster.get(ns, "no-image")["status"]["message"]

    # fixing a spec while its pod is still Pending replaces the Job at once (no trainer ran)
    (old,) = [j for j in cluster.jobs(ns) if j["metadata"]["name"] == "nowhere-train"]
    fix = '{"spec": {"nodeSelector": null, "suspend": true}}'
    cluster.kubectl("patch", "ist", "nowhere", "-n", ns, "--type=merge", "-p", fix)

    def replaced() -> list[dict]:
        jobs = [j for j in cluster.jobs(ns) if j["metadata"]["name"] == "nowhere-train"]
        return [j for j in jobs if j["metadata"]["uid"] != old["metadata"]["uid"]]

    (new,) = wait_for("the replacement Job", replaced, timeout=60)
    cluster.wait_phase(ns, "nowhere", "Suspended", timeout=60)
    assert "nodeSelector" not in new["spec"]["template"]["spec"]
    cluster.wait_event(ns, "nowhere", "JobReplaced")
    cluster.kubectl("delete", "ist", "--all", "-n", ns)


def test_pod_security_restricted_admits_the_trainer_and_a_quota_refuses_it(
    cluster: Cluster,
) -> None:
    restricted = cluster.namespace(
        "restricted", labels={"pod-security.kubernetes.io/enforce": "restricted"}
    )
    no_gpus = cluster.namespace("no-gpu-quota")
    quota = {"apiVersion": "v1", "kind": "ResourceQuota",
             "metadata": {"name": "gpus", "namespace": no_gpus},
             "spec": {"hard": {"requests.nvidia.com/gpu": "0"}}}  # fmt: skip
    cluster.kubectl.apply(quota)
    cluster.kubectl.apply(training("strict", restricted), training("greedy", no_gpus))

    def refusal(namespace: str) -> str | None:
        selector = "involvedObject.kind=Job,reason=FailedCreate"
        events = cluster.kubectl.json("events", "-n", namespace, "--field-selector", selector)
        return next((e["message"] for e in events["items"]), None)

    # the real Job controller is refused by the ResourceQuota admission plugin: no pod, and
    # the API server's answer reaches the training's status, an Event and kubectl get
    quota_message = wait_for("the quota refusal", lambda: refusal(no_gpus), timeout=60)
    assert "exceeded quota: gpus" in quota_message and "requests.nvidia.com/gpu=1" in quota_message
    assert not cluster.kubectl.json("pods", "-n", no_gpus)["items"]

    def refused_status() -> dict | None:
        status = cluster.get(no_gpus, "greedy").get("status") or {}
        return status if "exceeded quota: gpus" in status.get("message", "") else None

    status = wait_for("the refusal in the training's status", refused_status, timeout=60)
    assert status["phase"] == "Pending"
    scheduled = next(c for c in status["conditions"] if c["type"] == "Scheduled")
    assert (scheduled["status"], scheduled["reason"]) == ("False", "QuotaExceeded")
    (warning,) = [e for e in cluster.wait_event(no_gpus, "greedy", "QuotaExceeded")
                  if e["reason"] == "QuotaExceeded"]  # fmt: skip
    assert warning["type"] == "Warning" and "requests.nvidia.com/gpu=1" in warning["message"]
    table = cluster.kubectl("get", "ist", "greedy", "-n", no_gpus, "-o", "wide")
    assert "QuotaExceeded" in table and "exceeded quota: gpus" in table
    # the trainer pod's own securityContext satisfies Pod Security "restricted"
    cluster.wait_phase(restricted, "strict", "Succeeded")
    assert refusal(restricted) is None
    cluster.kubectl("delete", "ist", "--all", "-n", no_gpus)


def test_suspend_resume_and_operator_restart_mid_training(cluster: Cluster) -> None:
    ns = cluster.namespace("suspend")
    resource = training("long", ns)
    resource["spec"]["hyperparameters"]["epochs"] = 6
    cluster.kubectl.apply(resource)
    cluster.wait_phase(ns, "long", "Running")
    wait_for("a first validation", lambda: cluster.progress(ns, "long").get("metrics"), TIMEOUT)
    cluster.kubectl(
        "patch", "ist", "long", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":true}}'
    )
    suspended = cluster.wait_phase(ns, "long", "Suspended", timeout=60)
    assert {c["type"]: c["status"] for c in suspended["status"]["conditions"]}[
        "Suspended"
    ] == "True"
    run = cluster.local.volume_dir(ns, "instseg-runs") / "shapes-r50"
    assert (run / "last.pt").is_file()
    (job,) = cluster.jobs(ns)
    assert job["spec"]["suspend"] is True

    cluster.kubectl(
        "patch", "ist", "long", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}'
    )
    cluster.wait_phase(ns, "long", "Running", timeout=60)
    # kopf posts Events from a queue: let it post the Resuming one before the SIGKILL
    reasons = [e["reason"] for e in cluster.wait_event(ns, "long", "Resuming")]
    assert "Suspending" in reasons
    cluster.restart_operator()  # killed mid-training: the new one carries on
    done = cluster.wait_phase(ns, "long", "Succeeded", timeout=2 * TIMEOUT)  # 6 epochs
    assert done["status"]["progress"]["epochText"] == "6/6"
    (after,) = cluster.jobs(ns)
    assert after["metadata"]["uid"] == job["metadata"]["uid"]  # never a second Job
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["event"] == "start"]
    # the SIGTERM of the suspension stopped the trainer at an iteration boundary past the
    # first epoch (2 iterations) with a checkpoint, within the pod's grace period
    assert len(starts) == 2 and starts[1]["resumed_at_iteration"] > 2
    finals = [e["status"] for e in events if e["event"] == "final"]
    assert finals == ["interrupted", "completed"]


def test_fifty_trainings_applied_at_once_get_exactly_fifty_jobs(cluster: Cluster) -> None:
    ns = cluster.namespace("bulk")
    resources = [training(f"t{i:02d}", ns, suspend=True) for i in range(50)]
    cluster.kubectl.apply(*resources)
    wait_for("50 Jobs", lambda: len(cluster.jobs(ns)) == 50, timeout=120)
    wait_for("50 Suspended trainings", lambda: cluster.phases(ns).count("Suspended") == 50, 120)
    uids = sorted(j["metadata"]["uid"] for j in cluster.jobs(ns))

    def job_created_events() -> list[dict]:
        items = cluster.kubectl.json("events", "-n", ns)["items"]
        return [e for e in items if e["reason"] == "JobCreated"]

    wait_for("50 JobCreated Events", lambda: len(job_created_events()) >= 50, timeout=60)
    log = cluster.root / "operator.log"

    def resumed() -> int:  # kopf logs `[bulk/t07] Resuming is processed: ...`
        return sum(1 for line in log.read_text().splitlines()
                   if f"[{ns}/" in line and "Resuming is processed" in line)  # fmt: skip

    before = resumed()
    cluster.restart_operator(signal.SIGTERM)  # a restart resumes all 50 without duplicates
    wait_for("the new operator to resume all 50", lambda: resumed() - before >= 50, timeout=120)
    names = sorted(j["metadata"]["name"] for j in cluster.jobs(ns))
    assert names == [f"t{i:02d}-train" for i in range(50)]
    assert sorted(j["metadata"]["uid"] for j in cluster.jobs(ns)) == uids
    assert len(job_created_events()) == 50  # none created again by the restarted operator
    cluster.kubectl("delete", "ist", "--all", "-n", ns)
    wait_for("the Jobs to go", lambda: not cluster.jobs(ns), timeout=60)


def test_two_workers_train_together_and_survive_losing_one(cluster: Cluster) -> None:
    ns = cluster.namespace("multi")
    # a lost worker costs one failed pod, its own: the operator evicts the other (not a
    # failure) so that the group restarts together
    resource = training("dist", ns, workers=2, resources={"gpus": 0}, backoffLimit=1)
    resource["spec"]["hyperparameters"]["epochs"] = 3
    cluster.kubectl.apply(resource)
    (job,) = wait_for("the Job", lambda: cluster.jobs(ns), timeout=30)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"] == 2
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "dist-workers"
    command = pod["containers"][0]["command"]
    assert command[:7] == ["python", "-m", "instseg_trainer.launch", "--nnodes", "2",
                           "--nproc-per-node", "1"]  # fmt: skip
    assert "dist-train-0.dist-workers:29500" in command  # worker 0 hosts the rendezvous
    service = cluster.kubectl.json("service", "dist-workers", "-n", ns)
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["ownerReferences"][0]["name"] == "dist"

    # each pod has its own network namespace: worker 1 reaches worker 0 by its DNS name
    wait_for("a first validation", lambda: cluster.progress(ns, "dist").get("metrics"), TIMEOUT)
    selector = "batch.kubernetes.io/job-completion-index=1"
    (worker,) = cluster.kubectl.json("pods", "-n", ns, "-l", selector)["items"]
    (first,) = cluster.kubectl.json("pods", "-n", ns, "-l", selector[:-1] + "0")["items"]
    # worker 1 dies at once: the operator evicts worker 0 instead of leaving it in the old
    # rendezvous, the Job replaces both, and the new group resumes from last.pt
    cluster.kubectl("delete", "pod", worker["metadata"]["name"], "-n", ns, "--grace-period=0",
                    "--force")  # fmt: skip
    done = cluster.wait_phase(ns, "dist", "Succeeded", timeout=2 * TIMEOUT)
    assert done["status"]["progress"]["epochText"] == "3/3"
    assert done["status"]["restarts"] == 1  # the lost worker's pod; the eviction is no failure
    events = cluster.kubectl.json("events", "-n", ns)["items"]
    (restart,) = [e for e in events if e["reason"] == "RestartingGroup"]
    assert f"worker 1 ({worker['metadata']['name']}) ended" in restart["message"]
    assert first["metadata"]["name"] in restart["message"]
    (job,) = cluster.jobs(ns)
    assert job["status"]["failed"] == 1
    pods = cluster.kubectl.json("pods", "-n", ns, "-l", "batch.kubernetes.io/job-name=dist-train")
    ips = {p["status"]["podIP"] for p in pods["items"] if p["status"]["phase"] == "Succeeded"}
    assert len(ips) == 2
    run = cluster.local.volume_dir(ns, "instseg-runs") / "shapes-r50"
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["event"] == "start"]
    assert {e["world_size"] for e in starts} == {2} and len(starts) >= 2
    assert starts[-1]["resumed_at_iteration"] > 0


class Prometheus:
    """Debian's prometheus, scraping the operator as the chart's ServiceMonitor says and
    evaluating the chart's PrometheusRule."""

    def __init__(self, root: Path, operator: OperatorProcess, objects: list[dict]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("prometheus not installed: `make tools` installs Debian's as root")
        monitor = next(o for o in objects if o["kind"] == "ServiceMonitor")
        (endpoint,) = monitor["spec"]["endpoints"]
        service = next(o for o in objects if o["kind"] == "Service")
        groups = next(o for o in objects if o["kind"] == "PrometheusRule")["spec"]["groups"]
        root.mkdir(parents=True, exist_ok=True)
        (root / "rules.yml").write_text(yaml.safe_dump({"groups": groups}))
        # the Prometheus Operator's target labels: namespace, service, job = the Service
        target = {"namespace": service["metadata"]["namespace"],
                  "service": service["metadata"]["name"]}  # fmt: skip
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(root / "rules.yml")],
            "scrape_configs": [{
                "job_name": service["metadata"]["name"],
                "honor_labels": endpoint.get("honorLabels", False),
                "metrics_path": endpoint["path"],
                "static_configs": [{"targets": [f"127.0.0.1:{operator.metrics_port}"],
                                    "labels": target}],
            }],
        }  # fmt: skip
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process = subprocess.Popen(
            [binary, f"--config.file={root / 'prometheus.yml'}",
             f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address={self.url[7:]}"],
            stdout=(root / "prometheus.log").open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def api(self, path: str, **query: str) -> object:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def dashboard_queries(objects: list[dict], namespace: str, name: str) -> list[str]:
    """Every PromQL expression of the chart's Grafana dashboard, for one training."""
    config_map = next(o for o in objects if o["kind"] == "ConfigMap")
    (text,) = config_map["data"].values()
    panels = json.loads(text)["panels"]
    exprs = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    return [e.replace("$namespace", namespace).replace("$training", name) for e in exprs]


def test_prometheus_scrapes_every_dashboard_series_and_evaluates_the_alerts(
    cluster: Cluster,
) -> None:
    objects = render_chart(
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "alerts.enabled=true",
        "--set",
        "dashboard.enabled=true",
    )
    prometheus = Prometheus(cluster.root / "prometheus", cluster.operator, objects)
    try:
        ns = cluster.namespace("monitored")
        cluster.kubectl.apply(pvc("empty", ns))
        broken = training("broken", ns)
        broken["spec"]["data"] = {"train": {"claimName": "empty"}, "val": {"claimName": "empty"}}
        cluster.kubectl.apply(training("watched", ns), broken)
        cluster.wait_phase(ns, "broken", "Failed")
        cluster.wait_phase(ns, "watched", "Succeeded")
        epoch = f'instseg_training_epoch{{namespace="{ns}",name="watched"}}'
        wait_for("Prometheus to scrape the training", lambda: prometheus.query(epoch), 60,
                 ignore=(OSError,))  # fmt: skip
        for expr in dashboard_queries(objects, ns, "watched"):
            result = wait_for(f"a series for {expr}", lambda e=expr: prometheus.query(e), 30)
            for series in result:  # the training's own namespace label, not the operator's
                assert series["metric"].get("namespace", ns) == ns, (expr, series)
        values = prometheus.api("label/namespace/values", **{"match[]": "instseg_training_epoch"})
        assert ns in values  # the dashboard's namespace variable lists the training's namespace

        def alerts() -> dict[str, list[dict]]:
            groups = prometheus.api("rules", type="alert")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            assert all(r["health"] == "ok" for r in rules), rules
            return {r["name"]: r["alerts"] for r in rules if r["lastEvaluation"][:4] != "0001"}

        fired = wait_for("the failed training's alert",
                         lambda: alerts().get("InstsegTrainingFailed"), 30)  # fmt: skip
        assert {(a["labels"]["namespace"], a["labels"]["name"]) for a in fired} >= {(ns, "broken")}
        assert not alerts()["InstsegTrainingStalled"] and not alerts()["InstsegOperatorDown"]
    finally:
        prometheus.stop()


def test_a_second_replica_stays_idle_then_takes_over(cluster: Cluster) -> None:
    ns = cluster.namespace("peering")
    # kopf peering: the replica with the lower priority pauses while the other one lives
    second = cluster.start_operator("--log-level=debug", priority=0, log="second.log")
    try:
        second.wait_healthy()
        paused = "Pausing the watch-stream for instancesegtrainings"
        wait_for("the second replica to pause", lambda: paused in second.log.read_text(), 60)
        cluster.kubectl.apply(training("one", ns, suspend=True))
        cluster.wait_phase(ns, "one", "Suspended", timeout=60)
        events = cluster.wait_event(ns, "one", "JobCreated")
        assert [e["reason"] for e in events].count("JobCreated") == 1
        assert len(cluster.jobs(ns)) == 1
        assert f"[{ns}/one]" not in second.log.read_text()  # the idle replica never handled it
    except BaseException:
        second.stop()
        raise

    cluster.operator.stop()  # the active replica goes away: the idle one takes over
    cluster.operator = second
    resumed = "Resuming operations after the pause"
    wait_for("the second replica to resume", lambda: resumed in second.log.read_text(), 90)
    cluster.kubectl.apply(training("two", ns, suspend=True))
    cluster.wait_phase(ns, "two", "Suspended", timeout=60)
    assert len(cluster.jobs(ns)) == 2
