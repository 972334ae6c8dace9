// SPDX-License-Identifier: GPL-2.0
/*
 * ktel probe module_load: one event per kernel module loaded, from the
 * module:module_load tracepoint, with the module's taint flags (an unsigned or
 * out-of-tree module is a security signal). The tracepoint exists only in
 * kernels built with module support (CONFIG_MODULES).
 */
/* Compiled after bpf/ktel_common.bpf.h (prepended by the agent). */
#include "module_load.h"

TRACEPOINT_PROBE(module, module_load)
{
	struct module_load_event *ev;

	ev = ktel_reserve(sizeof(*ev));
	if (!ev)
		return 0;
	ev->ts_ns = bpf_ktime_get_ns();
	ev->pid = bpf_get_current_pid_tgid() >> 32;
	ev->taints = args->taints;
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	TP_DATA_LOC_READ_STR(ev->name, name, sizeof(ev->name));
	ktel_submit(ev);
	return 0;
}
