"""Operator reliability: trainings carry on through operator crashes and trainer pod kills.

Runs the whole local cluster (tests/kube: the real control plane with its Job controller,
the local kubelet running pods as processes) and the real trainer on tiny CPU data
(examples/training.yaml with the end-to-end tests' tiny hyperparameters, no GPU).

Round A (--trainings 20 --kills 10): applies the trainings at once, then SIGKILLs the operator
at --kills random moments and starts a replacement each time. A moment is "a random 0-10 s
after a random number (0 to trainings-1) of the trainings have finished", so the kills fall on
Job creation, on running trainings and on completions alike. Checks: exactly one Job ever
created per training (every Job uid seen by a watch), all Succeeded, no status lost (phase
Succeeded, progress.epochText E/E, completionTime and a Succeeded=True condition).

Round B (--pod-kills 5): as many trainings (--resume-epochs epochs); at each moment a random
trainer pod past its first checkpoint (last.pt saved, training not finished) is deleted with
gracePeriodSeconds=0, one kill per training. Checks: every training Succeeds, and its
metrics.jsonl has a `start` event after the kill with resumed_at_iteration > 0 (it went on
from last.pt, not from scratch). The Job controller counts a deleted pod as a failed one
against backoffLimit (3 by default); the figures show the Jobs' failed counts.

Pacing: a tiny trainer takes about 2 GiB and both cores of a 2-core machine, so each training
asks for the node's allocatable CPU / --concurrency (default 2): the real scheduler runs that
many at once and the rest wait Pending (Insufficient cpu), as on a full cluster. On 2 cores
the full run takes about 10 minutes (5 for each round), --quick (6 trainings, 3 kills, 2 pod
kills) about 3.

    .venv/bin/python benchmarks/operator_reliability.py [--quick] [--seed 1] [--standalone]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml
from urllib3.exceptions import ProtocolError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import instseg_contract as contract  # noqa: E402
from kubernetes import client, config, watch  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402
from kubernetes.utils import parse_quantity  # noqa: E402
from tests.cluster import (  # noqa: E402
    ROOT,
    KubeEnvironment,
    OperatorProcess,
    pvc,
    start_cluster,
    wait_for,
)

from instseg_operator import manifests  # noqa: E402
from instseg_trainer.sample_data import write_sample_dataset  # noqa: E402

EXAMPLE = yaml.safe_load((ROOT / "examples" / "training.yaml").read_text())
# as tests/test_operator_e2e.py: a few CPU seconds per epoch (4 images of 64-96 px, batches of 2)
TINY = {"batchSize": 2, "inputSize": 64, "backboneWeights": "none", "warmupIterations": 1}
MANAGED = ",".join(f"{key}={value}" for key, value in manifests.MANAGED_BY.items())
TERMINAL = ("Succeeded", "Failed")
ROUND_TIMEOUT = 1500
# a SIGKILLed replica's peering record stays for kopf's 60 s lifetime, an older record outranks
# a newer one and equal priorities pause every replica: replacement k gets this + k
REPLACEMENT_PRIORITY = 2**62


@dataclass
class Clients:
    custom: client.CustomObjectsApi
    core: client.CoreV1Api
    batch: client.BatchV1Api


def admin_clients(env: KubeEnvironment) -> Clients:
    api = config.new_client_from_config(str(env.cluster.kubeconfig))
    return Clients(client.CustomObjectsApi(api), client.CoreV1Api(api), client.BatchV1Api(api))


class JobLedger(threading.Thread):
    """Every Job uid seen in `namespace`, by training: a watch, so a Job that is created and
    replaced between two looks is counted too."""

    def __init__(self, batch: client.BatchV1Api, namespace: str) -> None:
        super().__init__(daemon=True)
        self.batch, self.namespace = batch, namespace
        self.uids: dict[str, set[str]] = defaultdict(set)
        self.stream = watch.Watch()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                for event in self.stream.stream(
                    self.batch.list_namespaced_job, self.namespace, label_selector=MANAGED
                ):
                    meta = event["object"].metadata
                    owner = (meta.annotations or {}).get(manifests.TRAINING_ANNOTATION, meta.name)
                    self.uids[owner].add(meta.uid)
            except (ApiException, ProtocolError):  # 410 Gone, a dropped watch: list again
                time.sleep(0.5)

    def stop(self) -> None:
        self.stopped.set()
        self.stream.stop()


class OperatorReplicas:
    """The operator, and a replacement after each SIGKILL (logs: operator-<k>.log)."""

    def __init__(self, kubeconfig: Path, root: Path, standalone: bool) -> None:
        self.kubeconfig, self.root, self.standalone = kubeconfig, root, standalone
        self.kills = 0
        self.current = self._start(priority=None)

    def _start(self, priority: int | None) -> OperatorProcess:
        extra = ("--standalone",) if self.standalone else ()
        log = self.root / f"operator-{self.kills}.log"
        self.current = OperatorProcess(self.kubeconfig, log, *extra, priority=priority)
        return self.current.wait_healthy()

    def kill_and_replace(self) -> float:
        """SIGKILLs the running replica, starts the next; seconds until it is healthy."""
        self.current.process.kill()
        self.current.process.wait()
        self.kills += 1
        started = time.monotonic()
        self._start(None if self.standalone else REPLACEMENT_PRIORITY + self.kills)
        return time.monotonic() - started

    def replicas_that_paused(self) -> int:
        """Replicas whose log says kopf paused them for a peer (none should be)."""
        logs = self.root.glob("operator-*.log")
        return sum("Pausing" in log.read_text(errors="replace") for log in logs)

    def log_tail(self) -> str:
        return self.current.log.read_text()[-4000:] if self.current.log.exists() else ""

    def stop(self) -> None:
        self.current.stop()


def training(name: str, namespace: str, epochs: int, cpu: str) -> dict:
    resource = copy.deepcopy(EXAMPLE)
    resource["metadata"] = {"name": name, "namespace": namespace}
    spec = resource["spec"]
    spec["output"] = {"claimName": "instseg-runs", "subPath": name}
    spec["hyperparameters"] = {**TINY, "epochs": epochs}
    spec["resources"] = {"gpus": 0, "cpu": cpu}
    return resource


def cpu_per_training(core: client.CoreV1Api, concurrency: int) -> str:
    """A CPU request that lets the scheduler run `concurrency` trainers at once on the node."""
    (node,) = core.list_node().items
    millicores = int(parse_quantity(node.status.allocatable["cpu"]) * 1000)
    return f"{millicores // concurrency}m"


def prepare_namespace(env: KubeEnvironment, name: str) -> str:
    env.kubectl.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    env.kubectl.apply(pvc("datasets", name), pvc("instseg-runs", name))
    data = env.cluster.volume_dir(name, "datasets") / "shapes"
    write_sample_dataset(data, num_train=4, num_val=2, seed=1, min_size=64, max_size=96)
    return name


def statuses(clients: Clients, namespace: str) -> dict[str, dict]:
    items = clients.custom.list_namespaced_custom_object(
        contract.GROUP, contract.VERSION, namespace, contract.PLURAL
    )["items"]
    return {item["metadata"]["name"]: item.get("status") or {} for item in items}


def finished_count(clients: Clients, namespace: str) -> int:
    return sum(s.get("phase") in TERMINAL for s in statuses(clients, namespace).values())


def wait_finished(clients: Clients, namespace: str, count: int) -> dict[str, dict]:
    """Waits until `count` trainings of `namespace` are Succeeded or Failed; their statuses."""
    wait_for(
        f"{count} trainings in {namespace} to finish",
        lambda: finished_count(clients, namespace) >= count,
        ROUND_TIMEOUT, every=1,
    )  # fmt: skip
    return statuses(clients, namespace)


def status_lost(status: dict, epochs: int) -> list[str]:
    """What a Succeeded training's final status should have and does not."""
    missing = []
    if status.get("phase") != "Succeeded":
        missing.append(f"phase {status.get('phase')}")
    epoch_text = (status.get("progress") or {}).get("epochText")
    if epoch_text != f"{epochs}/{epochs}":
        missing.append(f"epochText {epoch_text}")
    if not status.get("completionTime"):
        missing.append("completionTime")
    conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
    if conditions.get("Succeeded") != "True":
        missing.append(f"Succeeded condition {conditions.get('Succeeded')}")
    return missing


