// SPDX-License-Identifier: GPL-2.0
/*
 * ktel probe process: one event per exec (sched:sched_process_exec) and per
 * process exit (sched:sched_process_exit, last thread), for enrichment.
 *
 * Neither tracepoint gives the parent or the exit status, so the probe keeps
 * them from others: the forking process from sched:sched_process_fork, the
 * status from the exit_group/exit syscall tracepoints, and the fatal signal
 * from signal:signal_generate for a process that died without calling them.
 */
/* Compiled after bpf/ktel_common.bpf.h (prepended by the agent). */
#include "process.h"

/* Signals whose default action terminates (man 7 signal: Term and Core). */
#define KTEL_FATAL_SIGNALS                                                                        \
	((1u << 1) | (1u << 2) | (1u << 3) | (1u << 4) | (1u << 5) | (1u << 6) | (1u << 7) |      \
	 (1u << 8) | (1u << 9) | (1u << 10) | (1u << 11) | (1u << 12) | (1u << 13) | (1u << 14) | \
	 (1u << 15) | (1u << 16) | (1u << 24) | (1u << 25) | (1u << 26) | (1u << 27) |            \
	 (1u << 29) | (1u << 30) | (1u << 31))
/* include/trace/events/signal.h, enum TRACE_SIGNAL_DELIVERED. */
#define KTEL_TRACE_SIGNAL_DELIVERED 0

struct exit_status {
	s32 code; /* -1: no exit_group/exit seen */
	s32 signal; /* 0: no fatal-by-default signal sent */
};

/* Child pid -> tgid of the task that forked it; removed when the child exits. */
BPF_HASH(parents, u32, u32, 65536);
/* tgid (or tid, for a signal sent to one thread) -> how it is exiting. */
BPF_HASH(statuses, u32, struct exit_status, 16384);

static __always_inline void fill_common(struct process_event *ev, u32 type, u64 id)
{
	u32 tgid = id >> 32;
	u32 *ppid = parents.lookup(&tgid);

	ev->ts_ns = bpf_ktime_get_ns();
	ev->cgroup_id = bpf_get_current_cgroup_id();
	ev->type = type;
	ev->pid = tgid;
	ev->ppid = ppid ? *ppid : 0;
	ev->uid = (u32)bpf_get_current_uid_gid();
	ev->exit_code = -1;
	ev->signal = 0;
	ev->pad = 0;
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
}

TRACEPOINT_PROBE(sched, sched_process_fork)
{
	u32 child = args->child_pid;
	u32 parent = bpf_get_current_pid_tgid() >> 32;

	/* A new thread gets an entry too (its own tgid), removed at its exit. */
	parents.update(&child, &parent);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
	struct process_event *ev;
	u64 id = bpf_get_current_pid_tgid();
	u16 off;

	ev = ktel_reserve(sizeof(*ev));
	if (!ev)
		return 0;
	fill_common(ev, KTEL_PROCESS_EXEC, id);
	/* old_pid: the caller's tid before de_thread() made it the leader. */
	ev->tid = args->old_pid;
	/* __data_loc: the low 16 bits are the string's offset in the record. */
	off = args->data_loc_filename & 0xFFFF;
	if (bpf_probe_read_kernel_str(ev->filename, sizeof(ev->filename), (char *)args + off) < 0)
		ev->filename[0] = 0;
	ktel_submit(ev);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	struct process_event *ev;
	struct exit_status *st;
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id, tgid = id >> 32;
	int last;

	/*
	 * group_dead (the whole thread group is gone): absent in v6.1 (Debian
	 * 12), present in v6.18. Without it, the leader's exit stands for the
	 * process's, which is early when the leader exits before its threads.
	 */
#ifdef KTEL_HAVE_GROUP_DEAD
	last = args->group_dead;
#else
	last = tid == tgid;
#endif
	if (!last)
		goto out;
	ev = ktel_reserve(KTEL_PROCESS_EXIT_SIZE);
	if (!ev)
		goto done;
	fill_common(ev, KTEL_PROCESS_EXIT, id);
	ev->tid = tid;
	st = statuses.lookup(&tgid);
	if (st) {
		ev->exit_code = st->code;
		ev->signal = st->code < 0 ? st->signal : 0;
	}
	ktel_submit(ev);
done:
	statuses.delete(&tgid);
	parents.delete(&tgid);
out:
	/*
	 * The leader may go before the last thread: its entries serve until then.
	 * A thread's own (a fork entry, a signal sent to it alone) go with it.
	 */
	if (tid != tgid) {
		parents.delete(&tid);
		statuses.delete(&tid);
	}
	return 0;
}

static __always_inline int exit_called(s64 code)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct exit_status st = { .code = code & 0xff, .signal = 0 };

	/* The last call wins: exit_group(n) makes n the process's status. */
	statuses.update(&tgid, &st);
	return 0;
}

#ifdef KTEL_HAVE_SYS_EXIT_GROUP
TRACEPOINT_PROBE(syscalls, sys_enter_exit_group)
{
	return exit_called(args->error_code);
}
#endif

#ifdef KTEL_HAVE_SYS_EXIT
TRACEPOINT_PROBE(syscalls, sys_enter_exit)
{
	return exit_called(args->error_code);
}
#endif

#ifdef KTEL_HAVE_SIGNAL_GENERATE
TRACEPOINT_PROBE(signal, signal_generate)
{
	/*
	 * Only the sender sees the signal itself: once a fatal signal is on its
	 * way, every thread of the target dequeues SIGKILL (kernel/signal.c,
	 * complete_signal()), so signal_deliver would say 9 whatever was sent.
	 * A process with a handler for the signal that then exits normally
	 * reports its exit status instead (exit_code wins).
	 */
	struct exit_status st = { .code = -1 }, *cur;
	u32 pid = args->pid;
	int sig = args->sig;

	if (args->result != KTEL_TRACE_SIGNAL_DELIVERED || sig < 1 || sig > 31 ||
	    !(KTEL_FATAL_SIGNALS & (1u << sig)))
		return 0;
	cur = statuses.lookup(&pid);
	if (cur) {
		cur->signal = sig;
		return 0;
	}
	st.signal = sig;
	statuses.update(&pid, &st);
	return 0;
}
#endif
