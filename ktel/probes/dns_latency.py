"""Probe dns_latency: log2 histograms of getaddrinfo() latency per process and outcome,
from a uprobe on libc, and one event per lookup slower than a threshold.

``KEY`` and ``SLOW`` read ``struct dns_latency_key`` and ``struct dns_slow_event``
of bpf/dns_latency.h.
"""

from __future__ import annotations

import struct
from typing import Any

from opentelemetry.semconv._incubating.attributes.process_attributes import (
    PROCESS_EXECUTABLE_NAME,
    PROCESS_PID,
)

from ktel.probes import Histogram, Layout, Probe, Uprobe
from ktel.probes.decode import c_string
from ktel.schema import COMM, PID, TS_NS, U64, EventKind, Field, Int, Metric, Str

KEY = struct.Struct("<II16s")
SLOW = struct.Struct("<QQIIi4x16s256s")
METRIC = "dns_latency"

DNS_SLOW = EventKind(
    7,
    "dns_slow",
    (
        Field("ts_ns", TS_NS),
        Field("pid", PID),
        Field("tid", PID),
        Field("comm", COMM),
        Field("host", Str(1024), "the name passed to getaddrinfo (cut at 255 bytes)"),
        Field("latency_ns", Int(0, U64), "getaddrinfo's duration"),
        Field("ret", Int(-(1 << 31), (1 << 31) - 1), "getaddrinfo's return value (0 ok, EAI_* < 0)"),
    ),
    metric=Metric("dns_slow_lookups_total"),
)


def labels(key: bytes) -> dict[str, Any]:
    tgid, failed, comm = KEY.unpack(key)
    return {
        PROCESS_PID: tgid,
        PROCESS_EXECUTABLE_NAME: c_string(comm),
        "status": "error" if failed else "ok",
    }


def decode(raw: bytes, wall_offset_ns: int) -> list:
    """One slow-lookup record -> one DNS_SLOW event."""
    ts, latency, pid, tid, ret, comm, host = SLOW.unpack_from(raw)
    return [DNS_SLOW.id, ts + wall_offset_ns, pid, tid, c_string(comm), c_string(host), latency, ret]


PROBE = Probe(
    name="dns_latency",
    summary="histograms of getaddrinfo() latency per process (a libc uprobe), and slow lookups",
    kinds=(DNS_SLOW,),
    decode=decode,
    uprobes=(Uprobe("c", "getaddrinfo", "getaddrinfo_entry", "getaddrinfo_return"),),
    histograms=(Histogram("hist", METRIC, labels),),
    layouts=(
        Layout("dns_latency.h", "dns_latency_key", KEY, ("tgid", "failed", "comm"), event=False),
        Layout(
            "dns_latency.h",
            "dns_slow_event",
            SLOW,
            ("ts_ns", "latency_ns", "pid", "tid", "ret", "comm", "host"),
        ),
    ),
)