def kill_moments(rng: random.Random, kills: int, trainings: int) -> list[tuple[int, float]]:
    """(trainings finished, then seconds) for each kill, in order."""
    return sorted((rng.randrange(trainings), round(rng.uniform(0, 10), 1)) for _ in range(kills))


def kill_operator_at_moments(clients, namespace, replicas, moments, trainings) -> list[dict]:
    kills = []
    for finished, delay in moments:
        wait_finished(clients, namespace, finished)
        time.sleep(delay)
        active = trainings - finished_count(clients, namespace)
        restart_s = replicas.kill_and_replace()
        kills.append({"active": active, "replacement_healthy_s": round(restart_s, 1)})
    return kills


def round_operator_kills(env, clients, replicas, args, rng) -> dict:
    """Round A: the operator SIGKILLed at random moments while `args.trainings` train."""
    namespace = prepare_namespace(env, "operator-kills")
    ledger = JobLedger(clients.batch, namespace)
    ledger.start()
    cpu = cpu_per_training(clients.core, args.concurrency)
    names = [f"t{i:02d}" for i in range(args.trainings)]
    start = time.monotonic()
    env.kubectl.apply(*[training(n, namespace, args.epochs, cpu) for n in names])
    moments = kill_moments(rng, args.kills, args.trainings)
    kills = kill_operator_at_moments(clients, namespace, replicas, moments, args.trainings)
    final = wait_finished(clients, namespace, args.trainings)
    wall = time.monotonic() - start
    ledger.stop()
    jobs_now = clients.batch.list_namespaced_job(namespace, label_selector=MANAGED).items
    lost = {n: problems for n in names if (problems := status_lost(final[n], args.epochs))}
    return {
        "trainings": args.trainings,
        "epochs": args.epochs,
        "operator_kills": len(kills),
        "kills_while_trainings_active": sum(k["active"] > 0 for k in kills),
        "kill_moments": [{"after_finished": f, "delay_s": d} for f, d in moments],
        "replacement_healthy_s": [k["replacement_healthy_s"] for k in kills],
        "replicas_that_paused": replicas.replicas_that_paused(),
        "jobs_created": sum(len(ledger.uids[n]) for n in names),
        "trainings_with_exactly_one_job": sum(len(ledger.uids[n]) == 1 for n in names),
        "jobs_at_end": len(jobs_now),
        "succeeded": sum(final[n].get("phase") == "Succeeded" for n in names),
        "status_lost": len(lost),
        "status_lost_detail": lost,
        "wall_s": round(wall, 1),
    }


