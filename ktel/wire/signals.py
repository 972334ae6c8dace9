"""Output signals: metric snapshots (``ktel.metrics``), kernel spans (``ktel.spans``) and
kernel logs (``ktel.logs``), made by the aggregate stage; key = host id.

Metric snapshot::

    {"v": 1,
     "ts": int,          # sample timestamp, ms since epoch
     "series": [[name, type, {label: value}, value], ...],
     "stale": true}      # optional: these series end here (their host went silent);
                         # exporters send Prometheus stale markers, the pull endpoint
                         # drops them

``type`` is ``"counter"`` (cumulative since the series began; value a number),
``"gauge"`` (value a number) or ``"histogram"`` (cumulative since the series
began; value ``{"count": int, "sum": float, "bounds": [float, ...],
"counts": [int, ...]}`` with ``len(counts) == len(bounds) + 1``: bucket i counts
values in ``(bounds[i-1], bounds[i]]``, the last bucket is ``(bounds[-1], +inf)``,
the layout of an OTLP explicit-bucket histogram; ``count == sum(counts)``).

Label names follow OpenTelemetry semantic conventions (``host.id``,
``process.pid``, ...); the Prometheus exporters translate them.

Span batch::

    {"v": 1,
     "resource": {attr: value},    # host.id, host.name, ... (OTel resource)
     "spans": [[trace_id,          # 16 bytes
                span_id,           # 8 bytes
                parent_span_id,    # 8 bytes, or b"" for a root span
                name, start_ns, end_ns,   # wall clock, ns since epoch
                status,            # 0 unset, 1 ok, 2 error (OTLP StatusCode)
                status_message, {attr: value}], ...]}

Log batch::

    {"v": 1,
     "resource": {attr: value},
     "logs": [[ts_ns,              # wall clock, ns since epoch
               severity_number,    # OTLP SeverityNumber, 0..24
               severity_text, body, {attr: value},
               trace_id,           # 16 bytes or b""
               span_id], ...]}     # 8 bytes or b""
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from opentelemetry.semconv._incubating.attributes.host_attributes import HOST_ID

from ktel.schema import (
    ATTR_VALUE,
    TS_NS,
    U63,
    U64,
    Bool,
    Bytes,
    Field,
    Float,
    Int,
    Key,
    ListOf,
    MapOf,
    Row,
    Shape,
    Str,
    Type,
    show,
)
from ktel.wire.codec import SEND_MAX_BYTES, WireError, pack, unpack

# Rows per record at most: the aggregate's series per host (aggregate max_series) and
# a batch's spans and logs fit well below.
MAX_ROWS = 100_000
ATTRS = MapOf(ATTR_VALUE, 128)
LABELS = MapOf(Str(4096), 64)
NAME = Str(256)
COUNT = Int(0, U64)
# Histogram buckets: the kernel's log2 histograms have 40.
HISTOGRAM = Shape(
    (
        Key("count", COUNT),
        Key("sum", Float()),
        Key("bounds", ListOf(Float(), 256)),
        Key("counts", ListOf(COUNT, 257)),
    )
)
HISTOGRAM_KEYS = tuple(k.name for k in HISTOGRAM.keys)


# What a sample adds to its series' name and labels wherever a Prometheus exporter
# writes it, about: a remote-write Sample is 19 bytes and its framing a few more; a
# scrape's text line has the value, braces, quotes and separators.
SAMPLE_BYTES = 32
# The most a snapshot's series may take as Prometheus samples (``prometheus_size``): a
# classic histogram repeats its series' name and labels in each bucket, its sum and its
# count, so a record of 771 KB (3 histograms of 257 buckets, 64 labels of 4,000
# characters) made 200 MB of series, 600 MB of an exporter's memory to encode or serve.
# The aggregate's snapshot of a host holds at most the series' half of
# process.max_state_bytes (at most 990,000) of names and labels, which a histogram's 40
# buckets, sum and count repeat 42 times: with the record itself, at most about 22 MB
# (tests/unit/test_untrusted_snapshots.py measures it at that bound, with the longest
# labels a probe or kernel code gives). Receivers take requests of that order:
# VictoriaMetrics at most 32 MiB by default (-maxInsertRequestSize).
MAX_PROMETHEUS_BYTES = 32 << 20


def _increasing(bounds: list[float]) -> bool:
    """Whether each bucket bound is above the one before (a scrape, and a backend, refuse
    buckets out of order), as the doubles every exporter sends: two integers apart (the
    wire takes a bound as an int too) may be one double, 2^53 and 2^53 + 1, which made
    two buckets of one ``le`` in a scrape and OTLP bounds that do not increase."""
    return all(float(a) < float(b) for a, b in zip(bounds, bounds[1:]))  # noqa: B905 (one shorter by design)


class _SeriesValue(Type):
    """A series' value: a finite number (a counter's not below zero, checked with the
    series' type in decode_snapshot), or a histogram whose bounds increase and whose
    counts have one more bucket than its bounds and add up to its count. Every
    observation is in one bucket, the last unbounded: a backend refuses a count its
    buckets do not add up to (Prometheus 2 with a 500, which a remote-write sender
    retries for ever)."""

    number = Float()

    def expr(self, x: str, names: dict[str, Any]) -> str:
        n = self.number.expr(x, names)
        h = HISTOGRAM.expr(x, names)
        names["_increasing"] = _increasing
        return (
            f"({n} or ({h} and len({x}['counts']) == len({x}['bounds']) + 1"
            f" and {x}['count'] == sum({x}['counts']) and _increasing({x}['bounds'])))"
        )

    def why(self, value: Any) -> str:
        if type(value) is dict:
            problem = HISTOGRAM.problem(value)
            if problem:
                return f"histogram {problem}"
            if len(value["counts"]) != len(value["bounds"]) + 1:
                return "histogram must have one count more than bounds"
            if not _increasing(value["bounds"]):
                return f"histogram bounds must increase, got {show(value['bounds'])}"
            return f"histogram count {value['count']} is not the sum of its counts, {sum(value['counts'])}"
        return self.number.why(value)


SERIES = Row(
    (
        Field("name", NAME),
        Field("type", Str(choices=frozenset({"counter", "gauge", "histogram"}))),
        Field("labels", LABELS),
        Field("value", _SeriesValue()),
    )
)
SNAPSHOT_SHAPE = Shape(
    (
        Key("ts", Int(0, U63)),
        Key("series", ListOf(SERIES, MAX_ROWS)),
        Key("stale", Bool(), required=False),
    )
)

SPAN = Row(
    (
        Field("trace_id", Bytes((16,))),
        Field("span_id", Bytes((8,))),
        Field("parent_span_id", Bytes((0, 8))),
        Field("name", NAME),
        Field("start_ns", TS_NS),
        Field("end_ns", TS_NS),
        Field("status", Int(0, 2)),
        Field("status_message", Str(1024)),
        Field("attrs", ATTRS),
    )
)
SPANS_SHAPE = Shape((Key("resource", ATTRS), Key("spans", ListOf(SPAN, MAX_ROWS))))

LOG = Row(
    (
        Field("ts_ns", TS_NS),
        Field("severity_number", Int(0, 24)),
        Field("severity_text", Str(16)),
        Field("body", Str(4096)),
        Field("attrs", ATTRS),
        Field("trace_id", Bytes((0, 16))),
        Field("span_id", Bytes((0, 8))),
    )
)
LOGS_SHAPE = Shape((Key("resource", ATTRS), Key("logs", ListOf(LOG, MAX_ROWS))))


def log2_bounds(slots: int, scale: float = 1.0) -> list[float]:
    """Explicit upper bounds of the kernel's log2 buckets, times ``scale``
    (1e-9: nanoseconds counted, seconds exported).

    Bucket i holds [2^i, 2^(i+1)) (bucket 0: [0, 2)); the last is unbounded.
    The wire's explicit buckets are upper-inclusive, so a value of exactly
    2^(i+1) lands one bucket lower than the kernel put it: negligible at
    nanosecond resolution.
    """
    return [2.0 ** (i + 1) * scale for i in range(slots - 1)]


@dataclasses.dataclass(frozen=True)
class MetricSnapshot:
    ts_ms: int
    series: Sequence[Sequence[Any]]  # [name, type, labels, value]
    stale: bool = False  # the series end here (see the module docstring)


@dataclasses.dataclass(frozen=True)
class SpanBatch:
    resource: dict[str, Any]
    spans: Sequence[Sequence[Any]]  # see the module docstring for the fields


@dataclasses.dataclass(frozen=True)
class LogBatch:
    resource: dict[str, Any]
    logs: Sequence[Sequence[Any]]


def encode_snapshot(snap: MetricSnapshot) -> bytes:
    obj: dict[str, Any] = {"ts": snap.ts_ms, "series": snap.series}
    if snap.stale:
        obj["stale"] = True
    return pack(obj)


def samples(typ: str, value: Any) -> int:
    """How many Prometheus samples a wire series makes: a histogram one for each bucket,
    its sum and its count (its classic form, which the pull endpoint always serves), any
    other series one."""
    return len(value["counts"]) + 2 if typ == "histogram" else 1


def series_chars(name: str, labels: dict[str, str]) -> int:
    """The characters of a wire series' name and labels, as ``series_size`` counts them:
    as the record has them, not as Prometheus names them (a counter's ``_total``, a ``_``
    before a name starting with a digit). (The pull endpoint counts what its memory takes
    for a series otherwise: exporters/pull.py ``series_cost``.)"""
    return len(name) + sum(map(len, labels)) + sum(map(len, labels.values()))


def series_size(chars: int, typ: str, value: Any) -> int:
    """What the Prometheus samples of a series whose name and labels take ``chars``
    characters (``series_chars``) take, about: those characters and SAMPLE_BYTES in
    every sample."""
    return (chars + SAMPLE_BYTES) * samples(typ, value)


def prometheus_size(series: Sequence[Sequence[Any]], nbytes: int) -> int:
    """At least the ``series_size`` of every series of a snapshot of ``nbytes`` bytes on
    the wire, and at most ``nbytes`` more. A counter's or gauge's name and labels are in
    the record once, as in its one sample, so only histograms are looked at: a pass over
    a snapshot's labels would cost a quarter of its decoding, this one a fortieth."""
    size = nbytes + SAMPLE_BYTES * len(series)
    for name, typ, labels, value in series:
        if typ == "histogram":
            size += series_size(series_chars(name, labels), typ, value)
    return size


