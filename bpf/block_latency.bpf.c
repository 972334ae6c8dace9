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

/* A request that never completes (a requeue, a dead disk) ages out of the LRU. */
BPF_TABLE("lru_hash", struct start_key, struct start_val, start, 16384);
BPF_PERCPU_HASH(hist, struct block_latency_key, struct ktel_hist, 1024);
TRACEPOINT_PROBE(block, block_rq_issue)
{
	struct start_key key = {};
	struct start_val val = {};
	char c0 = args->rwbs[0], c1 = args->rwbs[1];

	if (ktel_sampled_out())
		return 0;
	key.dev = args->dev;
	key.sector = args->sector;
	val.ts = bpf_ktime_get_ns();
	/* blk_fill_rwbs(): an 'F' for a preflush may come before the op letter. */
	if (c0 == 'F' && (c1 == 'W' || c1 == 'R' || c1 == 'D' || c1 == 'F' || c1 == 'N'))
		val.op = c1;
	else
		val.op = c0;
	if (start.update(&key, &val))
		count_lost();
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
	delta = bpf_ktime_get_ns() - v->ts;
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
