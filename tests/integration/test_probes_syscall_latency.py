"""The syscall_latency probe against the real kernel: 23 getppid calls from a
process in a cgroup of the test's own are exactly 23 in that cgroup's getppid
histogram, read as deltas."""

import os
import time

import pytest

from edge_agent import probes
from ktel.probes import syscall_latency
from tests.integration.probe_harness import (
    Workload,
    build_c,
    cgroup2_child,
    histogram_total,
    loaded,
    threads_in_open,
)

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


def test_calls_counted_between_the_last_idle_read_and_the_eviction_are_not_lost(tmp_path, monkeypatch):
    """A key is evicted after a read that found it idle: what the kernel counted between
    that read and the delete is sent, not deleted with the key."""
    monkeypatch.setattr(probes, "EVICT_IDLE_SNAPSHOTS", 1)
    exe = build_c(tmp_path, "getppid", f"#define N {N}\n" + GETPPID)
    with cgroup2_child() as cgroup, loaded("syscall_latency") as probe:
        key = {"cgroup.id": cgroup.stat().st_ino}
        w = Workload([str(exe)])
        try:
            key["syscall.id"] = int(w.hello)
            (cgroup / "cgroup.procs").write_text(str(w.pid))
            assert w.go() == "done"
            snaps = [probe.snapshot()]
            read = probe.read_histograms

            def read_then_call(name: str) -> dict[bytes, tuple[int, ...]]:
                values = read(name)
                assert w.go() == "done"  # N calls after the read, before the delete
                return values

            monkeypatch.setattr(probe, "read_histograms", read_then_call)
            snaps.append(probe.snapshot())  # idle as read: evicted
            monkeypatch.setattr(probe, "read_histograms", read)
            snaps.append(probe.snapshot())
        finally:
            w.finish()
    assert sum(histogram_total(s, "syscall_latency", **key)[0] for s in snaps) == 2 * N


# Prints its SYS_execve and waits; at a line on stdin, a thread other than the main
# one execs echo, which prints "done".
EXEC_FROM_A_THREAD = r"""
#include <pthread.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

static void *exec_echo(void *arg)
{
	execl("/bin/echo", "echo", "done", (char *)NULL);
	return arg;
}

int main(void)
{
	char line[64];
	pthread_t t;

	printf("%d\n", SYS_execve);
	fflush(stdout);
	if (fgets(line, sizeof(line), stdin)) {
		pthread_create(&t, NULL, exec_echo, NULL);
		pthread_join(t, NULL);
	}
	return 1;
}
"""


def test_an_execve_by_a_thread_other_than_the_leader_is_counted(tmp_path):
    """execve() from a thread that is not the leader returns with the leader's tid
    (de_thread()): its start, stored under the thread's own tid, is found at its end."""
    exe = build_c(tmp_path, "exec_from_a_thread", EXEC_FROM_A_THREAD)
    with cgroup2_child() as cgroup, loaded("syscall_latency") as probe:
        key = {"cgroup.id": cgroup.stat().st_ino}
        w = Workload([str(exe)])
        try:
            key["syscall.id"] = int(w.hello)
            (cgroup / "cgroup.procs").write_text(str(w.pid))
            assert w.go() == "done"
        finally:
            assert w.finish() == 0
        snap = probe.snapshot()
    assert histogram_total(snap, "syscall_latency", **key)[0] == 1


# Start timestamps moved this far into the future (KTEL_START_SKEW_NS): as if each
# were read on a CPU whose clock is ahead. Past the top bucket's 2^39 ns, and such
# that a few wrapped differences overflow the u64 sum.
SKEW_NS = 1 << 62


def test_a_start_read_after_its_end_is_skipped_and_counted_not_recorded(tmp_path):
    exe = build_c(tmp_path, "getppid", f"#define N {N}\n" + GETPPID)
    with (
        cgroup2_child() as cgroup,
        loaded("syscall_latency", defines={"KTEL_START_SKEW_NS": SKEW_NS}) as probe,
    ):
        key = {"cgroup.id": cgroup.stat().st_ino}
        w = Workload([str(exe)])
        try:
            key["syscall.id"] = int(w.hello)
            (cgroup / "cgroup.procs").write_text(str(w.pid))
            assert w.go() == "done"
            snap = probe.snapshot()
            counters = probe.counters()
        finally:
            w.finish()
    # Recorded, each would be a latency of about 2^64 - 2^62 ns in the top bucket.
    assert histogram_total(snap, "syscall_latency", **key)[0] == 0
    assert counters["negative_latency"] >= N  # every other thread's syscalls add to it


M = 41  # syscalls in flight at once: a prime, against a map of KTEL_SYSCALL_INFLIGHT_MAX = 8

# Prints its SYS_openat and waits; each line on stdin: M threads open the FIFO argv[1]
# for reading at once, each sleeping in openat until the test opens it for writing,
# then "done".
HELD_OPENS = r"""
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

static const char *fifo;

static void *held_open(void *arg)
{
	int fd = open(fifo, O_RDONLY);

	if (fd >= 0)
		close(fd);
	return arg;
}

int main(int argc, char **argv)
{
	pthread_t t[M];
	char line[64];
	int i;

	fifo = argv[1];
	printf("%d\n", SYS_openat);
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin)) {
		for (i = 0; i < M; i++)
			pthread_create(&t[i], NULL, held_open, NULL);
		for (i = 0; i < M; i++)
			pthread_join(t[i], NULL);
		printf("done\n");
		fflush(stdout);
	}
	return 0;
}
"""


def test_syscalls_in_flight_beyond_the_map_are_counted_none_lost_uncounted(tmp_path):
    """More syscalls in flight than the map of calls in flight holds: each one is in
    the histogram or counted in inflight_lost, none lost uncounted."""
    exe = build_c(tmp_path, "held_opens", f"#define M {M}\n" + HELD_OPENS)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with cgroup2_child() as cgroup:
        key = {"cgroup.id": cgroup.stat().st_ino}
        w = Workload([str(exe), str(fifo)])
        try:
            key["syscall.id"] = int(w.hello)
            (cgroup / "cgroup.procs").write_text(str(w.pid))
            with loaded("syscall_latency", defines={"KTEL_SYSCALL_INFLIGHT_MAX": 8}) as probe:
                w.send()
                deadline = time.monotonic() + 30
                while threads_in_open(w.pid) < M and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert threads_in_open(w.pid) == M, "the opens did not all block"
                os.close(os.open(fifo, os.O_WRONLY))  # every reader's open returns
                assert w.readline() == "done"
                snap = probe.snapshot()
                lost = probe.counters()["inflight_lost"]
        finally:
            w.finish()
    count, _ = histogram_total(snap, "syscall_latency", **key)
    assert count < M  # the map of 8 could not hold them all...
    # ...and each one it did not hold is counted (with other threads' syscalls: at least)
    assert count + lost >= M
