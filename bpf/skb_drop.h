/* SPDX-License-Identifier: GPL-2.0 */
/* ktel: the skb_drop event as it leaves the kernel through the ring buffer. */
#ifndef KTEL_SKB_DROP_H
#define KTEL_SKB_DROP_H

#include <linux/types.h>

#define KTEL_COMM_LEN 16

/*
 * Layout (no implicit padding; ktel/probes/skb_drop.py reads it with struct
 * format "<QQIIH6x16s", 48 bytes, checked by a test):
 *   0 ts_ns     u64  bpf_ktime_get_ns() at the drop
 *   8 location  u64  kernel address of the code that freed the packet
 *  16 pid       u32  tgid of the task on the CPU (the sender, or a softirq thread)
 *  20 reason    u32  enum skb_drop_reason; its names come from the format file
 *  24 protocol  u16  ethertype, host order
 *  32 comm      char[16]
 */
struct skb_drop_event {
	__u64 ts_ns;
	__u64 location;
	__u32 pid;
	__u32 reason;
	__u16 protocol;
	__u8 pad[6];
	char comm[KTEL_COMM_LEN];
};

#endif
