/* SPDX-License-Identifier: GPL-2.0 */
/* filewatcher_trace.h - filewatcher:file_created, one event per file really created. */

/*
 * The samples/trace_events shape: read several times by <trace/define_trace.h>;
 * filewatcher.c is the one C file with CREATE_TRACE_POINTS.
 *
 * Fields (an ABI, documented in kmod/README.md and checked against the format
 * file by tests/vm/test_kmod_vm.py):
 *   pid    tgid of the process that created the file
 *   comm   its command name (TASK_COMM_LEN = 16 bytes, NUL terminated)
 *   flags  the open flags it asked for (O_CREAT always set; O_EXCL, O_TRUNC...)
 *   mode   the mode it asked for, before the umask
 *   path   the created file's absolute path (d_path), cut at
 *          FILEWATCHER_PATH_MAX_LEN bytes
 * path is the field a minimal file-creation watcher would have; pid, comm,
 * flags and mode say who created it and how.
 */
#undef TRACE_SYSTEM
#define TRACE_SYSTEM filewatcher

#if !defined(_FILEWATCHER_TRACE_H) || defined(TRACE_HEADER_MULTI_READ)
#define _FILEWATCHER_TRACE_H

#include <linux/tracepoint.h>
#include <linux/sched.h>
#include <linux/string.h>

/*
 * A trace event must fit in a ring-buffer page (about 4 KiB with headers), so
 * a PATH_MAX path would be dropped whole; cut it instead, keeping the start.
 */
#define FILEWATCHER_PATH_MAX_LEN 2047

/* Laid out by hand, as TRACE_EVENT() blocks are: clang-format would run it together. */
/* clang-format off */
TRACE_EVENT(file_created,

	TP_PROTO(pid_t pid, const char *comm, unsigned int flags, umode_t mode,
		 const char *path, unsigned int path_len),

	TP_ARGS(pid, comm, flags, mode, path, path_len),

	TP_STRUCT__entry(
		__field(pid_t, pid)
		__array(char, comm, TASK_COMM_LEN)
		__field(u32, flags)
		__field(u16, mode)
		__string_len(path, path, min_t(unsigned int, path_len, FILEWATCHER_PATH_MAX_LEN))
	),

	TP_fast_assign(
		__entry->pid = pid;
		strscpy(__entry->comm, comm, TASK_COMM_LEN);
		__entry->flags = flags;
		__entry->mode = mode;
		/*
		 * The path's first bytes, as many as __string_len() reserved and recorded
		 * (less the NUL), then the NUL: 6.1's __assign_str_len() is gone from later
		 * kernels (6.12 has only __assign_str(item)), and this builds on both.
		 */
		memcpy(__get_str(path), path, __get_dynamic_array_len(path) - 1);
		__get_str(path)[__get_dynamic_array_len(path) - 1] = '\0';
	),

	/* The path goes last: it may hold spaces. */
	TP_printk("pid=%d comm=%s flags=0x%x mode=0%o path=%s",
		  __entry->pid, __entry->comm, __entry->flags, __entry->mode, __get_str(path))
);
/* clang-format on */

#endif /* _FILEWATCHER_TRACE_H */

/* This part must be outside the include guard. */
#undef TRACE_INCLUDE_PATH
#define TRACE_INCLUDE_PATH .
#undef TRACE_INCLUDE_FILE
#define TRACE_INCLUDE_FILE filewatcher_trace
#include <trace/define_trace.h>
