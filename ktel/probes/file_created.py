"""Probe file_created: one event per file created, from the filewatcher module's
tracepoint where it is loaded (it sees the create itself), else from the open and
creat syscall tracepoints (O_CREAT and a successful return).

``LAYOUT`` reads ``struct file_created_event`` of bpf/file_created.h.
"""

from __future__ import annotations

import os
import struct

from ktel.probes import Layout, Probe
from ktel.probes.decode import HEADER_SIZE, c_string, frame, stride
from ktel.schema import COMM, PID, TS_NS, Bool, EventKind, Field, Int, Metric, Str

LAYOUT = struct.Struct("<QIIIiIB3x16s256s")
# A record as a run of the ring buffer holds it: its 8-byte header first (edge_agent/ringbuf.py).
FRAMED = struct.Struct(f"<{HEADER_SIZE}x{LAYOUT.format[1:]}")
assert FRAMED.size == stride(LAYOUT.size)
AT_FDCWD = -100
SLASH = ord("/")
FILE_CREATED = EventKind(
    1,
    "file_created",
    (
        Field("ts_ns", TS_NS, "the creating syscall's return"),
        Field("pid", PID, "thread group id (process.pid)"),
        Field("tid", PID),
        Field("uid", Int(0, (1 << 32) - 1)),
        Field("comm", COMM, "process.executable.name as the kernel knows it"),
        # PATH_MAX after resolving against the cwd, escapes included.
        Field("path", Str(4 * 4096), "absolute when the agent could resolve it, else as passed"),
        Field("flags", Int(0, (1 << 32) - 1), "open flags"),
        Field(
            "certain",
            Bool(),
            "true: O_EXCL or filewatcher saw the create; false: O_CREAT on a file that may "
            "already have existed (the syscall fallback)",
        ),
    ),
    # The aggregate stage labels it by directory (aggregate.directory_depth), not by a field.
    metric=Metric("file_created_total"),
)
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
    """One ring-buffer record -> one FILE_CREATED event.

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


PROBE = Probe(
    name="file_created",
    summary="files created, with process and path (filewatcher module, else open/creat syscalls)",
    tracepoints=(
        "syscalls/sys_enter_openat",
        "syscalls/sys_exit_openat",
        "syscalls/sys_enter_openat2",
        "syscalls/sys_exit_openat2",
        "syscalls/sys_enter_creat",
        "syscalls/sys_exit_creat",
    ),
    kinds=(FILE_CREATED,),
    decode=decode,
    decode_run=decode_run,
    # With the filewatcher module loaded, its tracepoint (which sees the create
    # itself) replaces the syscall tracepoints, which the source then leaves out.
    optional_tracepoints={
        "syscalls/sys_enter_open": "KTEL_HAVE_SYS_OPEN",
        "filewatcher/file_created": "KTEL_HAVE_FILEWATCHER",
    },
    programs={"filewatcher/file_created": "file_created_filewatcher"},
    layouts=(
        Layout(
            "file_created.h",
            "file_created_event",
            LAYOUT,
            ("ts_ns", "pid", "tid", "uid", "dirfd", "flags", "certain", "comm", "path"),
        ),
    ),
)
