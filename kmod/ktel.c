// SPDX-License-Identifier: GPL-2.0
/* ktel.c - the ktel module: a telemetry API for kernel code, emitted as ktel:* tracepoints. */

#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/random.h>
#include <linux/timekeeping.h>
#include <ktel/ktel.h>

/* The one place that instantiates the ktel:* events. */
#define CREATE_TRACE_POINTS
#include "ktel_trace.h"

/*
 * <ktel/ktel.h> tests these static keys inline in the calling module
 * (tracepoint_enabled()), so the tracepoint structures are exported too.
 */
EXPORT_TRACEPOINT_SYMBOL_GPL(ktel_counter);
EXPORT_TRACEPOINT_SYMBOL_GPL(ktel_gauge);
EXPORT_TRACEPOINT_SYMBOL_GPL(ktel_histogram);
EXPORT_TRACEPOINT_SYMBOL_GPL(ktel_span_begin);
EXPORT_TRACEPOINT_SYMBOL_GPL(ktel_span_end);
EXPORT_TRACEPOINT_SYMBOL_GPL(ktel_log);

void __ktel_counter_add(const char *name, const struct ktel_kv *labels, unsigned int nr_labels,
			u64 delta)
{
	/* The event's value is s64, shared with gauges; an increment past S64_MAX saturates. */
	trace_ktel_counter(name, labels, nr_labels, delta > S64_MAX ? S64_MAX : (s64)delta);
}
EXPORT_SYMBOL_GPL(__ktel_counter_add);

void __ktel_gauge_set(const char *name, const struct ktel_kv *labels, unsigned int nr_labels,
		      s64 value)
{
	trace_ktel_gauge(name, labels, nr_labels, value);
}
EXPORT_SYMBOL_GPL(__ktel_gauge_set);

void __ktel_histogram_observe(const char *name, const struct ktel_kv *labels,
			      unsigned int nr_labels, u64 value)
{
	trace_ktel_histogram(name, labels, nr_labels, value);
}
EXPORT_SYMBOL_GPL(__ktel_histogram_observe);

static bool ktel_trace_id_valid(const u8 *id)
{
	return memchr_inv(id, 0, KTEL_TRACE_ID_LEN) != NULL;
}

void __ktel_span_begin(struct ktel_span *span, const char *name,
		       const struct ktel_span_context *parent, const struct ktel_kv *attrs,
		       unsigned int nr_attrs)
{
	span->name = name;
	if (ktel_span_context_valid(parent) && ktel_trace_id_valid(parent->trace_id)) {
		memcpy(span->ctx.trace_id, parent->trace_id, KTEL_TRACE_ID_LEN);
		span->parent_span_id = parent->span_id;
	} else {
		/* All-zero ids are invalid in W3C trace context; the loops run once in practice. */
		do
			get_random_bytes(span->ctx.trace_id, KTEL_TRACE_ID_LEN);
		while (!ktel_trace_id_valid(span->ctx.trace_id));
		span->parent_span_id = 0;
	}
	do
		span->ctx.span_id = get_random_u64();
	while (!span->ctx.span_id);
	span->start_ns = ktime_get_ns();
	trace_ktel_span_begin(span, 0, KTEL_SPAN_STATUS_UNSET, attrs, nr_attrs);
}
EXPORT_SYMBOL_GPL(__ktel_span_begin);

void __ktel_span_end(struct ktel_span *span, enum ktel_span_status status,
		     const struct ktel_kv *attrs, unsigned int nr_attrs)
{
	trace_ktel_span_end(span, ktime_get_ns(), status, attrs, nr_attrs);
}
EXPORT_SYMBOL_GPL(__ktel_span_end);

void __ktel_log(enum ktel_severity severity, const struct ktel_span_context *ctx,
		const struct ktel_kv *attrs, unsigned int nr_attrs, const char *fmt, ...)
{
	char msg[KTEL_MSG_MAX_LEN + 1];
	va_list ap;
	int len;

	va_start(ap, fmt);
	len = vscnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	trace_ktel_log(severity, ktel_span_context_valid(ctx) ? ctx : NULL, msg, len, attrs,
		       nr_attrs);
}
EXPORT_SYMBOL_GPL(__ktel_log);

static int __init ktel_init(void)
{
	return 0;
}

/* Users hold references through the symbols they import, so exit has nothing to wait for. */
static void __exit ktel_exit(void)
{
}

module_init(ktel_init);
module_exit(ktel_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("ktel: telemetry API for kernel code (metrics, spans, logs as tracepoints)");
