"""Probe syscall_latency: a log2 histogram of every syscall's duration, per cgroup and
syscall, kept in the kernel (raw_syscalls:sys_enter/sys_exit); the agent reads deltas.

``KEY`` reads ``struct syscall_latency_key`` of bpf/syscall_latency.h.
"""

from __future__ import annotations

import struct
from typing import Any

from ktel.probes import Histogram, Layout, Probe
from ktel.probes.decode import syscall_name

KEY = struct.Struct("<QI4x")
METRIC = "syscall_latency"


def labels(key: bytes) -> dict[str, Any]:
    cgroup_id, nr = KEY.unpack(key)
    return {"syscall.id": nr, "syscall.name": syscall_name(nr), "cgroup.id": cgroup_id}


PROBE = Probe(
    name="syscall_latency",
    summary="histograms of syscall duration per cgroup and syscall, kept in the kernel",
    tracepoints=(
        "raw_syscalls/sys_enter",
        "raw_syscalls/sys_exit",
        "sched/sched_process_exit",
        "sched/sched_process_exec",
    ),
    histograms=(Histogram("hist", METRIC, labels),),
    layouts=(
        Layout("syscall_latency.h", "syscall_latency_key", KEY, ("cgroup_id", "syscall_id"), event=False),
    ),
)
