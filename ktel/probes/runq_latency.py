"""Probe runq_latency: a node-wide log2 histogram of how long runnable tasks wait for a
CPU (sched:sched_wakeup/sched_wakeup_new/sched_switch), kept in the kernel.

One histogram (a per-CPU array of one struct ktel_hist), so no labels: the host
is in the batch.
"""

from __future__ import annotations

from typing import Any

from ktel.probes import Histogram, Probe

METRIC = "runq_latency"


def labels(key: bytes) -> dict[str, Any]:
    return {}


PROBE = Probe(
    name="runq_latency",
    summary="a histogram of run-queue latency (wakeup to running), kept in the kernel",
    tracepoints=("sched/sched_wakeup", "sched/sched_wakeup_new", "sched/sched_switch"),
    required_fields=("sched/sched_switch:prev_state",),
    histograms=(Histogram("hist", METRIC, labels, evict=False),),
)
