"""Probe process: process exec and exit (sched:sched_process_exec/exit/fork, and the
exit syscalls and signal delivery where they exist, for the exit status).

``LAYOUT`` reads the 64-byte head of ``struct process_event`` of bpf/process.h,
all an exit record has; an exec record adds the filename.
"""

from __future__ import annotations

import struct

from ktel.probes import Layout, Probe
from ktel.probes.decode import c_string
from ktel.schema import COMM, PID, TS_NS, U64, EventKind, Field, Int, Metric, Str

LAYOUT = struct.Struct("<QQIIIIIii4x16s")  # the 64-byte head, all an exit record has
PATH_LEN = 256
EXEC_SIZE = LAYOUT.size + PATH_LEN
TYPE_EXEC = 1
TYPE_EXIT = 2

_COMMON = (
    Field("ts_ns", TS_NS),
    Field("pid", PID, "tgid (after the exec, for an exec)"),
    Field("tid", PID, "the thread that called execve, or the last thread to exit"),
    Field("ppid", PID, "tgid of the process that forked it; 0 when unknown (forked before the probe)"),
    Field("uid", Int(0, (1 << 32) - 1)),
    Field("cgroup_id", Int(0, U64), "cgroup v2 id (inode of its directory in the cgroup2 mount)"),
    Field("comm", COMM),
)

PROCESS_EXEC = EventKind(
    4,
    "process_exec",
    (*_COMMON, Field("filename", Str(4 * PATH_LEN), "as passed to execve")),
    metric=Metric("process_execs_total"),
)

PROCESS_EXIT = EventKind(
    5,
    "process_exit",
    (
        *_COMMON,
        Field(
            "exit_code",
            Int(0, 255, optional=True),
            "the status passed to exit_group/exit; nil when it died of a signal",
        ),
        Field("signal", Int(0, 127), "the fatal signal when exit_code is nil (0: unknown)"),
    ),
)


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
    """One ring-buffer record -> a PROCESS_EXEC or PROCESS_EXIT event."""
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


PROBE = Probe(
    name="process",
    summary="process exec and exit, with parent, cgroup and exit status",
    tracepoints=("sched/sched_process_exec", "sched/sched_process_exit", "sched/sched_process_fork"),
    kinds=(PROCESS_EXEC, PROCESS_EXIT),
    decode=decode,
    optional_tracepoints={
        "syscalls/sys_enter_exit_group": "KTEL_HAVE_SYS_EXIT_GROUP",
        "syscalls/sys_enter_exit": "KTEL_HAVE_SYS_EXIT",
        "signal/signal_generate": "KTEL_HAVE_SIGNAL_GENERATE",
    },
    optional_fields={"sched/sched_process_exit:group_dead": "KTEL_HAVE_GROUP_DEAD"},
    layouts=(
        # An exec record: the head, then the filename.
        Layout(
            "process.h",
            "process_event",
            struct.Struct(LAYOUT.format + f"{PATH_LEN}s"),
            ("ts_ns", "cgroup_id", "type", "pid", "tid", "ppid", "uid", "exit_code", "signal", "comm")
            + ("filename",),
        ),
    ),
)
