"""Which cgroups are containers: the agent's own container and pod attributes.

Every event carries the cgroup v2 id of the task that caused it
(``bpf_get_current_cgroup_id()``, the inode number of its cgroup's directory).
Container runtimes name the cgroup of each container after the container's id,
and the kubelet names each pod's cgroup after the pod's uid, so one walk of the
cgroup v2 tree maps cgroup ids to ``container.id``, ``container.runtime.name``
and ``k8s.pod.uid`` (OpenTelemetry semantic conventions) without asking any
runtime. The names the walk understands::

    .../docker-<id>.scope                  docker (systemd cgroup driver)
    .../docker/<id>                        docker (cgroupfs driver)
    .../cri-containerd-<id>.scope          containerd
    .../crio-<id>.scope, .../crio-<id>     CRI-O
    .../libpod-<id>.scope, .../libpod-<id> podman
    .../<id>                               a container, runtime not named (the
                                           kubelet's cgroupfs driver: .../pod<uid>/<id>)
    .../kubepods[-<qos>]-pod<uid>.slice    a Kubernetes pod (systemd driver; kind's
                                           kubelet-kubepods-... too)
    .../pod<uid>                           a Kubernetes pod (cgroupfs driver)

where <id> is 64 hex digits and <uid> a pod's uid (a static pod's cgroup is
named after its config hash, which is not the uid the API server knows: left
out). A cgroup below a container's (crun's ``container``, systemd in a
container) belongs to that container; a container in a pod's cgroup is in
that pod; a pod or a container inside another container (a kind node, docker
in docker) is itself and nothing of the outer one. A cgroup no name says
anything about is left out: what the walk cannot tell is unknown, never
guessed. Pod names and namespaces are not in cgroup paths; the enrich stage's
metadata feed adds them.

The walk runs once per heartbeat, and the heartbeat carries its result
(ktel/wire/control.py), so a container started since the last heartbeat is unknown
until the next one.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

from opentelemetry.semconv._incubating.attributes.container_attributes import (
    CONTAINER_ID,
    CONTAINER_RUNTIME_NAME,
)
from opentelemetry.semconv._incubating.attributes.k8s_attributes import K8S_POD_UID

log = logging.getLogger("ktel.agent")

# A heartbeat must stay well under Kafka's default 1 MiB record limit: an entry
# is about 175 bytes of msgpack, so this is some 350 KiB. A node with the
# kubelet's default of 110 pods has a few hundred container and pod cgroups.
MAX_CONTAINERS = 2048

_ID = r"[0-9a-f]{64}"
_SCOPE = re.compile(rf"(docker|cri-containerd|crio|libpod)-({_ID})(?:\.scope)?")
_RUNTIMES = {"docker": "docker", "cri-containerd": "containerd", "crio": "cri-o", "libpod": "podman"}
_BARE_ID = re.compile(_ID)
# The systemd driver writes the uid's dashes as underscores.
_UID = r"[0-9a-f]{8}(?:[-_][0-9a-f]{4}){3}[-_][0-9a-f]{12}"
_POD = re.compile(rf"(?:[\w.-]+-)?pod({_UID})(?:\.slice)?")

Attributes = dict[str, str]


def name_attributes(name: str, parent: str) -> Attributes:
    """What one directory's name says (``parent`` is the name of the directory above)."""
    if m := _SCOPE.fullmatch(name):
        return {CONTAINER_ID: m[2], CONTAINER_RUNTIME_NAME: _RUNTIMES[m[1]]}
    if _BARE_ID.fullmatch(name):
        attrs = {CONTAINER_ID: name}
        if parent == "docker":
            attrs[CONTAINER_RUNTIME_NAME] = "docker"
        return attrs
    if m := _POD.fullmatch(name):
        return {K8S_POD_UID: m[1].replace("_", "-")}
    return {}


def inherit(outer: Attributes, own: Attributes) -> Attributes:
    """A directory's attributes given its parent's ``outer`` and its own name's ``own``."""
    if not own:
        return outer  # a sub-cgroup of a container or pod
    if CONTAINER_ID in own and CONTAINER_ID not in outer:
        return {**outer, **own}  # a container in its pod
    return own  # a pod or a container inside a container: nothing of the outer one holds


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
        """The host's tree: ``root`` (``agent.cgroup_root``), else the cgroup2 mount."""
        if root is None:
            try:
                root = find_cgroup2_root(Path("/proc/self/mountinfo").read_text())
            except OSError as err:
                log.warning("mounts unreadable (%s): container and pod attributes are unknown", err)
                return cls(None)
            if root is None:
                log.warning("no cgroup2 mount: container and pod attributes are unknown")
                return cls(None)
        if not (root / "cgroup.controllers").is_file():
            log.warning(
                "agent.cgroup_root %s is not a cgroup v2 tree (no cgroup.controllers): container and "
                "pod attributes are unknown; set it to the host's cgroup2 mount",
                root,
            )
            return cls(None)
        return cls(root)

    def scan(self) -> list[list]:
        """``[[cgroup id, {attribute: value}], ...]``, the heartbeat's ``containers``."""
        if self.root is None:
            return []
        # The containers and pods themselves (their own name says so), then the cgroups
        # below them: a container may make as many of those as it likes, and listed as
        # the walk met them they pushed other containers out of the bound.
        named: list[list] = []
        below: list[list] = []
        seen = 0
        try:
            dev = os.stat(self.root).st_dev
        except OSError:
            self.unlisted = 0
            return []
        stack: list[tuple[str, str, Attributes]] = [(str(self.root), "", {})]
        while stack:
            path, name, outer = stack.pop()
            try:
                entries = list(os.scandir(path))
            except OSError:  # removed while walking: nothing to tell
                continue
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                # Another file system mounted in the tree (a v1 hierarchy under a
                # hybrid host's /sys/fs/cgroup) numbers its inodes on its own.
                if not stat.S_ISDIR(st.st_mode) or st.st_dev != dev:
                    continue
                own = name_attributes(entry.name, name)
                attrs = inherit(outer, own)
                if attrs:
                    seen += 1
                    into = named if own else below
                    if len(into) < MAX_CONTAINERS:
                        into.append([st.st_ino, attrs])
                stack.append((entry.path, entry.name, attrs))
        found = (named + below)[:MAX_CONTAINERS]
        self.unlisted = seen - len(found)
        return found
