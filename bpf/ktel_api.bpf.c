// SPDX-License-Identifier: GPL-2.0
/*
 * ktel probe ktel_api: the metrics, finished spans and logs that kernel code emits
 * through ktel's telemetry API (kmod/include/ktel/ktel.h) as ktel:* tracepoints.
 * ktel:ktel_span_begin is not attached: ktel_span_end carries the whole span, the
 * attributes given to its begin too.
 *
 * The programs take the contexts of bpf/ktel_tracepoints.bpf.h rather than BCC's
 * TRACEPOINT_PROBE, which needs the tracepoints present when it compiles: so the
 * agent compiles and verifies them on every host and attaches them (by name, from
 * edge_agent/probes.py) where the ktel module is loaded.
 */
/* Compiled after bpf/ktel_common.bpf.h (prepended by the agent). */
#include "ktel_tracepoints.bpf.h"

static __always_inline int ktel_api_metric(struct ktel_metric_ctx *ctx, __u8 kind)
{
	struct ktel_api_event *e = ktel_reserve(sizeof(*e));

	if (!e)
		return 0;
	ktel_tp_metric(e, ctx, kind);
	ktel_submit(e);
	return 0;
}

int ktel_api_counter(struct ktel_metric_ctx *ctx)
{
	return ktel_api_metric(ctx, KTEL_API_COUNTER);
}

int ktel_api_gauge(struct ktel_metric_ctx *ctx)
{
	return ktel_api_metric(ctx, KTEL_API_GAUGE);
}

int ktel_api_histogram(struct ktel_metric_ctx *ctx)
{
	return ktel_api_metric(ctx, KTEL_API_HISTOGRAM);
}

int ktel_api_span_end(struct ktel_span_ctx *ctx)
{
	struct ktel_api_event *e = ktel_reserve(sizeof(*e));

	if (!e)
		return 0;
	ktel_tp_span(e, ctx, KTEL_API_SPAN_END);
	ktel_submit(e);
	return 0;
}

int ktel_api_log(struct ktel_log_ctx *ctx)
{
	struct ktel_api_event *e = ktel_reserve(sizeof(*e));

	if (!e)
		return 0;
	ktel_tp_log(e, ctx);
	ktel_submit(e);
	return 0;
}
