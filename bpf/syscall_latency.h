/* SPDX-License-Identifier: GPL-2.0 */
/* ktel: the key of the syscall_latency histogram map. */
#ifndef KTEL_SYSCALL_LATENCY_H
#define KTEL_SYSCALL_LATENCY_H

#include <linux/types.h>

/*
 * Key of map "hist" (value: struct ktel_hist, bpf/ktel_hist.h). Layout (no
 * implicit padding; read by ktel/probes/syscall_latency.py, checked by a test):
 *   0 cgroup_id   u64  cgroup v2 id of the caller (bpf_get_current_cgroup_id())
 *   8 syscall_id  u32  syscall number of this architecture
 *  12 pad         u32  zero
 */
struct syscall_latency_key {
	__u64 cgroup_id;
	__u32 syscall_id;
	__u32 pad;
};

#endif
