"""Probe module_load: one event per kernel module loaded (module:module_load), with
its taint flags: an unsigned ("E") or out-of-tree ("O") module loaded on a fleet
host is a security signal. Absent from kernels built without module support.

``LAYOUT`` reads ``struct module_load_event`` of bpf/module_load.h.
"""

from __future__ import annotations

import struct

from ktel.probes import Layout, Probe
from ktel.probes.decode import c_string, taint_letters
from ktel.schema import COMM, PID, TS_NS, U32, EventKind, Field, Int, Metric, Str

LAYOUT = struct.Struct("<QII16s56s")

MODULE_LOAD = EventKind(
    12,
    "module_load",
    (
        Field("ts_ns", TS_NS),
        Field("pid", PID, "the process that loaded it (insmod, modprobe, udev)"),
        Field("comm", COMM),
        Field("name", Str(224), "the module's name"),
        Field("taints", Int(0, U32), "the module's taint bits"),
        Field("taint_flags", Str(32), 'their letters, e.g. "OE": out-of-tree and unsigned'),
    ),
    keep=True,
    metric=Metric("module_loads_total", (("module", "name"), ("taints", "taint_flags"))),
)


def decode(raw: bytes, wall_offset_ns: int) -> list:
    """One ring-buffer record -> one MODULE_LOAD event."""
    ts, pid, taints, comm, name = LAYOUT.unpack_from(raw)
    return [
        MODULE_LOAD.id,
        ts + wall_offset_ns,
        pid,
        c_string(comm),
        c_string(name),
        taints,
        taint_letters(taints),
    ]


PROBE = Probe(
    name="module_load",
    summary="kernel modules loaded, with their taint flags (unsigned, out-of-tree)",
    tracepoints=("module/module_load",),
    kinds=(MODULE_LOAD,),
    decode=decode,
    layouts=(
        Layout("module_load.h", "module_load_event", LAYOUT, ("ts_ns", "pid", "taints", "comm", "name")),
    ),
)
