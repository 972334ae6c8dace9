"""Pure core of the aggregate stage: raw batches -> per-host cumulative series.

State per host (one JSON-able dict in the host's Faust table value)::

    {"seen": {boot_id: [[lo, hi], ...]},       # processors/dedupe_core.py guarding this stage
     "series": {series_key: cumulative_value},
     "series_bytes": int}                      # what the series may take encoded, see below

A batch's changelog record carries the series it changed, not all of them
(processors/changelog.py).

Which counter an event adds to is what its kind declares (``EventKind.metric``,
ktel/probes/): the counter's name and the fields its labels take their values
from. ``file_created`` is labelled by its directory instead (``directory_label``).

Counts are weighted: an event that stands for w events (sampled 1 in w, in the
kernel or by the sample stage) adds w, so counts stay unbiased.

A series key is ``json.dumps([name, sorted label items])``. The ``host.id``
label is added at snapshot time, not stored per series.

Emission: each window, a host's snapshot holds only the series whose value changed
since this worker last emitted them, plus those due for a refresh every
``refresh_seconds`` (``Aggregate.on_window``), so the records, samples and backend
writes follow activity rather than every series ever seen.

A counter or histogram series the worker knows to be new is first emitted at zero
(``zero_of``), stamped 1 ms before the window's close, in a snapshot of its own just
before its host's (one host, one partition of ``ktel.metrics``: it is read first).
Prometheus' ``increase()`` and ``rate()`` count from a series' second sample, so a
series whose first sample is its first value is never counted: a host's first OOM kill,
a new directory's first files, a module's first error of a new label. From 0 they are
counted, as Prometheus advises counters to start. A gauge's value is no count: no zero.
A series is known new when the worker's memory of what it emitted of its host
(``Emitted``) is of the host's series map as it is (the same object: nothing recovered
since) and has no record of the series: a batch this worker counted made it since. A
host whose state had no series when a batch came (new to the fleet, or back after being
forgotten) has had none emitted since, by any worker, and its memory starts there,
empty. A state recovered from the changelog (a restart, a rebalance) gets no zeros: the
worker cannot tell which of its series a backend already has, and a zero after a value
would read as a counter reset (counted twice) or be refused as out of order
(remote-write's 400, the snapshot dead-lettered). So when a worker first emits a
recovered host, each of its series starts at its value, which ``increase()`` misses for
those made since the host's last window before. A batch replayed after a crash is dropped by the dedupe
guard when the recovered state counted it, and when not, adds to that state as any
batch does. A forgotten host's last snapshot is marked stale, which ends its series;
back, they start again at 0, after the stale marker (a backend refuses a sample at or
before it), whichever worker forgot the host: windows are due on the same instants on
every worker (multiples of the window since the epoch, processors/stages.py
``next_window``) and each is stamped when it runs, less than a window after it was due,
so a marker is at least 1 ms before the next deadline, and a zero 1 ms before a close
after it no earlier (the same instant only for a close a window less 1 ms late, then
the next on time to the millisecond with the host back between the two).

Cardinality: each host keeps at most ``max_series`` series, taking at most
``max_series_bytes`` JSON-encoded (half of ``process.max_state_bytes``, what a host
may hold). Events that would
create more are counted in one overflow series per metric carrying the label
``otel.metric.overflow="true"``, as the OpenTelemetry metrics SDK does; the
overflow series have the last eighth of the bytes to themselves, and events of a
metric whose overflow series finds no room either are counted as dropped
(``Result.counts["series_dropped_room"]``), as are, each under its reason
(``DROPPED``), events whose series already holds another type (a counter and a gauge
of one name and labels: see ``_fits``), kernel-code metric events with a value their
type cannot take (``count_events``), and events of a series whose name Prometheus
gives another type's series (a gauge ``x_count``: exporters/prom_names.py ``clash``),
or that has no name, or a name or label longer than a snapshot takes (``misnamed``), and
events that would take a histogram's count past the 2^64 - 1 a snapshot carries
(``_full``: it keeps the counts it had).
A series' bytes are reckoned when it is created, for the largest its numbers can grow
(``series_bytes``), so its counts growing never pushes the host past the bound.

Kernel code's own metrics (``ktel_metric`` events of the ktel_api probe) become
series too: counters add their increments, gauges keep the last value, histogram
observations fill log2 buckets like the kernel's histograms (a name ending in ``_ns``
is exported as ``_seconds``). A ``host.id`` label they give is dropped: every series
is labelled with its batch's host (and so is one that is ``host_id`` once sanitised).
So is a label Prometheus keeps for itself (a name starting with ``__``, ``le`` on a
histogram: exporters/prom_names.py ``reserved``), which the pull endpoint cannot serve
(``_kept``, also for series a state from before holds). A series of a name Prometheus
gives another type's series is not emitted either (``row_of``), for one a state from
before holds: every exporter would refuse it, at every refresh.

A gauge is stored as ``{"gauge": value, "at": [stream, seq]}``: the batch that set it,
its stream (boot and incarnation, processors/dedupe_core.py) as a CRC-32 and its
sequence number. A batch of the same stream numbered below it leaves the gauge as it
is: batches of a host come in order, but one refused and re-driven later (``ktel dlq
--redrive``) does not, and its older value must not stand in for the newer one until
the host reports again. Sequence numbers, not event times: a host's clock may step
back, its numbering does not. A batch of another stream sets it, as the last one taken.

``signals()`` turns kernel spans into span records and kernel logs and OOM kills
into log records, for ``ktel.spans`` and ``ktel.logs``: one record per process, with
its resource, for up to ``MAX_PROCESS_RECORDS`` processes of a batch; the rows of any
more go in the host's record, each naming its process.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence, Set
from typing import TYPE_CHECKING, Any

from opentelemetry.semconv._incubating.attributes.host_attributes import HOST_ID
from opentelemetry.semconv._incubating.attributes.process_attributes import (
    PROCESS_EXECUTABLE_NAME,
    PROCESS_PID,
)

from exporters.prom_names import HOST_LABEL, clash, label_name, reserved
from ktel.logs import Once
from ktel.probes import KINDS
from ktel.schema import U64, Str
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
    log2_bounds,
)
from ktel.wire.signals import LABELS as SERIES_LABELS
from ktel.wire.signals import NAME as SERIES_NAME
from processors.dedupe_core import stream
from processors.stage import FromConfig, Result, Stage, State, Touched

if TYPE_CHECKING:
    from ktel.config import AggregateConfig

assert FILE_CREATED.metric is not None
FILE_CREATED_TOTAL = FILE_CREATED.metric.name
# The longest label value a snapshot takes (ktel/wire/signals.py).
assert isinstance(SERIES_LABELS.value, Str)
LABEL_CHARS = SERIES_LABELS.value.max_len
# kind id -> (counter name, ((label, index of its field in the event), ...)), as declared.
COUNTERS: dict[int, tuple[str, tuple[tuple[str, int], ...]]] = {
    k.id: (k.metric.name, tuple((label, k.index(field)) for label, field in k.metric.labels))
    for k in KINDS.values()
    if k.metric is not None
}
OVERFLOW_LABELS: tuple[tuple[str, str], ...] = (("otel.metric.overflow", "true"),)
# Why events are counted in no series (Outcome.dropped): the reason label of
# ktel_processor_series_dropped_total, and what it means.
DROPPED = {
    "room": "a new series with no room left even in its metric's overflow series",
    "type": "a series that already holds another type",
    "value": "kernel code's own metric with a value its type cannot take (a negative counter increment "
    "or histogram observation)",
    "name": "a series named as Prometheus names another type's series (a gauge *_count or *_total), "
    "of no name, or of a name or label longer than a snapshot takes",
    "full": "a histogram's events past the 2^64 - 1 its count holds (it keeps the counts it had, so "
    "that no bucket's count falls)",
}
# Names whose events were dropped for their name, each logged once (up to a bound: a
# writer of the raw topic may send ever new names).
_warned = Once()

log = logging.getLogger("ktel.process")


@dataclasses.dataclass(frozen=True)
class Options(FromConfig):
    window_seconds: float = 10.0  # how often snapshots are emitted
    refresh_seconds: float = 120.0  # see AggregateConfig.refresh_seconds
    directory_depth: int = 3
    include_filename: bool = False
    max_series: int = 2000
    max_series_bytes: int = 450_000  # half of ProcessConfig.max_state_bytes (see processors/chain.py)
    host_ttl_seconds: float = 3600.0  # see AggregateConfig.host_ttl_seconds


@dataclasses.dataclass
class Outcome:
    counted: float = 0
    overflowed: float = 0
    # Events counted in no series, by why (DROPPED).
    dropped: dict[str, float] = dataclasses.field(default_factory=lambda: defaultdict(float))
    touched: Touched = dataclasses.field(default_factory=Touched)  # the series it changed


@dataclasses.dataclass
class Emitted:
    """What this worker last emitted of one host."""

    due_ms: float  # when its first unchanged series is due for a refresh (or earlier)
    series: dict[str, tuple[Any, int]]  # series key -> (fingerprint of the value emitted, when)
    # The host's series map these were of: one recovered from the changelog since (a
    # rebalance) is another object, and it is looked at whole again.
    of: dict[str, Any]


class Aggregate(Stage):
    """The stage: each batch added to its host's series, its spans and logs passed
    on; every window, each host's series that changed (see ``on_window``)."""

    name = "aggregate"
    counts_batches = True

    def __init__(self, opts: Options):
        super().__init__()
        self.opts = opts
        self.window_s = opts.window_seconds
        # The worker's memory, not the table: rebuilt by a full snapshot after a restart
        # or a rebalance, which is what a new owner of a host must send anyway.
        self.emitted: dict[str, Emitted] = {}
        # Hosts with a batch counted since the last window: the series the batches changed.
        self.counted: dict[str, set[str]] = {}

    @classmethod
    def from_config(cls, section: AggregateConfig, max_state_bytes: int) -> Aggregate:
        return cls(dataclasses.replace(Options.from_config(section), max_series_bytes=max_state_bytes // 2))

    def on_batch(self, state: State, batch: RawBatch, now_ms: int) -> Result:
        state["last_ms"] = now_ms  # the worker's clock, as the window's now_ms: see on_window
        fresh = not state.get("series")
        out = add(state, batch, self.opts)
        if fresh:
            # A host with no series has had none emitted since it was last forgotten, by
            # this worker or any other (a series stays in its host's state until then):
            # what this worker emitted of this map is nothing, so each series it makes is
            # new and starts at zero (see the module doc). (A record refused after all has
            # the series it made taken out of this map again, changelog.restored, or the
            # host's value dropped, and this with it at the next window.)
            self.emitted[batch.host_id] = Emitted(math.inf, {}, state["series"])
        self.counted.setdefault(batch.host_id, set()).update(path[-1] for path in out.touched)
        spans, logs = signals(batch)
        counts = {"events": out.counted, "overflowed": out.overflowed}
        counts.update((f"series_dropped_{why}", n) for why, n in out.dropped.items() if n)
        return Result(batch, changed=True, touched=out.touched, spans=spans, logs=logs, counts=counts)

    def on_window(
        self, states: dict[str, State], now_ms: int, share: float, reading: Set[str] = frozenset()
    ) -> Result:
        """Each host's snapshot of the series whose value changed since this worker last
        emitted them, and of those it last emitted ``refresh_seconds`` ago or more, so
        that Prometheus does not mark them stale (after 5 minutes without a sample).
        Values are cumulative, so a series left out of a window loses nothing. A host with
        no batch since the previous window and no refresh due costs no snapshot at all.

        A counter or histogram series this worker knows to be new is first emitted at
        zero (``zero_of``), stamped 1 ms before ``now_ms``, in a snapshot of its own just
        before its host's (see the module doc).

        A host silent for ``host_ttl_seconds`` (by the worker's clock, which also stamped
        its last batch) gets a last snapshot of all its series, marked stale, and is
        forgotten, so dead and forged hosts stop costing anything; unless it is one of
        ``reading``: a worker that took the host's partition after an outage longer than
        the TTL finds every host's last batch older than that, the live ones' since
        batches still unread, and forgetting them would also forget which batches were
        counted, so those read again (from the last committed offset) would count twice."""
        out = Result()
        ttl_ms = self.opts.host_ttl_seconds * 1000
        for gone in self.emitted.keys() - states.keys():  # forgotten, or another worker's now
            del self.emitted[gone]
        unchanged = 0
        for host_id, state in states.items():
            if now_ms - state.get("last_ms", now_ms) > ttl_ms and host_id not in reading:
                rows = snapshot(host_id, state)
                if rows:
                    out.snapshots.append((host_id, MetricSnapshot(now_ms, rows, stale=True)))
                out.forget.append(host_id)
                self.emitted.pop(host_id, None)
                continue
            rows, zeros, skipped = self._changed(host_id, state, now_ms)
            unchanged += skipped
            if zeros:
                # Just before the values: a backend needs the 0 first, and the values'
                # time is also when the zeros were made (their ingestion latency, M2).
                out.snapshots.append((host_id, MetricSnapshot(now_ms - 1, zeros)))
            if rows:
                out.snapshots.append((host_id, MetricSnapshot(now_ms, rows)))
        self.counted.clear()
        if unchanged:
            out.counts["unchanged_series"] = unchanged
        return out

    def forget(self, host_id: str) -> Result:
        """Its memory of what it emitted of the host goes (so does the host's, at the next
        window, once its state is gone): also asked of a host still held whose window's
        snapshot the worker did not send after all (a rebalance came first), so that its
        next window emits it whole, as after a rebalance, rather than leave out as
        unchanged the series that snapshot carried."""
        self.emitted.pop(host_id, None)
        return Result()

    def _changed(self, host_id: str, state: State, now_ms: int) -> tuple[list[list], list[list], int]:
        """The host's rows to emit now, those of the new series among them at zero, and
        how many series were left out as unchanged."""
        seen = self.emitted.get(host_id)
        mine = state.get("series", {})
        refresh_ms = self.opts.refresh_seconds * 1000
        zeros: list[list] = []
        if seen is not None and seen.of is mine and now_ms < seen.due_ms:
            # No refresh due: only the series counted since can have changed. (A window
            # over every series of every counted host cost most of the window.)
            rows = []
            for key in self.counted.get(host_id, ()):
                value = mine.get(key)
                if value is None:
                    continue  # (its record refused after all, and the series with it)
                now = fingerprint(value)
                before = seen.series.get(key)
                if (before is None or before[0] != now) and (row := row_of(host_id, key, value)):
                    rows.append(row)
                    seen.series[key] = (now, now_ms)
                    if before is None and (zero := zero_of(row)) is not None:
                        zeros.append(zero)  # (made in this map since this worker last looked)
            if rows:
                # (its first series, when the host had none: then nothing was due at all)
                seen.due_ms = min(seen.due_ms, now_ms + refresh_ms)
            return rows, zeros, len(mine) - len(rows)
        # A map this worker emitted before (a refresh due) holds as new what it has no
        # record of; any other (recovered: a restart, a rebalance) may have been emitted
        # by another worker, or before the restart, and its series are not known new.
        known = seen is not None and seen.of is mine
        last = seen.series if seen is not None else {}
        rows, series, due_ms = [], {}, math.inf
        for key, value in mine.items():
            # (a series' row is built only to be emitted: most of a host's are unchanged)
            now = fingerprint(value)
            before = last.get(key)
            if before is None or before[0] != now or now_ms - before[1] >= refresh_ms:
                if row := row_of(host_id, key, value):
                    rows.append(row)
                    if before is None and known and (zero := zero_of(row)) is not None:
                        zeros.append(zero)
                before = (now, now_ms)
            series[key] = before
            due_ms = min(due_ms, before[1] + refresh_ms)
        self.emitted[host_id] = Emitted(due_ms, series, mine)
        return rows, zeros, len(series) - len(rows)


def directory_label(path: str, depth: int) -> str:
    """The first ``depth`` components of the file's directory: a bounded label."""
    if not path.startswith("/"):
        # Relative and unresolved (the process was gone): keep it coarse.
        return path.split("/", 1)[0] if "/" in path else "."
    parts = [p for p in path.split("/")[:-1] if p][:depth]
    return "/" + "/".join(parts)


# Series keys are made for every event and parsed for every series a window emits,
# and a host's keys (and many a fleet's hosts share) recur: both ways are cached,
# bounded (bench/RESULTS.md, "The chain's own work per batch"). A key of more characters
# than this is neither (its series' are made and read each time): a writer naming ever
# new ones of up to 64 KB each (directories of 16,384 characters, 4 bytes each) filled
# the caches with gigabytes. Keys are far shorter (a directory three levels down).
CACHED_KEY_CHARS = 512


def series_key(name: str, labels: tuple[tuple[str, str], ...]) -> str:
    n = len(name)
    for _label, value in labels:
        n += len(value)
    return _series_key(name, labels) if n <= CACHED_KEY_CHARS else _key(name, labels)


def _key(name: str, labels: tuple[tuple[str, str], ...]) -> str:
    return json.dumps([name, labels])


_series_key = functools.lru_cache(maxsize=16384)(_key)


def parsed_key(key: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A series key's name and labels."""
    return _parsed_key(key) if len(key) <= CACHED_KEY_CHARS else _parse(key)


def _parse(key: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    name, labels = json.loads(key)
    return name, tuple((k, v) for k, v in labels)


_parsed_key = functools.lru_cache(maxsize=16384)(_parse)


def parse_key(key: str) -> tuple[str, dict[str, str]]:
    name, labels = parsed_key(key)
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


def _labels(labels: dict[str, Any], typ: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, str(v)) for k, v in labels.items() if _kept(k, typ)))


# Label names repeat in every event and every window's rows: decided once per name and type.
@functools.lru_cache(maxsize=4096)
def _kept(label: str, typ: str) -> bool:
    """Whether a series of type ``typ`` keeps a label of this name that kernel code (or a
    probe) gave. host.id is the host whose batch it is, which ktel sets on every series
    (row_of): one given (or one that is ``host_id`` once sanitised, as ``host-id``) would
    make the series another host's, and its host's snapshot records a forgery every
    exporter refuses (ktel/wire/signals.py check_keyed), or would be one Prometheus series
    with the host's own. A label Prometheus keeps for itself (exporters/prom_names.py
    ``reserved``) is one the pull endpoint cannot serve, and one of no name one for which
    the remote-write exporter refuses the whole snapshot holding it (``unnamed``)."""
    return label != "" and label_name(label) != HOST_LABEL and not reserved(label, typ)


def count_events(
    batch: RawBatch, opts: Options
) -> tuple[dict[str, float], dict[str, dict[str, Any]], dict[str, list[float]], float]:
    """Counter increments, histogram deltas and gauge values (each [value, events]) of
    one batch (the stage's only per-event loop over every event), and the (weighted)
    events of kernel code's own metrics with a value their type cannot take: a negative
    counter increment (a cumulative counter only goes up: Prometheus would read the fall
    as a restart, and OTLP's monotonic sums must not fall) or histogram observation (the
    log2 buckets start at 0). Such an event is a sender's error: dropped and counted,
    not made a wrong series.

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
    gauges: dict[str, list[float]] = {}
    invalid = 0.0
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
            key = series_key(histogram_name(metric, unit), _labels(labels, "histogram"))
            h = hists.setdefault(key, {"count": 0.0, "sum": 0.0, "buckets": [0.0] * len(buckets)})
            h["count"] += count * scale
            h["sum"] += total * scale
            h["buckets"] = [a + b * scale for a, b in zip(h["buckets"], buckets, strict=True)]
            continue
        if kind == mid:
            _ts, _pid, mtype, name, labels, value = ev[1:]
            if mtype == "gauge":
                gauge = gauges.setdefault(series_key(name, _labels(labels, "gauge")), [0, 0])
                gauge[0] = value  # the batch's last value wins
                gauge[1] += 1
            elif value < 0:
                invalid += w
            elif mtype == "counter":
                pending[name, _labels(labels, "counter")] += value * w
            else:
                if name.endswith("_ns"):
                    name = name[: -len("_ns")] + "_seconds"
                key = series_key(name, _labels(labels, "histogram"))
                h = hists.setdefault(key, {"count": 0.0, "sum": 0.0, "buckets": [0.0] * HIST_SLOTS})
                h["count"] += w
                h["sum"] += value * w
                h["buckets"][log2_slot(value)] += w
            continue
        found = _counter_labels(ev, opts)
        if found is not None:
            pending[found] += w
    counts = {series_key(name, labels): n for (name, labels), n in pending.items()}
    return counts, hists, gauges, invalid


def add(state: dict[str, Any], batch: RawBatch, opts: Options) -> Outcome:
    """Fold one batch known to be new into its host's state (mutated in place)."""
    series = state.setdefault("series", {})
    if "series_bytes" not in state:  # a state from before the byte bound
        state["series_bytes"] = sum(series_bytes(k, _numbers(v)) for k, v in series.items())
    out = Outcome()
    counts, hists, gauges, out.dropped["value"] = count_events(batch, opts)
    if gauges:
        at = [zlib.crc32(stream(batch).encode()), batch.seq]
    for key, (value, events) in gauges.items():
        if (key := _place(state, key, "gauge", 0, events, opts, out)) and not _later(series.get(key), at):
            series[key] = {"gauge": value, "at": at}
    for key, n in counts.items():
        if key := _place(state, key, "counter", 0, n, opts, out):
            series[key] = series.get(key, 0) + n
            out.counted += n
    for key, delta in hists.items():
        if _full(delta["buckets"]):  # (whatever it is added to: no series made for it)
            out.dropped["full"] += delta["count"]
            continue
        if not (key := _place(state, key, "histogram", len(delta["buckets"]), delta["count"], opts, out)):
            continue
        h = series.get(key)
        if h is None:
            series[key] = delta
        else:
            buckets = [a + b for a, b in zip(h["buckets"], delta["buckets"], strict=True)]
            if _full(buckets):
                out.dropped["full"] += delta["count"]
                continue
            h["count"] += delta["count"]
            h["sum"] += delta["sum"]
            h["buckets"] = buckets
        out.counted += delta["count"]
    return out


def _later(gauge: dict[str, Any] | None, at: list[int]) -> bool:
    """Whether ``gauge`` was set by a later batch of the stream ``at`` names (see the
    module doc)."""
    held = gauge.get("at") if gauge is not None else None  # (none: set before "at" was kept)
    return held is not None and held[0] == at[0] and held[1] > at[1]


def _place(
    state: dict[str, Any], key: str, kind: str, buckets: int, n: float, opts: Options, out: Outcome
) -> str:
    """The series a ``kind`` update of ``n`` events to ``key`` goes to (``_admit``), its
    old value noted in ``out.touched``; "" when there is none, it holds another type
    (``_fits``), or Prometheus names another type's series as it is named (``clash``:
    one kind's series must not write into another's, and which is refused must not
    depend on which came first, nor on which worker holds which host), the events
    counted as dropped."""
    name, labels = parsed_key(key)
    why = misnamed(name, labels, kind)
    if why is not None:
        out.dropped["name"] += n
        if _warned((name, kind)):
            log.warning(
                "aggregate: the events of the %s %.100r are dropped, counted in "
                'ktel_processor_series_dropped_total{reason="name"}: %s',
                kind,
                name,
                why,
            )
        return ""
    key = _admit(state, key, NUMBERS.get(kind, 2 + buckets), opts, out, n)
    if not key:
        return ""
    series = state["series"]
    if not _fits(series.get(key), kind, buckets):
        out.dropped["type"] += n
        return ""
    out.touched.touch(series, ("series", key))
    return key


def misnamed(name: str, labels: Sequence[tuple[str, str]], kind: str) -> str | None:
    """Why exporters refuse a series of this name, labels and type (None: they do not):
    one Prometheus gives another type's series (``clash``); or no name at all, for which
    the remote-write exporter refuses the whole snapshot holding it (exporters/prom_names.py
    ``unnamed``), or a name or a label value longer than a snapshot takes (a directory
    label of a forged path, kernel code's name made ``_seconds``), for which every
    exporter does: every series of its host, at every window that emits it."""
    if not name:
        return "a series of no name"
    if len(name) > SERIES_NAME.max_len:
        return f"a name of {len(name)} characters, past the {SERIES_NAME.max_len} a snapshot takes"
    for label, value in labels:
        if len(value) > LABEL_CHARS:
            return (
                f"a label {label!r:.60} of {len(value)} characters, past the {LABEL_CHARS} a snapshot takes"
            )
    return clash(name, kind)


def _fits(value: Any, kind: str, buckets: int) -> bool:
    """Whether a series holding ``value`` (None: new) takes a ``kind`` update: one name
    and labels sent as a counter by one event and a gauge or a histogram (of another
    bucket count) by another is a sender's error, whose events are counted as dropped
    rather than mixed into, or crashing on, the series already there."""
    if value is None:
        return True
    if isinstance(value, dict) and "gauge" in value:
        return kind == "gauge"
    if isinstance(value, dict):
        return kind == "histogram" and len(value["buckets"]) == buckets
    return kind == "counter"


# The longest a number of a series gets in JSON: a float's repr is at most 24
# characters, and an integer count (events times integer weights) stays below 10^31.
NUMBER_CHARS = 32
# Quotes, colon, comma and a histogram's or gauge's field names around the numbers.
SERIES_OVERHEAD = 48


def series_bytes(key: str, numbers: int) -> int:
    """The most a series of ``numbers`` numbers can take in its host's encoded state."""
    return len(json.dumps(key)) + SERIES_OVERHEAD + numbers * (NUMBER_CHARS + 1)


# The numbers a series of each kind stores; a histogram: its count, sum and buckets.
NUMBERS = {"counter": 1, "gauge": 3}  # (a gauge: its value, and the stream and seq that set it)


def _numbers(value: Any) -> int:
    if isinstance(value, dict) and "buckets" in value:
        return 2 + len(value["buckets"])
    return NUMBERS["gauge"] if isinstance(value, dict) else NUMBERS["counter"]


def _admit(state: dict[str, Any], key: str, numbers: int, opts: Options, out: Outcome, n: float) -> str:
    """The key to add to: ``key``; past the bounds its metric's overflow series; or ""
    when even that has no room (the events are counted as dropped)."""
    series = state["series"]
    if key in series:
        return key
    # Ordinary series stop an eighth short of the bytes, which is the overflow series' room.
    room = opts.max_series_bytes - opts.max_series_bytes // 8 - state["series_bytes"]
    size = series_bytes(key, numbers)
    if len(series) < opts.max_series and size <= room:
        state["series_bytes"] += size
        return key
    name, _ = parse_key(key)
    overflow = series_key(name, OVERFLOW_LABELS)
    if overflow not in series:
        size = series_bytes(overflow, numbers)
        if state["series_bytes"] + size > opts.max_series_bytes:
            out.dropped["room"] += n
            return ""
        state["series_bytes"] += size
    out.overflowed += n
    return overflow


def _full(buckets: list[float]) -> bool:
    """Whether a histogram of these buckets is past the count a snapshot carries, 2^64 - 1,
    its buckets rounded as ``_counts`` rounds them. ``add`` adds no delta that would make
    it so: the buckets' counts are cumulative, and capped at emission (``_counts``) one
    would fall as an earlier one grew into its share, which Prometheus and OTLP read as a
    reset."""
    return sum(round(c) for c in buckets) > U64


def _counts(buckets: list[float]) -> list[int]:
    """A histogram's bucket counts as the wire carries them: each rounded (weights and
    in-kernel sampling scale counts up by fractions), and together, being its count, at
    most 2^64 - 1: a (hostile) state past it (recovered, or kept by a ktel that added
    past it, ``_full``) stays there rather than making a snapshot no one can encode."""
    counts, left = [], U64
    for c in buckets:
        n = min(round(c), left)
        counts.append(n)
        left -= n
    return counts


def snapshot(host_id: str, state: dict[str, Any]) -> list[list]:
    """All the host's series as wire snapshot entries [name, type, labels, value]."""
    return [row for _, row in keyed_rows(host_id, state)]


def keyed_rows(host_id: str, state: dict[str, Any]) -> Iterator[tuple[str, list]]:
    """Each of the host's series emitted (``row_of``): its key and its snapshot entry."""
    for key, value in state.get("series", {}).items():
        row = row_of(host_id, key, value)
        if row is not None:
            yield key, row


def row_of(host_id: str, key: str, value: Any) -> list | None:
    """The snapshot entry [name, type, labels, value] of the host's series ``key``; None
    for one of a name Prometheus gives another type's series (``clash``), which only a
    state from before ``_place`` refused them holds."""
    name, pairs = parsed_key(key)
    typ = ("gauge" if "gauge" in value else "histogram") if isinstance(value, dict) else "counter"
    if misnamed(name, pairs, typ) is not None:
        return None
    # (_kept again: a series kept before _labels dropped such a label)
    labels = {k: v for k, v in pairs if _kept(k, typ)}
    labels[HOST_ID] = host_id
    if typ == "gauge":
        return [name, "gauge", labels, value["gauge"]]
    if typ == "histogram":
        scale = 1e-9 if name.endswith("_seconds") else 1.0  # counted in ns (see count_events)
        counts = _counts(value["buckets"])
        hist = {
            # What its buckets add up to, each rounded: the wire takes no other count
            # (ktel/wire/signals.py).
            "count": sum(counts),
            "sum": value["sum"] * scale,
            "bounds": log2_bounds(len(value["buckets"]), scale),
            "counts": counts,
        }
        return [name, "histogram", labels, hist]
    return [name, "counter", labels, value]


def usable(key: str, value: Any) -> bool:
    """Whether a series read back from the changelog (``changelog.fold``) has what every
    window reads of it (``fingerprint``, ``row_of``): a key of a name and labels, and a
    counter's finite number, a gauge's, or a histogram's finite count, sum and (at most
    ``HIST_SLOTS``) buckets. A series that fails one would fail every window of its host,
    after every restart too, as the worker recovers the same value."""
    try:
        name, labels = parsed_key(key)
    except (ValueError, TypeError, RecursionError):
        return False
    if not isinstance(name, str) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels):
        return False
    if not isinstance(value, dict):
        return finite(value)
    if "gauge" in value:
        return finite(value["gauge"])
    buckets = value.get("buckets")
    return (
        finite(value.get("count"))
        and finite(value.get("sum"))
        and isinstance(buckets, list)
        and 0 < len(buckets) <= HIST_SLOTS
        and all(finite(b) for b in buckets)
    )


def finite(number: Any) -> bool:
    """A number a snapshot carries: a float that is one, or an integer msgpack takes."""
    if isinstance(number, float):
        return math.isfinite(number)
    return isinstance(number, int) and not isinstance(number, bool) and -(2**63) <= number <= U64


def zero_of(row: list) -> list | None:
    """The snapshot entry of ``row``'s series as it was before its first event: a
    counter at 0 (of its value's type), a histogram of the same bounds with its count,
    sum and every bucket 0; None for a gauge, whose value is no count (0 would be a value
    it never had)."""
    name, typ, labels, value = row
    if typ == "counter":
        return [name, typ, labels, 0.0 if isinstance(value, float) else 0]
    if typ == "histogram":
        return [
            name,
            typ,
            labels,
            {"count": 0, "sum": 0.0, "bounds": value["bounds"], "counts": [0] * len(value["counts"])},
        ]
    return None


def fingerprint(value: Any) -> Any:
    """What of a series' stored value its snapshot entry shows: equal fingerprints, an
    equal entry."""
    if isinstance(value, dict) and "gauge" in value:
        return value["gauge"]
    if isinstance(value, dict):
        return value["count"], value["sum"], tuple(value["buckets"])
    return value


# OTLP SeverityText of each SeverityNumber range (1-4 TRACE ... 21-24 FATAL).
SEVERITY_TEXT = ("TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL")
SEVERITY_ERROR = 17


def severity_text(number: int) -> str:
    return SEVERITY_TEXT[min(max(number - 1, 0) // 4, 5)] if number > 0 else ""


def _resource(batch: RawBatch, pid: int | None) -> dict[str, Any]:
    """The host's resource attributes (from the enrich stage, else the host id alone),
    plus what is known of the process: never more than what was told."""
    res = dict(batch.resource or {})
    if pid:
        res[PROCESS_PID] = pid
        res.update((batch.processes or {}).get(str(pid), {}))
    res[HOST_ID] = batch.host_id  # (last: the record is this host's, check_keyed in ktel/wire/signals.py)
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
    _fold(spans, SPAN_ATTRS, batch.processes or {})
    _fold(logs, LOG_ATTRS, batch.processes or {})
    return (
        [SpanBatch(_resource(batch, pid), rows) for pid, rows in spans.items()],
        [LogBatch(_resource(batch, pid), rows) for pid, rows in logs.items()],
    )


# The processes of one batch that get a span or log record of their own, with their
# resource: the host's (up to 32 attributes of 1,024 characters) and the process's. The
# others' rows go in the host's record (pid None), each naming its process in its own
# attributes: a batch of logs of 100,000 pids, 363 KB of zstd, made as many records of
# the host's resource each, 3.9 GB.
MAX_PROCESS_RECORDS = 256
SPAN_ATTRS, LOG_ATTRS = 8, 4  # where a span's and a log row's attributes are


def _fold(by_pid: dict[Any, list[list]], attrs_at: int, processes: dict[str, dict[str, Any]]) -> None:
    """Fold the rows of the processes past the first ``MAX_PROCESS_RECORDS`` of
    ``by_pid`` into its host record (None), each with ``process.pid`` and what is known
    of its process (``processes``, from the enrich stage) among its attributes."""
    if len(by_pid) <= MAX_PROCESS_RECORDS:
        return
    own = set([pid for pid in by_pid if pid][:MAX_PROCESS_RECORDS])
    host = by_pid.setdefault(None, [])
    for pid in [pid for pid in by_pid if pid and pid not in own]:
        known = {**processes.get(str(pid), {}), PROCESS_PID: pid}
        for row in by_pid.pop(pid):
            row[attrs_at] = {**row[attrs_at], **known}
            host.append(row)
