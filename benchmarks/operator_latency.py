"""Operator latency: resource created → Job created, and Job complete → phase Succeeded.

Runs the API emulator (tests/kube) without its Job controller, so that this script plays the
Job controller itself: it marks each Job complete and times how long the operator takes to
report the training Succeeded. The operator runs as its own process (`instseg-operator`), as
in production; times are taken by watches, not polls.

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kubernetes import client, config, watch  # noqa: E402
from tests.cluster import OperatorProcess, pvc, start_cluster, wait_for  # noqa: E402

from instseg_operator import manifests as mf  # noqa: E402

NAMESPACE = "bench"


class Watcher(threading.Thread):
    """Records the monotonic time at which each object first satisfies `test`."""

    def __init__(self, list_call, test, **kwargs) -> None:
        super().__init__(daemon=True)
        self.list_call, self.test, self.kwargs = list_call, test, kwargs
        self.seen: dict[str, float] = {}
        self.stream = watch.Watch()

    def run(self) -> None:
        for event in self.stream.stream(self.list_call, **self.kwargs):
            obj = event["object"]
            obj = (
                obj if isinstance(obj, dict) else client.ApiClient().sanitize_for_serialization(obj)
            )
            name = obj["metadata"]["name"]
            if name not in self.seen and event["type"] != "DELETED" and self.test(obj):
                self.seen[name] = time.monotonic()

    def stop(self) -> None:
        self.stream.stop()


def training(name: str) -> dict:
    return {
        "apiVersion": mf.API_VERSION,
        "kind": mf.KIND,
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "template": "MaskRCNN-ResNet50",
            "data": {"train": {"claimName": "datasets"}, "val": {"claimName": "datasets"}},
            "output": {"claimName": "runs", "subPath": name},
            "hyperparameters": {"epochs": 1},
        },
    }


def complete(batch: client.BatchV1Api, name: str) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = {
        "startTime": now,
        "completionTime": now,
        "succeeded": 1,
        "conditions": [
            {"type": "Complete", "status": "True", "lastProbeTime": now,
             "lastTransitionTime": now, "reason": "Completed", "message": "done"},
        ],
    }  # fmt: skip
    batch.patch_namespaced_job_status(mf.job_name(name), NAMESPACE, {"status": status})


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 3), "p95": round(p95, 3)}


def run_round(names: list[str], api, batch, jobs: Watcher, done: Watcher, timeout: float):
    """Creates `names` at once, waits for their Jobs, completes the Jobs, waits for Succeeded."""
    created: dict[str, float] = {}

    def create(name: str) -> None:
        api.create_namespaced_custom_object(
            mf.GROUP, mf.VERSION, NAMESPACE, mf.PLURAL, training(name)
        )
        created[name] = time.monotonic()

    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(create, names))
    wait_for("the Jobs", lambda: all(mf.job_name(n) in jobs.seen for n in names), timeout)
    all_jobs = max(jobs.seen[mf.job_name(n)] for n in names) - start
    to_job = [jobs.seen[mf.job_name(n)] - created[n] for n in names]
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
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="resources created at once")
    parser.add_argument("--singles", type=int, default=10, help="one-at-a-time repetitions")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        emulator, kubectl = start_cluster(root, controllers=False)
        operator = None
        try:
            kubectl.apply(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
            )
            kubectl.apply(pvc("datasets", NAMESPACE), pvc("runs", NAMESPACE))
            operator = OperatorProcess(emulator.kubeconfig, root / "operator.log").wait_healthy()
            api_client = config.new_client_from_config(str(emulator.kubeconfig))
            api, batch = client.CustomObjectsApi(api_client), client.BatchV1Api(api_client)
            jobs = Watcher(batch.list_namespaced_job, lambda o: True, namespace=NAMESPACE)
            done = Watcher(
                api.list_namespaced_custom_object,
                lambda o: (o.get("status") or {}).get("phase") == "Succeeded",
                group=mf.GROUP, version=mf.VERSION, namespace=NAMESPACE, plural=mf.PLURAL,
            )  # fmt: skip
            jobs.start(), done.start()
            time.sleep(1)  # both watches established
            single_job, single_done = [], []
            for i in range(args.singles):
                to_job, to_done, _ = run_round([f"single-{i}"], api, batch, jobs, done, 60)
                single_job += to_job
                single_done += to_done
            names = [f"bulk-{i:03d}" for i in range(args.count)]
            operator_cpu = cpu_seconds(operator.process.pid)
            own_cpu = resource.getrusage(resource.RUSAGE_SELF)
            start = time.monotonic()
            bulk_job, bulk_done, all_jobs = run_round(names, api, batch, jobs, done, 300)
            bulk_wall = time.monotonic() - start
            operator_cpu = cpu_seconds(operator.process.pid) - operator_cpu
            after = resource.getrusage(resource.RUSAGE_SELF)
            own_cpu = after.ru_utime + after.ru_stime - own_cpu.ru_utime - own_cpu.ru_stime
            jobs.stop(), done.stop()
            figures = {
                "single_create_to_job_s": percentiles(single_job),
                "single_complete_to_succeeded_s": percentiles(single_done),
                "bulk_count": args.count,
                "bulk_create_to_job_s": percentiles(bulk_job),
                "bulk_complete_to_succeeded_s": percentiles(bulk_done),
                "bulk_all_jobs_within_s": round(all_jobs, 2),
                "operator_peak_rss_mib": peak_rss_mib(operator.process.pid),
                # where the bulk round's time went: CPU seconds of the operator and of this
                # process (the emulated API server + the benchmark's clients), against its wall
                "bulk_wall_s": round(bulk_wall, 2),
                "bulk_operator_cpu_s": round(operator_cpu, 2),
                "bulk_api_server_and_client_cpu_s": round(own_cpu, 2),
                "cpus": os.cpu_count(),
            }
        except BaseException:
            log = root / "operator.log"
            if log.exists():
                print(log.read_text()[-4000:], file=sys.stderr)
            raise
        finally:
            if operator is not None:
                operator.stop()
            emulator.stop()
    print(f"1 resource ({args.singles} times): create→Job {figures['single_create_to_job_s']}, "
          f"Job complete→Succeeded {figures['single_complete_to_succeeded_s']}")  # fmt: skip
    print(f"{args.count} resources at once: create→Job {figures['bulk_create_to_job_s']}, "
          f"Job complete→Succeeded {figures['bulk_complete_to_succeeded_s']}, all Jobs within "
          f"{figures['bulk_all_jobs_within_s']} s")  # fmt: skip
    print(f"operator peak RSS: {figures['operator_peak_rss_mib']} MiB")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
