// SPDX-License-Identifier: GPL-2.0
/*
 * ktel probe tcp_retransmit: one event per TCP retransmission, from the
 * tcp:tcp_retransmit_skb tracepoint (addresses, ports, state).
 *
 * The tracepoint fires in whatever context retransmits (usually the RTO
 * timer in softirq), so the task on the CPU says nothing and is not reported.
 */
/* Compiled after bpf/ktel_common.bpf.h (prepended by the agent). */
#include "tcp_retransmit.h"

#define KTEL_AF_INET 2

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
	struct tcp_retransmit_event *ev;

	ev = ktel_reserve(sizeof(*ev));
	if (!ev)
		return 0;
	ev->ts_ns = bpf_ktime_get_ns();
	ev->state = args->state;
	/*
	 * err: absent in v6.1 (Debian 12's headers), present in v6.18 (where
	 * the tracepoint also fires for failed retransmissions); the loader
	 * defines KTEL_TCP_RETRANSMIT_ERR when the format file lists it.
	 */
#ifdef KTEL_TCP_RETRANSMIT_ERR
	ev->err = args->err;
	ev->has_err = 1;
#else
	ev->err = 0;
	ev->has_err = 0;
#endif
	ev->family = args->family;
	ev->sport = args->sport;
	ev->dport = args->dport;
	ev->pad = 0;
	__builtin_memset(ev->saddr, 0, sizeof(ev->saddr));
	__builtin_memset(ev->daddr, 0, sizeof(ev->daddr));
	if (ev->family == KTEL_AF_INET) {
		__builtin_memcpy(ev->saddr, args->saddr, 4);
		__builtin_memcpy(ev->daddr, args->daddr, 4);
	} else {
		__builtin_memcpy(ev->saddr, args->saddr_v6, 16);
		__builtin_memcpy(ev->daddr, args->daddr_v6, 16);
	}
	ktel_submit(ev);
	return 0;
}
