"""Pure core of the aggregate stage: raw batches -> per-host cumulative series.

State per host (one JSON-able dict, stored as one Faust table value so that the
dedupe record and the counts change together in one changelog message)::

    {"seen": {boot_id: [[lo, hi], ...]},       # processors/dedupe_core.py
     "series": {series_key: cumulative_value}}

Counts are weighted: an event that stands for w events (sampled 1 in w, in the
kernel or by the sample stage) adds w, so counts stay unbiased.

A series key is ``json.dumps([name, sorted label items])``. The ``host.id``
label is added at snapshot time, not stored per series.

Cardinality: each host keeps at most ``max_series`` series; events that would
create more are counted in one overflow series per metric carrying the label
``otel.metric.overflow="true"``, as the OpenTelemetry metrics SDK does.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from ktel.wire import (
    DNS_SLOW,
    FILE_CREATED,
    HISTOGRAM_DELTA,
    OOM_KILL,
    PROCESS_EXEC,
    SKB_DROP,
    TCP_RETRANSMIT,
    RawBatch,
)
from processors import dedupe_core

FILE_CREATED_TOTAL = "file_created_total"
OVERFLOW_LABELS: tuple[tuple[str, str], ...] = (("otel.metric.overflow", "true"),)


@dataclasses.dataclass(frozen=True)
class Options:
    directory_depth: int = 3
    include_filename: bool = False
    max_series: int = 2000


@dataclasses.dataclass
class Outcome:
    duplicate: bool = False
    counted: float = 0
    overflowed: float = 0


def directory_label(path: str, depth: int) -> str:
    """The first ``depth`` components of the file's directory: a bounded label."""
    if not path.startswith("/"):
        # Relative and unresolved (the process was gone): keep it coarse.
        return path.split("/", 1)[0] if "/" in path else "."
    parts = [p for p in path.split("/")[:-1] if p][:depth]
    return "/" + "/".join(parts)


def series_key(name: str, labels: tuple[tuple[str, str], ...]) -> str:
    return json.dumps([name, labels])


def parse_key(key: str) -> tuple[str, dict[str, str]]:
    name, labels = json.loads(key)
    return name, dict(labels)


def _counter_labels(ev: Sequence[Any], opts: Options) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    """The counter series an event adds to, or None (a kind no counter follows)."""
    kind = ev[0]
    if kind == FILE_CREATED.id:
        path = ev[6]
        labels: tuple[tuple[str, str], ...] = (("directory", directory_label(path, opts.directory_depth)),)
        if opts.include_filename:
            labels += (("file", path.rsplit("/", 1)[-1]),)
        return FILE_CREATED_TOTAL, labels
    if kind == TCP_RETRANSMIT.id:
        return "tcp_retransmits_total", (("state", str(ev[7])),)
    if kind == OOM_KILL.id:
        return "oom_kills_total", ()
    if kind == SKB_DROP.id:
        return "skb_drops_total", (("reason", str(ev[6])),)
    if kind == PROCESS_EXEC.id:
        return "process_execs_total", ()
    if kind == DNS_SLOW.id:
        return "dns_slow_lookups_total", ()
    return None


def histogram_name(metric: str, unit: str) -> str:
    return f"{metric}_seconds" if unit == "ns" else f"{metric}_{unit}"


def count_events(batch: RawBatch, opts: Options) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Counter increments and histogram deltas of one batch (the stage's only per-event loop).

    Counter increments are weighted (see the module doc). A histogram delta is
    scaled by the probe's in-kernel sampling and the event's weight.
    """
    counts: dict[str, float] = defaultdict(float)
    hists: dict[str, dict[str, Any]] = {}
    weights = batch.weights or [1] * len(batch.events)
    hid = HISTOGRAM_DELTA.id
    for ev, w in zip(batch.events, weights, strict=True):
        if ev[0] == hid:
            _ts, _start, metric, unit, labels, count, total, buckets, every = ev[1:]
            scale = w * every
            key = series_key(
                histogram_name(metric, unit), tuple(sorted((k, str(v)) for k, v in labels.items()))
            )
            h = hists.setdefault(key, {"count": 0.0, "sum": 0.0, "buckets": [0.0] * len(buckets)})
            h["count"] += count * scale
            h["sum"] += total * scale
            h["buckets"] = [a + b * scale for a, b in zip(h["buckets"], buckets, strict=True)]
            continue
        found = _counter_labels(ev, opts)
        if found is not None:
            counts[series_key(*found)] += w
    return counts, hists


def apply(state: dict[str, Any], batch: RawBatch, opts: Options) -> Outcome:
    """Fold one batch into its host's state (mutated in place), unless it is a duplicate."""
    if not dedupe_core.first_time(state, batch):
        return Outcome(duplicate=True)
    return add(state, batch, opts)


def add(state: dict[str, Any], batch: RawBatch, opts: Options) -> Outcome:
    """Fold one batch known to be new into its host's state."""
    series = state.setdefault("series", {})
    out = Outcome()
    counts, hists = count_events(batch, opts)
    for key, n in counts.items():
        key = _admit(series, key, opts, out, n)
        series[key] = series.get(key, 0) + n
        out.counted += n
    for key, delta in hists.items():
        key = _admit(series, key, opts, out, delta["count"])
        h = series.get(key)
        if h is None:
            series[key] = delta
        else:
            h["count"] += delta["count"]
            h["sum"] += delta["sum"]
            h["buckets"] = [a + b for a, b in zip(h["buckets"], delta["buckets"], strict=True)]
        out.counted += delta["count"]
    return out


def _admit(series: dict[str, Any], key: str, opts: Options, out: Outcome, n: float) -> str:
    """The key to add to: ``key``, or its metric's overflow series past the cardinality limit."""
    if key in series or len(series) < opts.max_series:
        return key
    name, _ = parse_key(key)
    out.overflowed += n
    return series_key(name, OVERFLOW_LABELS)


def log2_bounds_seconds(slots: int) -> list[float]:
    """Explicit upper bounds of the kernel's log2 ns buckets, in seconds.

    Bucket i holds [2^i, 2^(i+1)) ns (bucket 0: [0, 2)); the last is unbounded.
    The wire's explicit buckets are upper-inclusive, so a value of exactly
    2^(i+1) ns lands one bucket lower than the kernel put it: negligible at
    nanosecond resolution.
    """
    return [2.0 ** (i + 1) / 1e9 for i in range(slots - 1)]


def snapshot(host_id: str, state: dict[str, Any]) -> list[list]:
    """The host's series as wire snapshot entries [name, type, labels, value]."""
    rows = []
    for key, value in state.get("series", {}).items():
        name, labels = parse_key(key)
        labels = {"host.id": host_id, **labels}
        if isinstance(value, dict):
            hist = {
                "count": round(value["count"]),
                "sum": value["sum"] / 1e9 if name.endswith("_seconds") else value["sum"],
                "bounds": log2_bounds_seconds(len(value["buckets"])),
                "counts": [round(c) for c in value["buckets"]],
            }
            rows.append([name, "histogram", labels, hist])
        else:
            rows.append([name, "counter", labels, value])
    return rows
