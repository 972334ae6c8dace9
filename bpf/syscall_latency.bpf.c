// SPDX-License-Identifier: GPL-2.0
/*
 * ktel probe syscall_latency: log2 histograms of syscall durations in ns,
 * per syscall number and cgroup v2 id, from raw_syscalls:sys_enter/sys_exit.
 * Kept in the kernel (docs/design.md, principle 6); the agent reads deltas.
 */
/* Compiled after bpf/ktel_common.bpf.h (prepended by the agent). */
#include "ktel_hist.h"
#include "syscall_latency.h"

/*
 * Thread id -> sys_enter time; every thread blocked in a syscall holds one. A
 * plain hash: a start it has no room for is counted at sys_enter
 * (inflight_lost), not lost unseen.
 */
#ifndef KTEL_SYSCALL_INFLIGHT_MAX
#define KTEL_SYSCALL_INFLIGHT_MAX 65536
#endif
BPF_HASH(start, u32, u64, KTEL_SYSCALL_INFLIGHT_MAX);
BPF_PERCPU_HASH(hist, struct syscall_latency_key, struct ktel_hist, 8192);
TRACEPOINT_PROBE(raw_syscalls, sys_enter)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	u64 ts;

	if (ktel_sampled_out())
		return 0;
	ts = ktel_start_ts();
	if (start.update(&tid, &ts))
		ktel_count(KTEL_COUNTER_INFLIGHT_LOST);
	return 0;
}

TRACEPOINT_PROBE(raw_syscalls, sys_exit)
{
	struct syscall_latency_key key = {};
	struct ktel_hist zero = {}, *h;
	u32 tid = (u32)bpf_get_current_pid_tgid();
	u64 *tsp, delta;

	tsp = start.lookup(&tid);
	if (!tsp)
		return 0;
	if (ktel_latency(*tsp, bpf_ktime_get_ns(), &delta)) {
		start.delete(&tid);
		return 0;
	}
	start.delete(&tid);
	if (args->id < 0)
		return 0;
	key.cgroup_id = bpf_get_current_cgroup_id();
	key.syscall_id = args->id;
	h = hist.lookup_or_try_init(&key, &zero);
	if (!h) {
		count_lost();
		return 0;
	}
	h->slots[ktel_hist_slot(delta)]++;
	h->sum += delta;
	return 0;
}

/* A thread that exits in exit/exit_group never reaches sys_exit. */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u32 tid = args->pid;

	start.delete(&tid);
	return 0;
}

/*
 * An execve by a thread other than the leader returns as the leader: de_thread()
 * gives it the leader's pid. Its start moves with it, else its sys_exit finds
 * none (the sample lost, uncounted) and the entry under its old tid stays.
 */
TRACEPOINT_PROBE(sched, sched_process_exec)
{
	u32 old = args->old_pid, tid = (u32)bpf_get_current_pid_tgid();
	u64 *tsp, ts;

	if (old == tid)
		return 0;
	tsp = start.lookup(&old);
	if (!tsp)
		return 0;
	ts = *tsp;
	start.delete(&old);
	if (start.update(&tid, &ts))
		ktel_count(KTEL_COUNTER_INFLIGHT_LOST);
	return 0;
}
