"""Decoder of the dns_latency probe (bpf/dns_latency.{h,bpf.c}): histogram
labels, and the slow-lookup events of its ring buffer.

``KEY`` and ``SLOW`` mirror ``struct dns_latency_key`` and ``struct
dns_slow_event`` in bpf/dns_latency.h; tests/unit/test_probe_layout.py
compiles the header and checks they agree.
"""

from __future__ import annotations

import struct
from typing import Any

from edge_agent.ringbuf import c_string
from ktel.wire import DNS_SLOW

KEY = struct.Struct("<II16s")
SLOW = struct.Struct("<QQIIi4x16s256s")
METRIC = "dns_latency"


def labels(key: bytes) -> dict[str, Any]:
    tgid, failed, comm = KEY.unpack(key)
    return {
        "process.pid": tgid,
        "process.executable.name": c_string(comm),
        "status": "error" if failed else "ok",
    }


def decode(raw: bytes, wall_offset_ns: int) -> list:
    """One slow-lookup record -> one wire event (see ktel.wire.DNS_SLOW)."""
    ts, latency, pid, tid, ret, comm, host = SLOW.unpack_from(raw)
    return [DNS_SLOW.id, ts + wall_offset_ns, pid, tid, c_string(comm), c_string(host), latency, ret]
