/* SPDX-License-Identifier: GPL-2.0 */
/* ktel: the oom_kill event as it leaves the kernel through the ring buffer. */
#ifndef KTEL_OOM_KILL_H
#define KTEL_OOM_KILL_H

#include <linux/types.h>

#define KTEL_COMM_LEN 16

/*
 * Layout (no implicit padding; ktel/probes/oom_kill.py reads it with struct
 * format "<QQQQQQIIIhBx16s16s", 96 bytes, checked by a test):
 *   0 ts_ns         u64  bpf_ktime_get_ns() when the victim was marked
 *   8 total_vm_kb   u64  the victim's memory, kB, as the tracepoint gives it
 *  16 anon_rss_kb   u64
 *  24 file_rss_kb   u64
 *  32 shmem_rss_kb  u64
 *  40 pgtables_kb   u64
 *  48 pid           u32  the victim (task pid, as the tracepoint gives it)
 *  52 uid           u32  the victim's uid
 *  56 trigger_pid   u32  tgid of the task on the CPU: the one that ran into the limit
 *  60 oom_score_adj s16
 *  62 has_detail    u8   1: comm..oom_score_adj are filled (the tracepoint has them)
 *  64 comm          char[16] the victim's comm
 *  80 trigger_comm  char[16]
 */
struct oom_kill_event {
	__u64 ts_ns;
	__u64 total_vm_kb;
	__u64 anon_rss_kb;
	__u64 file_rss_kb;
	__u64 shmem_rss_kb;
	__u64 pgtables_kb;
	__u32 pid;
	__u32 uid;
	__u32 trigger_pid;
	__s16 oom_score_adj;
	__u8 has_detail;
	__u8 pad;
	char comm[KTEL_COMM_LEN];
	char trigger_comm[KTEL_COMM_LEN];
};

#endif
