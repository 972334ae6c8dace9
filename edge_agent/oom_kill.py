"""Decoder of the oom_kill probe (bpf/oom_kill.{h,bpf.c}).

The layout mirrors ``struct oom_kill_event`` in bpf/oom_kill.h;
tests/unit/test_probe_layout.py compiles the header and checks they agree.
"""

from __future__ import annotations

import struct

from edge_agent.ringbuf import c_string
from ktel.wire import OOM_KILL

LAYOUT = struct.Struct("<QQQQQQIIIhBx16s16s")


def decode(raw: bytes, wall_offset_ns: int) -> list:
    """One ring-buffer record -> one wire event (see ktel.wire.OOM_KILL)."""
    (ts, total_vm, anon, file, shmem, pgtables, pid, uid, trigger_pid, adj, detail, comm, tcomm) = (
        LAYOUT.unpack_from(raw)
    )
    if not detail:  # a kernel whose mark_victim gives the pid alone
        total_vm = anon = file = shmem = pgtables = uid = adj = None
    return [
        OOM_KILL.id,
        ts + wall_offset_ns,
        pid,
        c_string(comm),
        uid,
        total_vm,
        anon,
        file,
        shmem,
        pgtables,
        adj,
        trigger_pid,
        c_string(tcomm),
    ]
