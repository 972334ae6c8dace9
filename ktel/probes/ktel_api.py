"""Probe ktel_api: the metrics, spans and logs of kernel code that uses ktel's
telemetry API (kmod/include/ktel/ktel.h), from the ktel:* tracepoints of ktel's
kernel module; skipped where the module is not loaded.

``LAYOUT`` reads ``struct ktel_api_event`` of bpf/ktel_api.h. Timestamps are wall
clock, ns since the epoch; ids are bytes in OTLP order (a kernel u64 span id as 8
bytes big-endian, so its hex is the %016llx the kernel prints).
"""

from __future__ import annotations

import struct

from ktel.probes import Layout, Probe
from ktel.probes.decode import c_string
from ktel.schema import PID, TS_NS, Bytes, EventKind, Field, Int, Map, Str

LAYOUT = struct.Struct("<QqQQQQIIBBB5x16s64s512s256s")
MAX_KV = 4
STR = 64

ATTRS = Map(MAX_KV, 4 * STR)  # at most KTEL_MAX_KV pairs of 64-byte strings
TRACE_ID = Bytes((16,))
SPAN_ID = Bytes((8,))

KTEL_METRIC = EventKind(
    9,
    "ktel_metric",
    (
        Field("ts_ns", TS_NS),
        Field("pid", PID, "tgid of the task on the CPU when the kernel code emitted it"),
        Field(
            "type",
            Str(choices=frozenset({"counter", "gauge", "histogram"})),
            "counter: value is an increment; gauge: the new value; histogram: one observation",
        ),
        Field("name", Str(4 * STR), "as the kernel code named it (Prometheus style, unit suffix)"),
        Field("labels", ATTRS),
        Field("value", Int(-(1 << 63), (1 << 63) - 1)),
    ),
)

KTEL_SPAN = EventKind(
    10,
    "ktel_span",
    (
        Field("ts_ns", TS_NS, "when the span ended"),
        Field("pid", PID),
        Field("tid", PID),
        Field("trace_id", TRACE_ID),
        Field("span_id", SPAN_ID),
        Field("parent_span_id", Bytes((0, 8)), "empty for a root span"),
        Field("name", Str(4 * STR)),
        Field("start_ns", TS_NS),
        Field("end_ns", TS_NS),
        Field("status", Int(0, 2), "0 unset, 1 ok, 2 error (OTLP StatusCode)"),
        Field("attrs", ATTRS),
    ),
)

KTEL_LOG = EventKind(
    11,
    "ktel_log",
    (
        Field("ts_ns", TS_NS),
        Field("pid", PID),
        Field("tid", PID),
        Field("severity", Int(0, 24), "OTLP SeverityNumber: 1 TRACE, 5 DEBUG, 9 INFO, 13 WARN, 17 ERROR"),
        Field("message", Str(4 * 256)),
        Field("attrs", ATTRS),
        Field("trace_id", Bytes((0, 16)), "empty when the log is in no span"),
        Field("span_id", Bytes((0, 8)), "empty when the log is in no span"),
    ),
    keep=True,
)

# enum ktel_api_kind
COUNTER, GAUGE, HISTOGRAM, SPAN_END, LOG, SPAN_BEGIN = 1, 2, 3, 4, 5, 6
METRIC_TYPE = {COUNTER: "counter", GAUGE: "gauge", HISTOGRAM: "histogram"}
NO_TRACE = bytes(16)
# The wire's value is an int64 (KTEL_METRIC); an observation the kernel gives as u64
# past it is kept at its top, as ktel.c keeps a counter's increment.
I64_MAX = (1 << 63) - 1
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
    """One ring-buffer record -> one KTEL_METRIC, KTEL_SPAN or KTEL_LOG event.

    ``wall_offset_ns`` turns the kernel's CLOCK_MONOTONIC into wall-clock time.
    """
    (ts, value, span_id, parent, start, end, pid, tid, kind, level, nr_kv, trace_id, name, kv, text) = (
        LAYOUT.unpack_from(raw)
    )
    ts += wall_offset_ns
    if kind in METRIC_TYPE:
        if kind == HISTOGRAM and value < 0:
            # ktel:ktel_histogram's value is a u64 (kmod/README.md), which the record
            # carries in its s64: read signed, an observation from 2^63 up was a negative
            # one, which the aggregate stage drops as a sender's error.
            value = I64_MAX
        return [KTEL_METRIC.id, ts, pid, METRIC_TYPE[kind], c_string(name), _kv(kv, nr_kv), value]
    if kind == SPAN_END:
        # What the wire cannot carry is a decode error, counted by the agent, rather
        # than a batch every consumer would refuse.
        if level > 2 or not span_id:
            raise ValueError(f"ktel_api span with status {level} and span id {span_id:#x}")
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
        if level > 24:
            raise ValueError(f"ktel_api log with severity {level} (OTLP's are 1 to 24)")
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


PROBE = Probe(
    name="ktel_api",
    summary="metrics, spans and logs of kernel code using ktel's API (needs ktel's module)",
    tracepoints=tuple(PROGRAMS),
    kinds=(KTEL_METRIC, KTEL_SPAN, KTEL_LOG),
    decode=decode,
    programs=PROGRAMS,
    layouts=(
        Layout(
            "ktel_api.h",
            "ktel_api_event",
            LAYOUT,
            (
                "ts_ns",
                "value",
                "span_id",
                "parent_span_id",
                "start_ns",
                "end_ns",
                "pid",
                "tid",
                "kind",
                "level",
                "nr_kv",
                "trace_id",
                "name",
                "kv",
                "text",
            ),
        ),
    ),
)
