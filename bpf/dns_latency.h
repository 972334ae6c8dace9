/* SPDX-License-Identifier: GPL-2.0 */
/* ktel: the dns_latency histogram key and slow-lookup event. */
#ifndef KTEL_DNS_LATENCY_H
#define KTEL_DNS_LATENCY_H

#include <linux/types.h>

#define KTEL_COMM_LEN 16
#define KTEL_HOST_LEN 256

/*
 * Key of map "hist" (value: struct ktel_hist, bpf/ktel_hist.h). Layout (no
 * implicit padding; read by ktel/probes/dns_latency.py, checked by a test):
 *   0 tgid    u32
 *   4 failed  u32  1 when getaddrinfo returned non-zero (an EAI_* error)
 *   8 comm    char[16] of the calling thread
 */
struct dns_latency_key {
	__u32 tgid;
	__u32 failed;
	char comm[KTEL_COMM_LEN];
};

/*
 * Slow lookup, through the ring buffer. Layout (struct format
 * "<QQIIi4x16s256s", 304 bytes):
 *   0 ts_ns       u64  bpf_ktime_get_ns() at getaddrinfo's return
 *   8 latency_ns  u64
 *  16 pid         u32  tgid
 *  20 tid         u32
 *  24 ret         s32  getaddrinfo's return value
 *  32 comm        char[16]
 *  48 host        char[256] the node argument, NUL-terminated ("" for NULL)
 */
struct dns_slow_event {
	__u64 ts_ns;
	__u64 latency_ns;
	__u32 pid;
	__u32 tid;
	__s32 ret;
	__u32 pad;
	char comm[KTEL_COMM_LEN];
	char host[KTEL_HOST_LEN];
};

#endif
