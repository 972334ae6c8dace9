// SPDX-License-Identifier: GPL-2.0
/*
 * ktel probe block_latency: log2 histograms of block request latency in ns,
 * from issue to the driver until completion, per disk and operation, from
 * block:block_rq_issue and block:block_rq_complete (dev, sector, rwbs).
 */
/* Compiled after bpf/ktel_common.bpf.h (prepended by the agent). */
#include "ktel_hist.h"
#include "block_latency.h"

struct start_key {
	u32 dev;
	u32 pad;
	u64 sector;
};

struct start_val {
	u64 ts;
	u32 op;
	u32 pad;
};

/*
 * Requests in flight. A plain hash, not an LRU: an LRU evicts to make room,
 * and not only when it is full (a CPU whose local free list is empty evicts
 * first, kernel/bpf/bpf_lru_list.c), and a request whose start it evicted
 * would be lost with no count, its completion indistinguishable from one
 * issued before the probe was attached or sampled out. Here a request the
 * full map cannot hold is counted at its issue. Every request completes (a
 * requeued one is issued again under the same key, a dead disk's fail), so
 * entries do not accumulate.
 */
#ifndef KTEL_BLOCK_INFLIGHT_MAX
#define KTEL_BLOCK_INFLIGHT_MAX 16384
#endif
BPF_HASH(start, struct start_key, struct start_val, KTEL_BLOCK_INFLIGHT_MAX);
BPF_PERCPU_HASH(hist, struct block_latency_key, struct ktel_hist, 1024);
TRACEPOINT_PROBE(block, block_rq_issue)
{
	struct start_key key = {};
	struct start_val val = {};
	char c0 = args->rwbs[0], c1 = args->rwbs[1];

	key.dev = args->dev;
	key.sector = args->sector;
	if (ktel_sampled_out()) {
		/*
		 * Not kept, this issue must not leave an older start in its place: a
		 * requeued request is issued again under the same key, and were this
		 * second issue sampled out, its completion would be timed from the
		 * first. Kept, this issue overwrites it. The lookup first: lockless,
		 * where a delete takes the bucket's lock even for a key not there.
		 */
		if (start.lookup(&key))
			start.delete(&key);
		return 0;
	}
	val.ts = ktel_start_ts();
	/* blk_fill_rwbs(): an 'F' for a preflush may come before the op letter. */
	if (c0 == 'F' && (c1 == 'W' || c1 == 'R' || c1 == 'D' || c1 == 'F' || c1 == 'N'))
		val.op = c1;
	else
		val.op = c0;
	if (start.update(&key, &val))
		ktel_count(KTEL_COUNTER_INFLIGHT_LOST);
	return 0;
}

TRACEPOINT_PROBE(block, block_rq_complete)
{
	struct start_key key = {};
	struct block_latency_key hkey = {};
	struct ktel_hist zero = {}, *h;
	struct start_val *v;
	u64 delta;

	key.dev = args->dev;
	key.sector = args->sector;
	v = start.lookup(&key);
	if (!v)
		return 0;
	if (ktel_latency(v->ts, bpf_ktime_get_ns(), &delta)) {
		start.delete(&key);
		return 0;
	}
	hkey.dev = key.dev;
	hkey.op = v->op;
	start.delete(&key);
	h = hist.lookup_or_try_init(&hkey, &zero);
	if (!h) {
		count_lost();
		return 0;
	}
	h->slots[ktel_hist_slot(delta)]++;
	h->sum += delta;
	return 0;
}
