"""Who a local container runs as: the pod's and container's securityContext, as a kubelet
and runc apply them.

- runAsUser / runAsGroup (the container's over the pod's), fsGroup and supplementalGroups
  become the process's uid, gid and groups (util-linux `setpriv`, exec'd last by the launch
  script, so the container keeps its pid); allowPrivilegeEscalation: false sets
  no_new_privs. A uid other than 0 loses every capability, as in a real container.
- runAsNonRoot without runAsUser refuses to start: the local "image" runs as root
  (CreateContainerConfigError, kubelet's own message).
- fsGroup: a PVC's or a disk emptyDir's files get the group and group read/write (setgid
  on directories), every time, or with fsGroupChangePolicy OnRootMismatch only when the
  volume's root does not match yet. Volumes start root-owned and 0755, like a fresh ext4
  block device, so a non-root trainer without fsGroup cannot write to its output.
- The host is the image: where this Python environment lies under a directory other users
  cannot enter (pyenv under /root, mode 0700), a non-root container sees that directory
  replaced by one that holds only the environment. Its HOME is a directory of the pod that
  its user owns (kubelet.HOME), as an image's home would be.
- A missing subPath is created with the volume root's mode, as the kubelet does.
"""

from __future__ import annotations

import os
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path


class RunAsRootRefused(Exception):
    """runAsNonRoot with the image's root user (the container cannot be created)."""


@dataclass(frozen=True)
class Identity:
    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    no_new_privs: bool = False

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def container_identity(pod_spec: dict, container: dict) -> Identity:
    """The identity one container runs with; RunAsRootRefused where runAsNonRoot cannot
    hold."""
    pod_context = pod_spec.get("securityContext") or {}
    own = container.get("securityContext") or {}

    def setting(key: str):
        return own[key] if own.get(key) is not None else pod_context.get(key)

    uid = setting("runAsUser")
    if setting("runAsNonRoot") and not uid:
        if uid is None:
            raise RunAsRootRefused("container has runAsNonRoot and image will run as root")
        raise RunAsRootRefused("container's runAsUser breaks non-root policy")
    uid = int(uid or 0)
    gid = int(setting("runAsGroup") or 0)  # without runAsGroup, the primary group is root
    groups = [pod_context["fsGroup"]] if pod_context.get("fsGroup") is not None else []
    groups += pod_context.get("supplementalGroups") or []
    no_new_privs = own.get("allowPrivilegeEscalation") is False
    return Identity(uid, gid, tuple(dict.fromkeys(int(g) for g in groups)), no_new_privs)


def exec_prefix(setpriv: str, identity: Identity) -> list[str]:
    """What the launch script execs the container's argv under."""
    if identity.is_root and not identity.no_new_privs:
        return []
    groups = ",".join(map(str, identity.groups))
    return [
        setpriv, f"--reuid={identity.uid}", f"--regid={identity.gid}",
        f"--groups={groups}" if groups else "--clear-groups",
        *(["--no-new-privs"] if identity.no_new_privs else []),
        "--",
    ]  # fmt: skip


def _closed_ancestor(path: str) -> str | None:
    """The highest directory above `path` that other users cannot enter, if any."""
    parts = Path(path).parts
    for depth in range(2, len(parts)):
        ancestor = os.path.join(*parts[:depth])
        if not os.stat(ancestor).st_mode & stat.S_IXOTH:
            return ancestor
    return None


def image_view_lines(image_paths: list[str], stage: str) -> list[str]:
    """Launch-script lines (run as root in the container's mount namespace) that let a
    non-root process reach the Python environment: each closed ancestor is covered by the
    directory `stage`, which holds bind mounts of the environment's directories only."""
    q = shlex.quote
    covered: dict[str, list[str]] = {}
    for path in image_paths:
        ancestor = _closed_ancestor(path)
        if ancestor is not None:
            covered.setdefault(ancestor, []).append(path)
    lines = []
    for number, (ancestor, paths) in enumerate(sorted(covered.items())):
        staged = os.path.join(stage, str(number))
        # nested paths (an interpreter's bin under its prefix) come with their parent
        tops = [p for p in paths if not any(p != o and p.startswith(o + "/") for o in paths)]
        for path in tops:
            inside = q(os.path.join(staged, os.path.relpath(path, ancestor)))
            lines += [f"mkdir -p {inside}", f"mount --rbind {q(path)} {inside}"]
        lines.append(f"mount --rbind {q(staged)} {q(ancestor)}")
    return lines


def apply_fs_group(root: Path, group: int, policy: str | None, read_only: bool) -> None:
    """Gives a volume's files to fsGroup as the kubelet does (SetVolumeOwnership): group
    read/write (read-only: read), and setgid plus group search on directories."""
    mask = 0o440 if read_only else 0o660

    def fix(path: str) -> None:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            return
        wanted = mask | (stat.S_ISGID | 0o110 if stat.S_ISDIR(info.st_mode) else 0)
        os.chown(path, -1, group)
        os.chmod(path, stat.S_IMODE(info.st_mode) | wanted)

    if policy == "OnRootMismatch":
        info = os.stat(root)
        wanted = mask | stat.S_ISGID | 0o110
        if info.st_gid == group and stat.S_IMODE(info.st_mode) & wanted == wanted:
            return
    fix(str(root))
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            fix(os.path.join(directory, name))
