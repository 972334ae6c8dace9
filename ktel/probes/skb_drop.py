"""Probe skb_drop: one event per packet the kernel drops with a reason (skb:kfree_skb).

``LAYOUT`` reads ``struct skb_drop_event`` of bpf/skb_drop.h.

Drop reason names come from the running kernel, not from a table here: the
values of ``enum skb_drop_reason`` move between kernel versions (NO_SOCKET is
2 in v6.1, Debian 12's headers, and 3 in v6.18, this host's kernel). The
tracepoint's print fmt lists every value with its name (the kernel resolves
the enum through TRACE_DEFINE_ENUM), so the agent reads the format file when
the probe loads (``load_reasons``).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

from ktel.paths import TRACEFS
from ktel.probes import Layout, Probe
from ktel.probes.decode import c_string
from ktel.schema import COMM, PID, TS_NS, U64, EventKind, Field, Int, Metric, Str

LAYOUT = struct.Struct("<QQIIH6x16s")
FORMAT_FILE = TRACEFS / "events/skb/kfree_skb/format"

SKB_DROP = EventKind(
    6,
    "skb_drop",
    (
        Field("ts_ns", TS_NS),
        Field("pid", PID, "task on CPU at the drop (often the sender, or a softirq thread)"),
        Field("comm", COMM),
        Field("protocol", Int(0, (1 << 16) - 1), "ethertype, host order (0x0800 IPv4, 0x86dd IPv6)"),
        Field("reason", Int(0, (1 << 32) - 1), "enum skb_drop_reason value"),
        Field("reason_name", Str(128), 'its name from the running kernel, e.g. "NO_SOCKET"'),
        Field("location", Int(0, U64), "kernel address of the freeing code"),
    ),
    keep=True,
    metric=Metric("skb_drops_total", (("reason", "reason_name"),)),
)

_PAIR = re.compile(r'\{\s*(0x[0-9a-fA-F]+|\d+)\s*,\s*"([^"]*)"\s*\}')
_reasons: dict[int, str] | None = None


def reason_names(format_text: str) -> dict[int, str]:
    """{value: name} from the __print_symbolic(REC->reason, ...) of a kfree_skb format file.

    Pairs whose value the kernel left as a symbol (no TRACE_DEFINE_ENUM) are
    skipped; those reasons decode as "reason_<n>".
    """
    start = format_text.find("__print_symbolic(REC->reason")
    if start < 0:
        return {}
    return {int(v, 0): name for v, name in _PAIR.findall(format_text, start)}


def load_reasons(path: Path = FORMAT_FILE) -> dict[int, str]:
    global _reasons
    try:
        _reasons = reason_names(path.read_text())
    except OSError:
        _reasons = {}
    return _reasons


def reason_name(reason: int) -> str:
    names = _reasons if _reasons is not None else load_reasons()
    return names.get(reason, f"reason_{reason}")


def decode(raw: bytes, wall_offset_ns: int) -> list:
    """One ring-buffer record -> one SKB_DROP event."""
    ts, location, pid, reason, protocol, comm = LAYOUT.unpack_from(raw)
    return [
        SKB_DROP.id,
        ts + wall_offset_ns,
        pid,
        c_string(comm),
        protocol,
        reason,
        reason_name(reason),
        location,
    ]


PROBE = Probe(
    name="skb_drop",
    summary="packets the kernel dropped, by drop reason",
    tracepoints=("skb/kfree_skb",),
    kinds=(SKB_DROP,),
    decode=decode,
    required_fields=("skb/kfree_skb:reason",),
    prepare=load_reasons,
    layouts=(
        Layout(
            "skb_drop.h",
            "skb_drop_event",
            LAYOUT,
            ("ts_ns", "location", "pid", "reason", "protocol", "comm"),
        ),
    ),
)
