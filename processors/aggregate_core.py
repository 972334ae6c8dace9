"""Pure core of the aggregate stage: raw batches -> per-host cumulative series.

State per host (one JSON-able dict, stored as one Faust table value so that the
dedupe record and the counts change together in one changelog message)::

    {"seen": {boot_id: [[lo, hi], ...]},       # processors/dedupe_core.py guarding this stage
     "series": {series_key: cumulative_value}}

Which counter an event adds to is what its kind declares (``EventKind.metric``,
ktel/probes/): the counter's name and the fields its labels take their values
from. ``file_created`` is labelled by its directory instead (``directory_label``).

Counts are weighted: an event that stands for w events (sampled 1 in w, in the
kernel or by the sample stage) adds w, so counts stay unbiased.

A series key is ``json.dumps([name, sorted label items])``. The ``host.id``
label is added at snapshot time, not stored per series.

Cardinality: each host keeps at most ``max_series`` series; events that would
create more are counted in one overflow series per metric carrying the label
``otel.metric.overflow="true"``, as the OpenTelemetry metrics SDK does.

Kernel code's own metrics (``ktel_metric`` events of the ktel_api probe) become
series too: counters add their increments, gauges keep the last value (stored
as ``{"gauge": value}``), histogram observations fill log2 buckets like the
kernel's histograms (a name ending in ``_ns`` is exported as ``_seconds``).

``signals()`` turns kernel spans into span records and kernel logs and OOM kills
into log records, for ``ktel.spans`` and ``ktel.logs``.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.semconv._incubating.attributes.host_attributes import HOST_ID
from opentelemetry.semconv._incubating.attributes.process_attributes import (
    PROCESS_EXECUTABLE_NAME,
    PROCESS_PID,
)

from ktel.probes import KINDS
from ktel.schema import U64
from ktel.wire import (
    FILE_CREATED,
    HIST_SLOTS,
    HISTOGRAM_DELTA,
    KTEL_LOG,
    KTEL_METRIC,
    KTEL_SPAN,
    OOM_KILL,
    LogBatch,
    MetricSnapshot,
    RawBatch,
    SpanBatch,
)
from processors.stage import FromConfig, Result, Stage, State

if TYPE_CHECKING:
    from ktel.config import AggregateConfig

assert FILE_CREATED.metric is not None
FILE_CREATED_TOTAL = FILE_CREATED.metric.name
# kind id -> (counter name, ((label, index of its field in the event), ...)), as declared.
COUNTERS: dict[int, tuple[str, tuple[tuple[str, int], ...]]] = {
    k.id: (k.metric.name, tuple((label, k.index(field)) for label, field in k.metric.labels))
    for k in KINDS.values()
    if k.metric is not None
}
OVERFLOW_LABELS: tuple[tuple[str, str], ...] = (("otel.metric.overflow", "true"),)


@dataclasses.dataclass(frozen=True)
class Options(FromConfig):
    window_seconds: float = 10.0  # how often snapshots are emitted
    directory_depth: int = 3
    include_filename: bool = False
    max_series: int = 2000
    host_ttl_seconds: float = 3600.0  # see AggregateConfig.host_ttl_seconds


@dataclasses.dataclass
class Outcome:
    counted: float = 0
    overflowed: float = 0


class Aggregate(Stage):
    """The stage: each batch added to its host's series, its spans and logs passed
    on; every window, each host's snapshot."""

    name = "aggregate"
    counts_batches = True

    def __init__(self, opts: Options):
        super().__init__()
        self.opts = opts
        self.window_s = opts.window_seconds

    @classmethod
    def from_config(cls, section: AggregateConfig) -> Aggregate:
        return cls(Options.from_config(section))

    def on_batch(self, state: State, batch: RawBatch, now_ms: int) -> Result:
        state["last_ms"] = now_ms  # the worker's clock, as the window's now_ms: see on_window
        out = add(state, batch, self.opts)
        spans, logs = signals(batch)
        counts = {"events": out.counted, "overflowed": out.overflowed}
        return Result(batch, changed=True, spans=spans, logs=logs, counts=counts)

    def on_window(self, states: dict[str, State], now_ms: int, share: float) -> Result:
        """Each host's snapshot; a host silent for ``host_ttl_seconds`` (by the worker's
        clock, which also stamped its last batch) gets a last one, marked stale, and is
        forgotten, so dead and forged hosts stop costing a snapshot every window."""
        out = Result()
        ttl_ms = self.opts.host_ttl_seconds * 1000
        for host_id, state in states.items():
            rows = snapshot(host_id, state)
            expired = now_ms - state.get("last_ms", now_ms) > ttl_ms
            if rows:
                out.snapshots.append((host_id, MetricSnapshot(now_ms, rows, stale=expired)))
            if expired:
                out.forget.append(host_id)
        if out.forget:
            out.counts["expired_hosts"] = len(out.forget)
        return out


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
    counter = COUNTERS.get(kind)
    if counter is None:
        return None
    name, fields = counter
    return name, tuple((label, str(ev[i])) for label, i in fields)


