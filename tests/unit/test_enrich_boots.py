"""The enrich stage across a host's reboots (processors/enrich_core.py): pids and cgroup
ids start again at every boot, so a batch its agent spooled before a reboot and sent
after it takes its own boot's processes, containers and feed lines, never the current
boot's for the same pid or cgroup id."""

from __future__ import annotations

import json

from ktel.wire import FILE_CREATED, PROCESS_EXEC, RawBatch
from processors import enrich_core

T = 1_700_000_000_000_000_000
CG = 4242  # one cgroup id, another container's at each boot
OLD, NEW = "a" * 64, "b" * 64  # the container.id of CG at boots b1 and b2


def heartbeat(state: dict, boot: str, ts: int, containers: list | None = None) -> None:
    host = {"host.id": "h", "boot.id": boot, "os.version": f"kernel of {boot}"}
    enrich_core.observe_heartbeat(state, {"ts": ts, "host": host, "containers": containers or []})


def feed(*lines: dict) -> enrich_core.Metadata:
    metadata, errors = enrich_core.load_metadata("\n".join(json.dumps(line) for line in lines))
    assert errors == []
    return metadata


def run(state: dict, boot: str, seq: int, events: list, metadata: enrich_core.Metadata) -> RawBatch:
    return enrich_core.enrich(
        state, RawBatch("h", boot, seq, T + seq, events), metadata, enrich_core.Options()
    ).batch


def exec_(pid: int, comm: str) -> list:
    return [PROCESS_EXEC.id, T, pid, pid, 1, 1000, CG, comm, f"/bin/{comm}"]


def touch(pid: int) -> list:
    return [FILE_CREATED.id, T, pid, pid, 0, "touch", "/tmp/x", 0o101, False]


def container(cid: str) -> dict:
    return {"container.id": cid, "container.runtime.name": "containerd"}


def test_a_batch_spooled_before_a_reboot_takes_its_own_boots_host_processes_and_containers():
    state: dict = {}
    heartbeat(state, "b1", 1000, [[CG, container(OLD)]])
    run(state, "b1", 0, [exec_(10, "old")], {})
    # The reboot: pid 10 and cgroup CG are another process's and container's.
    heartbeat(state, "b2", 2000, [[CG, container(NEW)]])
    run(state, "b2", 0, [exec_(10, "new")], {})

    spooled = run(state, "b1", 1, [touch(10)], {})
    assert spooled.resource["os.version"] == "kernel of b1"
    assert spooled.processes["10"]["process.executable.name"] == "old"
    assert spooled.processes["10"]["container.id"] == OLD
    current = run(state, "b2", 1, [touch(10)], {})
    assert current.processes["10"]["process.executable.name"] == "new"
    assert current.processes["10"]["container.id"] == NEW
    # A boot no heartbeat told of: nothing of another boot's, the pid unknown.
    unseen = run(state, "b3", 0, [touch(10)], {})
    assert unseen.resource == {"host.id": "h"} and unseen.processes == {}


def test_a_feed_line_applies_to_the_batches_of_the_boot_it_names_and_one_naming_none_to_the_current_boots():
    metadata = feed(
        {"host.id": "h", "cgroup.id": CG, "container.id": NEW, "k8s.pod.name": "web-new"},
        {"host.id": "h", "boot.id": "b1", "cgroup.id": CG, "k8s.pod.name": "web-old"},
        {"host.id": "h", "boot.id": "b3", "cgroup.id": CG, "k8s.pod.name": "web-later"},
    )
    state: dict = {}
    heartbeat(state, "b1", 1000, [[CG, container(OLD)]])
    run(state, "b1", 0, [exec_(10, "old")], metadata)
    heartbeat(state, "b2", 2000, [[CG, container(NEW)]])
    run(state, "b2", 0, [exec_(10, "new")], metadata)

    # The line of its boot, with its agent's container: not the current boot's line,
    # whose container.id would have replaced it.
    spooled = run(state, "b1", 1, [touch(10)], metadata).processes["10"]
    assert (spooled["container.id"], spooled["k8s.pod.name"]) == (OLD, "web-old")
    current = run(state, "b2", 1, [touch(10)], metadata).processes["10"]
    assert (current["container.id"], current["k8s.pod.name"]) == (NEW, "web-new")
    # A boot whose first heartbeat is still to come: its own lines alone.
    later = run(state, "b3", 0, [exec_(10, "later")], metadata).processes["10"]
    assert later["k8s.pod.name"] == "web-later" and "container.id" not in later
    # Of b1's cgroups, the feed names only CG: another is left without pod or container.
    other = [PROCESS_EXEC.id, T, 11, 11, 1, 1000, CG + 1, "x", "/bin/x"]
    assert "k8s.pod.name" not in run(state, "b1", 2, [other], metadata).processes["11"]