def decode_snapshot(data: bytes) -> MetricSnapshot:
    obj = unpack(data, "metric snapshot", SNAPSHOT_SHAPE)
    for i, (_name, typ, _labels, value) in enumerate(obj["series"]):
        if (typ == "histogram") != (type(value) is dict):
            raise WireError(f"metric snapshot: series {i} is a {typ} with a value {show(value)}")
        if typ == "histogram" and len(value) != len(HISTOGRAM_KEYS):
            # Only what is read is kept: entries a newer writer may add are ignored, and
            # an exporter that holds the value (the pull endpoint, for minutes) would hold
            # them, many times their bytes as Python objects, counted in no bound.
            obj["series"][i][3] = {k: value[k] for k in HISTOGRAM_KEYS}
        if typ == "counter" and value < 0:
            # (cumulative: it only goes up from 0; a scrape refuses it, and Prometheus would
            # read a fall as a restart)
            raise WireError(f"metric snapshot: series {i} is a counter below zero, {value}")
    size = prometheus_size(obj["series"], len(data))
    if size > MAX_PROMETHEUS_BYTES:
        # (checked before any exporter makes a sample of it: see MAX_PROMETHEUS_BYTES)
        raise WireError(
            f"metric snapshot: its series make about {size:,} bytes of Prometheus samples (a histogram's "
            f"name and labels in each of its buckets), more than {MAX_PROMETHEUS_BYTES:,}"
        )
    return MetricSnapshot(ts_ms=obj["ts"], series=obj["series"], stale=obj.get("stale", False))


