// SPDX-License-Identifier: GPL-2.0
/*
 * ktel probe skb_drop: one event per packet the kernel dropped with a
 * reason, from skb:kfree_skb (consume_skb, a normal free, is another
 * tracepoint and is not seen).
 *
 * The reason field appeared in v5.17 (kfree_skb_reason()); the loader
 * skips this probe on a kernel whose format file lacks it. The agent maps
 * the enum to names with the running kernel's print fmt, because the
 * values move between versions (v6.1 and v6.18 already disagree).
 */
/* Compiled after bpf/ktel_common.bpf.h (prepended by the agent). */
#include "skb_drop.h"

/*
 * The tracepoint's args struct names enum skb_drop_reason, which BCC's
 * default headers do not declare; only its size (an int) matters here.
 * v5.17-v5.19 declared it in linux/skbuff.h, v6.0 on in net/dropreason.h.
 */
#if __has_include(<net/dropreason.h>)
#include <net/dropreason.h>
#else
#include <linux/skbuff.h>
#endif

TRACEPOINT_PROBE(skb, kfree_skb)
{
	struct skb_drop_event *ev;

	ev = ktel_reserve(sizeof(*ev));
	if (!ev)
		return 0;
	ev->ts_ns = bpf_ktime_get_ns();
	ev->location = (u64)args->location;
	ev->pid = bpf_get_current_pid_tgid() >> 32;
	ev->reason = (u32)args->reason;
	ev->protocol = args->protocol;
	__builtin_memset(ev->pad, 0, sizeof(ev->pad));
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	ktel_submit(ev);
	return 0;
}
