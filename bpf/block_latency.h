/* SPDX-License-Identifier: GPL-2.0 */
/* ktel: the key of the block_latency histogram map. */
#ifndef KTEL_BLOCK_LATENCY_H
#define KTEL_BLOCK_LATENCY_H

#include <linux/types.h>

/*
 * Key of map "hist" (value: struct ktel_hist, bpf/ktel_hist.h). Layout (no
 * implicit padding; read by ktel/probes/block_latency.py, checked by a test):
 *   0 dev  u32  the disk's dev_t as the kernel keeps it: major << 20 | minor
 *   4 op   u8   the request's operation letter from rwbs: 'R' read, 'W' write,
 *               'D' discard, 'F' flush, 'N' other
 *   5 pad  u8[3] zero
 */
struct block_latency_key {
	__u32 dev;
	__u8 op;
	__u8 pad[3];
};

#endif
