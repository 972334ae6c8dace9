"""What the aggregate stage emits in the first window of a host new to it: its new
counters and histograms at zero, then every series at its value
(processors/aggregate_core.py), for the exporters' tests to take as they come."""

from __future__ import annotations

from ktel.wire import HIST_SLOTS, HISTOGRAM_DELTA, KTEL_METRIC, MetricSnapshot, RawBatch
from processors import aggregate_core
from processors.chain import Chain

NOW_MS = 1_700_000_000_000
WINDOW_MS = 10_000
FILE = [1, 1, 2, 2, 0, "c", "/tmp/f", 0o101, False]  # a file_created event: file_created_total
# A kernel histogram in ns (syscall_latency_seconds, log2 bounds in seconds) of 3 durations.
SLOTS = [0] * 10 + [3] + [0] * (HIST_SLOTS - 11)
LATENCY = [HISTOGRAM_DELTA.id, 1, 0, "syscall_latency", "ns", {}, 3, 3000, SLOTS, 1]
SIZE = [KTEL_METRIC.id, 1, 2, "histogram", "request_size_bytes", {}, 4096]  # log2 bounds, in bytes
DEPTH = [KTEL_METRIC.id, 1, 2, "gauge", "queue_depth", {}, 3]


def first_window() -> tuple[MetricSnapshot, MetricSnapshot]:
    """The host's snapshot of its new series at zero, stamped 1 ms before the window's
    close, and its snapshot at the close, in the order the aggregate emits them."""
    chain = Chain([aggregate_core.Aggregate(aggregate_core.Options(window_seconds=WINDOW_MS / 1000))])
    [aggregate] = chain.timed()
    value: dict = {}
    chain.on_batch(value, RawBatch("h", "b", 0, 0, [FILE, LATENCY, SIZE, DEPTH]), NOW_MS - 1)
    [(h1, zero), (h2, snap)] = chain.on_window(aggregate, {"h": value}, NOW_MS, 1.0).snapshots
    assert (h1, h2, zero.ts_ms, snap.ts_ms) == ("h", "h", NOW_MS - 1, NOW_MS)
    return zero, snap
