"""The local kubelet's pod network: one Linux bridge on the host and one network namespace per
pod, joined to the bridge by a veth pair.

Network `N` (the first index whose subnet and bridge nobody on this machine uses) is the subnet
10.244.N.0/24; the bridge `isbr<N>` holds the gateway address 10.244.N.1, where the API server
listens, and each pod gets the next free address in the subnet as `eth0` of its namespace
`is<N>-<uid prefix>`. Nothing is routed or NATed to the outside: pods reach each other across the
bridge and the host at the gateway address, and IP forwarding is switched off on the bridge.

`ip netns exec <netns>` bind-mounts the files in /etc/netns/<netns>/ over /etc/ for the process
it runs: that is how a pod gets its own hosts file (`<job>-0.<service>` resolves to the pod's
address) and a resolv.conf without a reachable server (unknown names fail at once).
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

NETWORK_PREFIX = "10.244"
MAX_INDEX = 250
ETC_NETNS = Path("/etc/netns")
# another process's PodNetwork holds an flock on its index until it ends (pytest -n, two serves)
LOCK_DIR = Path(tempfile.gettempdir()) / "instseg-pod-network"
REQUIREMENT = (
    "the local kubelet needs root and iproute2 (ip netns) to give each pod its own network "
    "namespace"
)
# unknown names must fail at once inside a pod, not wait for the host's DNS server
RESOLV_CONF = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"


class PodNetworkError(RuntimeError):
    """An `ip` command failed; the message has the command and its error output."""


@dataclass(frozen=True)
class PodAddress:
    netns: str
    ip: str


def hosts_file_text(entries: list[tuple[str, list[str]]]) -> str:
    """A pod's /etc/hosts: localhost, then one line per (address, names)."""
    lines = ["# Kubernetes-managed hosts file (local kubelet).", "127.0.0.1\tlocalhost"]
    lines += [f"{ip}\t{' '.join(names)}" for ip, names in entries if names]
    return "\n".join(lines) + "\n"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise PodNetworkError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done


def _used_addresses_and_links() -> tuple[list[ipaddress.IPv4Interface], set[str]]:
    links = json.loads(_ip("-j", "addr").stdout or "[]")
    addresses = [
        ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}")
        for link in links
        for info in link.get("addr_info") or []
        if info.get("family") == "inet"
    ]
    return addresses, {link["ifname"] for link in links}


def _claim_free_index() -> tuple[int, int | None]:
    """The first network index nobody uses, and the file descriptor of its lock."""
    addresses, links = _used_addresses_and_links() if shutil.which("ip") else ([], set())
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    for index in range(MAX_INDEX + 1):
        subnet = ipaddress.IPv4Network(f"{NETWORK_PREFIX}.{index}.0/24")
        if f"isbr{index}" in links or any(a.ip in subnet for a in addresses):
            continue
        fd = os.open(LOCK_DIR / f"{index}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return index, fd
    raise PodNetworkError(f"no free pod subnet: {NETWORK_PREFIX}.0-{MAX_INDEX}.0/24 are all in use")


class PodNetwork:
    """The bridge and the per-pod namespaces of one local cluster (see the module docstring).
    Thread-safe: the kubelet adds and removes pods from several threads."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.index, self._lock_fd = _claim_free_index()
        self.subnet = f"{NETWORK_PREFIX}.{self.index}.0/24"
        self.gateway = f"{NETWORK_PREFIX}.{self.index}.1"
        self.bridge = f"isbr{self.index}"
        self._pods: dict[str, PodAddress] = {}
        self._next_host = 2
        self._lock = threading.Lock()

    def setup(self) -> None:
        """Creates the bridge with the gateway address (again: nothing changes)."""
        if shutil.which("ip") is None or os.geteuid() != 0:
            missing = "the `ip` command (iproute2)" if shutil.which("ip") is None else "root"
            raise RuntimeError(f"{REQUIREMENT}; missing: {missing}")
        if _ip("link", "show", self.bridge, check=False).returncode != 0:
            _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "replace", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        # even where the host forwards (ip_forward=1), nothing from a pod leaves the machine
        Path(f"/proc/sys/net/ipv4/conf/{self.bridge}/forwarding").write_text("0\n")

    def _names(self, uid: str) -> tuple[str, str]:
        short = uid.replace("-", "")[:8]
        return f"is{self.index}-{short}", f"vis{self.index}-{short}"  # both ≤ 15 characters

    def _allocate_ip(self) -> str:
        used = {address.ip for address in self._pods.values()}
        for step in range(253):
            host = 2 + (self._next_host - 2 + step) % 253
            ip = f"{NETWORK_PREFIX}.{self.index}.{host}"
            if ip not in used:
                self._next_host = host + 1  # round robin: a freed address is not reused at once
                return ip
        raise PodNetworkError(f"no free address left in {self.subnet}")

    def add_pod(self, uid: str, hostname: str) -> PodAddress:
        """A namespace for pod `uid` with its address on the bridge and a hosts file that
        names it `hostname`."""
        with self._lock:
            if uid in self._pods:
                return self._pods[uid]
            netns, host_veth = self._names(uid)
            address = PodAddress(netns, self._allocate_ip())
            self._pods[uid] = address
        try:
            self._wire(address, host_veth)
            self._write_etc(netns, [(address.ip, [hostname])])
        except BaseException:
            self.remove_pod(uid)
            raise
        return address

    def _wire(self, address: PodAddress, host_veth: str) -> None:
        netns = address.netns
        _ip("netns", "add", netns)
        _ip("link", "add", host_veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("link", "set", host_veth, "master", self.bridge, "up")
        _ip("-n", netns, "addr", "add", f"{address.ip}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "route", "add", "default", "via", self.gateway)

    def _write_etc(self, netns: str, entries: list[tuple[str, list[str]]]) -> None:
        etc = ETC_NETNS / netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(hosts_file_text(entries))
        (etc / "resolv.conf").write_text(RESOLV_CONF)

    def set_hosts(self, netns: str, entries: list[tuple[str, list[str]]]) -> None:
        """Rewrites a pod's hosts file in place: running processes see it bind-mounted, so it
        must stay the same file. A pod already removed is skipped."""
        try:
            with open(ETC_NETNS / netns / "hosts", "r+") as hosts:
                hosts.write(hosts_file_text(entries))
                hosts.truncate()
        except FileNotFoundError:
            pass

    def remove_pod(self, uid: str) -> None:
        """Deletes the pod's namespace, veth pair and /etc/netns files (gone ones are fine)."""
        with self._lock:
            self._pods.pop(uid, None)
        self._remove(*self._names(uid))

    def _remove(self, netns: str, host_veth: str) -> None:
        _ip("netns", "delete", netns, check=False)
        _ip("link", "delete", host_veth, check=False)
        shutil.rmtree(ETC_NETNS / netns, ignore_errors=True)

    def teardown(self) -> None:
        """Removes every namespace of this network (also ones a crashed kubelet left) and the
        bridge. Never raises for things already gone."""
        prefix = f"is{self.index}-"
        names = set()
        if shutil.which("ip"):
            listing = _ip("-j", "netns", "list", check=False).stdout.strip()
            names = {n["name"] for n in json.loads(listing or "[]") if n["name"].startswith(prefix)}
        if ETC_NETNS.is_dir():
            names |= {p.name for p in ETC_NETNS.iterdir() if p.name.startswith(prefix)}
        for netns in names:
            self._remove(netns, "v" + netns)
        with self._lock:
            self._pods.clear()
        if shutil.which("ip"):
            _ip("link", "delete", self.bridge, check=False)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
