/* SPDX-License-Identifier: GPL-2.0 */
/* ktel_trace.h - the ktel:* tracepoints (metrics, spans, logs) behind the API in <ktel/ktel.h>. */

/*
 * Built the way samples/trace_events/trace-events-sample.h is: this header is
 * read several times by <trace/define_trace.h> (TRACE_HEADER_MULTI_READ), and
 * exactly one C file (ktel.c) defines CREATE_TRACE_POINTS before including it.
 *
 * The field names and types below are an ABI read by BPF programs and by
 * tests/vm/test_kmod_vm.py, which compares every format file with the tables
 * in kmod/README.md. Changing a field is a breaking change: add, never rename.
 */
#undef TRACE_SYSTEM
#define TRACE_SYSTEM ktel

#if !defined(_KTEL_TRACE_H) || defined(TRACE_HEADER_MULTI_READ)
#define _KTEL_TRACE_H

#include <linux/tracepoint.h>
#include <linux/string.h>
#include <linux/minmax.h>
#include <ktel/ktel.h>

#ifndef _KTEL_TRACE_HELPERS
#define _KTEL_TRACE_HELPERS
/* Defined once, expanded again in every stage of the multi-read. */

static inline const char *ktel_tp_str(const char *s)
{
	return s ? s : "";
}

/* Key or value of slot @i of @kv[@n]; "" when the slot is unused. */
static inline const char *ktel_tp_key(const struct ktel_kv *kv, unsigned int n, unsigned int i)
{
	return (kv && i < n) ? ktel_tp_str(kv[i].key) : "";
}

static inline const char *ktel_tp_val(const struct ktel_kv *kv, unsigned int n, unsigned int i)
{
	return (kv && i < n) ? ktel_tp_str(kv[i].value) : "";
}

/*
 * The first bytes of @src, up to its NUL and at most @size - 1 of them, then
 * zeroes up to @size: no byte of @src past @size - 1 is read. A caller's
 * buffer of exactly the *_MAX_LEN bytes a field keeps need not hold a NUL
 * (<ktel/ktel.h>), and strscpy_pad(dst, src, size) reads src[size - 1] too, to
 * tell a string cut there from one that ends there: a byte past such a buffer.
 */
static inline void ktel_tp_strcpy(char *dst, const char *src, unsigned int size)
{
	memcpy_and_pad(dst, size, src, strnlen(src, size - 1), 0);
}

/*
 * The macros from here to the end of the events are laid out by hand, the
 * way TRACE_EVENT() blocks are: clang-format would run their field lists
 * and statements together.
 */
/* clang-format off */
/*
 * A bounded string field, measured once. __string_len() reserves @len + 1
 * bytes, @len measured when the event's size is computed (6.1's
 * include/trace/stages/stage5_get_offsets.h), and records that size in the
 * field's __data_loc, which the assign stage reads back with
 * __get_dynamic_array_len() (stage3_trace_output.h; still defined in stage 6).
 * The copy is bounded by that size: ktel_tp_strcpy() reads and copies at most
 * size - 1 bytes, always ends with a NUL and zeroes the rest. Sizing the copy
 * by a second measure alone would write past the reservation if the string
 * grew in between, and leave bytes of the ring buffer unwritten if it shrank.
 * Not the kernel's own copy for such a field: 6.1's
 * __assign_str_len(item, src, len) is gone from later kernels (6.12 has only
 * __assign_str(item), which copies the length recorded here), and ktel builds
 * for both.
 */
#define KTEL_STR_FIELD(item, src, max) __string_len(item, src, strnlen(ktel_tp_str(src), max))
#define KTEL_STR_ASSIGN(item, src)                                                         \
	ktel_tp_strcpy(__get_str(item), ktel_tp_str(src), __get_dynamic_array_len(item))

