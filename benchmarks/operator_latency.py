"""Operator latency: resource created → Job created, and Job complete → phase Succeeded.

Runs the local cluster (tests/kube: the real kube-apiserver, etcd, scheduler and
kube-controller-manager) without kube-controller-manager's Job controller, so that no pod is
ever created and this script plays the Job controller itself: it writes each Job's status
as the Job controller does on success (startTime, completionTime, succeeded, and the
SuccessCriteriaMet and Complete conditions, which the API server validates) and times how
long the operator takes to report the training Succeeded. The operator runs as its own
process (`instseg-operator`) with the chart's ServiceAccount, as in production; times are
taken by watches, not polls.

    .venv/bin/python benchmarks/operator_latency.py [--count 100] [--singles 10]

Targets (issue 3): p95 ≤ 1 s for both latencies; 100 resources → 100 Jobs within 30 s.
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from urllib3.exceptions import ProtocolError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import instseg_contract as contract  # noqa: E402
from kubernetes import client, config, watch  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402
from tests.cluster import (  # noqa: E402
    KubeEnvironment,
    OperatorProcess,
    pvc,
    start_cluster,
    wait_for,
)

from instseg_operator import manifests  # noqa: E402

NAMESPACE = "bench"
# kube-controller-manager's --controllers: everything but the Job controller
WITHOUT_JOB_CONTROLLER = "*,-job-controller"


class Watcher(threading.Thread):
    """Records the monotonic time at which each object first satisfies `test`."""

    def __init__(self, list_call, test, **kwargs) -> None:
        super().__init__(daemon=True)
        self.list_call, self.test, self.kwargs = list_call, test, kwargs
        self.seen: dict[str, float] = {}
        self.stream = watch.Watch()
        self.serializer = client.ApiClient()
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            for event in self.stream.stream(self.list_call, **self.kwargs):
                self.record(event)
        except (ApiException, ProtocolError):
            if not self.stopped.is_set():  # once stopped, the cluster's shutdown ends it
                raise

    def record(self, event: dict) -> None:
        obj = event["object"]
        if not isinstance(obj, dict):
            obj = self.serializer.sanitize_for_serialization(obj)
        name = obj["metadata"]["name"]
        if name not in self.seen and event["type"] != "DELETED" and self.test(obj):
            self.seen[name] = time.monotonic()

    def stop(self) -> None:
        self.stopped.set()
        self.stream.stop()


def training(name: str) -> dict:
    return {
        "apiVersion": contract.API_VERSION,
        "kind": contract.KIND,
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "template": "MaskRCNN-ResNet50",
            "data": {"train": {"claimName": "datasets"}, "val": {"claimName": "datasets"}},
            "output": {"claimName": "runs", "subPath": name},
            "hyperparameters": {"epochs": 1},
        },
    }


def succeeded_job_status(completions: int) -> dict:
    """A finished Job's status as the Job controller writes it. kube-apiserver 1.34 refuses
    Complete=True without startTime ("required for finished job"), without completionTime, or
    without a SuccessCriteriaMet=True condition; `succeeded` is what the Job controller sets."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def condition(kind: str, reason: str) -> dict:
        return {"type": kind, "status": "True", "lastProbeTime": now,
                "lastTransitionTime": now, "reason": reason, "message": "Reached expected "
                "number of succeeded pods"}  # fmt: skip

    return {
        "startTime": now,
        "completionTime": now,
        "succeeded": completions,
        "conditions": [
            condition("SuccessCriteriaMet", "CompletionsReached"),
            condition("Complete", "CompletionsReached"),
        ],
    }


def complete(batch: client.BatchV1Api, name: str) -> None:
    status = succeeded_job_status(completions=1)
    batch.patch_namespaced_job_status(manifests.job_name(name), NAMESPACE, {"status": status})


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 3), "p95": round(p95, 3)}


def run_round(names: list[str], api, batch, jobs: Watcher, done: Watcher, timeout: float):
    """Creates `names` at once, waits for their Jobs, completes the Jobs, waits for Succeeded."""
    created: dict[str, float] = {}

    def create(name: str) -> None:
        api.create_namespaced_custom_object(
            contract.GROUP, contract.VERSION, NAMESPACE, contract.PLURAL, training(name)
        )
        created[name] = time.monotonic()

    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(create, names))
    wait_for("the Jobs", lambda: all(manifests.job_name(n) in jobs.seen for n in names), timeout)
    all_jobs = max(jobs.seen[manifests.job_name(n)] for n in names) - start
    to_job = [jobs.seen[manifests.job_name(n)] - created[n] for n in names]
    completed: dict[str, float] = {}

    def finish(name: str) -> None:
        complete(batch, name)
        completed[name] = time.monotonic()

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(finish, names))
    wait_for("phase Succeeded", lambda: all(n in done.seen for n in names), timeout)
    to_succeeded = [done.seen[n] - completed[n] for n in names]
    return to_job, to_succeeded, all_jobs


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def control_plane_cpu(env: KubeEnvironment) -> dict[str, float]:
    """CPU seconds so far of etcd, kube-apiserver, kube-controller-manager and kube-scheduler."""
    processes = env.cluster.control_plane.processes
    return {name: cpu_seconds(process.pid) for name, process in processes.items()}


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def start_watchers(api, batch) -> tuple[Watcher, Watcher]:
    jobs = Watcher(batch.list_namespaced_job, lambda o: True, namespace=NAMESPACE)
    done = Watcher(
        api.list_namespaced_custom_object,
        lambda o: (o.get("status") or {}).get("phase") == "Succeeded",
        group=contract.GROUP, version=contract.VERSION, namespace=NAMESPACE, plural=contract.PLURAL,
    )  # fmt: skip
    jobs.start(), done.start()
    time.sleep(1)  # both watches established
    return jobs, done


