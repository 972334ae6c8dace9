"""Decoder of the tcp_retransmit probe (bpf/tcp_retransmit.{h,bpf.c}).

The layout mirrors ``struct tcp_retransmit_event`` in bpf/tcp_retransmit.h;
tests/unit/test_probe_layout.py compiles the header and checks they agree.
"""

from __future__ import annotations

import ipaddress
import struct

from ktel.wire import TCP_RETRANSMIT

LAYOUT = struct.Struct("<QiiHHHBx16s16s")
AF_INET = 2

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


def _addr(family: int, raw: bytes) -> str:
    if family == AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw))


def decode(raw: bytes, wall_offset_ns: int) -> list:
    """One ring-buffer record -> one wire event (see ktel.wire.TCP_RETRANSMIT)."""
    ts, state, err, family, sport, dport, has_err, saddr, daddr = LAYOUT.unpack_from(raw)
    return [
        TCP_RETRANSMIT.id,
        ts + wall_offset_ns,
        "ipv4" if family == AF_INET else "ipv6",
        _addr(family, saddr),
        sport,
        _addr(family, daddr),
        dport,
        TCP_STATES.get(state, str(state)),
        err if has_err else None,
    ]
