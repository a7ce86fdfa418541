"""The local cluster the operator's tests run on behaves like Kubernetes where they rely on it:
the real control plane's version and admission, claims bound to directories, and the local
kubelet's pods (env from the downward API, volumes where the pod mounts them, a real
service-account token, exit codes, graceful deletion)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from tests.cluster import KubeEnvironment, pvc, wait_for

# a process that is not root: who it is, then a write to the volume's root
WRITER = (
    "import os, pathlib; print('identity', os.getuid(), os.getgid(), sorted(os.getgroups()));"
    " pathlib.Path('/out/written').write_text('ok')"
)

NAMESPACE = "local-cluster"
# the pod's own view: env, its mounts, and an in-cluster API call with its token
PROBE = textwrap.dedent(
    """
    import json, os, pathlib, sys
    from kubernetes import client, config
    config.load_incluster_config()
    me = client.CoreV1Api().read_namespaced_pod(os.environ["POD_NAME"], os.environ["POD_NS"])
    pathlib.Path("/probe/probe.json").write_text(json.dumps({
        "uid": me.metadata.uid, "node": os.environ["NODE"], "ip": os.environ["POD_IP"],
        "hostname": os.uname().nodename,
    }))
    sys.exit(int(os.environ.get("EXIT_CODE", "0")))
    """
)


@pytest.fixture(scope="module")
def namespace(kube: KubeEnvironment) -> str:
    kube.kubectl.apply(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        pvc("work", NAMESPACE),
        pvc("block", NAMESPACE),  # root-owned 0755, like a fresh block device
        # the probe reads its own pod through the API, as the trainer patches its training
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "view", "namespace": NAMESPACE},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "view"},
         "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": NAMESPACE}]},
    )  # fmt: skip
    return NAMESPACE


def probe_pod(name: str, exit_code: int = 0, command: list[str] | None = None) -> dict:
    field = lambda path: {"valueFrom": {"fieldRef": {"fieldPath": path}}}  # noqa: E731
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "probe", "image": "python:3.11",
                "command": command or [sys.executable, "-c", PROBE],
                "env": [{"name": "POD_NAME", **field("metadata.name")},
                        {"name": "POD_NS", **field("metadata.namespace")},
                        {"name": "NODE", **field("spec.nodeName")},
                        {"name": "POD_IP", **field("status.podIP")},
                        {"name": "EXIT_CODE", "value": str(exit_code)}],
                "volumeMounts": [{"name": "work", "mountPath": "/probe", "subPath": name}],
            }],
            "volumes": [{"name": "work", "persistentVolumeClaim": {"claimName": "work"}}],
        },
    }  # fmt: skip


def pod_phase(kube: KubeEnvironment, name: str) -> str | None:
    pod = kube.kubectl.json("pod", name, "-n", NAMESPACE)
    phase = pod["status"].get("phase")
    return phase if phase in ("Succeeded", "Failed") else None


def test_the_control_plane_is_kubernetes_1_34(kube: KubeEnvironment) -> None:
    version = json.loads(kube.kubectl("version", "-o", "json"))
    assert version["serverVersion"]["gitVersion"] == "v1.34.5"
    (node,) = kube.kubectl.json("nodes")["items"]
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
    assert ready == "True" and node["status"]["allocatable"]["nvidia.com/gpu"] == "8"


def test_a_pod_runs_with_its_env_volumes_and_token(kube: KubeEnvironment, namespace: str) -> None:
    kube.kubectl.apply(probe_pod("probe"))
    assert wait_for("the probe pod to finish", lambda: pod_phase(kube, "probe"), 60) == "Succeeded"
    claim = kube.kubectl.json("pvc", "work", "-n", namespace)
    assert claim["status"]["phase"] == "Bound"  # by the real PV binder
    work = kube.cluster.volume_dir(namespace, "work")
    seen = json.loads((work / "probe" / "probe.json").read_text())
    pod = kube.kubectl.json("pod", "probe", "-n", namespace)
    assert seen == {"uid": pod["metadata"]["uid"], "node": "local", "ip": pod["status"]["podIP"],
                    "hostname": "probe"}  # fmt: skip
    (status,) = pod["status"]["containerStatuses"]
    assert status["state"]["terminated"]["exitCode"] == 0


def test_a_failing_container_reports_its_exit_code(kube: KubeEnvironment, namespace: str) -> None:
    kube.kubectl.apply(probe_pod("fails", exit_code=3))
    assert wait_for("the failing pod", lambda: pod_phase(kube, "fails"), 60) == "Failed"
    pod = kube.kubectl.json("pod", "fails", "-n", namespace)
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (3, "Error")


def test_deleting_a_pod_stops_its_process_gracefully(kube: KubeEnvironment, namespace: str) -> None:
    trap = ("import pathlib, signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path('/probe/term').write_text('1'),"
            " sys.exit(0)))\npathlib.Path('/probe/ready').write_text('1')\n"
            "while True: time.sleep(0.1)\n")  # fmt: skip
    kube.kubectl.apply(probe_pod("sleeper", command=[sys.executable, "-c", trap]))
    work = kube.cluster.volume_dir(namespace, "work") / "sleeper"
    wait_for("the sleeper to trap SIGTERM", lambda: (work / "ready").is_file(), 60)
    kube.kubectl("delete", "pod", "sleeper", "-n", namespace, "--timeout=60s")
    assert (work / "term").read_text() == "1"


def non_root_pod(name: str, fs_group: int | None) -> dict:
    context = {"runAsUser": 10001, "runAsGroup": 10001, "runAsNonRoot": True}
    if fs_group is not None:
        context |= {"fsGroup": fs_group, "fsGroupChangePolicy": "OnRootMismatch"}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "restartPolicy": "Never", "securityContext": context,
            "containers": [{
                "name": "writer", "image": "python:3.11",
                "command": [sys.executable, "-c", WRITER],
                "securityContext": {"allowPrivilegeEscalation": False},
                "volumeMounts": [{"name": "block", "mountPath": "/out"}],
            }],
            "volumes": [{"name": "block", "persistentVolumeClaim": {"claimName": "block"}}],
        },
    }  # fmt: skip


def test_a_non_root_pod_writes_to_a_root_owned_volume_only_through_fs_group(
    kube: KubeEnvironment, namespace: str
) -> None:
    block = kube.cluster.volume_dir(namespace, "block")
    kube.kubectl.apply(non_root_pod("no-fs-group", None))
    assert wait_for("the pod without fsGroup", lambda: pod_phase(kube, "no-fs-group"), 60) \
        == "Failed"  # fmt: skip
    log = kube.kubectl("logs", "no-fs-group", "-n", namespace)
    assert "identity 10001 10001 []" in log and "Permission denied: '/out/written'" in log

    kube.kubectl.apply(non_root_pod("fs-group", 10001))
    assert wait_for("the pod with fsGroup", lambda: pod_phase(kube, "fs-group"), 60) \
        == "Succeeded"  # fmt: skip
    assert "identity 10001 10001 [10001]" in kube.kubectl("logs", "fs-group", "-n", namespace)
    written = (block / "written").stat()
    assert (written.st_uid, written.st_gid) == (10001, 10001)
    root = block.stat()
    assert root.st_gid == 10001 and root.st_mode & 0o2070 == 0o2070  # setgid, group rwx


def test_run_as_non_root_without_a_user_is_refused(kube: KubeEnvironment, namespace: str) -> None:
    pod = non_root_pod("image-root", None)
    del pod["spec"]["securityContext"]["runAsUser"]
    kube.kubectl.apply(pod)

    def waiting() -> dict | None:
        statuses = kube.kubectl.json("pod", "image-root", "-n", namespace)["status"]
        state = (statuses.get("containerStatuses") or [{}])[0].get("state") or {}
        return state.get("waiting") if (state.get("waiting") or {}).get("message") else None

    state = wait_for("the refusal", waiting, 60)
    assert state["reason"] == "CreateContainerConfigError"
    assert state["message"] == "container has runAsNonRoot and image will run as root"
    kube.kubectl("delete", "pod", "image-root", "-n", namespace, "--wait=false")
