"""Decoder of the process probe (bpf/process.{h,bpf.c}): exec and exit events.

The layout mirrors ``struct process_event`` in bpf/process.h;
tests/unit/test_probe_layout.py compiles the header and checks they agree.
"""

from __future__ import annotations

import struct

from edge_agent.ringbuf import c_string
from ktel.wire import PROCESS_EXEC, PROCESS_EXIT

LAYOUT = struct.Struct("<QQIIIIIii4x16s")  # the 64-byte head, all an exit record has
PATH_LEN = 256
EXEC_SIZE = LAYOUT.size + PATH_LEN
TYPE_EXEC = 1
TYPE_EXIT = 2


def _proc_ppid(pid: int) -> int:
    """Best effort for a process forked before the probe was loaded: its
    parent from /proc while it (or its zombie) is still there, else 0."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        return int(stat[stat.rindex(b")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def decode(raw: bytes, wall_offset_ns: int) -> list:
    """One ring-buffer record -> a process_exec or process_exit wire event."""
    ts, cgroup_id, typ, pid, tid, ppid, uid, exit_code, signal, comm = LAYOUT.unpack_from(raw)
    if not ppid:
        ppid = _proc_ppid(pid)
    if typ == TYPE_EXEC:
        filename = c_string(raw[LAYOUT.size : LAYOUT.size + PATH_LEN])
        comm_s = c_string(comm)
        return [PROCESS_EXEC.id, ts + wall_offset_ns, pid, tid, ppid, uid, cgroup_id, comm_s, filename]
    if typ == TYPE_EXIT:
        return [
            PROCESS_EXIT.id,
            ts + wall_offset_ns,
            pid,
            tid,
            ppid,
            uid,
            cgroup_id,
            c_string(comm),
            exit_code if exit_code >= 0 else None,
            signal if exit_code < 0 else 0,
        ]
    raise ValueError(f"process record of unknown type {typ}")
