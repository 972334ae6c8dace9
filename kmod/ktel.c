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

/*
 * Sets the first KTEL_MAX_KV attributes of @src[@nr] on @dst[@n], as an
 * OpenTelemetry span sets attributes: a key already there (compared in the
 * KTEL_KV_MAX_LEN bytes an event keeps of it) gets the new value in its slot,
 * a new key the next slot, or is ignored once all KTEL_MAX_KV are used.
 * Returns the slots used. @dst points into @src: nothing is copied.
 */
static unsigned int ktel_kv_set(struct ktel_kv *dst, unsigned int n, const struct ktel_kv *src,
				unsigned int nr)
{
	unsigned int i, j;

	if (!src)
		return n;
	for (i = 0; i < min_t(unsigned int, nr, KTEL_MAX_KV); i++) {
		const char *key = ktel_tp_str(src[i].key);

		for (j = 0; j < n; j++)
			if (!strncmp(dst[j].key, key, KTEL_KV_MAX_LEN))
				break;
		if (j == n) {
			if (n == KTEL_MAX_KV)
				continue;
			dst[n++].key = key;
		}
		dst[j].value = ktel_tp_str(src[i].value);
	}
	return n;
}

void __ktel_span_begin(struct ktel_span *span, const char *name,
		       const struct ktel_span_context *parent, const struct ktel_kv *attrs,
		       unsigned int nr_attrs)
{
	struct ktel_kv kv[KTEL_MAX_KV];
	unsigned int i, n;

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
	/*
	 * Copied, cut as the event cuts them, for ktel_span_end()'s event: the
	 * agent exports spans from that event alone, and the caller's strings
	 * may be gone by then.
	 */
	n = ktel_kv_set(kv, 0, attrs, nr_attrs);
	for (i = 0; i < n; i++) {
		ktel_tp_strcpy(span->attrs[i][0], kv[i].key, sizeof(span->attrs[i][0]));
		ktel_tp_strcpy(span->attrs[i][1], kv[i].value, sizeof(span->attrs[i][1]));
	}
	span->nr_attrs = n;
	trace_ktel_span_begin(span, 0, KTEL_SPAN_STATUS_UNSET, kv, n);
}
EXPORT_SYMBOL_GPL(__ktel_span_begin);

void __ktel_span_end(struct ktel_span *span, enum ktel_span_status status,
		     const struct ktel_kv *attrs, unsigned int nr_attrs)
{
	struct ktel_kv kv[KTEL_MAX_KV];
	unsigned int i, n = min_t(unsigned int, span->nr_attrs, KTEL_MAX_KV);

	/* begin's attributes, then @attrs set on them: the end's value wins on a key. */
	for (i = 0; i < n; i++) {
		kv[i].key = span->attrs[i][0];
		kv[i].value = span->attrs[i][1];
	}
	n = ktel_kv_set(kv, n, attrs, nr_attrs);
	trace_ktel_span_end(span, ktime_get_ns(), status, kv, n);
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
