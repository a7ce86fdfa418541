"""The local kubelet's pure parts (tests/kube/kubelet.py) and its pod network
(tests/kube/network.py); the kubelet against the real control plane is tested in
test_local_cluster.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.kube.identity import (
    Identity,
    RunAsRootRefused,
    apply_fs_group,
    container_identity,
    exec_prefix,
    image_view_lines,
)
from tests.kube.kubelet import (
    DirectoryProvisioner,
    Mount,
    expand,
    field_ref,
    find_executable,
    hosts_entries,
    launch_script,
    log_tail,
    pod_hostname,
    qos_class,
    resource_field_ref,
    start_error_message,
    terminated_state,
)
from tests.kube.network import PodNetwork, hosts_file_text


def test_expand_follows_kubernetes_rules():
    values = {"A": "1", "JOB_COMPLETION_INDEX": "3"}
    assert expand("--node-rank=$(JOB_COMPLETION_INDEX)", values) == "--node-rank=3"
    assert expand("$(A)$(A)", values) == "11"
    assert expand("$$(A)", values) == "$(A)"  # escaped
    assert expand("$(MISSING)", values) == "$(MISSING)"  # unknown: kept
    assert expand("$(A", values) == "$(A"  # unterminated: literal
    assert expand("cost: $5 $", values) == "cost: $5 $"


def pod_with(resources: list[dict], **meta) -> dict:
    containers = [{"name": f"c{i}", "resources": r} for i, r in enumerate(resources)]
    return {
        "metadata": {"name": "p", "namespace": "ns", **meta},
        "spec": {"containers": containers},
    }


def test_qos_class():
    both = {"cpu": "500m", "memory": "1Gi"}
    assert qos_class(pod_with([{}])) == "BestEffort"
    assert qos_class(pod_with([{"limits": {"nvidia.com/gpu": "1"}}])) == "BestEffort"
    assert qos_class(pod_with([{"requests": both, "limits": both}])) == "Guaranteed"
    assert qos_class(pod_with([{"requests": both, "limits": both}, {}])) == "Burstable"
    assert qos_class(pod_with([{"requests": {"cpu": "1"}}])) == "Burstable"


def test_downward_api_values():
    pod = pod_with(
        [{"limits": {"memory": "2Gi"}, "requests": {"cpu": "250m"}}],
        uid="u-1",
        labels={"b": "2", "a": "1"},
        annotations={"batch.kubernetes.io/job-completion-index": "4"},
    )
    annotation = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert field_ref(pod, annotation, "10.0.0.2", "10.0.0.1") == "4"
    assert field_ref(pod, "metadata.labels", "", "") == 'a="1"\nb="2"'
    assert field_ref(pod, "status.podIP", "10.0.0.2", "10.0.0.1") == "10.0.0.2"
    allocatable = {"cpu": "16", "memory": "64Gi"}
    limit = {"resource": "limits.memory", "divisor": "1Mi"}
    assert resource_field_ref(pod, "c0", limit, allocatable) == "2048"
    assert resource_field_ref(pod, "c0", {"resource": "requests.cpu"}, allocatable) == "1"
    assert resource_field_ref(pod, "c0", {"resource": "limits.cpu"}, allocatable) == "16"


def test_hosts_name_pods_with_hostname_and_subdomain():
    def pod(name, hostname=None, subdomain=None):
        spec = {"hostname": hostname, "subdomain": subdomain}
        return {"metadata": {"name": name, "namespace": "ns", "uid": name}, "spec": spec}

    me, worker, plain = pod("j-0-x", "j-0", "svc"), pod("j-1-y", "j-1", "svc"), pod("other")
    neighbours = [(me, "10.0.0.2"), (worker, "10.0.0.3"), (plain, "10.0.0.4")]
    entries = hosts_entries(me, "10.0.0.2", neighbours)
    assert entries == [
        ("10.0.0.2", ["j-0.svc.ns.svc.cluster.local", "j-0.svc.ns.svc", "j-0.svc", "j-0"]),
        ("10.0.0.3", ["j-1.svc.ns.svc.cluster.local", "j-1.svc.ns.svc", "j-1.svc"]),
    ]
    text = hosts_file_text(entries)
    assert text.splitlines()[1:3] == [
        "127.0.0.1\tlocalhost",
        f"10.0.0.2\t{' '.join(entries[0][1])}",
    ]
    assert pod_hostname(pod("x" * 70)) == "x" * 63


def test_launch_script_mounts_parents_first_and_execs_argv():
    mounts = [
        Mount("/data/train", "/v/my data/train", read_only=True),
        Mount("/data", "/v/data"),
        Mount("/dev/shm", tmpfs=True, size="1Gi"),
    ]
    script = launch_script("job-0", mounts, "/data", "/pods/ns/p").splitlines()
    bind_parent = script.index("mount --bind /v/data /data")
    bind_child = script.index("mount --bind '/v/my data/train' /data/train")
    assert bind_parent < bind_child < script.index("mount -o remount,bind,ro /data/train")
    assert "mount -t tmpfs -o mode=1777,size=1Gi tmpfs /dev/shm" in script
    assert "cd /data 2>/dev/null || cd /pods/ns/p" in script
    assert script[-1] == 'exec "$@"'


def test_executables_are_found_through_the_container_mounts(tmp_path: Path):
    tool = tmp_path / "volume" / "bin" / "train"
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    mounts = [Mount("/work", str(tmp_path / "volume"))]
    assert find_executable("/work/bin/train", "/usr/bin", mounts, "/")
    assert find_executable("train", "/work/bin:/usr/bin", mounts, "/")
    assert find_executable("bin/train", "/usr/bin", mounts, "/work")
    assert not find_executable("train", "/usr/bin", mounts, "/")
    assert find_executable(sys.executable, "", [], "/")
    parent = os.path.dirname(sys.prefix)
    hiding = [Mount(parent, str(tmp_path))]  # a volume over the Python environment pods run from
    assert not find_executable(sys.executable, "", hiding, "/")
    message = start_error_message(sys.executable, hiding)
    assert f"the volume mounted at {parent} hides" in message and "mount it elsewhere" in message


def test_exit_codes_and_reasons():
    def reason(code, killed=False):
        state = terminated_state(code, killed, "t0", "local://1")
        return state["exitCode"], state["reason"]

    assert reason(0) == (0, "Completed")
    assert reason(3) == (3, "Error")
    assert reason(-signal.SIGTERM) == (143, "Error")
    assert reason(-signal.SIGKILL) == (137, "OOMKilled")  # nobody here sent it
    assert reason(-signal.SIGKILL, killed=True) == (137, "Error")


def test_provisioned_volume_is_the_claims_directory(tmp_path: Path):
    provisioner = DirectoryProvisioner(None, tmp_path, "local-dir", spawn=None)  # type: ignore[arg-type]
    claim = {
        "metadata": {"name": "data", "namespace": "ns", "uid": "u-1"},
        "spec": {"storageClassName": "local-dir", "accessModes": ["ReadWriteMany"],
                 "resources": {"requests": {"storage": "5Gi"}}},
    }  # fmt: skip
    assert provisioner.wants(claim)
    volume = provisioner.volume_for(claim)
    assert volume["metadata"]["name"] == "pvc-u-1"
    assert volume["spec"]["hostPath"]["path"] == str(tmp_path / "volumes" / "ns" / "data")
    assert volume["spec"]["claimRef"]["uid"] == "u-1"
    assert volume["spec"]["capacity"] == {"storage": "5Gi"}
    assert volume["spec"]["accessModes"] == ["ReadWriteMany"]
    assert not provisioner.wants({**claim, "spec": {**claim["spec"], "volumeName": "pv"}})
    assert not provisioner.wants({**claim, "spec": {"storageClassName": "other"}})


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"
)
def test_pods_reach_each_other_by_the_names_in_their_hosts_files(tmp_path: Path):
    network = PodNetwork(tmp_path)
    network.setup()
    try:
        server = network.add_pod(str(uuid.uuid4()), "w-0")
        client = network.add_pod(str(uuid.uuid4()), "w-1")
        for address in (server, client):
            network.set_hosts(address.netns, [(server.ip, ["w-0.svc"]), (client.ip, ["w-1"])])
        listen = (
            "import socket; s = socket.create_server(('', 8000)); print('up', flush=True); "
            "c, _ = s.accept(); c.sendall(b'hello')"
        )
        connect = "import socket; print(socket.create_connection(('w-0.svc', 8000)).recv(5))"
        serve = ["ip", "netns", "exec", server.netns, sys.executable, "-c", listen]
        ask = ["ip", "netns", "exec", client.netns, sys.executable, "-c", connect]
        listener = subprocess.Popen(serve, stdout=subprocess.PIPE, text=True)
        try:
            assert listener.stdout.readline() == "up\n"
            answer = subprocess.run(ask, capture_output=True, text=True, timeout=10)
        finally:
            listener.kill()
            listener.wait()
        assert answer.stdout == "b'hello'\n", answer.stderr
    finally:
        network.teardown()
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert server.netns not in names and client.netns not in names
    assert not Path("/etc/netns", server.netns).exists()


def test_log_tail_is_what_fallback_to_logs_on_error_reports(tmp_path):
    log = tmp_path / "pod.log"
    log.write_text("".join(f"line {i}\n" for i in range(200)))
    tail = log_tail(log)
    assert tail.splitlines()[-1] == "line 199" and len(tail.splitlines()) == 80
    log.write_text("x" * 5000 + "\nlast\n")
    assert len(log_tail(log).encode()) <= 2048 and log_tail(log).endswith("last")
    assert log_tail(tmp_path / "missing.log") == ""


def test_identity_takes_the_containers_settings_over_the_pods() -> None:
    spec = {"securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000,
                                "supplementalGroups": [3000, 2000]}}  # fmt: skip
    container = {"securityContext": {"runAsUser": 10001, "allowPrivilegeEscalation": False}}
    identity = container_identity(spec, container)
    assert identity == Identity(10001, 1000, (2000, 3000), no_new_privs=True)
    assert exec_prefix("/usr/bin/setpriv", identity) == [
        "/usr/bin/setpriv", "--reuid=10001", "--regid=1000", "--groups=2000,3000",
        "--no-new-privs", "--",
    ]  # fmt: skip
    assert exec_prefix("/usr/bin/setpriv", container_identity({}, {})) == []  # root, as is
    # without runAsGroup, a container's primary group is root's
    assert container_identity({"securityContext": {"runAsUser": 5}}, {}).gid == 0
    with pytest.raises(RunAsRootRefused, match="runAsNonRoot and image will run as root"):
        container_identity({"securityContext": {"runAsNonRoot": True}}, {})


def test_fs_group_gives_a_volume_to_the_group_once_with_on_root_mismatch(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir(mode=0o755)
    (tmp_path / "runs" / "last.pt").write_bytes(b"x")
    (tmp_path / "runs" / "last.pt").chmod(0o600)
    apply_fs_group(tmp_path, 4242, "OnRootMismatch", read_only=False)
    for path in (tmp_path, tmp_path / "runs"):
        info = path.stat()
        assert info.st_gid == 4242 and info.st_mode & 0o2070 == 0o2070
    assert (tmp_path / "runs" / "last.pt").stat().st_mode & 0o777 == 0o660
    (tmp_path / "later.pt").write_bytes(b"y")
    (tmp_path / "later.pt").chmod(0o600)
    apply_fs_group(tmp_path, 4242, "OnRootMismatch", read_only=False)  # the root matches
    assert (tmp_path / "later.pt").stat().st_mode & 0o777 == 0o600
    apply_fs_group(tmp_path, 4242, None, read_only=False)  # Always: every file again
    assert (tmp_path / "later.pt").stat().st_mode & 0o777 == 0o660


def test_a_closed_directory_above_the_image_is_covered_for_other_users(tmp_path: Path) -> None:
    home = tmp_path / "root"
    prefix = home / ".pyenv" / "versions" / "3.11"
    (prefix / "bin").mkdir(parents=True)
    home.chmod(0o700)
    lines = image_view_lines([str(prefix), str(prefix / "bin"), "/usr"], "/stage")
    # the highest closed directory: `home`, or one above it (pytest's base is 0700 too)
    closed = next(p for p in reversed(prefix.parents) if not p.stat().st_mode & 0o001)
    assert home.is_relative_to(closed)
    inside = f"/stage/0/{prefix.relative_to(closed)}"  # the prefix only; bin comes with it
    assert lines == [
        f"mkdir -p {inside}", f"mount --rbind {prefix} {inside}", f"mount --rbind /stage/0 {closed}"
    ]  # fmt: skip
