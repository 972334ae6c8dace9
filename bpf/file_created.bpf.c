// SPDX-License-Identifier: GPL-2.0
/*
 * ktel probe file_created, stable-tracepoint fallback: a file opened with
 * O_CREAT whose open succeeded. Hosts with the ktel filewatcher module use its
 * filewatcher:file_created tracepoint instead, which sees the create itself.
 *
 * The path pointer is saved at sys_enter and read at sys_exit, when the kernel
 * has faulted the string in (the same reason bcc's opensnoop reads it late).
 */
/* Compiled after bpf/ktel_common.bpf.h (the agent prepends it: BCC rewrites
 * map calls such as counters.lookup() only in the main file, not in headers). */
#include "file_created.h"
#include "ktel_tracepoints.bpf.h"

/*
 * filewatcher:file_created (the ktel filewatcher module, kmod/filewatcher.c)
 * reports only files an open really created. Always compiled, so the verifier
 * checks it on every host; attached by the agent where the tracepoint exists
 * (edge_agent/probes.py), and then KTEL_HAVE_FILEWATCHER leaves the syscall
 * fallback below out.
 */
int file_created_filewatcher(struct filewatcher_ctx *ctx)
{
	struct file_created_event *ev = ktel_reserve(sizeof(*ev));

	if (!ev)
		return 0;
	ktel_tp_file_created(ev, ctx);
	events.ringbuf_submit(ev, 0);
	return 0;
}

#ifndef KTEL_HAVE_FILEWATCHER

/* asm-generic/fcntl.h values; identical on x86_64 and arm64. */
#define KTEL_O_CREAT 00000100
#define KTEL_O_EXCL 00000200
#define KTEL_O_WRONLY 00000001
#define KTEL_O_TRUNC 00001000
#define KTEL_AT_FDCWD -100

struct pending_open {
	const char *filename;
	__u32 flags;
	__s32 dirfd;
};

/* Keyed by pid_tgid: one syscall in flight per thread. */
BPF_HASH(pending, u64, struct pending_open, 10240);

static __always_inline int open_enter(const char *filename, u32 flags, s32 dirfd)
{
	struct pending_open p = {};
	u64 id;

	if (!(flags & KTEL_O_CREAT))
		return 0;
	id = bpf_get_current_pid_tgid();
	p.filename = filename;
	p.flags = flags;
	p.dirfd = dirfd;
	pending.update(&id, &p);
	return 0;
}

static __always_inline int open_exit(long ret)
{
	u64 id = bpf_get_current_pid_tgid();
	struct pending_open *p = pending.lookup(&id);
	struct file_created_event *ev;

	if (!p)
		return 0;
	if (ret < 0)
		goto out;
	ev = ktel_reserve(sizeof(*ev));
	if (!ev)
		goto out;
	ev->ts_ns = bpf_ktime_get_ns();
	ev->pid = id >> 32;
	ev->tid = (u32)id;
	ev->uid = (u32)bpf_get_current_uid_gid();
	ev->dirfd = p->dirfd;
	ev->flags = p->flags;
	ev->certain = !!(p->flags & KTEL_O_EXCL);
	ev->pad[0] = ev->pad[1] = ev->pad[2] = 0;
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	if (bpf_probe_read_user_str(ev->path, sizeof(ev->path), p->filename) < 0)
		ev->path[0] = 0;
	events.ringbuf_submit(ev, 0);
out:
	pending.delete(&id);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
	return open_enter(args->filename, args->flags, args->dfd);
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat)
{
	return open_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat2)
{
	/* struct open_how begins with its u64 flags (include/uapi/linux/openat2.h). */
	u64 flags = 0;

	if (bpf_probe_read_user(&flags, sizeof(flags), args->how))
		return 0;
	return open_enter(args->filename, (u32)flags, args->dfd);
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat2)
{
	return open_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_creat)
{
	/* creat(2) is open(O_CREAT|O_WRONLY|O_TRUNC). */
	return open_enter(args->pathname, KTEL_O_CREAT | KTEL_O_WRONLY | KTEL_O_TRUNC,
			  KTEL_AT_FDCWD);
}

TRACEPOINT_PROBE(syscalls, sys_exit_creat)
{
	return open_exit(args->ret);
}

/*
 * open(2) has its own tracepoint only where the kernel builds the syscall
 * (x86_64 does, arm64 does not); the loader defines KTEL_HAVE_SYS_OPEN then.
 */
#ifdef KTEL_HAVE_SYS_OPEN
TRACEPOINT_PROBE(syscalls, sys_enter_open)
{
	return open_enter(args->filename, args->flags, KTEL_AT_FDCWD);
}

TRACEPOINT_PROBE(syscalls, sys_exit_open)
{
	return open_exit(args->ret);
}
#endif
#endif /* KTEL_HAVE_FILEWATCHER */
