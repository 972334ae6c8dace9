/* SPDX-License-Identifier: GPL-2.0 */
/* ktel: the tcp_retransmit event as it leaves the kernel through the ring buffer. */
#ifndef KTEL_TCP_RETRANSMIT_H
#define KTEL_TCP_RETRANSMIT_H

#include <linux/types.h>

/*
 * Layout (no implicit padding; ktel/probes/tcp_retransmit.py reads it with
 * struct format "<QiiHHHBx16s16s", 56 bytes, checked by a test):
 *   0 ts_ns    u64  bpf_ktime_get_ns() at the retransmission
 *   8 state    s32  TCP state (include/net/tcp_states.h: 1 ESTABLISHED ...)
 *  12 err      s32  result of the retransmission (0 or -errno), if has_err
 *  16 family   u16  AF_INET (2) or AF_INET6 (10)
 *  18 sport    u16  local port, host order
 *  20 dport    u16  remote port, host order
 *  22 has_err  u8   1 when the kernel's tracepoint has the err field
 *  24 saddr    u8[16]  local address: 4 bytes (then zeros) for AF_INET, 16 for AF_INET6
 *  40 daddr    u8[16]  remote address, the same way
 */
struct tcp_retransmit_event {
	__u64 ts_ns;
	__s32 state;
	__s32 err;
	__u16 family;
	__u16 sport;
	__u16 dport;
	__u8 has_err;
	__u8 pad;
	__u8 saddr[16];
	__u8 daddr[16];
};

#endif