def test_a_line_naming_no_boot_follows_the_hosts_latest_heartbeat():
    metadata = feed({"host.id": "h", "cgroup.id": CG, "k8s.pod.name": "web"})
    state: dict = {}

    def pod(boot: str, seq: int) -> str | None:
        processes = run(state, boot, seq, [exec_(10, "p")], metadata).processes
        assert processes is not None
        return processes["10"].get("k8s.pod.name")

    assert pod("b1", 0) is None  # no heartbeat yet: no boot is known to be the current one
    heartbeat(state, "b1", 1000)
    assert pod("b1", 1) == "web"
    heartbeat(state, "b2", 2000)
    assert (pod("b1", 2), pod("b2", 0)) == (None, "web")
    heartbeat(state, "b1", 1500)  # a heartbeat of the boot before, late: b2 is still the current one
    assert (pod("b1", 3), pod("b2", 1)) == (None, "web")
    assert enrich_core.current_boot(state) == "b2"


def test_a_new_boots_first_heartbeat_makes_it_current_whatever_its_clock_says():
    """The agent's clock set back across the reboot (the boot before's ahead, set right
    at boot): ordered by ``ts``, the boot before stayed current, the feed's lines
    naming no boot applied to its batches, not the new boot's, until the new clock
    passed its last heartbeat."""
    metadata = feed({"host.id": "h", "cgroup.id": CG, "k8s.pod.name": "web"})
    state: dict = {}
    heartbeat(state, "b1", 5000)
    heartbeat(state, "b2", 2000)
    assert enrich_core.current_boot(state) == "b2"
    processes = run(state, "b2", 0, [exec_(10, "p")], metadata).processes
    assert processes is not None and processes["10"]["k8s.pod.name"] == "web"
    heartbeat(state, "b2", 2010)
    heartbeat(state, "b1", 4000)  # the boot before's, re-driven: older than its last
    assert enrich_core.current_boot(state) == "b2"


def test_a_feed_lines_boot_id_is_the_heartbeats():
    lines = [
        {"host.id": "h", "boot.id": "8d2e4f00-1111-2222-3333-444455556666", "cgroup.id": 1},
        {"host.id": "h", "boot.id": 7, "cgroup.id": 2},
        {"host.id": "h", "boot.id": "", "cgroup.id": 3},
        {"host.id": "h", "boot.id": "8d2e4f00111122223333444455556666", "cgroup.id": 4, "k8s.pod.name": "a"},
        {"host.id": "h", "cgroup.id": 4, "k8s.pod.name": "b"},
    ]
    metadata, errors = enrich_core.load_metadata("\n".join(json.dumps(line) for line in lines))
    assert [e.split(":")[0] for e in errors] == ["line 1", "line 2", "line 3"]
    assert "without its dashes" in errors[0]
    assert metadata == {
        "h": {
            "8d2e4f00111122223333444455556666": {4: {"k8s.pod.name": "a"}},
            None: {4: {"k8s.pod.name": "b"}},
        }
    }
    assert enrich_core.feed_entries(metadata) == 2