def run_events(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def killable_pods(clients, namespace, runs: Path, killed: set[str]) -> list[tuple[str, str]]:
    """(pod, training) of each running trainer pod past its first checkpoint, not finished
    and not killed before."""
    found = []
    for pod in clients.core.list_namespaced_pod(namespace, label_selector=MANAGED).items:
        name = (pod.metadata.annotations or {}).get(manifests.TRAINING_ANNOTATION)
        running = pod.status.phase == "Running" and not pod.metadata.deletion_timestamp
        if name is None or not running or name in killed:
            continue
        events = run_events(runs / name)
        if (runs / name / "last.pt").exists() and not any(e["event"] == "final" for e in events):
            found.append((pod.metadata.name, name))
    return sorted(found)


def kill_trainer_pod(clients, namespace, runs: Path, killed: dict, rng) -> None:
    """Deletes one random killable trainer pod with grace period 0, a random 0-3 s after one
    is found; records the training's `start` events so far in `killed`."""
    while True:
        candidates = wait_for(
            "a trainer pod past its first checkpoint",
            lambda: killable_pods(clients, namespace, runs, set(killed)), ROUND_TIMEOUT, every=0.5,
        )  # fmt: skip
        pod, name = rng.choice(candidates)
        time.sleep(rng.uniform(0, 3))
        if (pod, name) not in killable_pods(clients, namespace, runs, set(killed)):
            continue  # it finished, or its pod went, meanwhile: draw again
        starts = sum(e["event"] == "start" for e in run_events(runs / name))
        clients.core.delete_namespaced_pod(pod, namespace, grace_period_seconds=0)
        killed[name] = {"pod": pod, "starts_before_kill": starts}
        return


def resume_report(name: str, kill: dict | None, runs: Path, status: dict, job) -> dict:
    events = run_events(runs / name)
    starts = [e["resumed_at_iteration"] for e in events if e["event"] == "start"]
    after_kill = starts[kill["starts_before_kill"] :] if kill else []
    return {
        "phase": status.get("phase"),
        "killed_pod": kill["pod"] if kill else None,
        "start_resumed_at_iteration": starts,
        "resumed_from_checkpoint": any(iteration > 0 for iteration in after_kill),
        "finals": [e["status"] for e in events if e["event"] == "final"],
        "job_failed_pods": (job.status.failed or 0) if job else None,
    }


def round_pod_kills(env, clients, args, rng) -> dict:
    """Round B: one trainer pod per training deleted with grace 0 at a random moment."""
    namespace = prepare_namespace(env, "pod-kills")
    runs = env.cluster.volume_dir(namespace, "instseg-runs")
    cpu = cpu_per_training(clients.core, args.concurrency)
    names = [f"p{i:02d}" for i in range(args.pod_kills)]
    start = time.monotonic()
    env.kubectl.apply(*[training(n, namespace, args.resume_epochs, cpu) for n in names])
    killed: dict[str, dict] = {}
    for _ in names:
        kill_trainer_pod(clients, namespace, runs, killed, rng)
    final = wait_finished(clients, namespace, len(names))
    wall = time.monotonic() - start
    jobs = {
        job.metadata.annotations.get(manifests.TRAINING_ANNOTATION): job
        for job in clients.batch.list_namespaced_job(namespace, label_selector=MANAGED).items
    }
    detail = {n: resume_report(n, killed.get(n), runs, final[n], jobs.get(n)) for n in names}
    return {
        "trainings": len(names),
        "epochs": args.resume_epochs,
        "pod_kills": len(killed),
        "succeeded": sum(d["phase"] == "Succeeded" for d in detail.values()),
        "resumed_from_checkpoint": sum(d["resumed_from_checkpoint"] for d in detail.values()),
        "job_failed_pods": sum(d["job_failed_pods"] or 0 for d in detail.values()),
        "status_lost": sum(bool(status_lost(final[n], args.resume_epochs)) for n in names),
        "detail": detail,
        "wall_s": round(wall, 1),
    }


def run(args) -> dict:
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = start_cluster(root)
        replicas = None
        try:
            clients = admin_clients(env)
            replicas = OperatorReplicas(env.operator_kubeconfig, root, args.standalone)
            round_a = round_operator_kills(env, clients, replicas, args, rng)
            print_round_a(round_a)
            round_b = round_pod_kills(env, clients, args, rng)
            print_round_b(round_b)
            return {"operator_kills_round": round_a, "pod_kills_round": round_b}
        except BaseException:
            if replicas is not None:
                print(replicas.log_tail(), file=sys.stderr)
            raise
        finally:
            if replicas is not None:
                replicas.stop()
            env.stop()


def print_round_a(figures: dict) -> None:
    print(f"round A: {figures['trainings']} trainings, operator SIGKILLed "
          f"{figures['operator_kills']} times ({figures['kills_while_trainings_active']} while "
          f"trainings were active): {figures['jobs_created']} Jobs created "
          f"({figures['trainings_with_exactly_one_job']} trainings with exactly one), "
          f"{figures['succeeded']} Succeeded, status lost on {figures['status_lost']}, "
          f"{figures['wall_s']} s")  # fmt: skip


def print_round_b(figures: dict) -> None:
    print(
        f"round B: {figures['trainings']} trainings, {figures['pod_kills']} trainer pods "
        f"deleted with grace 0: {figures['succeeded']} Succeeded, "
        f"{figures['resumed_from_checkpoint']} resumed from last.pt, "
        f"{figures['job_failed_pods']} pod failures counted by the Jobs, {figures['wall_s']} s"
    )
    for name, detail in figures["detail"].items():
        print(f"  {name}: {detail}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainings", type=int, default=20, help="round A's trainings")
    parser.add_argument("--kills", type=int, default=10, help="round A's operator SIGKILLs")
    parser.add_argument("--epochs", type=int, default=1, help="round A's epochs per training")
    parser.add_argument("--pod-kills", type=int, default=5, help="round B: trainings = kills")
    parser.add_argument("--resume-epochs", type=int, default=3, help="round B's epochs")
    parser.add_argument("--concurrency", type=int, default=2, help="trainers running at once")
    parser.add_argument("--seed", type=int, default=1, help="seeds the kill moments")
    parser.add_argument("--standalone", action="store_true", help="operators without peering")
    parser.add_argument("--quick", action="store_true", help="6 trainings, 3 kills, 2 pod kills")
    args = parser.parse_args()
    if args.quick:
        args.trainings, args.kills, args.pod_kills = 6, 3, 2
    return args


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    figures = run(args)
    figures.update(
        seed=args.seed,
        concurrency=args.concurrency,
        standalone=args.standalone,
        wall_s=round(time.monotonic() - started, 1),
        cpus=os.cpu_count(),
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