def measure(env: KubeEnvironment, operator: OperatorProcess, args) -> dict:
    """The single rounds, then the bulk round, with the CPU time each process spent on it."""
    api_client = config.new_client_from_config(str(env.cluster.kubeconfig))
    api, batch = client.CustomObjectsApi(api_client), client.BatchV1Api(api_client)
    jobs, done = start_watchers(api, batch)
    single_job, single_done = [], []
    for i in range(args.singles):
        to_job, to_done, _ = run_round([f"single-{i}"], api, batch, jobs, done, 60)
        single_job += to_job
        single_done += to_done
    names = [f"bulk-{i:03d}" for i in range(args.count)]
    operator_before, own_before = cpu_seconds(operator.process.pid), own_cpu_seconds()
    plane_before = control_plane_cpu(env)
    start = time.monotonic()
    bulk_job, bulk_done, all_jobs = run_round(names, api, batch, jobs, done, 300)
    bulk_wall = time.monotonic() - start
    plane = {k: round(v - plane_before[k], 2) for k, v in control_plane_cpu(env).items()}
    jobs.stop(), done.stop()
    return {
        "single_create_to_job_s": percentiles(single_job),
        "single_complete_to_succeeded_s": percentiles(single_done),
        "bulk_count": args.count,
        "bulk_create_to_job_s": percentiles(bulk_job),
        "bulk_complete_to_succeeded_s": percentiles(bulk_done),
        "bulk_all_jobs_within_s": round(all_jobs, 2),
        "operator_peak_rss_mib": peak_rss_mib(operator.process.pid),
        # where the bulk round's time went: CPU seconds of the operator, of the control plane
        # (per component and in all) and of this process (its clients and watches, and the
        # local kubelet, which runs in it), against the round's wall time
        "bulk_wall_s": round(bulk_wall, 2),
        "bulk_operator_cpu_s": round(cpu_seconds(operator.process.pid) - operator_before, 2),
        "bulk_control_plane_cpu_s": round(sum(plane.values()), 2),
        "bulk_control_plane_cpu_s_by_process": plane,
        "bulk_benchmark_process_cpu_s": round(own_cpu_seconds() - own_before, 2),
        "cpus": os.cpu_count(),
    }


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = start_cluster(root, controllers=WITHOUT_JOB_CONTROLLER)
        operator = None
        try:
            env.kubectl.apply(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
            )
            env.kubectl.apply(pvc("datasets", NAMESPACE), pvc("runs", NAMESPACE))
            log = root / "operator.log"
            operator = OperatorProcess(env.operator_kubeconfig, log).wait_healthy()
            return measure(env, operator, args)
        except BaseException:
            log = root / "operator.log"
            if log.exists():
                print(log.read_text()[-4000:], file=sys.stderr)
            raise
        finally:
            if operator is not None:
                operator.stop()
            env.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="resources created at once")
    parser.add_argument("--singles", type=int, default=10, help="one-at-a-time repetitions")
    args = parser.parse_args()
    figures = run(args)
    print(f"1 resource ({args.singles} times): create→Job {figures['single_create_to_job_s']}, "
          f"Job complete→Succeeded {figures['single_complete_to_succeeded_s']}")  # fmt: skip
    print(f"{args.count} resources at once: create→Job {figures['bulk_create_to_job_s']}, "
          f"Job complete→Succeeded {figures['bulk_complete_to_succeeded_s']}, all Jobs within "
          f"{figures['bulk_all_jobs_within_s']} s")  # fmt: skip
    print(f"bulk round: {figures['bulk_wall_s']} s wall; CPU s: operator "
          f"{figures['bulk_operator_cpu_s']}, control plane "
          f"{figures['bulk_control_plane_cpu_s_by_process']}, this process "
          f"{figures['bulk_benchmark_process_cpu_s']}")  # fmt: skip
    print(f"operator peak RSS: {figures['operator_peak_rss_mib']} MiB")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
