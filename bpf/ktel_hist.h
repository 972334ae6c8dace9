/* SPDX-License-Identifier: GPL-2.0 */
/* ktel: the log2 histogram that the histogram probes keep in BPF maps. */
#ifndef KTEL_HIST_H
#define KTEL_HIST_H

#include <linux/types.h>

/*
 * Bucket i counts values v with 2^i <= v < 2^(i+1), except that bucket 0
 * counts 0 <= v < 2 and the last bucket (KTEL_HIST_SLOTS - 1) counts every
 * v >= 2^(KTEL_HIST_SLOTS - 1). Latencies are in nanoseconds, so the last
 * bucket starts at 2^39 ns, about 550 s.
 *
 * Mirrored in ktel/probes/__init__.py (HIST_SLOTS); the layout, checked by
 * tests/unit/test_probe_layout.py, is slots at 0 (40 x u64), sum at 320,
 * 328 bytes. The maps holding it are per-CPU (the agent sums the CPUs), so a
 * tracepoint program, which runs with preemption disabled, adds to it with no
 * atomics; a uprobe program, preemptible, adds atomically (see counters in
 * bpf/ktel_common.bpf.h). The agent reads them as deltas.
 */
#define KTEL_HIST_SLOTS 40

struct ktel_hist {
	__u64 slots[KTEL_HIST_SLOTS];
	__u64 sum; /* sum of the values counted */
};

/* floor(log2(v)) for v >= 1, and 0 for v = 0; branch-free for the verifier. */
static inline __u32 ktel_log2(__u64 v)
{
	__u32 r, shift;

	r = (v > 0xFFFFFFFFULL) << 5;
	v >>= r;
	shift = (v > 0xFFFF) << 4;
	v >>= shift;
	r |= shift;
	shift = (v > 0xFF) << 3;
	v >>= shift;
	r |= shift;
	shift = (v > 0xF) << 2;
	v >>= shift;
	r |= shift;
	shift = (v > 0x3) << 1;
	v >>= shift;
	r |= shift;
	r |= (__u32)(v >> 1);
	return r;
}

static inline __u32 ktel_hist_slot(__u64 v)
{
	__u32 slot = ktel_log2(v);

	return slot < KTEL_HIST_SLOTS ? slot : KTEL_HIST_SLOTS - 1;
}

#endif
