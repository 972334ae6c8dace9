/* SPDX-License-Identifier: GPL-2.0 */
/* ktel: the module_load event as it leaves the kernel through the ring buffer. */
#ifndef KTEL_MODULE_LOAD_H
#define KTEL_MODULE_LOAD_H

#include <linux/types.h>

#define KTEL_COMM_LEN 16
#define KTEL_MODULE_NAME_LEN 56 /* MODULE_NAME_LEN on 64-bit: 64 - sizeof(unsigned long) */

/*
 * Layout (no implicit padding; ktel/probes/module_load.py reads it with struct
 * format "<QII16s56s", 88 bytes, checked by a test):
 *   0 ts_ns   u64  bpf_ktime_get_ns() when the module was loaded
 *   8 pid     u32  tgid of the process that loaded it (insmod, modprobe, udev)
 *  12 taints  u32  the module's taint bits (kernel/panic.c: 12 O out-of-tree, 13 E unsigned, ...)
 *  16 comm    char[16]  that process's comm
 *  32 name    char[56]  the module's name
 */
struct module_load_event {
	__u64 ts_ns;
	__u32 pid;
	__u32 taints;
	char comm[KTEL_COMM_LEN];
	char name[KTEL_MODULE_NAME_LEN];
};

#endif
