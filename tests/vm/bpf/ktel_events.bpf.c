// SPDX-License-Identifier: GPL-2.0
/* ktel_events.bpf.c - BPF programs on the ktel:* and filewatcher:* tracepoints for the VM test. */

/*
 * The tracepoint contexts below are written from kmod/README.md's field tables
 * alone (offsets asserted at compile time), so they also prove that a BPF
 * program reading the documented ABI gets the data. Strings are __data_loc:
 * the low 16 bits are the offset from the start of the record, the high 16
 * bits the length.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "ktel_events.h"

#define ABI(t, f, off) \
	_Static_assert(__builtin_offsetof(t, f) == (off), #t "." #f " is not at " #off)

struct tp_common {
	__u16 common_type;
	__u8 common_flags;
	__u8 common_preempt_count;
	__s32 common_pid;
};

/* ktel:ktel_counter, ktel:ktel_gauge (s64 value), ktel:ktel_histogram (u64 value) */
struct ktel_metric_ctx {
	struct tp_common c;
	__u32 name;
	__s64 value;
	__u8 nr_labels;
	__u32 label_loc[8]; /* label0_key, label0_value, ... label3_value */
};
ABI(struct ktel_metric_ctx, name, 8);
ABI(struct ktel_metric_ctx, value, 16);
ABI(struct ktel_metric_ctx, nr_labels, 24);
ABI(struct ktel_metric_ctx, label_loc, 28);

/* ktel:ktel_span_begin, ktel:ktel_span_end */
struct ktel_span_ctx {
	struct tp_common c;
	__u8 trace_id[16];
	__u64 span_id;
	__u64 parent_span_id;
	__u64 start_ns;
	__u64 end_ns;
	__u8 status;
	__u32 name;
	__u8 nr_attrs;
	__u32 attr_loc[8];
};
ABI(struct ktel_span_ctx, trace_id, 8);
ABI(struct ktel_span_ctx, span_id, 24);
ABI(struct ktel_span_ctx, parent_span_id, 32);
ABI(struct ktel_span_ctx, start_ns, 40);
ABI(struct ktel_span_ctx, end_ns, 48);
ABI(struct ktel_span_ctx, status, 56);
ABI(struct ktel_span_ctx, name, 60);
ABI(struct ktel_span_ctx, nr_attrs, 64);
ABI(struct ktel_span_ctx, attr_loc, 68);

/* ktel:ktel_log */
struct ktel_log_ctx {
	struct tp_common c;
	__u8 severity;
	__u8 trace_id[16];
	__u64 span_id;
	__u8 nr_attrs;
	__u32 attr_loc[8];
	__u32 message;
};
ABI(struct ktel_log_ctx, severity, 8);
ABI(struct ktel_log_ctx, trace_id, 9);
ABI(struct ktel_log_ctx, span_id, 32);
ABI(struct ktel_log_ctx, nr_attrs, 40);
ABI(struct ktel_log_ctx, attr_loc, 44);
ABI(struct ktel_log_ctx, message, 76);

/* filewatcher:file_created */
struct file_created_ctx {
	struct tp_common c;
	__s32 pid;
	char comm[16];
	__u32 flags;
	__u16 mode;
	__u32 path;
};
ABI(struct file_created_ctx, pid, 8);
ABI(struct file_created_ctx, comm, 12);
ABI(struct file_created_ctx, flags, 28);
ABI(struct file_created_ctx, mode, 32);
ABI(struct file_created_ctx, path, 36);

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} events SEC(".maps");

