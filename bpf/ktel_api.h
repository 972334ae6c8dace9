/* SPDX-License-Identifier: GPL-2.0 */
/* ktel: the ktel_api event (ktel:* tracepoints of kernel code) as it leaves the kernel. */
#ifndef KTEL_API_H
#define KTEL_API_H

#include <linux/types.h>

#define KTEL_API_MAX_KV 4 /* KTEL_MAX_KV in kmod/include/ktel/ktel.h */
#define KTEL_API_STR 64 /* names, keys and values: at most 63 bytes + NUL (kmod/README.md) */
#define KTEL_API_TEXT 256 /* log messages: at most 255 bytes + NUL */

/* Which tracepoint a record came from. */
enum ktel_api_kind {
	KTEL_API_COUNTER = 1, /* ktel:ktel_counter */
	KTEL_API_GAUGE = 2, /* ktel:ktel_gauge */
	KTEL_API_HISTOGRAM = 3, /* ktel:ktel_histogram */
	KTEL_API_SPAN_END = 4, /* ktel:ktel_span_end: a finished span, complete on its own */
	KTEL_API_LOG = 5, /* ktel:ktel_log */
	KTEL_API_SPAN_BEGIN = 6, /* ktel:ktel_span_begin: not attached by the agent */
};

/*
 * Layout (no implicit padding; ktel/probes/ktel_api.py reads it with struct
 * format "<QqQQQQIIBBB5x16s64s512s256s", 912 bytes, checked by a test):
 *   0 ts_ns          u64  bpf_ktime_get_ns() when the tracepoint fired
 *   8 value          s64  metric value (counter increment, gauge value, observation)
 *  16 span_id        u64  span: its id; log: its span's id (0: none)
 *  24 parent_span_id u64  span: parent's id (0: root)
 *  32 start_ns       u64  span: start, CLOCK_MONOTONIC
 *  40 end_ns         u64  span: end, CLOCK_MONOTONIC
 *  48 pid            u32  tgid of the task on the CPU
 *  52 tid            u32
 *  56 kind           u8   enum ktel_api_kind
 *  57 level          u8   span: status (0 unset, 1 ok, 2 error); log: severity number
 *  58 nr_kv          u8   labels (metrics) or attributes (spans, logs) used, 0-4
 *  64 trace_id       u8[16]
 *  80 name           char[64]  metric or span name
 * 144 kv             char[4][2][64]  key, value of each label or attribute
 * 656 text           char[256] log message
 */
struct ktel_api_event {
	__u64 ts_ns;
	__s64 value;
	__u64 span_id;
	__u64 parent_span_id;
	__u64 start_ns;
	__u64 end_ns;
	__u32 pid;
	__u32 tid;
	__u8 kind;
	__u8 level;
	__u8 nr_kv;
	__u8 pad[5];
	__u8 trace_id[16];
	char name[KTEL_API_STR];
	char kv[KTEL_API_MAX_KV][2][KTEL_API_STR];
	char text[KTEL_API_TEXT];
};

#endif
