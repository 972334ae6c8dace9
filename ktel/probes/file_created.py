"""Probe file_created: one event per file created, from the filewatcher module's
tracepoint where it is loaded (it sees the create itself), else from the open and
creat syscall tracepoints (O_CREAT and a successful return).

``LAYOUT`` reads ``struct file_created_event`` of bpf/file_created.h. A record for
an absolute path (not opened in a root) is only its first ``ABS_SIZE`` bytes (no
``dir``): records come in those two sizes, and the ring buffer holds 2.6 times as
many of the short ones.

A relative path (the syscall fallback records what the process passed) is made
absolute from the directory the kernel side read from the dentries of the
process's cwd or openat dirfd at the syscall's return (``dir``), so it holds
after the process has exited. A file opened with openat2's RESOLVE_IN_ROOT, whose
path (absolute too) is inside dirfd's directory, carries its own whole path there
instead. That needs the running kernel's struct offsets (``kernel_defines``, from
its BTF); without BTF, or for a directory deeper than the record holds, the agent
falls back to /proc/<pid>/cwd or /proc/<pid>/fd, which works only while the
process lives.

A path longer than the record's 255 bytes (the caller's string, or filewatcher's
d_path) arrives cut, its start kept, and marked ``PATH_TRUNCATED``: the event names
the file by that start, as the wire event has no field to say it was cut, and the
kernel side counts each such record (``truncated_paths``, exported by the agent as
``ktel_agent_truncated_paths_total``). A file filewatcher could not name (its
d_path failed: a path past PATH_MAX) arrives with the module's path
``(d_path failed)``, counted by the kernel side (``unresolved_paths``, exported as
``ktel_agent_unresolved_paths_total``). The event's path is exactly that text:
filewatcher's records say their path is relative to no directory (``DIRFD_NONE``),
so it is never resolved against /proc/<pid>/cwd, which would make up a path such
as ``/(d_path failed)`` while the process lives on in another directory.
"""

from __future__ import annotations

import logging
import os
import struct

from ktel.probes import Layout, Probe, btf
from ktel.probes.decode import HEADER_SIZE, PackedEvents, c_string, frame, pack_event, stride
from ktel.schema import COMM, PID, TS_NS, Bool, EventKind, Field, Int, Metric, Str

try:  # compiled when ktel is installed (setup.py); a bare checkout packs in Python
    import ktel.probes._file_created_pack as _native
except ImportError:
    _native = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LAYOUT = struct.Struct("<QIIIiIBBH16s256s512s")
# A record as a run of the ring buffer holds it: its 8-byte header first (edge_agent/ringbuf.py).
# The 512-byte dir is skipped: only a relative path (or one opened in a root) needs it,
# and copying it out of every record was a sixth of the decoder's time; decode_run
# slices it when needed.
DIR_LEN = 512
FRAMED = struct.Struct(f"<{HEADER_SIZE}x{LAYOUT.format[1:-4]}{DIR_LEN}x")
DIR_AT = HEADER_SIZE + LAYOUT.size - DIR_LEN  # dir's offset in a framed record
assert FRAMED.size == stride(LAYOUT.size)
# KTEL_FILE_CREATED_ABS_SIZE: a record without dir, for an absolute path.
ABS_SIZE = LAYOUT.size - DIR_LEN
FRAMED_ABS = struct.Struct(f"<{HEADER_SIZE}x{LAYOUT.format[1:-4]}")
assert FRAMED_ABS.size == stride(ABS_SIZE)
SIZES = (ABS_SIZE, LAYOUT.size)  # the sizes of its records
DIR_OK = 1  # KTEL_DIR_OK (bpf/file_created.h)
DIR_IN_ROOT = 0x80  # KTEL_DIR_IN_ROOT
PATH_TRUNCATED = 0x40  # KTEL_PATH_TRUNCATED: path holds only the start of the file's path
if _native is not None and (LAYOUT.size, ABS_SIZE, DIR_IN_ROOT, PATH_TRUNCATED) != (
    _native.RECORD_SIZE,
    getattr(_native, "ABS_SIZE", 0),
    getattr(_native, "DIR_IN_ROOT", 0),
    getattr(_native, "PATH_TRUNCATED", 0),
):
    # Built from another bpf/file_created.h than LAYOUT describes: its bytes would be wrong.
    log.warning(
        "file_created: the compiled packer was built for other records than %s bytes; packing"
        " in Python (reinstall ktel to rebuild it)",
        SIZES,
    )
    _native = None  # type: ignore[assignment]


