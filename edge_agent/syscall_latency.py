"""Labels of the syscall_latency probe's histograms (bpf/syscall_latency.{h,bpf.c}).

``KEY`` mirrors ``struct syscall_latency_key`` in bpf/syscall_latency.h;
tests/unit/test_probe_layout.py compiles the header and checks they agree.
The histograms themselves are read by edge_agent/probes.py (HISTOGRAM_DELTA).
"""

from __future__ import annotations

import functools
import struct
from typing import Any

KEY = struct.Struct("<QI4x")
METRIC = "syscall_latency"


@functools.lru_cache(maxsize=1024)
def syscall_name(nr: int) -> str:
    """The syscall's name on this architecture (BCC's table), or "" if unknown."""
    try:
        from bcc.syscall import syscall_name as bcc_name
    except ImportError:
        return ""
    name = bcc_name(nr).decode()
    return "" if name.startswith("[unknown") else name


def labels(key: bytes) -> dict[str, Any]:
    cgroup_id, nr = KEY.unpack(key)
    return {"syscall.id": nr, "syscall.name": syscall_name(nr), "cgroup.id": cgroup_id}