def histogram_name(metric: str, unit: str) -> str:
    return f"{metric}_seconds" if unit == "ns" else f"{metric}_{unit}"


def log2_slot(value: int) -> int:
    """ktel_hist_slot() of bpf/ktel_hist.h: bucket i holds [2^i, 2^(i+1)), 0 and 1 in bucket 0."""
    return min(max(int(value).bit_length() - 1, 0), HIST_SLOTS - 1)


def _labels(labels: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


def count_events(
    batch: RawBatch, opts: Options
) -> tuple[dict[str, float], dict[str, dict[str, Any]], dict[str, float]]:
    """Counter increments, histogram deltas and gauge values of one batch (the
    stage's only per-event loop over every event).

    Counter increments are weighted (see the module doc). A histogram delta is
    scaled by the probe's in-kernel sampling and the event's weight. A gauge is
    a value, not a count: weights do not apply.
    """
    # Counter increments are summed per (name, labels) and made series keys (JSON) once
    # per batch, not per event: that key and the directory label were most of the
    # fused worker's CPU (bench/processing_throughput.py). First-seen order, which decides what
    # overflows, and the order of the additions are those of the events, as before.
    pending: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
    hists: dict[str, dict[str, Any]] = {}
    gauges: dict[str, float] = {}
    weights = batch.weights or [1] * len(batch.events)
    hid, mid, fid = HISTOGRAM_DELTA.id, KTEL_METRIC.id, FILE_CREATED.id
    # file_created is most of the traffic. Its directory label depends only on the path
    # up to its last "/" (see directory_label), so it is computed once per directory.
    dir_labels: dict[str, tuple[tuple[str, str], ...]] = {}
    depth, fast_files = opts.directory_depth, not opts.include_filename
    for ev, w in zip(batch.events, weights, strict=True):
        kind = ev[0]
        if kind == fid and fast_files:
            path = ev[6]
            head = path[: path.rfind("/") + 1]
            labels = dir_labels.get(head)
            if labels is None:
                labels = dir_labels[head] = (("directory", directory_label(path, depth)),)
            pending[FILE_CREATED_TOTAL, labels] += w
            continue
        if kind == hid:
            _ts, _start, metric, unit, labels, count, total, buckets, every = ev[1:]
            scale = w * every
            key = series_key(histogram_name(metric, unit), _labels(labels))
            h = hists.setdefault(key, {"count": 0.0, "sum": 0.0, "buckets": [0.0] * len(buckets)})
            h["count"] += count * scale
            h["sum"] += total * scale
            h["buckets"] = [a + b * scale for a, b in zip(h["buckets"], buckets, strict=True)]
            continue
        if kind == mid:
            _ts, _pid, mtype, name, labels, value = ev[1:]
            if mtype == "counter":
                pending[name, _labels(labels)] += value * w
            elif mtype == "gauge":
                gauges[series_key(name, _labels(labels))] = value  # the batch's last value wins
            else:
                if name.endswith("_ns"):
                    name = name[: -len("_ns")] + "_seconds"
                key = series_key(name, _labels(labels))
                h = hists.setdefault(key, {"count": 0.0, "sum": 0.0, "buckets": [0.0] * HIST_SLOTS})
                h["count"] += w
                h["sum"] += value * w
                h["buckets"][log2_slot(value)] += w
            continue
        found = _counter_labels(ev, opts)
        if found is not None:
            pending[found] += w
    counts = {series_key(name, labels): n for (name, labels), n in pending.items()}
    return counts, hists, gauges


def add(state: dict[str, Any], batch: RawBatch, opts: Options) -> Outcome:
    """Fold one batch known to be new into its host's state (mutated in place)."""
    series = state.setdefault("series", {})
    out = Outcome()
    counts, hists, gauges = count_events(batch, opts)
    for key, value in gauges.items():
        series[_admit(series, key, opts, out, 0)] = {"gauge": value}
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


def log2_bounds(slots: int, scale: float = 1.0) -> list[float]:
    """Explicit upper bounds of the kernel's log2 buckets, times ``scale``
    (1e-9: nanoseconds counted, seconds exported).

    Bucket i holds [2^i, 2^(i+1)) (bucket 0: [0, 2)); the last is unbounded.
    The wire's explicit buckets are upper-inclusive, so a value of exactly
    2^(i+1) lands one bucket lower than the kernel put it: negligible at
    nanosecond resolution.
    """
    return [2.0 ** (i + 1) * scale for i in range(slots - 1)]


def _count(n: float) -> int:
    """A histogram count as the wire carries it: weights and in-kernel sampling scale
    counts up, and a (hostile) product past 2^64 - 1 stays there rather than making a
    snapshot no one can encode."""
    return min(round(n), U64)


def snapshot(host_id: str, state: dict[str, Any]) -> list[list]:
    """The host's series as wire snapshot entries [name, type, labels, value]."""
    rows = []
    for key, value in state.get("series", {}).items():
        name, labels = parse_key(key)
        labels = {HOST_ID: host_id, **labels}
        if isinstance(value, dict) and "gauge" in value:
            rows.append([name, "gauge", labels, value["gauge"]])
        elif isinstance(value, dict):
            scale = 1e-9 if name.endswith("_seconds") else 1.0  # counted in ns (see count_events)
            hist = {
                "count": _count(value["count"]),
                "sum": value["sum"] * scale,
                "bounds": log2_bounds(len(value["buckets"]), scale),
                "counts": [_count(c) for c in value["buckets"]],
            }
            rows.append([name, "histogram", labels, hist])
        else:
            rows.append([name, "counter", labels, value])
    return rows


# OTLP SeverityText of each SeverityNumber range (1-4 TRACE ... 21-24 FATAL).
SEVERITY_TEXT = ("TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL")
SEVERITY_ERROR = 17


def severity_text(number: int) -> str:
    return SEVERITY_TEXT[min(max(number - 1, 0) // 4, 5)] if number > 0 else ""


def _resource(batch: RawBatch, pid: int | None) -> dict[str, Any]:
    """The host's resource attributes (from the enrich stage, else the host id alone),
    plus what is known of the process: never more than what was told."""
    res = dict(batch.resource or {HOST_ID: batch.host_id})
    if pid:
        res[PROCESS_PID] = pid
        res.update((batch.processes or {}).get(str(pid), {}))
    return res


def signals(batch: RawBatch) -> tuple[list[SpanBatch], list[LogBatch]]:
    """The batch's kernel spans as span records and its kernel logs and OOM kills as
    log records, one record per process (its resource) that has any.

    A kept event that stands for several (sampled) carries ``ktel.sample_weight``.
    """
    spans: dict[int, list[list]] = defaultdict(list)
    logs: dict[int | None, list[list]] = defaultdict(list)
    weights = batch.weights or [1] * len(batch.events)
    sid, lid, oid = KTEL_SPAN.id, KTEL_LOG.id, OOM_KILL.id
    for ev, w in zip(batch.events, weights, strict=True):
        kind = ev[0]
        if kind == sid:
            _ts, pid, _tid, trace_id, span_id, parent, name, start, end, status, attrs = ev[1:]
            attrs = {**attrs, "ktel.sample_weight": w} if w != 1 else attrs
            spans[pid].append([trace_id, span_id, parent, name, start, end, status, "", attrs])
        elif kind == lid:
            ts, pid, _tid, severity, message, attrs, trace_id, span_id = ev[1:]
            attrs = {**attrs, "ktel.sample_weight": w} if w != 1 else attrs
            logs[pid].append([ts, severity, severity_text(severity), message, attrs, trace_id, span_id])
        elif kind == oid:
            ts, pid, comm, uid, total_vm, anon, file, shmem, pgtables, adj, trigger_pid, trigger_comm = ev[1:]
            attrs = {
                "event.name": "oom_kill",
                PROCESS_PID: pid,
                PROCESS_EXECUTABLE_NAME: comm,
                "process.owner.uid": uid,
                "oom.total_vm_kb": total_vm,
                "oom.anon_rss_kb": anon,
                "oom.file_rss_kb": file,
                "oom.shmem_rss_kb": shmem,
                "oom.pgtables_kb": pgtables,
                "oom.score_adj": adj,
                "oom.trigger.pid": trigger_pid,
                "oom.trigger.executable.name": trigger_comm,
            }
            body = f"OOM killer killed process {pid} ({comm or '?'})"
            # Values a kernel did not give (None) stay out: unknown is not zero.
            row_attrs = {k: v for k, v in attrs.items() if v is not None and v != ""}
            logs[None].append([ts, SEVERITY_ERROR, "ERROR", body, row_attrs, b"", b""])
    return (
        [SpanBatch(_resource(batch, pid), rows) for pid, rows in spans.items()],
        [LogBatch(_resource(batch, pid), rows) for pid, rows in logs.items()],
    )