def encode_spans(batch: SpanBatch) -> bytes:
    return pack({"resource": batch.resource, "spans": batch.spans})


def decode_spans(data: bytes) -> SpanBatch:
    obj = unpack(data, "span batch", SPANS_SHAPE)
    return SpanBatch(obj["resource"], obj["spans"])


def encode_logs(batch: LogBatch) -> bytes:
    return pack({"resource": batch.resource, "logs": batch.logs})


def decode_logs(data: bytes) -> LogBatch:
    obj = unpack(data, "log batch", LOGS_SHAPE)
    return LogBatch(obj["resource"], obj["logs"])


Signal = MetricSnapshot | SpanBatch | LogBatch
ROWS_FIELD = {MetricSnapshot: "series", SpanBatch: "spans", LogBatch: "logs"}


def check_keyed(signal: Signal, key: bytes | None) -> None:
    """Refuse (WireError) a record that speaks for a host other than the one its key
    names: a series labelled ``host.id`` = h, or spans or logs whose resource is h's, in
    a record not keyed h. The aggregate keys each record by the host it is of; a record
    keyed otherwise (a buggy or hostile writer of the output topics) would overwrite
    that host's values in every exporter, or end its series with a stale snapshot. What
    names no host (no ``host.id``) is not checked."""
    named: Iterable[tuple[str, Any]]
    if isinstance(signal, MetricSnapshot):
        named = ((f"series {row[0]!r:.60}", row[2].get(HOST_ID)) for row in signal.series)
        what = "metric snapshot"
    else:
        named = [("resource", signal.resource.get(HOST_ID))]
        what = "span batch" if isinstance(signal, SpanBatch) else "log batch"
    for where, host in named:
        if host is not None and (key is None or str(host).encode() != key):
            raise WireError(
                f"{what}: its {where} is of host {host!r:.60}, but the record's key is {key!r:.60}"
            )


