/* SPDX-License-Identifier: GPL-2.0 */
/* ktel: the process exec/exit events as they leave the kernel through the ring buffer. */
#ifndef KTEL_PROCESS_H
#define KTEL_PROCESS_H

#include <linux/types.h>

#define KTEL_COMM_LEN 16
#define KTEL_PATH_LEN 256

enum ktel_process_type {
	KTEL_PROCESS_EXEC = 1,
	KTEL_PROCESS_EXIT = 2,
};

/*
 * Layout (no implicit padding; ktel/probes/process.py reads it with struct
 * format "<QQIIIIIii4x16s", 64 bytes, then the filename for an exec; checked
 * by a test). An exit record is the first KTEL_PROCESS_EXIT_SIZE bytes only.
 *   0 ts_ns      u64  bpf_ktime_get_ns() at the exec / at the last thread's exit
 *   8 cgroup_id  u64  cgroup v2 id of the process
 *  16 type       u32  enum ktel_process_type
 *  20 pid        u32  tgid
 *  24 tid        u32  exec: the thread that called execve; exit: the exiting thread
 *  28 ppid       u32  tgid of the process that forked it (0: forked before the probe)
 *  32 uid        u32
 *  36 exit_code  s32  exit: status passed to exit_group/exit (0-255), -1 if none was seen
 *  40 signal     s32  exit: last fatal-by-default signal sent to it (when exit_code is -1)
 *  48 comm       char[16]
 *  64 filename   char[256] exec only: the path given to execve, NUL-terminated
 */
struct process_event {
	__u64 ts_ns;
	__u64 cgroup_id;
	__u32 type;
	__u32 pid;
	__u32 tid;
	__u32 ppid;
	__u32 uid;
	__s32 exit_code;
	__s32 signal;
	__u32 pad;
	char comm[KTEL_COMM_LEN];
	char filename[KTEL_PATH_LEN];
};

#define KTEL_PROCESS_EXIT_SIZE 64

#endif
