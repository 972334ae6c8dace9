/* SPDX-License-Identifier: GPL-2.0 */
/* ktel: the file_created event as it leaves the kernel through the ring buffer. */
#ifndef KTEL_FILE_CREATED_H
#define KTEL_FILE_CREATED_H

#include <linux/types.h>

#define KTEL_COMM_LEN 16
#define KTEL_PATH_LEN 256

/*
 * Layout (no implicit padding; the decoder in ktel/probes/file_created.py reads
 * it with struct format "<QIIIiIB3x16s256s", 304 bytes, checked by a test):
 *   0 ts_ns    u64  bpf_ktime_get_ns() at the syscall's return
 *   8 pid      u32  tgid
 *  12 tid      u32
 *  16 uid      u32
 *  20 dirfd    s32  openat's dirfd (AT_FDCWD = -100), to resolve relative paths
 *  24 flags    u32  open flags
 *  28 certain  u8   1: the file was certainly created (O_EXCL); 0: O_CREAT alone
 *  32 comm     char[16]
 *  48 path     char[256] as the caller passed it, NUL-terminated
 */
struct file_created_event {
	__u64 ts_ns;
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__s32 dirfd;
	__u32 flags;
	__u8 certain;
	__u8 pad[3];
	char comm[KTEL_COMM_LEN];
	char path[KTEL_PATH_LEN];
};

#endif
