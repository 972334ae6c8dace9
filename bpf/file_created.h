/* SPDX-License-Identifier: GPL-2.0 */
/* ktel: the file_created event as it leaves the kernel through the ring buffer. */
#ifndef KTEL_FILE_CREATED_H
#define KTEL_FILE_CREATED_H

#include <linux/types.h>

#define KTEL_COMM_LEN 16
#define KTEL_PATH_LEN 256
/* Twice the longest name component (NAME_MAX 255 + NUL): see dir below. */
#define KTEL_DIR_LEN 512

/* dir_state */
#define KTEL_DIR_NONE 0 /* dir unused: path is absolute, or not resolved in the kernel */
#define KTEL_DIR_OK 1 /* dir holds the whole directory path was relative to */
#define KTEL_DIR_TRUNCATED 2 /* that directory is deeper or longer than dir holds */
/*
 * Or'd in: openat2 with RESOLVE_IN_ROOT, which resolves the path (absolute too, with
 * "..", and symlinks) inside dirfd's directory as in a root (how container runtimes
 * open files in a container's root). dir then holds the created file's own whole
 * path, walked from the fd the open returned; without it (KTEL_DIR_NONE, no BTF;
 * KTEL_DIR_TRUNCATED) the agent resolves path inside dirfd from /proc.
 */
#define KTEL_DIR_IN_ROOT 0x80
/*
 * Or'd in: the path the agent names the file by is only the start of its path, cut
 * to fit path (KTEL_PATH_LEN - 1 bytes and the NUL): the caller's string was longer
 * (the syscall fallback), or filewatcher's d_path() was (its tracepoint keeps up
 * to 2047 bytes). Not set where path goes unused: a file opened in a root whose
 * own path dir holds whole (KTEL_DIR_IN_ROOT with KTEL_DIR_OK). Each such record
 * is counted in KTEL_COUNTER_PATH_TRUNCATED (bpf/ktel_common.h).
 */
#define KTEL_PATH_TRUNCATED 0x40

/*
 * dirfd of a record from the filewatcher module (bpf/ktel_tracepoints.bpf.h): its path
 * is the module's text, relative to no directory: d_path()'s absolute path, or
 * "(d_path failed)" when d_path() failed (kmod/README.md). The agent sends such a path
 * as it is, never resolved against the process's cwd, where it would name a file that
 * is not the one created. Not a file descriptor, and not AT_FDCWD: the kernel resolves
 * a relative path against no other negative dirfd, so no open the syscall fallback
 * records was relative to it.
 */
#define KTEL_DIRFD_NONE -1

/*
 * Layout (no implicit padding; the decoder in ktel/probes/file_created.py reads
 * it with struct format "<QIIIiIBBH16s256s512s", 816 bytes, checked by a test):
 *   0 ts_ns    u64  bpf_ktime_get_ns() at the syscall's return
 *   8 pid      u32  tgid
 *  12 tid      u32
 *  16 uid      u32
 *  20 dirfd    s32  openat's dirfd (AT_FDCWD = -100), to resolve relative paths
 *                   (and, without dir, paths opened in a root); KTEL_DIRFD_NONE
 *                   from filewatcher
 *  24 flags    u32  open flags
 *  28 certain  u8   1: the file was certainly created (O_EXCL); 0: O_CREAT alone
 *  29 dir_state u8  KTEL_DIR_*, with KTEL_DIR_IN_ROOT and KTEL_PATH_TRUNCATED or'd in
 *  30 dir_len  u16  bytes of dir used
 *  32 comm     char[16]
 *  48 path     char[256] as the caller passed it, NUL-terminated (its start, with
 *                   KTEL_PATH_TRUNCATED, when it is longer)
 * 304 dir      char[512] for a relative path, the directory it is relative to (the
 *              cwd, or openat's dirfd), read from the kernel's dentries when the
 *              syscall returned: its components from the innermost up, each
 *              NUL-terminated ("b\0a\0" is /a/b; none is /); with
 *              KTEL_DIR_IN_ROOT, the file's own path instead
 *
 * A record for an absolute path (not opened in a root) has no dir: it is the first
 * KTEL_FILE_CREATED_ABS_SIZE bytes only (dir_state KTEL_DIR_NONE). With the ring
 * buffer's 8-byte header that is 312 bytes a record instead of 824: a ring buffer
 * holds 2.6 times the events, and the agent copies that much less; the decoder tells
 * the two apart by their size.
 */
struct file_created_event {
	__u64 ts_ns;
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__s32 dirfd;
	__u32 flags;
	__u8 certain;
	__u8 dir_state;
	__u16 dir_len;
	char comm[KTEL_COMM_LEN];
	char path[KTEL_PATH_LEN];
	char dir[KTEL_DIR_LEN];
};

/* 304: the record up to dir (tests/unit/test_probe_layout.py checks the number). */
#define KTEL_FILE_CREATED_ABS_SIZE __builtin_offsetof(struct file_created_event, dir)

#endif