/* Fields "<p>0_key", "<p>0_value" ... "<p>3_value" and "nr_<p>s", p = label or attr. */
#define KTEL_KV_SLOT_FIELDS(p, i, kv, n)                                                   \
	KTEL_STR_FIELD(p##i##_key, ktel_tp_key(kv, n, i), KTEL_KV_MAX_LEN)                 \
	KTEL_STR_FIELD(p##i##_value, ktel_tp_val(kv, n, i), KTEL_KV_MAX_LEN)
#define KTEL_KV_FIELDS(p, kv, n)                                                           \
	__field(u8, nr_##p##s)                                                             \
	KTEL_KV_SLOT_FIELDS(p, 0, kv, n)                                                   \
	KTEL_KV_SLOT_FIELDS(p, 1, kv, n)                                                   \
	KTEL_KV_SLOT_FIELDS(p, 2, kv, n)                                                   \
	KTEL_KV_SLOT_FIELDS(p, 3, kv, n)

#define KTEL_KV_SLOT_ASSIGN(p, i, kv, n)                                                   \
	KTEL_STR_ASSIGN(p##i##_key, ktel_tp_key(kv, n, i));                                \
	KTEL_STR_ASSIGN(p##i##_value, ktel_tp_val(kv, n, i));
#define KTEL_KV_ASSIGN(p, kv, n)                                                           \
	__entry->nr_##p##s = (kv) ? min_t(unsigned int, n, KTEL_MAX_KV) : 0;               \
	KTEL_KV_SLOT_ASSIGN(p, 0, kv, n)                                                   \
	KTEL_KV_SLOT_ASSIGN(p, 1, kv, n)                                                   \
	KTEL_KV_SLOT_ASSIGN(p, 2, kv, n)                                                   \
	KTEL_KV_SLOT_ASSIGN(p, 3, kv, n)

/* Printed as "{k=v,k=v}" with only the used slots. */
#define KTEL_KV_SLOT_FMT "%s%s%s%s"
#define KTEL_KV_FMT "{" KTEL_KV_SLOT_FMT KTEL_KV_SLOT_FMT KTEL_KV_SLOT_FMT KTEL_KV_SLOT_FMT "}"
#define KTEL_KV_SLOT_ARGS(p, i)                                                            \
	(i) > 0 && __entry->nr_##p##s > (i) ? "," : "", __get_str(p##i##_key),             \
		__entry->nr_##p##s > (i) ? "=" : "", __get_str(p##i##_value)
#define KTEL_KV_ARGS(p)                                                                    \
	KTEL_KV_SLOT_ARGS(p, 0), KTEL_KV_SLOT_ARGS(p, 1), KTEL_KV_SLOT_ARGS(p, 2),         \
		KTEL_KV_SLOT_ARGS(p, 3)

#define KTEL_SPAN_STATUS_SYMBOLS						\
	{ KTEL_SPAN_STATUS_UNSET, "UNSET" },					\
	{ KTEL_SPAN_STATUS_OK, "OK" },						\
	{ KTEL_SPAN_STATUS_ERROR, "ERROR" }
#define KTEL_SEVERITY_SYMBOLS							\
	{ KTEL_SEV_TRACE, "TRACE" }, { KTEL_SEV_DEBUG, "DEBUG" },		\
	{ KTEL_SEV_INFO, "INFO" }, { KTEL_SEV_WARN, "WARN" },			\
	{ KTEL_SEV_ERROR, "ERROR" }, { KTEL_SEV_FATAL, "FATAL" }
#endif /* _KTEL_TRACE_HELPERS */

/* So that user space sees the numbers, not the names, in the print fmt. */
TRACE_DEFINE_ENUM(KTEL_SPAN_STATUS_UNSET);
TRACE_DEFINE_ENUM(KTEL_SPAN_STATUS_OK);
TRACE_DEFINE_ENUM(KTEL_SPAN_STATUS_ERROR);
TRACE_DEFINE_ENUM(KTEL_SEV_TRACE);
TRACE_DEFINE_ENUM(KTEL_SEV_DEBUG);
TRACE_DEFINE_ENUM(KTEL_SEV_INFO);
TRACE_DEFINE_ENUM(KTEL_SEV_WARN);
TRACE_DEFINE_ENUM(KTEL_SEV_ERROR);
TRACE_DEFINE_ENUM(KTEL_SEV_FATAL);

/* ktel:ktel_counter and ktel:ktel_gauge share one layout. */
DECLARE_EVENT_CLASS(ktel_metric,

	TP_PROTO(const char *name, const struct ktel_kv *labels, unsigned int nr_labels,
		 s64 value),

	TP_ARGS(name, labels, nr_labels, value),

	TP_STRUCT__entry(
		KTEL_STR_FIELD(name, name, KTEL_NAME_MAX_LEN)
		__field(s64, value)
		KTEL_KV_FIELDS(label, labels, nr_labels)
	),

	TP_fast_assign(
		KTEL_STR_ASSIGN(name, name);
		__entry->value = value;
		KTEL_KV_ASSIGN(label, labels, nr_labels)
	),

	TP_printk("name=%s value=%lld labels=" KTEL_KV_FMT,
		  __get_str(name), __entry->value, KTEL_KV_ARGS(label))
);

/* value is an increment (>= 0); consumers sum them into a cumulative counter. */
DEFINE_EVENT(ktel_metric, ktel_counter,
	TP_PROTO(const char *name, const struct ktel_kv *labels, unsigned int nr_labels,
		 s64 value),
	TP_ARGS(name, labels, nr_labels, value)
);

/* value is the gauge's new value. */
DEFINE_EVENT(ktel_metric, ktel_gauge,
	TP_PROTO(const char *name, const struct ktel_kv *labels, unsigned int nr_labels,
		 s64 value),
	TP_ARGS(name, labels, nr_labels, value)
);

/* One observation; the consumer (a BPF log2 histogram, say) owns the buckets. */
TRACE_EVENT(ktel_histogram,

	TP_PROTO(const char *name, const struct ktel_kv *labels, unsigned int nr_labels,
		 u64 value),

	TP_ARGS(name, labels, nr_labels, value),

	TP_STRUCT__entry(
		KTEL_STR_FIELD(name, name, KTEL_NAME_MAX_LEN)
		__field(u64, value)
		KTEL_KV_FIELDS(label, labels, nr_labels)
	),

	TP_fast_assign(
		KTEL_STR_ASSIGN(name, name);
		__entry->value = value;
		KTEL_KV_ASSIGN(label, labels, nr_labels)
	),

	TP_printk("name=%s value=%llu labels=" KTEL_KV_FMT,
		  __get_str(name), __entry->value, KTEL_KV_ARGS(label))
);

/*
 * ktel:ktel_span_begin and ktel:ktel_span_end share one layout. span_end is
 * complete on its own (ids, parent, name, both timestamps, status), so a
 * consumer that only wants finished spans enables only span_end; span_begin
 * has end_ns 0 and status UNSET and shows spans in flight.
 */
DECLARE_EVENT_CLASS(ktel_span_class,

	TP_PROTO(const struct ktel_span *span, u64 end_ns, int status,
		 const struct ktel_kv *attrs, unsigned int nr_attrs),

	TP_ARGS(span, end_ns, status, attrs, nr_attrs),

	TP_STRUCT__entry(
		__array(u8, trace_id, KTEL_TRACE_ID_LEN)
		__field(u64, span_id)
		__field(u64, parent_span_id)
		__field(u64, start_ns)
		__field(u64, end_ns)
		__field(u8, status)
		KTEL_STR_FIELD(name, span->name, KTEL_NAME_MAX_LEN)
		KTEL_KV_FIELDS(attr, attrs, nr_attrs)
	),

	TP_fast_assign(
		memcpy(__entry->trace_id, span->ctx.trace_id, KTEL_TRACE_ID_LEN);
		__entry->span_id = span->ctx.span_id;
		__entry->parent_span_id = span->parent_span_id;
		__entry->start_ns = span->start_ns;
		__entry->end_ns = end_ns;
		__entry->status = status;
		KTEL_STR_ASSIGN(name, span->name);
		KTEL_KV_ASSIGN(attr, attrs, nr_attrs)
	),

	TP_printk("trace_id=%s span_id=%016llx parent_span_id=%016llx start_ns=%llu end_ns=%llu status=%s name=%s attrs=" KTEL_KV_FMT,
		  __print_hex_str(__entry->trace_id, KTEL_TRACE_ID_LEN),
		  __entry->span_id, __entry->parent_span_id, __entry->start_ns,
		  __entry->end_ns,
		  __print_symbolic(__entry->status, KTEL_SPAN_STATUS_SYMBOLS),
		  __get_str(name), KTEL_KV_ARGS(attr))
);

DEFINE_EVENT(ktel_span_class, ktel_span_begin,
	TP_PROTO(const struct ktel_span *span, u64 end_ns, int status,
		 const struct ktel_kv *attrs, unsigned int nr_attrs),
	TP_ARGS(span, end_ns, status, attrs, nr_attrs)
);

DEFINE_EVENT(ktel_span_class, ktel_span_end,
	TP_PROTO(const struct ktel_span *span, u64 end_ns, int status,
		 const struct ktel_kv *attrs, unsigned int nr_attrs),
	TP_ARGS(span, end_ns, status, attrs, nr_attrs)
);

/* A log record; trace_id and span_id are zero when it belongs to no span. */
TRACE_EVENT(ktel_log,

	TP_PROTO(int severity, const struct ktel_span_context *ctx, const char *msg,
		 unsigned int msg_len, const struct ktel_kv *attrs, unsigned int nr_attrs),

	TP_ARGS(severity, ctx, msg, msg_len, attrs, nr_attrs),

	TP_STRUCT__entry(
		__field(u8, severity)
		__array(u8, trace_id, KTEL_TRACE_ID_LEN)
		__field(u64, span_id)
		KTEL_KV_FIELDS(attr, attrs, nr_attrs)
		__string_len(message, msg, min_t(unsigned int, msg_len, KTEL_MSG_MAX_LEN))
	),

	TP_fast_assign(
		__entry->severity = severity;
		if (ctx) {
			memcpy(__entry->trace_id, ctx->trace_id, KTEL_TRACE_ID_LEN);
			__entry->span_id = ctx->span_id;
		} else {
			memset(__entry->trace_id, 0, KTEL_TRACE_ID_LEN);
			__entry->span_id = 0;
		}
		KTEL_KV_ASSIGN(attr, attrs, nr_attrs)
		/* msg is vscnprintf()'s: NUL-terminated at msg_len. */
		KTEL_STR_ASSIGN(message, msg);
	),

	/* The message goes last: it is free text. */
	TP_printk("severity=%s trace_id=%s span_id=%016llx attrs=" KTEL_KV_FMT " message=%s",
		  __print_symbolic(__entry->severity, KTEL_SEVERITY_SYMBOLS),
		  __print_hex_str(__entry->trace_id, KTEL_TRACE_ID_LEN),
		  __entry->span_id, KTEL_KV_ARGS(attr), __get_str(message))
);
/* clang-format on */

#endif /* _KTEL_TRACE_H */

/* This part must be outside the include guard. */
#undef TRACE_INCLUDE_PATH
#define TRACE_INCLUDE_PATH .
#undef TRACE_INCLUDE_FILE
#define TRACE_INCLUDE_FILE ktel_trace
#include <trace/define_trace.h>
