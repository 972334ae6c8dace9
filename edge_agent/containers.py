"""Which cgroups are containers: the agent's own container and pod attributes.

Every event carries the cgroup v2 id of the task that caused it
(``bpf_get_current_cgroup_id()``, the inode number of its cgroup's directory).
Container runtimes name the cgroup of each container after the container's id,
and the kubelet names each pod's cgroup after the pod's uid, so one walk of the
cgroup v2 tree maps cgroup ids to ``container.id``, ``container.runtime.name``
and ``k8s.pod.uid`` (OpenTelemetry semantic conventions) without asking any
runtime. The names the walk understands::

    .../docker-<id>.scope              docker (systemd cgroup driver)
    .../docker/<id>                    docker (cgroupfs driver)
    .../cri-containerd-<id>.scope      containerd
    .../crio-<id>.scope, .../crio-<id> CRI-O
    .../libpod-<id>.scope              podman
    .../pod<uid>/<id>                  a Kubernetes container, runtime not named
    .../kubepods-<qos>-pod<uid>.slice  a Kubernetes pod (systemd driver)
    .../pod<uid>                       a Kubernetes pod (cgroupfs driver)

where <id> is 64 hex digits. A cgroup below a container's (a container may make
its own) belongs to that container. A cgroup no name says anything about is
left out: what the walk cannot tell is unknown, never guessed. Pod names and
namespaces are not in cgroup paths; the enrich stage's metadata feed adds them.

The walk runs once per heartbeat, and the heartbeat carries its result
(ktel/wire.py), so a container started since the last heartbeat is unknown
until the next one.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger("ktel.agent")

# A heartbeat must stay well under Kafka's default 1 MiB record limit; at about
# 150 bytes an entry this is some 600 KiB. Nodes run far fewer containers.
MAX_CONTAINERS = 4096

_ID = r"[0-9a-f]{64}"
_SCOPE = re.compile(rf"(docker|cri-containerd|crio|libpod)-({_ID})(?:\.scope)?")
_RUNTIMES = {"docker": "docker", "cri-containerd": "containerd", "crio": "cri-o", "libpod": "podman"}
_BARE_ID = re.compile(_ID)
# The systemd driver writes the uid's dashes as underscores.
_UID = r"[0-9a-f]{8}(?:[-_][0-9a-f]{4}){3}[-_][0-9a-f]{12}"
_POD = re.compile(rf"(?:kubepods(?:-[a-z]+)*-)?pod({_UID})(?:\.slice)?")

Attributes = dict[str, str]


def name_attributes(name: str, parent: str) -> Attributes:
    """What one directory's name says (``parent`` is the name of the directory above)."""
    if m := _SCOPE.fullmatch(name):
        return {"container.id": m[2], "container.runtime.name": _RUNTIMES[m[1]]}
    if _BARE_ID.fullmatch(name):
        attrs = {"container.id": name}
        if parent == "docker":
            attrs["container.runtime.name"] = "docker"
        return attrs
    if m := _POD.fullmatch(name):
        return {"k8s.pod.uid": m[1].replace("_", "-")}
    return {}


def inherit(outer: Attributes, own: Attributes) -> Attributes:
    """A directory's attributes given its parent's: a container inside another
    (docker in docker, a kind node) is the inner one, with no runtime from the outer."""
    if not own:
        return outer
    if "container.id" in own:
        outer = {k: v for k, v in outer.items() if not k.startswith("container.")}
    return {**outer, **own}


def find_cgroup2_root(mountinfo: str) -> Path | None:
    """The first cgroup2 mount in /proc/self/mountinfo's text (``/sys/fs/cgroup`` on
    a unified host, ``/sys/fs/cgroup/unified`` on a hybrid one)."""
    for line in mountinfo.splitlines():
        mount, _, fs = line.partition(" - ")
        if fs.split()[:1] == ["cgroup2"]:
            return Path(mount.split()[4])
    return None


class Containers:
    """The cgroup v2 tree's containers and pods, by cgroup id."""

    def __init__(self, root: Path | None):
        self.root = root
        self.unlisted = 0  # containers over MAX_CONTAINERS in the last walk

    @classmethod
    def of_host(cls, root: Path | None) -> Containers:
        if root is None:
            try:
                root = find_cgroup2_root(Path("/proc/self/mountinfo").read_text())
            except OSError as err:
                log.warning("mounts unreadable (%s): container and pod attributes are unknown", err)
                return cls(None)
            if root is None:
                log.warning("no cgroup2 mount: container and pod attributes are unknown")
        return cls(root)

    def scan(self) -> list[list]:
        """``[[cgroup id, {attribute: value}], ...]``, the heartbeat's ``containers``."""
        if self.root is None:
            return []
        found: list[list] = []
        self.unlisted = 0
        stack: list[tuple[str, str, Attributes]] = [(str(self.root), "", {})]
        while stack:
            path, name, outer = stack.pop()
            try:
                entries = list(os.scandir(path))
            except OSError:  # removed while walking, or not a cgroup: nothing to tell
                continue
            for entry in entries:
                try:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                    attrs = inherit(outer, name_attributes(entry.name, name))
                    if attrs:
                        if len(found) < MAX_CONTAINERS:
                            found.append([entry.inode(), attrs])
                        else:
                            self.unlisted += 1
                    stack.append((entry.path, entry.name, attrs))
                except OSError:
                    continue
        return found
