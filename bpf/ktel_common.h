/* SPDX-License-Identifier: GPL-2.0 */
/* ktel: indices shared by every probe's counter and knob maps and the agent. */
#ifndef KTEL_COMMON_H
#define KTEL_COMMON_H

/* Mirrored in edge_agent/probes.py (checked by tests/unit/test_probe_layout.py). */
enum ktel_counter {
	KTEL_COUNTER_RINGBUF_DROPS = 0, /* ringbuf_reserve failed: buffer full */
	KTEL_COUNTER_SAMPLED_OUT = 1, /* dropped on purpose by the sampling knob */
	/* lost because the probe's map of calls in flight had no room for one (full or evicted) */
	KTEL_COUNTER_INFLIGHT_LOST = 2,
	/*
	 * a latency sample skipped because its start was read after its end (a clock
	 * that differs across CPUs): recorded, it would land in the top bucket and
	 * could wrap the histogram's sum
	 */
	KTEL_COUNTER_NEGATIVE_LATENCY = 3,
	/*
	 * an event sent with only the start of its path, the rest cut to fit the record
	 * (file_created: KTEL_PATH_TRUNCATED, bpf/file_created.h)
	 */
	KTEL_COUNTER_PATH_TRUNCATED = 4,
	/*
	 * an event whose file the kernel could not name: filewatcher's d_path() failed
	 * (a path past PATH_MAX), and its path is the module's "(d_path failed)"
	 */
	KTEL_COUNTER_PATH_UNRESOLVED = 5,
	KTEL_COUNTER_MAX = 6,
};

enum ktel_knob {
	KTEL_KNOB_SAMPLE_EVERY = 0,
	KTEL_KNOB_MAX = 1,
};

#endif
