"""The oom_kill probe against the real kernel: a process in a memory cgroup of
the test's own, limited to 64 MiB, allocates until the OOM killer kills it;
that is one oom_kill event naming it."""

import contextlib
import os
import signal
from pathlib import Path

import pytest

from tests.integration.probe_harness import drain_until, loaded, python_workload

pytestmark = pytest.mark.bpf

LIMIT = 64 << 20

HOG = """
chunks = []
while True:
    chunks.append(bytearray(8 << 20))  # touched: bytearray zero-fills
"""


@contextlib.contextmanager
def memory_cgroup():
    """A memory cgroup below this process's own: cgroup v2 if its memory
    controller is enabled, else the v1 memory hierarchy."""
    name = f"ktel-t{os.getpid()}-oom"
    v2, v1 = None, None
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _dev, mnt, fstype, _opts, *_ = line.split()
        if fstype == "cgroup2" and "memory" in (Path(mnt) / "cgroup.controllers").read_text().split():
            v2 = Path(mnt)
        elif fstype == "cgroup" and Path(mnt, "memory.limit_in_bytes").exists():
            v1 = Path(mnt)
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _id, controllers, path = line.split(":", 2)
        own[controllers] = path.lstrip("/")
    if v2 is not None:
        path = v2 / own[""] / name
        limit, procs = "memory.max", "cgroup.procs"
    elif v1 is not None:
        path = v1 / next(p for c, p in own.items() if "memory" in c.split(",")) / name
        limit, procs = "memory.limit_in_bytes", "tasks"
    else:
        pytest.skip("no memory cgroup controller (v2 or v1) to confine an OOM kill in")
    path.mkdir()
    try:
        (path / limit).write_text(str(LIMIT))
        for no_swap in ("memory.swap.max", "memory.memsw.limit_in_bytes"):
            # On a host with swap the hog would swap rather than be killed. (v1's
            # memsw limit counts memory too, hence the same LIMIT.)
            if (path / no_swap).exists():
                (path / no_swap).write_text("0" if no_swap == "memory.swap.max" else str(LIMIT))
        yield path, procs
    finally:
        path.rmdir()


def test_a_process_over_its_memory_cgroup_limit_is_one_oom_kill_event():
    with memory_cgroup() as (cgroup, procs), loaded("oom_kill") as probe:
        hog = python_workload(HOG)
        try:
            (cgroup / procs).write_text(str(hog.pid))
            hog.send()
            assert hog.proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            hog.kill()
        events = drain_until(probe, lambda evs: any(e["pid"] == hog.pid for e in evs))
    [ev] = [e for e in events if e["pid"] == hog.pid]
    comm = os.path.basename(hog.proc.args[0])[:15]
    assert (ev["kind"], ev["comm"], ev["trigger_pid"], ev["trigger_comm"]) == (
        "oom_kill",
        comm,
        hog.pid,
        comm,
    )
    assert ev["uid"] == os.getuid()
    # Killed near its limit, mostly anonymous memory (the interpreter's own pages,
    # charged before the move into the cgroup, come on top).
    assert LIMIT // 2 < ev["anon_rss_kb"] * 1024 < 2 * LIMIT
    assert ev["total_vm_kb"] * 1024 > ev["anon_rss_kb"] * 1024
    assert isinstance(ev["oom_score_adj"], int)