def encode_signal(signal: Signal) -> bytes:
    if isinstance(signal, MetricSnapshot):
        return encode_snapshot(signal)
    return encode_spans(signal) if isinstance(signal, SpanBatch) else encode_logs(signal)


def encoded_parts(signal: Signal, key: bytes | None) -> list[bytes]:
    """``signal`` encoded as records that fit a worker's send with ``key``
    (``SEND_MAX_BYTES``): its rows split in halves until each part fits, each part a
    record of the same kind, resource and timestamp with some of the rows.

    One process's logs or spans in one batch have no bound short of the batch's (a
    module logging in a loop: 1,000 logs of 1 KB are a 1 MB record), and a host's
    snapshot is bounded only through its state. Unsplit, the producer refuses such a
    record, on every restart. Every reader takes a record as some of a host's series,
    spans or logs, never as all of them (a window sends only what changed), so parts
    mean the same as the whole. A single row too large alone stays one record, which
    the producer then refuses."""
    data = encode_signal(signal)
    rows = rows_of(signal)
    if len(data) + len(key or b"") <= SEND_MAX_BYTES or len(rows) < 2:
        return [data]
    mid = len(rows) // 2
    halves = (with_rows(signal, part) for part in (rows[:mid], rows[mid:]))
    return [data for half in halves for data in encoded_parts(half, key)]


def rows_of(signal: Signal) -> Sequence[Sequence[Any]]:
    """A snapshot's series, a batch's spans or log records."""
    rows: Sequence[Sequence[Any]] = getattr(signal, ROWS_FIELD[type(signal)])
    return rows


def with_rows(signal: Signal, rows: Sequence[Sequence[Any]]) -> Signal:
    """A record of ``signal``'s kind, timestamp and staleness (a snapshot) or resource (a
    batch), holding ``rows``."""
    return dataclasses.replace(signal, **{ROWS_FIELD[type(signal)]: rows})  # type: ignore[arg-type]


def row_bytes(signal: Signal, row: Sequence[Any]) -> bytes:
    """``row`` as the wire writes it, in a record of ``signal``'s with it alone: two rows
    of records alike are one when these are (a value told apart only by its type, 1 and
    1.0, is another)."""
    return encode_signal(with_rows(signal, [row]))


# What a signal's records and rows are called, in a reason.
KIND_NAMES = {MetricSnapshot: "metric snapshot", SpanBatch: "span batch", LogBatch: "log batch"}
ROW_NAMES = {MetricSnapshot: "series", SpanBatch: "span", LogBatch: "log record"}


def not_part_of(part: Signal, whole: Signal) -> str | None:
    """Why ``part`` is not a record of some of ``whole``'s rows, or None. It is when it is
    of the same kind, with the same timestamp and staleness (a snapshot) or resource (a
    batch), and each of its rows is one of ``whole``'s, no more often than ``whole``
    holds it. Rows are compared as the wire writes them, so a value told apart only by
    its type (1 and 1.0) is another value. What an exporter dead-letters of a record (a
    snapshot of the series refused, a batch of the spans or log records refused) is
    such a part; ``ktel dlq --redrive`` sends one to the exporter's backend only if it is
    a part of the record its dead letter names."""
    kind = type(whole)
    if type(part) is not kind:
        return f"it is a {KIND_NAMES[type(part)]}, the record a {KIND_NAMES[kind]}"
    if encode_signal(with_rows(part, [])) != encode_signal(with_rows(whole, [])):
        what = "timestamp or staleness" if kind is MetricSnapshot else "resource"
        return f"its {what} is not the record's"
    held = collections.Counter(row_bytes(whole, row) for row in rows_of(whole))
    for i, row in enumerate(rows_of(part)):
        encoded = row_bytes(whole, row)
        if not held[encoded]:
            return f"its {ROW_NAMES[kind]} {i} is not in the record" + (
                " as often" if encoded in held else ""
            )
        held[encoded] -= 1
    return None
