"""Probe oom_kill: one event per OOM victim, from oom:mark_victim (the global OOM
killer and memory-cgroup OOM kills both mark their victim).

``LAYOUT`` reads ``struct oom_kill_event`` of bpf/oom_kill.h.
"""

from __future__ import annotations

import struct

from ktel.probes import Layout, Probe
from ktel.probes.decode import c_string
from ktel.schema import COMM, PID, TS_NS, U64, EventKind, Field, Int, Metric

LAYOUT = struct.Struct("<QQQQQQIIIhBx16s16s")
KB = Int(0, U64, optional=True)  # nil where the tracepoint lacks it

OOM_KILL = EventKind(
    3,
    "oom_kill",
    (
        Field("ts_ns", TS_NS),
        Field("pid", PID, "the victim, as the kernel gave it (task pid)"),
        Field("comm", COMM, 'the victim\'s name; "" where the tracepoint lacks it'),
        Field("uid", Int(0, (1 << 32) - 1, optional=True), "the victim's uid"),
        Field("total_vm_kb", KB, "the victim's memory, kB"),
        Field("anon_rss_kb", KB),
        Field("file_rss_kb", KB),
        Field("shmem_rss_kb", KB),
        Field("pgtables_kb", KB),
        Field("oom_score_adj", Int(-1000, 1000, optional=True)),
        Field("trigger_pid", PID, "the process whose allocation ran into the limit (tgid)"),
        Field("trigger_comm", COMM),
    ),
    keep=True,
    metric=Metric("oom_kills_total"),
)


def decode(raw: bytes, wall_offset_ns: int) -> list:
    """One ring-buffer record -> one OOM_KILL event."""
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


PROBE = Probe(
    name="oom_kill",
    summary="OOM kills: the victim, its memory and the process that ran into the limit",
    tracepoints=("oom/mark_victim",),
    kinds=(OOM_KILL,),
    decode=decode,
    optional_fields={"oom/mark_victim:comm": "KTEL_OOM_DETAIL"},
    layouts=(
        Layout(
            "oom_kill.h",
            "oom_kill_event",
            LAYOUT,
            (
                "ts_ns",
                "total_vm_kb",
                "anon_rss_kb",
                "file_rss_kb",
                "shmem_rss_kb",
                "pgtables_kb",
                "pid",
                "uid",
                "trigger_pid",
                "oom_score_adj",
                "has_detail",
                "comm",
                "trigger_comm",
            ),
        ),
    ),
)
