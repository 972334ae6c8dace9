/* SPDX-License-Identifier: GPL-2.0 */
/* ktel.h - the ktel module's telemetry API: metrics, spans and logs as ktel:* tracepoints. */
#ifndef _KTEL_KTEL_H
#define _KTEL_KTEL_H

/*
 * Kernel code that wants telemetry includes this header and calls the inline
 * functions below; the `ktel` module exports the out-of-line emitters (GPL
 * only). Everything ends up as a tracepoint in the `ktel` trace system, which
 * ftrace, perf and BPF read (kmod/README.md documents every field).
 *
 * Cost when nobody listens: each inline wrapper tests the tracepoint's static
 * key with tracepoint_enabled() (include/linux/tracepoint-defs.h, the pattern
 * for calling tracepoints from headers), so a disabled event is one patched
 * NOP in the caller and its arguments are not evaluated further. ktel_log()
 * is a macro for the same reason: its format arguments are not evaluated.
 *
 * Bounds, so an event's size is bounded too: at most KTEL_MAX_KV labels or
 * attributes (extra ones are ignored), names and keys and values cut at the
 * *_MAX_LEN bytes below, and no byte past those is read: a fixed-size buffer
 * of that many bytes need not end with a NUL. NULL strings become "". Strings
 * are copied into the event; the caller keeps ownership.
 *
 * Context: metrics and logs may be emitted from any context that can fire a
 * tracepoint; spans not from NMI (their ids come from get_random_bytes()).
 * A span's name must stay valid until ktel_span_end().
 */

#include <linux/types.h>
#include <linux/compiler.h>
#include <linux/string.h>
#include <linux/tracepoint-defs.h>

#define KTEL_MAX_KV 4 /* labels per metric, attributes per span or log */
#define KTEL_NAME_MAX_LEN 63 /* bytes of a metric or span name */
#define KTEL_KV_MAX_LEN 63 /* bytes of a label/attribute key or value */
#define KTEL_MSG_MAX_LEN 255 /* bytes of a log message */
#define KTEL_TRACE_ID_LEN 16 /* W3C / OpenTelemetry trace id, network order */

/* A label (metrics) or an attribute (spans, logs). */
struct ktel_kv {
	const char *key;
	const char *value;
};

/* What a child span or a log needs from its parent: all zero means "none". */
struct ktel_span_context {
	u8 trace_id[KTEL_TRACE_ID_LEN];
	u64 span_id;
};

/*
 * A span in flight; lives on the caller's stack between begin and end. It
 * keeps a copy of the attributes given to ktel_span_begin(), cut as the
 * event's are (at most KTEL_MAX_KV, KTEL_KV_MAX_LEN bytes each and a NUL),
 * for ktel_span_end() to emit: the caller's strings need not outlive begin.
 * That copy makes it about 560 bytes.
 */
struct ktel_span {
	struct ktel_span_context ctx;
	u64 parent_span_id; /* 0 for a root span */
	const char *name;
	u64 start_ns; /* ktime_get_ns(), CLOCK_MONOTONIC */
	u8 nr_attrs; /* begin's attributes kept below */
	char attrs[KTEL_MAX_KV][2][KTEL_KV_MAX_LEN + 1]; /* [i][0] key, [i][1] value */
};

/* Values are OpenTelemetry's (trace API: StatusCode). */
enum ktel_span_status {
	KTEL_SPAN_STATUS_UNSET = 0,
	KTEL_SPAN_STATUS_OK = 1,
	KTEL_SPAN_STATUS_ERROR = 2,
};

/* Values are OpenTelemetry's SeverityNumber (the first of each range). */
enum ktel_severity {
	KTEL_SEV_TRACE = 1,
	KTEL_SEV_DEBUG = 5,
	KTEL_SEV_INFO = 9,
	KTEL_SEV_WARN = 13,
	KTEL_SEV_ERROR = 17,
	KTEL_SEV_FATAL = 21,
};

/* Out-of-line emitters exported by the ktel module; call the wrappers below. */
void __ktel_counter_add(const char *name, const struct ktel_kv *labels, unsigned int nr_labels,
			u64 delta);
void __ktel_gauge_set(const char *name, const struct ktel_kv *labels, unsigned int nr_labels,
		      s64 value);
void __ktel_histogram_observe(const char *name, const struct ktel_kv *labels,
			      unsigned int nr_labels, u64 value);
void __ktel_span_begin(struct ktel_span *span, const char *name,
		       const struct ktel_span_context *parent, const struct ktel_kv *attrs,
		       unsigned int nr_attrs);
