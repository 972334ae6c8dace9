// SPDX-License-Identifier: GPL-2.0
/* ktel_events_loader.c - loads ktel_events.bpf.o in the guest, prints its ring-buffer records. */

/*
 *   ktel_bpf OBJECT.bpf.o
 *
 * Loads the object with libbpf (linked statically, so it runs in the busybox
 * initramfs), attaches every program to its tracepoint, prints
 * "KTEL BPF READY", then one "KTEL BPF <kind> key=value ..." line per record
 * until SIGINT or SIGTERM, then drains the ring buffer and prints
 * "KTEL BPF DROPS <n>" and "KTEL BPF STOP". Exit status 0 only if all of that
 * worked. Strings are printed last in a line, as in the trace output.
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <linux/types.h>
#include <bpf/libbpf.h>
#include <bpf/bpf.h>
#include "ktel_events.h"

#define MAX_LINKS 16

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static const char *kind_name(__u32 kind)
{
	static const char *const names[] = {
		"ktel_counter",	 "ktel_gauge", "ktel_histogram", "ktel_span_begin",
		"ktel_span_end", "ktel_log",   "file_created",
	};

	return kind < sizeof(names) / sizeof(names[0]) ? names[kind] : "unknown";
}

static void hex(char *out, const __u8 *b, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		sprintf(out + 2 * i, "%02x", b[i]);
}

static int on_event(void *ctx, void *data, size_t len)
{
	const struct ktel_vm_event *e = data;
	char tid[33];

	(void)ctx;
	if (len < sizeof(*e)) {
		printf("KTEL BPF short record %zu\n", len);
		return 0;
	}
	hex(tid, e->trace_id, sizeof(e->trace_id));
	switch (e->kind) {
	case KTEL_VM_COUNTER:
	case KTEL_VM_GAUGE:
	case KTEL_VM_HISTOGRAM:
		printf("KTEL BPF %s value=%" PRId64 " nr=%u name=%s kv0=%s=%s\n",
		       kind_name(e->kind), (int64_t)e->value, e->nr_kv, e->name, e->kv0_key,
		       e->kv0_value);
		break;
	case KTEL_VM_SPAN_BEGIN:
	case KTEL_VM_SPAN_END:
		printf("KTEL BPF %s trace_id=%s span_id=%016" PRIx64 " parent_span_id=%016" PRIx64
		       " start_ns=%" PRIu64 " end_ns=%" PRIu64 " status=%" PRId64
		       " nr=%u name=%s kv0=%s=%s\n",
		       kind_name(e->kind), tid, (uint64_t)e->span_id, (uint64_t)e->parent_span_id,
		       (uint64_t)e->start_ns, (uint64_t)e->end_ns, (int64_t)e->value, e->nr_kv,
		       e->name, e->kv0_key, e->kv0_value);
		break;
	case KTEL_VM_LOG:
		printf("KTEL BPF %s trace_id=%s span_id=%016" PRIx64 " severity=%" PRId64
		       " nr=%u kv0=%s=%s message=%s\n",
		       kind_name(e->kind), tid, (uint64_t)e->span_id, (int64_t)e->value, e->nr_kv,
		       e->kv0_key, e->kv0_value, e->text);
		break;
	case KTEL_VM_FILE_CREATED:
		printf("KTEL BPF %s pid=%u flags=0x%" PRIx64 " mode=0%" PRIo64 " comm=%s path=%s\n",
		       kind_name(e->kind), e->nr_kv, (uint64_t)e->value, (uint64_t)e->start_ns,
		       e->name, e->text);
		break;
	default:
		printf("KTEL BPF unknown kind %u\n", e->kind);
	}
	return 0;
}

int main(int argc, char **argv)
{
	struct bpf_link *links[MAX_LINKS];
	struct ring_buffer *rb = NULL;
	struct bpf_object *obj;
	struct bpf_program *prog;
	int nlinks = 0, ret = 1, i, err;
	__u64 drops = 0;
	__u32 zero = 0;

	if (argc != 2) {
		fprintf(stderr, "usage: ktel_bpf OBJECT.bpf.o\n");
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	obj = bpf_object__open_file(argv[1], NULL);
	if (!obj) {
		fprintf(stderr, "ktel_bpf: open %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	err = bpf_object__load(obj);
	if (err) {
		fprintf(stderr, "ktel_bpf: load: %s\n", strerror(-err));
		goto out;
	}
	bpf_object__for_each_program(prog, obj) {
		if (nlinks == MAX_LINKS)
			goto out;
		links[nlinks] = bpf_program__attach(prog);
		if (!links[nlinks]) {
			fprintf(stderr, "ktel_bpf: attach %s: %s\n", bpf_program__name(prog),
				strerror(errno));
			goto out;
		}
		nlinks++;
	}
	rb = ring_buffer__new(bpf_map__fd(bpf_object__find_map_by_name(obj, "events")), on_event,
			      NULL, NULL);
	if (!rb) {
		fprintf(stderr, "ktel_bpf: ring buffer: %s\n", strerror(errno));
		goto out;
	}
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	printf("KTEL BPF READY %d programs\n", nlinks);
	while (!stop) {
		err = ring_buffer__poll(rb, 100);
		if (err < 0 && err != -EINTR) {
			fprintf(stderr, "ktel_bpf: poll: %s\n", strerror(-err));
			goto out;
		}
	}
	if (ring_buffer__consume(rb) < 0)
		goto out;
	if (bpf_map_lookup_elem(bpf_map__fd(bpf_object__find_map_by_name(obj, "drops")), &zero,
				&drops))
		goto out;
	printf("KTEL BPF DROPS %" PRIu64 "\n", (uint64_t)drops);
	printf("KTEL BPF STOP\n");
	ret = 0;
out:
	ring_buffer__free(rb);
	for (i = 0; i < nlinks; i++)
		bpf_link__destroy(links[i]);
	bpf_object__close(obj);
	return ret;
}
