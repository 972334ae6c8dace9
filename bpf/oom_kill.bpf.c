// SPDX-License-Identifier: GPL-2.0
/*
 * ktel probe oom_kill: one event per OOM victim, from oom:mark_victim (the
 * global OOM killer and memory-cgroup OOM kills both mark their victim).
 */
/* Compiled after bpf/ktel_common.bpf.h (prepended by the agent). */
#include "oom_kill.h"

TRACEPOINT_PROBE(oom, mark_victim)
{
	struct oom_kill_event *ev;

	ev = ktel_reserve(sizeof(*ev));
	if (!ev)
		return 0;
	ev->ts_ns = bpf_ktime_get_ns();
	ev->pid = args->pid;
	ev->trigger_pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(ev->trigger_comm, sizeof(ev->trigger_comm));
	__builtin_memset(ev->comm, 0, sizeof(ev->comm));
	ev->pad = 0;
	/*
	 * Older kernels give the pid alone; v6.1 (Debian 12) and v6.18 add comm,
	 * the memory counters (already in kB), uid, pgtables and oom_score_adj.
	 * The loader defines KTEL_OOM_DETAIL when the format file lists comm.
	 */
#ifdef KTEL_OOM_DETAIL
	TP_DATA_LOC_READ_STR(ev->comm, comm, sizeof(ev->comm));
	ev->total_vm_kb = args->total_vm;
	ev->anon_rss_kb = args->anon_rss;
	ev->file_rss_kb = args->file_rss;
	ev->shmem_rss_kb = args->shmem_rss;
	ev->pgtables_kb = args->pgtables;
	ev->uid = args->uid;
	ev->oom_score_adj = args->oom_score_adj;
	ev->has_detail = 1;
#else
	ev->total_vm_kb = ev->anon_rss_kb = ev->file_rss_kb = 0;
	ev->shmem_rss_kb = ev->pgtables_kb = 0;
	ev->uid = 0;
	ev->oom_score_adj = 0;
	ev->has_detail = 0;
#endif
	ktel_submit(ev);
	return 0;
}
