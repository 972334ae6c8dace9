/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ktel: the ktel:* and filewatcher:* tracepoint records as kmod/README.md documents
 * them, and the code that copies one into a ring-buffer event. Shared by the agent's
 * BCC probes (bpf/ktel_api.bpf.c, bpf/file_created.bpf.c) and the libbpf programs
 * of the VM test (tests/vm/bpf/), so the one copy of this code that the VM test runs
 * against the real module is the copy the agent runs.
 *
 * The contexts are written from the README's field tables (the offsets are asserted
 * at compile time), not generated from a running kernel's format files: the agent
 * compiles them on hosts without the module too, so that the programs are checked
 * by the verifier everywhere. `__data_loc char[]` fields: the low 16 bits are the
 * string's offset from the start of the record, the high 16 bits its length.
 *
 * No map is used here: BCC rewrites map calls only in the file it compiles.
 */
#ifndef KTEL_TRACEPOINTS_BPF_H
#define KTEL_TRACEPOINTS_BPF_H

#include "ktel_api.h"
#include "file_created.h"

#define KTEL_ABI(t, f, off) \
	_Static_assert(__builtin_offsetof(t, f) == (off), #t "." #f " is not at " #off)

struct ktel_tp_common {
	__u16 common_type;
	__u8 common_flags;
	__u8 common_preempt_count;
	__s32 common_pid;
};

/* ktel:ktel_counter, ktel:ktel_gauge (s64 value), ktel:ktel_histogram (u64 value) */
struct ktel_metric_ctx {
	struct ktel_tp_common c;
	__u32 name;
	__s64 value;
	__u8 nr_labels;
	__u32 label_loc[2 * KTEL_API_MAX_KV]; /* label0_key, label0_value, ... label3_value */
};
KTEL_ABI(struct ktel_metric_ctx, name, 8);
KTEL_ABI(struct ktel_metric_ctx, value, 16);
KTEL_ABI(struct ktel_metric_ctx, nr_labels, 24);
KTEL_ABI(struct ktel_metric_ctx, label_loc, 28);

/* ktel:ktel_span_begin, ktel:ktel_span_end */
struct ktel_span_ctx {
	struct ktel_tp_common c;
	__u8 trace_id[16];
	__u64 span_id;
	__u64 parent_span_id;
	__u64 start_ns;
	__u64 end_ns;
	__u8 status;
	__u32 name;
	__u8 nr_attrs;
	__u32 attr_loc[2 * KTEL_API_MAX_KV];
};
KTEL_ABI(struct ktel_span_ctx, trace_id, 8);
KTEL_ABI(struct ktel_span_ctx, span_id, 24);
KTEL_ABI(struct ktel_span_ctx, parent_span_id, 32);
KTEL_ABI(struct ktel_span_ctx, start_ns, 40);
KTEL_ABI(struct ktel_span_ctx, end_ns, 48);
KTEL_ABI(struct ktel_span_ctx, status, 56);
KTEL_ABI(struct ktel_span_ctx, name, 60);
KTEL_ABI(struct ktel_span_ctx, nr_attrs, 64);
KTEL_ABI(struct ktel_span_ctx, attr_loc, 68);

/* ktel:ktel_log */
struct ktel_log_ctx {
	struct ktel_tp_common c;
	__u8 severity;
	__u8 trace_id[16];
	__u64 span_id;
	__u8 nr_attrs;
	__u32 attr_loc[2 * KTEL_API_MAX_KV];
	__u32 message;
};
KTEL_ABI(struct ktel_log_ctx, severity, 8);
KTEL_ABI(struct ktel_log_ctx, trace_id, 9);
KTEL_ABI(struct ktel_log_ctx, span_id, 32);
KTEL_ABI(struct ktel_log_ctx, nr_attrs, 40);
KTEL_ABI(struct ktel_log_ctx, attr_loc, 44);
KTEL_ABI(struct ktel_log_ctx, message, 76);

/* filewatcher:file_created */
struct filewatcher_ctx {
	struct ktel_tp_common c;
	__s32 pid;
	char comm[16];
	__u32 flags;
	__u16 mode;
	__u32 path;
};
KTEL_ABI(struct filewatcher_ctx, pid, 8);
KTEL_ABI(struct filewatcher_ctx, comm, 12);
KTEL_ABI(struct filewatcher_ctx, flags, 28);
KTEL_ABI(struct filewatcher_ctx, mode, 32);
KTEL_ABI(struct filewatcher_ctx, path, 36);

static __always_inline void ktel_tp_str(char *dst, __u32 size, const void *ctx, __u32 loc)
{
	if (bpf_probe_read_kernel_str(dst, size, (const char *)ctx + (loc & 0xffff)) < 0)
		dst[0] = 0;
}

/* Copies the used key/value slots; unused ones stay as the caller zeroed them. */
static __always_inline void ktel_tp_kv(struct ktel_api_event *e, const void *ctx, const __u32 *loc,
				       __u8 nr)
{
	int i;

	e->nr_kv = nr > KTEL_API_MAX_KV ? KTEL_API_MAX_KV : nr;
#pragma unroll
	for (i = 0; i < KTEL_API_MAX_KV; i++) {
		if (i >= e->nr_kv)
			break;
		ktel_tp_str(e->kv[i][0], KTEL_API_STR, ctx, loc[2 * i]);
		ktel_tp_str(e->kv[i][1], KTEL_API_STR, ctx, loc[2 * i + 1]);
	}
}

/* The fields every ktel_api record has; e is a reserved, not yet zeroed record. */
static __always_inline void ktel_tp_head(struct ktel_api_event *e, __u8 kind)
{
	__u64 id = bpf_get_current_pid_tgid();

	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = bpf_ktime_get_ns();
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->kind = kind;
}

static __always_inline void ktel_tp_metric(struct ktel_api_event *e,
					   const struct ktel_metric_ctx *ctx, __u8 kind)
{
	ktel_tp_head(e, kind);
	e->value = ctx->value;
	ktel_tp_str(e->name, KTEL_API_STR, ctx, ctx->name);
	ktel_tp_kv(e, ctx, ctx->label_loc, ctx->nr_labels);
}

static __always_inline void ktel_tp_span(struct ktel_api_event *e, const struct ktel_span_ctx *ctx,
					 __u8 kind)
{
	ktel_tp_head(e, kind);
	__builtin_memcpy(e->trace_id, ctx->trace_id, sizeof(e->trace_id));
	e->span_id = ctx->span_id;
	e->parent_span_id = ctx->parent_span_id;
	e->start_ns = ctx->start_ns;
	e->end_ns = ctx->end_ns;
	e->level = ctx->status;
	ktel_tp_str(e->name, KTEL_API_STR, ctx, ctx->name);
	ktel_tp_kv(e, ctx, ctx->attr_loc, ctx->nr_attrs);
}

static __always_inline void ktel_tp_log(struct ktel_api_event *e, const struct ktel_log_ctx *ctx)
{
	ktel_tp_head(e, KTEL_API_LOG);
	__builtin_memcpy(e->trace_id, ctx->trace_id, sizeof(e->trace_id));
	e->span_id = ctx->span_id;
	e->level = ctx->severity;
	ktel_tp_str(e->text, KTEL_API_TEXT, ctx, ctx->message);
	ktel_tp_kv(e, ctx, ctx->attr_loc, ctx->nr_attrs);
}

/*
 * filewatcher saw the create itself (kmod/README.md), so the event is certain;
 * its path is absolute (d_path), so e is a record without dir
 * (KTEL_FILE_CREATED_ABS_SIZE bytes). A longer path than path holds is cut, its
 * start kept, and marked KTEL_PATH_TRUNCATED: the __data_loc length counts the
 * NUL, so one above KTEL_PATH_LEN did not fit (a path the module cut at its 2047
 * bytes is among them).
 */
static __always_inline void ktel_tp_file_created(struct file_created_event *e,
						 const struct filewatcher_ctx *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();

	__builtin_memset(e, 0, KTEL_FILE_CREATED_ABS_SIZE);
	e->ts_ns = bpf_ktime_get_ns();
	e->pid = ctx->pid;
	e->tid = (__u32)id;
	e->uid = (__u32)bpf_get_current_uid_gid();
	/* The module's text, absolute or "(d_path failed)": never resolved (file_created.h). */
	e->dirfd = KTEL_DIRFD_NONE;
	e->flags = ctx->flags;
	e->certain = 1;
	__builtin_memcpy(e->comm, ctx->comm, sizeof(e->comm));
	ktel_tp_str(e->path, KTEL_PATH_LEN, ctx, ctx->path);
	if ((ctx->path >> 16) > KTEL_PATH_LEN)
		e->dir_state = KTEL_PATH_TRUNCATED;
}

#endif
