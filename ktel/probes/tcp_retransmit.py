"""Probe tcp_retransmit: one event per retransmitted TCP segment (tcp:tcp_retransmit_skb).

``LAYOUT`` reads ``struct tcp_retransmit_event`` of bpf/tcp_retransmit.h.
"""

from __future__ import annotations

import struct

from ktel.probes import Layout, Probe
from ktel.probes.decode import AF_INET, inet_address
from ktel.schema import TS_NS, EventKind, Field, Int, Metric, Str

LAYOUT = struct.Struct("<QiiHHHBx16s16s")

# include/net/tcp_states.h (TCP_BOUND_INACTIVE appeared in v6.10).
TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
    13: "BOUND_INACTIVE",
}
PORT = Int(0, (1 << 16) - 1)
ADDRESS = Str(45)  # the longest IPv6 text form

TCP_RETRANSMIT = EventKind(
    2,
    "tcp_retransmit",
    (
        Field("ts_ns", TS_NS),
        Field("family", Str(choices=frozenset({"ipv4", "ipv6"}))),
        Field("saddr", ADDRESS, "local address, text form"),
        Field("sport", PORT, "local port"),
        Field("daddr", ADDRESS, "remote address, text form"),
        Field("dport", PORT, "remote port"),
        Field("state", Str(32), 'TCP state name without TCP_, e.g. "ESTABLISHED"'),
        Field(
            "err",
            Int(-(1 << 31), (1 << 31) - 1, optional=True),
            "the retransmission's result (0 or -errno); nil where the kernel does not say",
        ),
    ),
    keep=True,
    metric=Metric("tcp_retransmits_total", (("state", "state"),)),
)


def decode(raw: bytes, wall_offset_ns: int) -> list:
    """One ring-buffer record -> one TCP_RETRANSMIT event."""
    ts, state, err, family, sport, dport, has_err, saddr, daddr = LAYOUT.unpack_from(raw)
    return [
        TCP_RETRANSMIT.id,
        ts + wall_offset_ns,
        "ipv4" if family == AF_INET else "ipv6",
        inet_address(family, saddr),
        sport,
        inet_address(family, daddr),
        dport,
        TCP_STATES.get(state, str(state)),
        err if has_err else None,
    ]


PROBE = Probe(
    name="tcp_retransmit",
    summary="TCP retransmissions, with addresses, ports and the socket's state",
    tracepoints=("tcp/tcp_retransmit_skb",),
    kinds=(TCP_RETRANSMIT,),
    decode=decode,
    required_fields=("tcp/tcp_retransmit_skb:state", "tcp/tcp_retransmit_skb:family"),
    optional_fields={"tcp/tcp_retransmit_skb:err": "KTEL_TCP_RETRANSMIT_ERR"},
    layouts=(
        Layout(
            "tcp_retransmit.h",
            "tcp_retransmit_event",
            LAYOUT,
            ("ts_ns", "state", "err", "family", "sport", "dport", "has_err", "saddr", "daddr"),
        ),
    ),
)
