// SPDX-License-Identifier: GPL-2.0
/*
 * ktel probe dns_latency: log2 histograms of getaddrinfo() durations in ns
 * per process, from a uprobe and a uretprobe on libc's getaddrinfo (the file
 * agent.libc_path names, else BCC's library name resolution of "c"), and a
 * slow-lookup event through the ring buffer for every call of KTEL_DNS_SLOW_NS
 * or more.
 *
 * Only processes mapping that very libc file are seen (not static binaries,
 * not a container's own libc, not resolvers that bypass getaddrinfo such as Go's).
 */
/* Compiled after bpf/ktel_common.bpf.h (prepended by the agent). */
#include <uapi/linux/ptrace.h>
#include "ktel_hist.h"
#include "dns_latency.h"

/* Slow-lookup threshold, ns; the agent may pass another with -D. */
#ifndef KTEL_DNS_SLOW_NS
#define KTEL_DNS_SLOW_NS 100000000ULL
#endif

struct dns_start {
	u64 ts;
	const char *host;
};

/*
 * Thread -> call in flight; a thread killed inside getaddrinfo ages out of the
 * LRU. The LRU evicts to make room, and not only when it is full (a CPU whose
 * local free list is empty evicts first, kernel/bpf/bpf_lru_list.c): a call
 * whose entry was evicted is found by its mark in call_marks and counted, as
 * file_created counts its opens.
 */
#ifndef KTEL_DNS_INFLIGHT_MAX
#define KTEL_DNS_INFLIGHT_MAX 10240
#endif
BPF_TABLE("lru_hash", u64, struct dns_start, start, KTEL_DNS_INFLIGHT_MAX);
/*
 * One mark per thread with a call in flight, in task-local storage: it lives
 * and dies with the thread and is never evicted, so at the return "marked but
 * not in start" means "evicted".
 */
BPF_TASK_STORAGE(call_marks, u64);
BPF_PERCPU_HASH(hist, struct dns_latency_key, struct ktel_hist, 4096);
int getaddrinfo_entry(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	struct dns_start s = {};
	u64 *mark;

	if (ktel_sampled_out())
		return 0;
	mark = call_marks.task_storage_get(bpf_get_current_task_btf(), 0,
					   BPF_LOCAL_STORAGE_GET_F_CREATE);
	s.ts = ktel_start_ts();
	s.host = (const char *)PT_REGS_PARM1(ctx);
	if (start.update(&id, &s)) {
		/* Not tracked at all: lost. Counted now, once. */
		ktel_count(KTEL_COUNTER_INFLIGHT_LOST);
		return 0;
	}
	if (mark)
		*mark = 1;
	else
		ktel_count(KTEL_COUNTER_INFLIGHT_LOST); /* no mark: an eviction would go unseen */
	return 0;
}

static __always_inline void slow_event(struct dns_start *s, u64 id, u64 now, int ret)
{
	/* Not ktel_reserve(): the lookup was sampled when it started. */
	struct dns_slow_event *ev = events.ringbuf_reserve(sizeof(*ev));

	if (!ev) {
		ktel_count(KTEL_COUNTER_RINGBUF_DROPS);
		return;
	}
	ev->ts_ns = now;
	ev->latency_ns = now - s->ts; /* not before: getaddrinfo_return checked */
	ev->pid = id >> 32;
	ev->tid = (u32)id;
	ev->ret = ret;
	ev->pad = 0;
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	if (!s->host || bpf_probe_read_user_str(ev->host, sizeof(ev->host), s->host) < 0)
		ev->host[0] = 0;
	ktel_submit(ev);
}

int getaddrinfo_return(struct pt_regs *ctx)
{
	struct dns_latency_key key = {};
	struct ktel_hist zero = {}, *h;
	struct dns_start *s;
	u64 id = bpf_get_current_pid_tgid(), now, delta;
	int ret = PT_REGS_RC(ctx);
	u64 *mark = call_marks.task_storage_get(bpf_get_current_task_btf(), 0, 0);
	int marked = mark && *mark;

	if (marked)
		*mark = 0;
	s = start.lookup(&id);
	if (!s) {
		/* Marked at the entry, gone now: the LRU evicted it. */
		if (marked)
			ktel_count(KTEL_COUNTER_INFLIGHT_LOST);
		return 0;
	}
	now = bpf_ktime_get_ns();
	if (ktel_latency(s->ts, now, &delta)) {
		start.delete(&id);
		return 0;
	}
	key.tgid = id >> 32;
	key.failed = ret != 0;
	bpf_get_current_comm(key.comm, sizeof(key.comm));
	h = hist.lookup_or_try_init(&key, &zero);
	if (h) {
		/* Atomic: a uprobe program may be preempted (bpf/ktel_common.bpf.h, counters). */
		__sync_fetch_and_add(&h->slots[ktel_hist_slot(delta)], 1);
		__sync_fetch_and_add(&h->sum, delta);
	} else {
		count_lost();
	}
	if (delta >= KTEL_DNS_SLOW_NS)
		slow_event(s, id, now, ret);
	start.delete(&id);
	return 0;
}
