"""The agent's reading of container and pod cgroups (edge_agent/containers.py)."""

import os
import subprocess

import pytest

from edge_agent import containers as containers_mod
from edge_agent.containers import Containers, find_cgroup2_root, inherit, name_attributes

D, C, P = "d" * 64, "c" * 64, "0f4b1c2e-7c4a-4c55-9a0e-3f1d2b6c8e11"


@pytest.mark.parametrize(
    ("name", "parent", "attrs"),
    [
        (f"docker-{D}.scope", "system.slice", {"container.id": D, "container.runtime.name": "docker"}),
        (D, "docker", {"container.id": D, "container.runtime.name": "docker"}),
        (f"cri-containerd-{C}.scope", "x", {"container.id": C, "container.runtime.name": "containerd"}),
        (f"crio-{C}.scope", "x", {"container.id": C, "container.runtime.name": "cri-o"}),
        (f"crio-{C}", "x", {"container.id": C, "container.runtime.name": "cri-o"}),
        (f"libpod-{C}.scope", "machine.slice", {"container.id": C, "container.runtime.name": "podman"}),
        (C, f"pod{P}", {"container.id": C}),  # cgroupfs driver: the runtime is not in the path
        (f"kubepods-burstable-pod{P.replace('-', '_')}.slice", "x", {"k8s.pod.uid": P}),
        (f"kubepods-pod{P.replace('-', '_')}.slice", "x", {"k8s.pod.uid": P}),
        (f"pod{P}", "besteffort", {"k8s.pod.uid": P}),
        (f"libpod-{C}", "machine.slice", {"container.id": C, "container.runtime.name": "podman"}),
        # kind: the kubelet's cgroup root is /kubelet, so its pod slices have a prefix.
        (f"kubelet-kubepods-besteffort-pod{P.replace('-', '_')}.slice", "x", {"k8s.pod.uid": P}),
        # Not containers: conmon beside a container, a short id, a static pod's
        # config hash (not the uid the API server knows), ordinary units.
        (f"crio-conmon-{C}.scope", "x", {}),
        (f"crio-conmon-{C}", "x", {}),
        (f"libpod-conmon-{C}.scope", "x", {}),
        ("pod" + "5" * 32, "besteffort", {}),
        ("docker-1234.scope", "system.slice", {}),
        ("system.slice", "", {}),
        ("kubepods-burstable.slice", "kubepods.slice", {}),
        ("user-1000.slice", "user.slice", {}),
    ],
)
def test_what_a_cgroup_name_says(name, parent, attrs):
    assert name_attributes(name, parent) == attrs


def test_a_container_is_in_its_pod_and_nothing_of_an_outer_container_holds():
    pod = {"k8s.pod.uid": P}
    in_pod = {"k8s.pod.uid": P, "container.id": D, "container.runtime.name": "containerd"}
    assert inherit(pod, {"container.id": D, "container.runtime.name": "containerd"}) == in_pod
    assert inherit(in_pod, {}) == in_pod  # a sub-cgroup of the container
    # Docker in docker inside a pod: Kubernetes does not know the inner container.
    assert inherit(in_pod, {"container.id": C}) == {"container.id": C}
    # A kind node: a pod inside the node's container is not that container's.
    assert inherit({"container.id": D, "container.runtime.name": "docker"}, pod) == pod


def test_the_cgroup2_mount_is_found_in_mountinfo():
    hybrid = (
        "30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
        "31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n"
    )
    assert str(find_cgroup2_root(hybrid)) == "/sys/fs/cgroup/unified"
    assert find_cgroup2_root("30 25 0:26 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n") is None


def test_a_walk_lists_containers_pods_and_their_sub_cgroups_by_inode(tmp_path):
    pod = tmp_path / "kubepods.slice" / f"kubepods-pod{P.replace('-', '_')}.slice"
    ctr = pod / f"cri-containerd-{C}.scope"
    nested = ctr / "init.scope"
    nested.mkdir(parents=True)
    (tmp_path / "system.slice" / "sshd.service").mkdir(parents=True)
    (ctr / "cgroup.procs").write_text("")  # files are not cgroups
    (tmp_path / "system.slice" / f"docker-{D}.scope").symlink_to(ctr)  # nor are links
    got = {cg: attrs for cg, attrs in Containers(tmp_path).scan()}
    in_ctr = {"k8s.pod.uid": P, "container.id": C, "container.runtime.name": "containerd"}
    assert got == {
        os.stat(pod).st_ino: {"k8s.pod.uid": P},
        os.stat(ctr).st_ino: in_ctr,
        os.stat(nested).st_ino: in_ctr,
    }


def test_no_cgroup2_mount_lists_nothing():
    assert Containers(None).scan() == []


def test_a_walk_lists_at_most_max_containers_and_counts_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr("edge_agent.containers.MAX_CONTAINERS", 2)
    for i in range(3):
        (tmp_path / f"docker-{i:064x}.scope").mkdir()
    c = Containers(tmp_path)
    assert (len(c.scan()), c.unlisted) == (2, 1)


@pytest.mark.parametrize("order", [False, True])
def test_a_container_making_many_cgroups_of_its_own_leaves_others_listed(tmp_path, monkeypatch, order):
    """A container may make cgroups below its own (systemd in it, a delegated tree), as
    many as it likes: the containers and pods themselves are listed before them, so that
    one container cannot push the others' attributes out of the heartbeat, whatever
    order the directories are read in."""
    monkeypatch.setattr("edge_agent.containers.MAX_CONTAINERS", 3)
    busy = tmp_path / "system.slice" / f"docker-{D}.scope"
    for i in range(5):
        (busy / f"sub{i}").mkdir(parents=True)
    pod = tmp_path / "kubepods" / f"pod{P}"
    (pod / C).mkdir(parents=True)
    listing = os.scandir
    monkeypatch.setattr(
        containers_mod.os, "scandir", lambda path: sorted(listing(path), key=lambda e: e.name, reverse=order)
    )
    c = Containers(tmp_path)
    listed = {cg for cg, _ in c.scan()}
    assert {os.stat(busy).st_ino, os.stat(pod).st_ino, os.stat(pod / C).st_ino} == listed
    assert c.unlisted == 5


def test_a_walk_stays_on_the_cgroup_file_system(tmp_path):
    """A file system mounted in the tree (a v1 hierarchy under a hybrid host's
    /sys/fs/cgroup) numbers its inodes on its own: its names say nothing."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    (tmp_path / f"docker-{D}.scope").mkdir()
    other = tmp_path / "cpu"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", other], check=True)
    try:
        (other / f"docker-{C}.scope").mkdir()
        got = [attrs["container.id"] for _cg, attrs in Containers(tmp_path).scan()]
    finally:
        subprocess.run(["umount", other], check=True)
    assert got == [D]


def test_the_agent_takes_only_a_cgroup_v2_tree(tmp_path):
    assert Containers.of_host(tmp_path).root is None  # no cgroup.controllers: not a cgroup v2 tree
    (tmp_path / "cgroup.controllers").write_text("")
    assert Containers.of_host(tmp_path).root == tmp_path
