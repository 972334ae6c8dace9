"""The runq_latency probe against the real kernel: a thread that sleeps 23 times
waits on the run queue after each wakeup; with the probe narrowed to that thread
(KTEL_FILTER_PID, like runqlat -p), its histogram counts those wakeups."""

import types

import pytest

from edge_agent.agent import AgentCollector
from tests.integration.probe_harness import Workload, build_c, histogram_total, loaded

pytestmark = pytest.mark.bpf

N = 23

# Each line on stdin: N sleeps of 10 ms, then "done".
SLEEPER = r"""
#include <stdio.h>
#include <time.h>

int main(void)
{
	struct timespec ms = { 0, 10000000 };
	char line[64];
	int i;

	printf("ready\n");
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin)) {
		for (i = 0; i < N; i++)
			nanosleep(&ms, NULL);
		printf("done\n");
		fflush(stdout);
	}
	return 0;
}
"""


def test_23_sleeps_are_counted_once_each_after_their_wakeup(tmp_path):
    exe = build_c(tmp_path, "sleeper", f"#define N {N}\n" + SLEEPER)
    w = Workload([str(exe)])  # blocked in read() from here on
    try:
        with loaded("runq_latency", defines={"KTEL_FILTER_PID": w.pid}) as probe:
            assert w.go() == "done"
            snap = probe.snapshot()
            quiet = probe.snapshot()
    finally:
        w.finish()
    count, buckets = histogram_total(snap, "runq_latency")
    # N wakeups from the sleeps and 1 from the read of the go line: 24 in nearly
    # every run. A preemption between two sleeps (rare: no work in between) adds
    # one; a wakeup that finds the thread not yet off its CPU (its vCPU stalled
    # mid-switch) is no wait on a run queue and is not counted.
    assert N <= count <= 2 * N
    # Waiting for a CPU takes more than 256 ns and, on an idle-ish machine, less than 1 s.
    assert sum(buckets[:8]) == 0 and sum(buckets[30:]) == 0
    assert histogram_total(quiet, "runq_latency")[0] == 0


def test_the_node_wide_histogram_counts_every_task(tmp_path):
    """Without the filter (as the agent loads it): at least the sleeper's wakeups."""
    exe = build_c(tmp_path, "sleeper", f"#define N {N}\n" + SLEEPER)
    w = Workload([str(exe)])
    try:
        with loaded("runq_latency") as probe:
            assert w.go() == "done"
            snap = probe.snapshot()
            lost = probe.counters()["hist_lost"]
    finally:
        w.finish()
    [ev] = snap
    assert ev[5] == {}  # one histogram for the node
    assert ev[6] >= N + 1
    assert lost == 0


# Start timestamps moved this far into the future (KTEL_START_SKEW_NS): as if each
# were read on a CPU whose clock is ahead. Past the top bucket's 2^39 ns, and such
# that a few wrapped differences overflow the u64 sum.
SKEW_NS = 1 << 62


def test_a_start_read_after_its_end_is_skipped_and_counted_not_recorded(tmp_path):
    exe = build_c(tmp_path, "sleeper", f"#define N {N}\n" + SLEEPER)
    w = Workload([str(exe)])
    try:
        with loaded(
            "runq_latency", defines={"KTEL_FILTER_PID": w.pid, "KTEL_START_SKEW_NS": SKEW_NS}
        ) as probe:
            assert w.go() == "done"
            snap = probe.snapshot()
            counters = probe.counters()
    finally:
        w.finish()
    # Recorded, each would be a latency of about 2^64 - 2^62 ns in the top bucket.
    assert histogram_total(snap, "runq_latency")[0] == 0
    assert N <= counters["negative_latency"] <= 2 * N
    assert counters["inflight_lost"] == 0


def test_the_agent_exports_the_programs_recursion_misses():
    """The kernel shows each program's recursion_misses (5.12 and later); the agent's
    scrape has them per probe, with their reason."""
    spool = types.SimpleNamespace(dropped_events=0, corrupt_bytes=0, depth_bytes=lambda: 0)
    control = types.SimpleNamespace(sample_every=lambda name: 1)
    with loaded("runq_latency") as probe:
        agent = types.SimpleNamespace(loaded={"runq_latency": probe}, spool=spool, control=control)
        families = {f.name: f for f in AgentCollector(agent).collect()}  # type: ignore[arg-type]
    [sample] = [s for s in families["ktel_agent_kernel_dropped_events"].samples if s.name.endswith("_total")]
    assert sample.labels == {"probe": "runq_latency", "reason": "recursion"}
    assert sample.value >= 0
