// SPDX-License-Identifier: GPL-2.0
/*
 * ktel probe runq_latency: a log2 histogram of run-queue latency in ns (from
 * a task's wakeup, or its preemption, until it runs), node-wide, from
 * sched:sched_wakeup, sched_wakeup_new and sched_switch, reading only their
 * fields (pids and prev_state).
 */
/* Compiled after bpf/ktel_common.bpf.h (prepended by the agent). */
#include "ktel_hist.h"

/*
 * sched_switch's prev_state is a TASK_REPORT bit (S D T t X Z P I, the low
 * 8 bits) or 0 for a runnable task, plus TASK_REPORT_MAX (0x100) when the
 * task was preempted (__trace_sched_switch_state(); the same in v6.1 and
 * v6.18). No report bit: the task stays on the run queue.
 */
#define KTEL_TASK_REPORT_MASK 0xff

/* Task pid -> when it became runnable. */
BPF_HASH(start, u32, u64, 32768);
/* One node-wide histogram (index 0). */
BPF_PERCPU_ARRAY(hist, struct ktel_hist, 1);
static __always_inline int enqueued(u32 pid)
{
	u64 ts;

	if (!pid) /* the idle task */
		return 0;
#ifdef KTEL_FILTER_PID
	/* KTEL_FILTER_PID: one thread only (tests and debugging; runqlat -p). */
	if (pid != KTEL_FILTER_PID)
		return 0;
#endif
	if (ktel_sampled_out()) {
		/*
		 * Not kept, this start must not leave an older one in its place: a
		 * wakeup that found the task still on its CPU stores one, and were
		 * the task's next preemption sampled out, the switch-in after it
		 * would count the task's own running time since that wakeup as wait.
		 * Kept, this start overwrites it. The lookup first: lockless, where
		 * a delete takes the bucket's lock even for a key that is not there.
		 */
		if (start.lookup(&pid))
			start.delete(&pid);
		return 0;
	}
	ts = ktel_start_ts();
	if (start.update(&pid, &ts))
		ktel_count(KTEL_COUNTER_INFLIGHT_LOST);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup)
{
	return enqueued(args->pid);
}

TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
	return enqueued(args->pid);
}

TRACEPOINT_PROBE(sched, sched_switch)
{
	u32 prev = args->prev_pid, next = args->next_pid, idx = 0;
	struct ktel_hist *h;
	u64 *tsp, delta;

	if (!(args->prev_state & KTEL_TASK_REPORT_MASK))
		enqueued(prev);
	else if (prev)
		/* Going to sleep: forget a wakeup that found it still on the CPU. */
		start.delete(&prev);
	tsp = start.lookup(&next);
	if (!tsp)
		return 0;
	if (ktel_latency(*tsp, bpf_ktime_get_ns(), &delta)) {
		start.delete(&next);
		return 0;
	}
	start.delete(&next);
	h = hist.lookup(&idx);
	if (!h)
		return 0;
	h->slots[ktel_hist_slot(delta)]++;
	h->sum += delta;
	return 0;
}
