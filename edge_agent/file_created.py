"""Decoder of the file_created probe (bpf/file_created.{h,bpf.c}).

The layout below mirrors ``struct file_created_event`` in bpf/file_created.h;
tests/unit/test_probe_layout.py compiles the header and checks they agree.
"""

from __future__ import annotations

import os
import struct

from edge_agent.ringbuf import HEADER_SIZE, c_string, frame, stride
from ktel.wire import FILE_CREATED

LAYOUT = struct.Struct("<QIIIiIB3x16s256s")
# A record as a run of the ring buffer holds it: its 8-byte header first (edge_agent/ringbuf.py).
FRAMED = struct.Struct(f"<{HEADER_SIZE}x{LAYOUT.format[1:]}")
assert FRAMED.size == stride(LAYOUT.size)
AT_FDCWD = -100
SLASH = ord("/")
# comm bytes (NUL-padded by the kernel) -> str: a host runs few distinct commands.
_COMMS: dict[bytes, str] = {}
_COMMS_MAX = 4096


def _resolve(path: str, pid: int, dirfd: int) -> str:
    """Make a relative path absolute from the process's cwd or dirfd.

    Best effort: the process may be gone by the time the agent reads the event,
    and then the path stays as the caller passed it.
    """
    link = f"/proc/{pid}/cwd" if dirfd == AT_FDCWD else f"/proc/{pid}/fd/{dirfd}"
    try:
        return os.path.normpath(os.path.join(os.readlink(link), path))
    except OSError:
        return path


def decode(raw: bytes, wall_offset_ns: int) -> list:
    """One ring-buffer record -> one wire event (see ktel.wire.FILE_CREATED).

    ``wall_offset_ns`` turns the kernel's CLOCK_MONOTONIC into wall-clock time.
    """
    return decode_run(*frame(raw), wall_offset_ns)[0]


def decode_run(size: int, data: bytes, wall_offset_ns: int) -> list:
    """A run of ring-buffer records -> their wire events: ``decode`` in bulk.

    One struct.iter_unpack over the run; the comm's text comes from a cache. The
    path is cut at its NUL (the kernel leaves what follows it uninitialised).
    """
    if size != LAYOUT.size:
        raise ValueError(f"file_created record of {size} bytes, expected {LAYOUT.size}")
    comms = _COMMS
    if len(comms) > _COMMS_MAX:
        comms.clear()
    kind = FILE_CREATED.id
    events: list[list] = []
    append = events.append
    for ts, pid, tid, uid, dirfd, flags, certain, comm, path in FRAMED.iter_unpack(data):
        c = comms.get(comm)
        if c is None:
            c = comms[comm] = c_string(comm)
        p = c_string(path) if path[0] == SLASH else _resolve(c_string(path), pid, dirfd)
        append([kind, ts + wall_offset_ns, pid, tid, uid, c, p, flags, certain != 0])
    return events
