"""The syscall_latency probe against the real kernel: 23 getppid calls from a
process in a cgroup of the test's own are exactly 23 in that cgroup's getppid
histogram, read as deltas."""

import pytest

from edge_agent import probes
from ktel.probes import syscall_latency
from tests.integration.probe_harness import Workload, build_c, cgroup2_child, histogram_total, loaded

pytestmark = pytest.mark.bpf

N = 23

# Prints its SYS_getppid and waits; each line on stdin: N getppid() calls, then "done".
GETPPID = r"""
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(void)
{
	char line[64];
	int i;

	printf("%d\n", SYS_getppid);
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin)) {
		for (i = 0; i < N; i++)
			syscall(SYS_getppid);
		printf("done\n");
		fflush(stdout);
	}
	return 0;
}
"""


def test_23_getppid_calls_in_a_cgroup_are_23_in_its_histogram(tmp_path):
    exe = build_c(tmp_path, "getppid", f"#define N {N}\n" + GETPPID)
    with cgroup2_child() as cgroup, loaded("syscall_latency") as probe:
        cgroup_id = cgroup.stat().st_ino
        w = Workload([str(exe)])
        try:
            nr = int(w.hello)
            (cgroup / "cgroup.procs").write_text(str(w.pid))
            assert w.go() == "done"
            first = probe.snapshot()
            quiet = probe.snapshot()  # nothing called in between: no delta for it
            assert w.go() == "done"
            assert w.go() == "done"
            second = probe.snapshot()
        finally:
            w.finish()

    count, buckets = histogram_total(first, "syscall_latency", **{"syscall.id": nr, "cgroup.id": cgroup_id})
    assert count == N
    # A getppid takes well under a millisecond (2^20 ns) and at least a nanosecond.
    assert sum(buckets[20:]) == 0
    [ev] = [e for e in first if e[5].get("syscall.id") == nr and e[5].get("cgroup.id") == cgroup_id]
    assert ev[5]["syscall.name"] in ("getppid", "")
    assert 0 < ev[7] < N * 2**20  # the sum of the latencies, ns
    assert ev[9] == 1  # no sampling
    assert histogram_total(quiet, "syscall_latency", **{"syscall.id": nr, "cgroup.id": cgroup_id})[0] == 0
    assert (
        histogram_total(second, "syscall_latency", **{"syscall.id": nr, "cgroup.id": cgroup_id})[0] == 2 * N
    )


def test_maybe_snapshot_keeps_its_interval_and_close_hands_over_the_last_deltas(tmp_path):
    """The agent's hook: maybe_snapshot() on every pass of its collect loop gives
    events once per interval, and after close() the deltas still unread, once."""
    exe = build_c(tmp_path, "getppid", f"#define N {N}\n" + GETPPID)
    with cgroup2_child() as cgroup, loaded("syscall_latency") as probe:
        key = {"cgroup.id": cgroup.stat().st_ino}
        w = Workload([str(exe)])
        try:
            key["syscall.id"] = int(w.hello)
            (cgroup / "cgroup.procs").write_text(str(w.pid))
            assert probe.maybe_snapshot(3600) == []  # not due
            assert w.go() == "done"
            due = probe.maybe_snapshot(0)
            assert w.go() == "done"
            assert probe.maybe_snapshot(3600) == []
        finally:
            w.finish()
        probe.close()  # as the agent stops: these calls are read here ...
        last = probe.maybe_snapshot(3600)  # ... and handed over once, whatever the interval
        assert probe.maybe_snapshot(0) == []
    assert histogram_total(due, "syscall_latency", **key)[0] == N
    assert histogram_total(last, "syscall_latency", **key)[0] == N


def test_an_idle_key_is_evicted_from_the_kernel_map_and_counts_afresh(tmp_path, monkeypatch):
    """Keys of gone cgroups must not fill the map: a key idle for
    EVICT_IDLE_SNAPSHOTS reads is deleted; if it comes back, its deltas stay exact."""
    monkeypatch.setattr(probes, "EVICT_IDLE_SNAPSHOTS", 2)
    exe = build_c(tmp_path, "getppid", f"#define N {N}\n" + GETPPID)
    with cgroup2_child() as cgroup, loaded("syscall_latency") as probe:
        key = {"cgroup.id": cgroup.stat().st_ino}
        w = Workload([str(exe)])
        try:
            key["syscall.id"] = nr = int(w.hello)
            (cgroup / "cgroup.procs").write_text(str(w.pid))
            assert w.go() == "done"
            first = probe.snapshot()

            def in_kernel() -> bool:
                return any(
                    syscall_latency.KEY.unpack(k) == (key["cgroup.id"], nr)
                    for k in probe.read_histograms("hist")
                )

            assert in_kernel()
            probe.snapshot()  # idle once
            probe.snapshot()  # idle twice: evicted
            assert not in_kernel()
            assert w.go() == "done"
            again = probe.snapshot()
        finally:
            w.finish()
    assert histogram_total(first, "syscall_latency", **key)[0] == N
    assert histogram_total(again, "syscall_latency", **key)[0] == N