void __ktel_span_end(struct ktel_span *span, enum ktel_span_status status,
		     const struct ktel_kv *attrs, unsigned int nr_attrs);
__printf(5, 6) void __ktel_log(enum ktel_severity severity, const struct ktel_span_context *ctx,
			       const struct ktel_kv *attrs, unsigned int nr_attrs, const char *fmt,
			       ...);

/* The tracepoints' static keys, exported by the ktel module. */
DECLARE_TRACEPOINT(ktel_counter);
DECLARE_TRACEPOINT(ktel_gauge);
DECLARE_TRACEPOINT(ktel_histogram);
DECLARE_TRACEPOINT(ktel_span_begin);
DECLARE_TRACEPOINT(ktel_span_end);
DECLARE_TRACEPOINT(ktel_log);

/* Add @delta (an increment, not a total) to counter @name{labels}. */
static inline void ktel_counter_add(const char *name, const struct ktel_kv *labels,
				    unsigned int nr_labels, u64 delta)
{
	if (tracepoint_enabled(ktel_counter))
		__ktel_counter_add(name, labels, nr_labels, delta);
}

/* Set gauge @name{labels} to @value. */
static inline void ktel_gauge_set(const char *name, const struct ktel_kv *labels,
				  unsigned int nr_labels, s64 value)
{
	if (tracepoint_enabled(ktel_gauge))
		__ktel_gauge_set(name, labels, nr_labels, value);
}

/* Record one observation @value of histogram @name{labels}; buckets are the consumer's. */
static inline void ktel_histogram_observe(const char *name, const struct ktel_kv *labels,
					  unsigned int nr_labels, u64 value)
{
	if (tracepoint_enabled(ktel_histogram))
		__ktel_histogram_observe(name, labels, nr_labels, value);
}

static inline bool ktel_span_context_valid(const struct ktel_span_context *ctx)
{
	return ctx && ctx->span_id != 0;
}

/*
 * Start span @span named @name. With a valid @parent (another span's ctx, or a
 * context propagated from elsewhere) the span joins the parent's trace;
 * otherwise it starts a new trace. @attrs go into the ktel_span_begin event
 * and are kept in @span for ktel_span_end()'s. While no span or log event is
 * enabled the span gets an all-zero (invalid) context and ktel_span_end()
 * emits nothing.
 */
static inline void ktel_span_begin(struct ktel_span *span, const char *name,
				   const struct ktel_span_context *parent,
				   const struct ktel_kv *attrs, unsigned int nr_attrs)
{
	if (tracepoint_enabled(ktel_span_begin) || tracepoint_enabled(ktel_span_end) ||
	    tracepoint_enabled(ktel_log)) {
		__ktel_span_begin(span, name, parent, attrs, nr_attrs);
	} else {
		/* Not the attribute copies: nothing reads them with an invalid context. */
		memset(&span->ctx, 0, sizeof(span->ctx));
		span->parent_span_id = 0;
		span->name = name;
		span->start_ns = 0;
		span->nr_attrs = 0;
	}
}

/*
 * End @span with @status. The ktel_span_end event, the finished span, carries
 * the attributes given to ktel_span_begin() and @attrs, merged as
 * OpenTelemetry's span attributes are set: begin's first, in their order; a
 * key of @attrs already there replaces its value (the end knows the outcome);
 * a new key takes the next slot, and is ignored once KTEL_MAX_KV are used.
 */
static inline void ktel_span_end(struct ktel_span *span, enum ktel_span_status status,
				 const struct ktel_kv *attrs, unsigned int nr_attrs)
{
	if (tracepoint_enabled(ktel_span_end) && ktel_span_context_valid(&span->ctx))
		__ktel_span_end(span, status, attrs, nr_attrs);
}

/*
 * ktel_log(severity, ctx, attrs, nr_attrs, fmt, ...) - a log record, printf
 * formatted and cut at KTEL_MSG_MAX_LEN bytes; @ctx (may be NULL) ties it to a
 * span. Nothing is evaluated or formatted while the event is disabled.
 */
#define ktel_log(severity, ctx, attrs, nr_attrs, fmt, ...)                              \
	do {                                                                            \
		if (tracepoint_enabled(ktel_log))                                       \
			__ktel_log(severity, ctx, attrs, nr_attrs, fmt, ##__VA_ARGS__); \
	} while (0)

#endif /* _KTEL_KTEL_H */
