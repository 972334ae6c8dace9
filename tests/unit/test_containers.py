"""The agent's reading of container and pod cgroups (edge_agent/containers.py)."""

import os

import pytest

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
        # Not containers: conmon beside a CRI-O container, a short id, ordinary units.
        (f"crio-conmon-{C}.scope", "x", {}),
        ("docker-1234.scope", "system.slice", {}),
        ("system.slice", "", {}),
        ("kubepods-burstable.slice", "kubepods.slice", {}),
        ("user-1000.slice", "user.slice", {}),
    ],
)
def test_what_a_cgroup_name_says(name, parent, attrs):
    assert name_attributes(name, parent) == attrs


def test_a_container_inside_another_is_the_inner_one_in_the_outer_pod():
    outer = {"container.id": D, "container.runtime.name": "docker", "k8s.pod.uid": P}
    assert inherit(outer, {}) == outer
    assert inherit(outer, {"container.id": C}) == {"k8s.pod.uid": P, "container.id": C}


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
