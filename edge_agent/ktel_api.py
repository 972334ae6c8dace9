"""Decoder of the ktel_api probe (bpf/ktel_api.{h,bpf.c}): kernel code's metrics,
spans and logs from the ktel:* tracepoints.

The layout mirrors ``struct ktel_api_event`` in bpf/ktel_api.h;
tests/unit/test_probe_layout.py compiles the header and checks they agree.
"""

from __future__ import annotations

import struct

from edge_agent.ringbuf import c_string
from ktel.wire import KTEL_LOG, KTEL_METRIC, KTEL_SPAN

LAYOUT = struct.Struct("<QqQQQQIIBBB5x16s64s512s256s")
MAX_KV = 4
STR = 64

# enum ktel_api_kind
COUNTER, GAUGE, HISTOGRAM, SPAN_END, LOG, SPAN_BEGIN = 1, 2, 3, 4, 5, 6
METRIC_TYPE = {COUNTER: "counter", GAUGE: "gauge", HISTOGRAM: "histogram"}
NO_TRACE = bytes(16)
# The probe's programs (bpf/ktel_api.bpf.c) and their tracepoints.
PROGRAMS = {
    "ktel/ktel_counter": "ktel_api_counter",
    "ktel/ktel_gauge": "ktel_api_gauge",
    "ktel/ktel_histogram": "ktel_api_histogram",
    "ktel/ktel_span_end": "ktel_api_span_end",
    "ktel/ktel_log": "ktel_api_log",
}


def _kv(raw: bytes, n: int) -> dict[str, str]:
    n = min(n, MAX_KV)
    return {
        c_string(raw[2 * i * STR : (2 * i + 1) * STR]): c_string(raw[(2 * i + 1) * STR : (2 * i + 2) * STR])
        for i in range(n)
    }


def _id(v: int) -> bytes:
    """A kernel u64 id as OTLP's 8 bytes (big-endian: its hex is the kernel's %016llx); 0 is none."""
    return v.to_bytes(8, "big") if v else b""


def decode(raw: bytes, wall_offset_ns: int) -> list:
    """One ring-buffer record -> one wire event (KTEL_METRIC, KTEL_SPAN or KTEL_LOG).

    ``wall_offset_ns`` turns the kernel's CLOCK_MONOTONIC into wall-clock time.
    """
    (ts, value, span_id, parent, start, end, pid, tid, kind, level, nr_kv, trace_id, name, kv, text) = (
        LAYOUT.unpack_from(raw)
    )
    ts += wall_offset_ns
    if kind in METRIC_TYPE:
        return [KTEL_METRIC.id, ts, pid, METRIC_TYPE[kind], c_string(name), _kv(kv, nr_kv), value]
    if kind == SPAN_END:
        return [
            KTEL_SPAN.id,
            ts,
            pid,
            tid,
            trace_id,
            _id(span_id),
            _id(parent),
            c_string(name),
            start + wall_offset_ns,
            end + wall_offset_ns,
            level,
            _kv(kv, nr_kv),
        ]
    if kind == LOG:
        in_span = trace_id != NO_TRACE
        return [
            KTEL_LOG.id,
            ts,
            pid,
            tid,
            level,
            c_string(text),
            _kv(kv, nr_kv),
            trace_id if in_span else b"",
            _id(span_id) if in_span else b"",
        ]
    raise ValueError(f"ktel_api record of unknown kind {kind}")