/* Reserve failures, so the test can tell a lost event from a missing one. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

char LICENSE[] SEC("license") = "GPL";

static __always_inline void read_loc(char *dst, __u32 size, const void *ctx, __u32 loc)
{
	bpf_probe_read_kernel_str(dst, size, (const char *)ctx + (loc & 0xffff));
}

static __always_inline struct ktel_vm_event *reserve(__u32 kind)
{
	struct ktel_vm_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	__u32 zero = 0;
	__u64 *n;

	if (!e) {
		n = bpf_map_lookup_elem(&drops, &zero);
		if (n)
			__sync_fetch_and_add(n, 1);
		return NULL;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->kind = kind;
	return e;
}

static __always_inline int metric(const struct ktel_metric_ctx *ctx, __u32 kind)
{
	struct ktel_vm_event *e = reserve(kind);

	if (!e)
		return 0;
	e->value = ctx->value;
	e->nr_kv = ctx->nr_labels;
	read_loc(e->name, sizeof(e->name), ctx, ctx->name);
	read_loc(e->kv0_key, sizeof(e->kv0_key), ctx, ctx->label_loc[0]);
	read_loc(e->kv0_value, sizeof(e->kv0_value), ctx, ctx->label_loc[1]);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tracepoint/ktel/ktel_counter")
int ktel_counter(struct ktel_metric_ctx *ctx)
{
	return metric(ctx, KTEL_VM_COUNTER);
}

SEC("tracepoint/ktel/ktel_gauge")
int ktel_gauge(struct ktel_metric_ctx *ctx)
{
	return metric(ctx, KTEL_VM_GAUGE);
}

SEC("tracepoint/ktel/ktel_histogram")
int ktel_histogram(struct ktel_metric_ctx *ctx)
{
	return metric(ctx, KTEL_VM_HISTOGRAM);
}

static __always_inline int span(const struct ktel_span_ctx *ctx, __u32 kind)
{
	struct ktel_vm_event *e = reserve(kind);

	if (!e)
		return 0;
	__builtin_memcpy(e->trace_id, ctx->trace_id, sizeof(e->trace_id));
	e->span_id = ctx->span_id;
	e->parent_span_id = ctx->parent_span_id;
	e->start_ns = ctx->start_ns;
	e->end_ns = ctx->end_ns;
	e->value = ctx->status;
	e->nr_kv = ctx->nr_attrs;
	read_loc(e->name, sizeof(e->name), ctx, ctx->name);
	read_loc(e->kv0_key, sizeof(e->kv0_key), ctx, ctx->attr_loc[0]);
	read_loc(e->kv0_value, sizeof(e->kv0_value), ctx, ctx->attr_loc[1]);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tracepoint/ktel/ktel_span_begin")
int ktel_span_begin(struct ktel_span_ctx *ctx)
{
	return span(ctx, KTEL_VM_SPAN_BEGIN);
}

SEC("tracepoint/ktel/ktel_span_end")
int ktel_span_end(struct ktel_span_ctx *ctx)
{
	return span(ctx, KTEL_VM_SPAN_END);
}

SEC("tracepoint/ktel/ktel_log")
int ktel_log(struct ktel_log_ctx *ctx)
{
	struct ktel_vm_event *e = reserve(KTEL_VM_LOG);

	if (!e)
		return 0;
	__builtin_memcpy(e->trace_id, ctx->trace_id, sizeof(e->trace_id));
	e->span_id = ctx->span_id;
	e->value = ctx->severity;
	e->nr_kv = ctx->nr_attrs;
	read_loc(e->kv0_key, sizeof(e->kv0_key), ctx, ctx->attr_loc[0]);
	read_loc(e->kv0_value, sizeof(e->kv0_value), ctx, ctx->attr_loc[1]);
	read_loc(e->text, sizeof(e->text), ctx, ctx->message);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tracepoint/filewatcher/file_created")
int file_created(struct file_created_ctx *ctx)
{
	struct ktel_vm_event *e = reserve(KTEL_VM_FILE_CREATED);

	if (!e)
		return 0;
	e->nr_kv = ctx->pid;
	e->value = ctx->flags;
	e->start_ns = ctx->mode;
	__builtin_memcpy(e->name, ctx->comm, sizeof(ctx->comm));
	read_loc(e->text, sizeof(e->text), ctx, ctx->path);
	bpf_ringbuf_submit(e, 0);
	return 0;
}
