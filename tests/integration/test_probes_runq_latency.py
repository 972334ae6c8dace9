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
    spool = types.SimpleNamespace(
        dropped_events=0, corrupt_bytes=0, unreadable_bytes=0, depth_bytes=lambda: 0
    )
    control = types.SimpleNamespace(sample_every=lambda name: 1)
    with loaded("runq_latency") as probe:
        agent = types.SimpleNamespace(loaded={"runq_latency": probe}, spool=spool, control=control)
        families = {f.name: f for f in AgentCollector(agent).collect()}  # type: ignore[arg-type]
    [sample] = [s for s in families["ktel_agent_kernel_dropped_events"].samples if s.name.endswith("_total")]
    assert sample.labels == {"probe": "runq_latency", "reason": "recursion"}
    assert sample.value >= 0


# Given, on its go line, a descriptor of the test's own that is the probe's map of
# starts, the thread takes a copy of it (pidfd_getfd), shares its CPU with a spinning
# thread of its own, then, running, writes itself a start of now into that map: what
# a wakeup that finds it still on its CPU stores. It then yields the CPU (a switch-out
# with prev_state 0, a start event, as a preemption is) until it has been switched
# out and back in at least once, and never sleeps in between.
ON_CPU_START = r"""
#define _GNU_SOURCE
#include <linux/bpf.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static volatile int stop;

static void *spin(void *arg)
{
	while (!stop)
		;
	return NULL;
}

static long involuntary_switches(void)
{
	struct rusage ru;

	getrusage(RUSAGE_THREAD, &ru);
	return ru.ru_nivcsw;
}

int main(void)
{
	char line[64];
	cpu_set_t cpu;
	pthread_t t;
	union bpf_attr attr;
	struct timespec now;
	uint32_t key = getpid();
	uint64_t ts;
	long before, switched;
	int pidfd, map_fd;

	printf("ready\n");
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		return 1;
	pidfd = syscall(SYS_pidfd_open, getppid(), 0);
	map_fd = syscall(SYS_pidfd_getfd, pidfd, atoi(line), 0);
	if (pidfd < 0 || map_fd < 0) {
		perror("pidfd_getfd");
		return 1;
	}
	CPU_ZERO(&cpu);
	CPU_SET(sched_getcpu(), &cpu);
	if (sched_setaffinity(0, sizeof(cpu), &cpu) || pthread_create(&t, NULL, spin, NULL))
		return 1; /* the spinner has this CPU alone too */
	clock_gettime(CLOCK_MONOTONIC, &now);
	ts = now.tv_sec * 1000000000ULL + now.tv_nsec;
	memset(&attr, 0, sizeof(attr));
	attr.map_fd = map_fd;
	attr.key = (uintptr_t)&key;
	attr.value = (uintptr_t)&ts;
	attr.flags = BPF_ANY;
	if (syscall(SYS_bpf, BPF_MAP_UPDATE_ELEM, &attr, sizeof(attr))) {
		perror("bpf");
		return 1;
	}
	before = involuntary_switches();
	while (involuntary_switches() == before)
		sched_yield();
	switched = involuntary_switches() - before;
	stop = 1;
	pthread_join(t, NULL);
	printf("%ld\n", switched);
	fflush(stdout);
	return 0;
}
"""


def test_a_start_left_by_a_wakeup_on_cpu_is_not_timed_from_when_the_preemption_is_sampled_out(
    tmp_path,
):
    """A wakeup that finds its task still on its CPU stores a start; the task's next
    switch-out with prev_state 0 (preemption, yield) is a start event of its own. All
    sampled out, no sample may come of it: the switch-in after it would otherwise
    count the task's running time since that wakeup, and the switch, as a wait."""
    exe = build_c(tmp_path, "on_cpu_start", ON_CPU_START)
    w = Workload([str(exe)])
    try:
        with loaded("runq_latency", defines={"KTEL_FILTER_PID": w.pid}) as probe:
            probe.set_sample_every((1 << 32) - 1)  # keeps 1 in 2^32 - 1: none, in all likelihood
            switched = int(w.go(str(probe.bpf[b"start"].map_fd)))
            snap = probe.snapshot()
            counters = probe.counters()
    finally:
        w.finish()
    assert switched >= 1
    assert counters["sampled_out"] >= switched
    assert histogram_total(snap, "runq_latency")[0] == 0
