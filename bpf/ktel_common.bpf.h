/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ktel: what every probe shares: its ring buffer, drop counters and sampling
 * knob, and the histogram probes' count of values lost. The agent prepends
 * this text to each probe's source instead of the probe #including it,
 * because BCC rewrites map calls (counters.lookup()) only in the main file it
 * compiles, not in included headers.
 */
#ifndef KTEL_COMMON_BPF_H
#define KTEL_COMMON_BPF_H

#include "ktel_common.h"

/* Ring buffer size in pages; the agent passes -DKTEL_RINGBUF_PAGES from its config. */
#ifndef KTEL_RINGBUF_PAGES
#define KTEL_RINGBUF_PAGES 256
#endif

BPF_RINGBUF_OUTPUT(events, KTEL_RINGBUF_PAGES);

/*
 * Per-CPU so the hot path never contends on a cache line; the agent sums the
 * CPUs. Indexed by enum ktel_counter.
 *
 * Per-CPU is not exclusive, though: a uprobe program (dns_latency's) runs with
 * migration disabled but preemption enabled (bpf_prog_run_array_uprobe(),
 * kernels 6.1 and later), so on a preemptible kernel another task's run on the
 * same CPU can come between its read and its write of a slot, and one of the
 * two increments is lost. Every counter and histogram slot a uprobe program
 * updates is added to with __sync_fetch_and_add() (an atomic add, uncontended
 * on a per-CPU slot). A tracepoint program runs with preemption disabled and
 * adds with a plain ++.
 */
BPF_PERCPU_ARRAY(counters, u64, KTEL_COUNTER_MAX);

/* knobs[KTEL_KNOB_SAMPLE_EVERY]: keep 1 event in N (0 or 1 keeps all). */
BPF_ARRAY(knobs, u32, KTEL_KNOB_MAX);

static __always_inline void ktel_count(u32 idx)
{
	u64 *v = counters.lookup(&idx);

	if (v) /* atomic: uprobe programs count too (see counters) */
		__sync_fetch_and_add(v, 1);
}

/* Returns 1 when the sampling knob says this event is to be dropped. */
static __always_inline int ktel_sampled_out(void)
{
	u32 idx = KTEL_KNOB_SAMPLE_EVERY;
	u32 *every = knobs.lookup(&idx);

	if (every && *every > 1 && bpf_get_prandom_u32() % *every) {
		ktel_count(KTEL_COUNTER_SAMPLED_OUT);
		return 1;
	}
	return 0;
}

/*
 * An event record in the ring buffer, or NULL when the sampling knob drops the
 * event or the buffer is full (each counted).
 */
static __always_inline void *ktel_reserve(u32 size)
{
	void *e;

	if (ktel_sampled_out())
		return NULL;
	e = events.ringbuf_reserve(size);
	if (!e)
		ktel_count(KTEL_COUNTER_RINGBUF_DROPS);
	return e;
}

/*
 * Wake-ups. A record submitted with flags 0 wakes the reader whenever it has
 * caught up, so at ordinary rates it wakes once per record. The agent reads on
 * a timer instead (agent.read_interval_ms) and asks to be woken only when the
 * buffer holds KTEL_WAKEUP_BYTES (a share of it, set by the agent's loader), so
 * that a burst is read before it fills the buffer. 0: the kernel's wake-ups.
 */
#ifndef KTEL_WAKEUP_BYTES
#define KTEL_WAKEUP_BYTES 0
#endif

static __always_inline void ktel_submit(void *e)
{
	u64 flags = 0;

	/*
	 * BCC 0.26 rewrites no events.ringbuf_query(): the map is named by the
	 * placeholder BCC gives the first map declared, events above (fd -1). A
	 * wrong placeholder fails the verifier at load: ringbuf_query takes a
	 * ring buffer only. Reserved records count as data: a buffer filled by
	 * records still being written wakes the reader too.
	 */
	if (KTEL_WAKEUP_BYTES)
		flags = bpf_ringbuf_query((void *)bpf_pseudo_fd(1, -1), BPF_RB_AVAIL_DATA) >=
					KTEL_WAKEUP_BYTES
				? BPF_RB_FORCE_WAKEUP
				: BPF_RB_NO_WAKEUP;
	events.ringbuf_submit(e, flags);
}

/*
 * A latency's start. KTEL_START_SKEW_NS, for tests alone, moves it into the
 * future, as a start read on a CPU whose clock is ahead would be.
 */
#ifndef KTEL_START_SKEW_NS
#define KTEL_START_SKEW_NS 0
#endif

static __always_inline u64 ktel_start_ts(void)
{
	return bpf_ktime_get_ns() + KTEL_START_SKEW_NS;
}

/*
 * *delta = now - start, or -1 and counted when start is after now: that
 * difference, a u64, would be a huge latency in the top bucket, and could wrap
 * the histogram's sum, which the agent then sends as a negative delta that the
 * schema refuses (the whole batch dead-lettered).
 */
static __always_inline int ktel_latency(u64 start, u64 now, u64 *delta)
{
	if (start > now) {
		ktel_count(KTEL_COUNTER_NEGATIVE_LATENCY);
		return -1;
	}
	*delta = now - start;
	return 0;
}

/*
 * hist_lost[0]: values a histogram probe (bpf/ktel_hist.h) did not count
 * because a map was full. Here, not in ktel_hist.h, because count_lost()
 * calls a map (see above); a probe without histograms leaves it at zero.
 */
BPF_PERCPU_ARRAY(hist_lost, u64, 1);

static __always_inline void count_lost(void)
{
	u32 zero = 0;
	u64 *v = hist_lost.lookup(&zero);

	if (v) /* atomic: uprobe programs count too (see counters) */
		__sync_fetch_and_add(v, 1);
}

#endif
