"""Labels of the runq_latency probe's histogram (bpf/runq_latency.bpf.c).

One node-wide histogram (a per-CPU array of one struct ktel_hist), so no labels;
the host is in the batch. Read by edge_agent/probes.py (HISTOGRAM_DELTA).
"""

from __future__ import annotations

from typing import Any

METRIC = "runq_latency"


def labels(key: bytes) -> dict[str, Any]:
    return {}
