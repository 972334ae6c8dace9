// SPDX-License-Identifier: GPL-2.0
/* ktel_events_loader.c - loads ktel_events.bpf.o in the guest, prints its ring-buffer records as hex. */

/*
 *   ktel_bpf OBJECT.bpf.o
 *
 * Loads the object with libbpf (linked statically, so it runs in the busybox
 * initramfs), attaches every program to its tracepoint, prints
 * "KTEL BPF READY", then one "KTEL BPF REC <size> <hex>" line per record until
 * SIGINT or SIGTERM, then drains the ring buffer and prints "KTEL BPF DROPS <n>"
 * and "KTEL BPF STOP". Exit status 0 only if all of that worked.
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <linux/types.h>
#include <bpf/libbpf.h>
#include <bpf/bpf.h>

#define MAX_LINKS 16

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

/*
 * One "KTEL BPF REC <size> <hex>" line per record, trailing zero bytes left out
 * (the host pads them back): the host decodes the records with the agent's decoders.
 */
static int on_event(void *ctx, void *data, size_t len)
{
	const unsigned char *b = data;
	size_t i;

	(void)ctx;
	printf("KTEL BPF REC %zu ", len);
	while (len && !b[len - 1])
		len--;
	for (i = 0; i < len; i++)
		printf("%02x", b[i]);
	putchar('\n');
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
