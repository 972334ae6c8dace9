// SPDX-License-Identifier: GPL-2.0
/* ktel_events.bpf.c - the agent's tracepoint code (bpf/ktel_tracepoints.bpf.h) under libbpf, for the VM test. */

/*
 * The guest has no BCC, so these programs wrap the copy code that the agent's
 * BCC probes (bpf/ktel_api.bpf.c, bpf/file_created.bpf.c) run, in libbpf
 * sections. They emit the agent's own records (struct ktel_api_event, struct
 * file_created_event), which the loader prints as hex and the host test decodes
 * with the agent's decoders (ktel/probes/ktel_api.py, ktel/probes/file_created.py).
 * ktel_span_begin is attached too, though the agent does not attach it, to check
 * its fields. The two record types differ in size, which tells them apart.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "ktel_tracepoints.bpf.h"

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

static __always_inline void *reserve(__u64 size)
{
	void *e = bpf_ringbuf_reserve(&events, size, 0);
	__u32 zero = 0;
	__u64 *n;

	if (!e) {
		n = bpf_map_lookup_elem(&drops, &zero);
		if (n)
			__sync_fetch_and_add(n, 1);
	}
	return e;
}

static __always_inline int metric(struct ktel_metric_ctx *ctx, __u8 kind)
{
	struct ktel_api_event *e = reserve(sizeof(*e));

	if (!e)
		return 0;
	ktel_tp_metric(e, ctx, kind);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tracepoint/ktel/ktel_counter")
int ktel_counter(struct ktel_metric_ctx *ctx)
{
	return metric(ctx, KTEL_API_COUNTER);
}

SEC("tracepoint/ktel/ktel_gauge")
int ktel_gauge(struct ktel_metric_ctx *ctx)
{
	return metric(ctx, KTEL_API_GAUGE);
}

SEC("tracepoint/ktel/ktel_histogram")
int ktel_histogram(struct ktel_metric_ctx *ctx)
{
	return metric(ctx, KTEL_API_HISTOGRAM);
}

static __always_inline int span(struct ktel_span_ctx *ctx, __u8 kind)
{
	struct ktel_api_event *e = reserve(sizeof(*e));

	if (!e)
		return 0;
	ktel_tp_span(e, ctx, kind);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tracepoint/ktel/ktel_span_begin")
int ktel_span_begin(struct ktel_span_ctx *ctx)
{
	return span(ctx, KTEL_API_SPAN_BEGIN);
}

SEC("tracepoint/ktel/ktel_span_end")
int ktel_span_end(struct ktel_span_ctx *ctx)
{
	return span(ctx, KTEL_API_SPAN_END);
}

SEC("tracepoint/ktel/ktel_log")
int ktel_log(struct ktel_log_ctx *ctx)
{
	struct ktel_api_event *e = reserve(sizeof(*e));

	if (!e)
		return 0;
	ktel_tp_log(e, ctx);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tracepoint/filewatcher/file_created")
int file_created(struct filewatcher_ctx *ctx)
{
	/* As bpf/file_created.bpf.c: filewatcher's paths are absolute, records without dir. */
	struct file_created_event *e = reserve(KTEL_FILE_CREATED_ABS_SIZE);

	if (!e)
		return 0;
	ktel_tp_file_created(e, ctx);
	bpf_ringbuf_submit(e, 0);
	return 0;
}
