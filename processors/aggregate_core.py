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
from typing import Any

from ktel.wire import FILE_CREATED, RawBatch
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


def count_events(batch: RawBatch, opts: Options) -> dict[str, float]:
    """Series increments for one batch (the only per-event loop of the stage)."""
    counts: dict[str, float] = defaultdict(float)
    depth = opts.directory_depth
    fid = FILE_CREATED.id
    weights = batch.weights or [1] * len(batch.events)
    for ev, w in zip(batch.events, weights, strict=True):
        if ev[0] != fid:
            continue
        path = ev[6]
        labels: tuple[tuple[str, str], ...] = (("directory", directory_label(path, depth)),)
        if opts.include_filename:
            labels += (("file", path.rsplit("/", 1)[-1]),)
        counts[series_key(FILE_CREATED_TOTAL, labels)] += w
    return counts


def apply(state: dict[str, Any], batch: RawBatch, opts: Options) -> Outcome:
    """Fold one batch into its host's state (mutated in place), unless it is a duplicate."""
    if not dedupe_core.first_time(state, batch):
        return Outcome(duplicate=True)
    return add(state, batch, opts)


def add(state: dict[str, Any], batch: RawBatch, opts: Options) -> Outcome:
    """Fold one batch known to be new into its host's state."""
    series = state.setdefault("series", {})
    out = Outcome()
    for key, n in count_events(batch, opts).items():
        if key not in series and len(series) >= opts.max_series:
            name, _ = parse_key(key)
            key = series_key(name, OVERFLOW_LABELS)
            out.overflowed += n
        series[key] = series.get(key, 0) + n
        out.counted += n
    return out


def snapshot(host_id: str, state: dict[str, Any]) -> list[list]:
    """The host's series as wire snapshot entries [name, type, labels, value]."""
    rows = []
    for key, value in state.get("series", {}).items():
        name, labels = parse_key(key)
        rows.append([name, "counter", {"host.id": host_id, **labels}, value])
    return rows