def compiled() -> bool:
    """Whether pack_run uses the compiled packer (else Python, at several times the CPU)."""
    return _native is not None


AT_FDCWD = -100
# KTEL_DIRFD_NONE (bpf/file_created.h): the filewatcher module's path, relative to nothing.
DIRFD_NONE = -1
SLASH = ord("/")
# What a path may take on the wire: PATH_MAX after resolving against the cwd, each byte
# that is not UTF-8 escaped in 4 characters. A path resolved longer than that (a cwd
# deep in such names) goes as the caller passed it.
PATH_CHARS = 4 * 4096
FILE_CREATED = EventKind(
    1,
    "file_created",
    (
        Field("ts_ns", TS_NS, "the creating syscall's return"),
        Field("pid", PID, "thread group id (process.pid)"),
        Field("tid", PID),
        Field("uid", Int(0, (1 << 32) - 1)),
        Field("comm", COMM, "process.executable.name as the kernel knows it"),
        Field("path", Str(PATH_CHARS), "absolute when the agent could resolve it, else as passed"),
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
        target = os.readlink(os.fsencode(link))
    except OSError:
        return path
    # Read as bytes and escaped as the record's own strings are (c_string): a str
    # readlink turns bytes that are not UTF-8 into surrogates, which the wire cannot pack.
    resolved = os.path.normpath(os.path.join(target.decode("utf-8", "backslashreplace"), path))
    # (past the field's bound the event would not be valid, and the processors would
    # refuse its whole batch: any user can make such a cwd)
    return resolved if len(resolved) <= PATH_CHARS else path


def _join(dir_bytes: bytes, path: str) -> str:
    """The record's dir (components innermost first, each NUL-terminated) joined with path."""
    parts = dir_bytes.split(b"\0")[:-1]
    parts.reverse()
    text = "/" + "/".join(p.decode("utf-8", "backslashreplace") for p in parts)
    return os.path.normpath(os.path.join(text, path))


def _in_root(whole: bytes | None, path: str, pid: int, dirfd: int) -> str:
    """A file created by openat2 with RESOLVE_IN_ROOT (bpf/file_created.h,
    KTEL_DIR_IN_ROOT): its own path as the kernel walked it (``whole``, the record's
    dir), else path inside dirfd's directory from /proc, ".." stopping at that root
    as in the kernel (a symlink in the way is then read as the host would, not as
    the root would)."""
    if whole is not None:
        return _join(whole, "")
    inside = os.path.normpath("/" + path).lstrip("/") or "."
    resolved = _resolve(inside, pid, dirfd)
    return path if resolved == inside else resolved


# The members bpf/file_created.bpf.c reads (KTEL_OFF_<define> = offsetof(struct, member)).
_OFFSETS = {
    "TASK_FS": ("task_struct", "fs"),
    "TASK_FILES": ("task_struct", "files"),
    "FS_ROOT": ("fs_struct", "root"),
    "FS_PWD": ("fs_struct", "pwd"),
    "PATH_MNT": ("path", "mnt"),
    "PATH_DENTRY": ("path", "dentry"),
    "FILES_FDT": ("files_struct", "fdt"),
    "FDT_MAX_FDS": ("fdtable", "max_fds"),
    "FDT_FD": ("fdtable", "fd"),
    "FILE_PATH": ("file", "f_path"),
    "VFSMOUNT_ROOT": ("vfsmount", "mnt_root"),
    "MOUNT_MNT": ("mount", "mnt"),
    "MOUNT_PARENT": ("mount", "mnt_parent"),
    "MOUNT_MOUNTPOINT": ("mount", "mnt_mountpoint"),
    "DENTRY_PARENT": ("dentry", "d_parent"),
    "DENTRY_NAME": ("dentry", "d_name"),
    "QSTR_NAME": ("qstr", "name"),
}


def kernel_defines() -> dict[str, int]:
    """KTEL_OFF_* for the in-kernel directory walk, from the running kernel's BTF;
    none (the agent resolves from /proc instead) where it has no BTF or lacks one."""
    try:
        b = btf.vmlinux()
        return {f"KTEL_OFF_{k}": b.offsetof(s, m) for k, (s, m) in _OFFSETS.items()}
    except (OSError, btf.BTFError) as err:
        log.warning("file_created: relative paths resolved from /proc only: %s", err)
        return {}


def decode(raw: bytes, wall_offset_ns: int) -> list:
    """One ring-buffer record -> one FILE_CREATED event.

    ``wall_offset_ns`` turns the kernel's CLOCK_MONOTONIC into wall-clock time.
    """
    return decode_run(*frame(raw), wall_offset_ns)[0]


def decode_run(size: int, data: bytes, wall_offset_ns: int) -> list:
    """A run of ring-buffer records -> their wire events: ``decode`` in bulk.

    One struct.iter_unpack over the run; the comm's text comes from a cache. The
    path is cut at its NUL (the kernel leaves what follows it uninitialised). A
    record whose dirfd is ``DIRFD_NONE`` (the filewatcher module's) keeps its path
    as it is.
    """
    framed = _framed(size)
    step, has_dir = framed.size, size == LAYOUT.size
    comms = _COMMS
    if len(comms) > _COMMS_MAX:
        comms.clear()
    kind = FILE_CREATED.id
    events: list[list] = []
    append = events.append
    for i, (ts, pid, tid, uid, dirfd, flags, certain, dir_state, dir_len, comm, path) in enumerate(
        framed.iter_unpack(data)
    ):
        c = comms.get(comm)
        if c is None:
            c = comms[comm] = c_string(comm)
        # A cut path is named by its start, as any other: the mark is counted in the kernel.
        dir_state &= ~PATH_TRUNCATED
        if dir_state & DIR_IN_ROOT:
            walked = dir_state == DIR_IN_ROOT | DIR_OK and has_dir
            at = i * step + DIR_AT
            p = _in_root(
                data[at : at + min(dir_len, DIR_LEN)] if walked else None, c_string(path), pid, dirfd
            )
        elif path[0] == SLASH:  # the common case, c_string inlined
            p = path.partition(b"\0")[0].decode("utf-8", "backslashreplace")
        elif dirfd == DIRFD_NONE:
            # filewatcher's "(d_path failed)": the module's text, no path to resolve.
            p = c_string(path)
        elif dir_state == DIR_OK and has_dir:
            at = i * step + DIR_AT
            p = _join(data[at : at + min(dir_len, DIR_LEN)], c_string(path))
        else:
            p = _resolve(c_string(path), pid, dirfd)
        append([kind, ts + wall_offset_ns, pid, tid, uid, c, p, flags, certain != 0])
    return events


def pack_run(size: int, data: bytes, wall_offset_ns: int, out: PackedEvents) -> None:
    """A run of ring-buffer records -> their packed wire events (``pack_event`` of what
    ``decode_run`` makes, byte for byte), appended to ``out``, for the agent.

    The compiled packer (file_created_pack.c) takes the records with an absolute,
    valid UTF-8 path and comm, a tenth of decode_run's and msgpack's cost; it stops
    at any other record, which decode_run takes here, and goes on after it."""
    if _native is None:
        out.extend(pack_event(ev) for ev in decode_run(size, data, wall_offset_ns))
        return
    step, kind = _framed(size).size, FILE_CREATED.id
    n = len(data) // step
    i = _native.pack(data, size, 0, wall_offset_ns, kind, out.data, out.sizes)
    while i < n:
        [ev] = decode_run(size, data[i * step : (i + 1) * step], wall_offset_ns)
        out.append(pack_event(ev))
        i = _native.pack(data, size, i + 1, wall_offset_ns, kind, out.data, out.sizes)


def _framed(size: int) -> struct.Struct:
    """How a run of records of ``size`` bytes is read."""
    if size == LAYOUT.size:
        return FRAMED
    if size == ABS_SIZE:
        return FRAMED_ABS
    raise ValueError(f"file_created record of {size} bytes, expected {ABS_SIZE} or {LAYOUT.size}")


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
    pack_run=pack_run,
    # With the filewatcher module loaded, its tracepoint (which sees the create
    # itself) replaces the syscall tracepoints, which the source then leaves out.
    optional_tracepoints={
        "syscalls/sys_enter_open": "KTEL_HAVE_SYS_OPEN",
        "filewatcher/file_created": "KTEL_HAVE_FILEWATCHER",
    },
    programs={"filewatcher/file_created": "file_created_filewatcher"},
    kernel_defines=kernel_defines,
    kernel_counters=("truncated_paths", "unresolved_paths"),
    layouts=(
        Layout(
            "file_created.h",
            "file_created_event",
            LAYOUT,
            (
                "ts_ns",
                "pid",
                "tid",
                "uid",
                "dirfd",
                "flags",
                "certain",
                "dir_state",
                "dir_len",
                "comm",
                "path",
                "dir",
            ),
        ),
    ),
)
