/* SPDX-License-Identifier: GPL-2.0 */
/* ktel_events.h - the record the VM test's BPF programs send to their loader. */
#ifndef KTEL_VM_EVENTS_H
#define KTEL_VM_EVENTS_H

enum ktel_vm_kind {
	KTEL_VM_COUNTER = 0,
	KTEL_VM_GAUGE = 1,
	KTEL_VM_HISTOGRAM = 2,
	KTEL_VM_SPAN_BEGIN = 3,
	KTEL_VM_SPAN_END = 4,
	KTEL_VM_LOG = 5,
	KTEL_VM_FILE_CREATED = 6,
};

#define KTEL_VM_STR 64
#define KTEL_VM_TEXT 256

/* Only the first label/attribute is carried: enough to check the slots decode. */
struct ktel_vm_event {
	__u32 kind;
	__u32 nr_kv; /* nr_labels / nr_attrs; pid for file_created */
	__s64 value; /* metric value; span status; log severity; file_created flags */
	__u64 span_id;
	__u64 parent_span_id; /* span_begin/end only */
	__u64 start_ns;
	__u64 end_ns;
	__u8 trace_id[16];
	char name[KTEL_VM_STR]; /* metric or span name; comm for file_created */
	char kv0_key[KTEL_VM_STR];
	char kv0_value[KTEL_VM_STR];
	char text[KTEL_VM_TEXT]; /* log message; file_created path */
};

#endif
