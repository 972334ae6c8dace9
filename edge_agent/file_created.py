"""Decoder of the file_created probe (bpf/file_created.{h,bpf.c}).

The layout below mirrors ``struct file_created_event`` in bpf/file_created.h;
tests/unit/test_probe_layout.py compiles the header and checks they agree.
"""

from __future__ import annotations

import os
import struct

from ktel.wire import FILE_CREATED

LAYOUT = struct.Struct("<QIIIiIB3x16s256s")
AT_FDCWD = -100


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
    ts, pid, tid, uid, dirfd, flags, certain, comm, path = LAYOUT.unpack_from(raw)
    p = path.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
    if not p.startswith("/"):
        p = _resolve(p, pid, dirfd)
    return [
        FILE_CREATED.id,
        ts + wall_offset_ns,
        pid,
        tid,
        uid,
        comm.split(b"\0", 1)[0].decode("utf-8", "backslashreplace"),
        p,
        flags,
        bool(certain),
    ]
