"""The pull endpoint: ``ktel export pull`` serves the current aggregates at
``/metrics`` in the Prometheus text format, for Prometheus (or anything) to scrape.

Each instance reads every partition of ``ktel.metrics`` (no consumer group:
every instance needs the whole picture) and keeps the latest value of each
series. It starts ``aggregate.refresh_seconds`` plus ``LOOKBACK_WINDOWS`` aggregation
windows back in time (``offsets_for_times``), not at the beginning of the topic: the
aggregate stage emits a series when it changes and again at least every
``refresh_seconds``, so that span holds the whole current picture, and a start no
longer reads a day of retained snapshots.

Which value of a series is the latest goes by the stream, not by clocks: a
host's snapshots are keyed by its host id, so they are all in one partition of
``ktel.metrics``, in the order they were written, and a series takes the value of
the snapshot furthest along that partition (its offset). Timestamps would let a
worker whose clock runs ahead win over every later snapshot: after a rebalance,
the new owner's values, stamped by a slower clock, would be ignored. A snapshot
marked stale (its host went silent) removes the series it names, if it comes
after their values. A series a snapshot of another partition names (a
mis-keyed writer, or ``ktel.metrics`` repartitioned) takes that snapshot's value
as it is read.

A snapshot further ahead of the endpoint's clock than ``pull.max_future_seconds``
goes to ``ktel.dlq`` instead, as the remote-write exporter sends it there: the
two outputs serve the same values.

Every scrape makes a line of text for every sample held (a histogram's name and labels
in each of its buckets), joins them and encodes them, and anything that writes
``ktel.metrics`` adds series, each held for 5 minutes. So what the endpoint's memory
takes for the series held, held and at the peak of a scrape (``series_cost`` and
``family_cost``, kept up to date as they come and go), is bounded by
``pull.max_series_bytes``: a series that would take it past that, new or grown, goes
to ``ktel.dlq`` (the series held keep their values, and the rest of its snapshot is
served). A snapshot whose samples alone would take more than ``MAX_PROMETHEUS_BYTES``
is refused by the wire; one it takes fits an empty endpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from exporters import consume
from exporters.consume import DeadLetterSink, Record
from exporters.delivery import Window
from exporters.prom_names import COUNTER_SUFFIX, clash, metric_name, prom_labels, reserved, unnamed
from exporters.remote_write import classic_buckets
from ktel import selfmetrics
from ktel.config import PROMETHEUS_STALENESS_SECONDS, Config
from ktel.wire import MetricSnapshot, decode_snapshot
from ktel.wire.signals import samples

log = logging.getLogger("ktel.export.pull")

STAGE = "pull"  # the stage its dead letters name
# More than one window, so a snapshot delayed by a slow worker or a rebalance is still read.
LOOKBACK_WINDOWS = 3
# How often, at most, the series are swept for those no snapshot named for long (expire).
SWEEP_S = 10.0
EXPIRED = Counter(
    "ktel_exporter_pull_expired_series",
    "series the pull endpoint stopped serving after 5 minutes without a snapshot naming them",
)
# What the endpoint's memory takes for what it serves, held and at the peak of a scrape,
# in bytes that Python allocates (CPython 3.11, prometheus_client 0.26): a scrape makes a
# Sample and a line of text for every sample, joins the lines into one text and encodes
# it, so at its peak it holds the lines' text three times over (TEXT_COPIES). Fitted to
# what bench/pull_memory.py and tests/unit/test_untrusted_snapshots.py measure, so that
# ``series_cost`` and ``family_cost`` add up to at least it for every shape they try,
# and most within 0.65 to 0.95 of it (bench/RESULTS.md).
# Held for each series: its entry in its family, its key and value, when it was read ...
SERIES_BYTES = 320
# ... and each of its labels: the pair in its key, the strings of its name and value.
LABEL_BYTES = 224
# Made for each sample by a scrape: its Sample, SampleLabels, line.
SAMPLE_BYTES = 200
# The characters of a sample's line besides its name and labels: its value (up to 24),
# braces, a space and a newline ...
LINE_CHARS = 28
# ... and around each label: = and quotes, and a comma.
LABEL_CHARS = 4
# Each bucket of a histogram: its bound and count held, its le's string and count made ...
BUCKET_BYTES = 200
# ... and ``_bucket`` and ``,le="..."`` in its line (a bound's text is at most 23 characters).
LE_CHARS = 36
# The lines, the text joined, the text encoded.
TEXT_COPIES = 3
# What each character of a scrape's text takes more while any of it is not ASCII: the
# text joined takes as many bytes for each as its widest character needs (up to 4), and
# so does the buffer it is encoded into before it is cut to the bytes encoded. One
# series with an emoji in a label, of a million others, so widened every other's text.
WIDE_TEXT_BYTES = 6
# Each family: its entry, the names its samples claim, its Metric.
FAMILY_BYTES = 700


@dataclasses.dataclass(slots=True)
class Cost:
    """What the endpoint's memory takes for some of what it serves: ``own``, and what
    ``text`` characters of a scrape's text take more while any of the text is not ASCII
    (``wide``: how many of the series and families counted have such text)."""

    own: int = 0
    text: int = 0
    wide: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.own + other.own, self.text + other.text, self.wide + other.wide)

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.own - other.own, self.text - other.text, self.wide - other.wide)

    @property
    def bytes(self) -> int:
        return self.own + (WIDE_TEXT_BYTES * self.text if self.wide else 0)


def text_chars(s: str) -> int:
    """The characters of ``s`` in a scrape's text: a backslash before each backslash,
    quote and newline."""
    return len(s) + s.count("\\") + s.count('"') + s.count("\n")


def widened(cost: Cost, chars: int) -> Cost:
    """``cost`` of what holds strings of ``chars`` characters and makes lines of
    ``cost.text``: each takes up to 4 bytes a character, not 1, if any of its characters
    is not ASCII (``cost.wide``; the text joined and encoded are WIDE_TEXT_BYTES')."""
    return Cost(cost.own + 3 * (chars + cost.text), cost.text, cost.wide) if cost.wide else cost


def series_cost(key: tuple[str, tuple[tuple[str, str], ...]], typ: str, value: Any) -> Cost:
    """What the endpoint's memory takes for a series, by its key (its sample name and
    labels, as served)."""
    name, labels = key
    names_values = "".join(itertools.chain.from_iterable(labels))  # (names are [a-zA-Z0-9_] once served)
    chars = len(name) + text_chars(names_values)
    n = samples(typ, value)
    buckets = len(value["counts"]) if typ == "histogram" else 0
    text = n * (chars + LABEL_CHARS * len(labels) + LINE_CHARS) + LE_CHARS * buckets
    own = SERIES_BYTES + LABEL_BYTES * len(labels) + chars + n * SAMPLE_BYTES + BUCKET_BYTES * buckets
    return widened(Cost(own + TEXT_COPIES * text, text, not names_values.isascii()), chars)


def family_cost(fam: str, name: str) -> Cost:
    """What the endpoint's memory takes for a family served as ``fam`` whose first series
    was named ``name`` (its help text), besides its series: its name and the names its
    samples claim (up to 5), and its HELP and TYPE lines."""
    text = 2 * len(fam) + text_chars(name) + LINE_CHARS * 2
    own = FAMILY_BYTES + 6 * len(fam) + len(name) + TEXT_COPIES * text
    return widened(Cost(own, text, not name.isascii()), len(name))


HELD_BYTES = Gauge(
    "ktel_exporter_pull_series_bytes",
    "what the series the pull endpoint serves take of its memory, held and at the peak of a scrape, "
    "as pull.max_series_bytes bounds it",
)


@dataclasses.dataclass
class Family:
    """A metric family as the endpoint serves it: its type, the name its first series
    had (its help text), and its series: (sample name, sorted label items) ->
    (partition, offset, value, when read): the value, the position in ktel.metrics of
    the snapshot it came from, and the endpoint's monotonic clock when it read it."""

    type: str
    name: str
    series: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[int, int, Any, float]] = dataclasses.field(
        default_factory=dict
    )


def family_name(name: str, typ: str) -> str:
    """The name of the family a series is served in: its Prometheus name, a counter's
    without ``_total`` (its samples' names end in it: ``metric_name``)."""
    pname = metric_name(name, typ)
    return pname.removesuffix(COUNTER_SUFFIX) if typ == "counter" else pname


def series_key(name: str, typ: str, labels: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """What a series is held by in its family: its samples' name and its labels, as served."""
    return metric_name(name, typ), tuple(kv for kv in prom_labels(name, labels) if kv[0] != "__name__")


def claims(fam: str, typ: str) -> tuple[str, ...]:
    """The names the samples of a family of type ``typ`` may have, in either text format."""
    if typ == "counter":
        return (fam, f"{fam}_total", f"{fam}_created")
    if typ == "histogram":
        return (fam, f"{fam}_bucket", f"{fam}_sum", f"{fam}_count", f"{fam}_created")
    return (fam,)


class LatestValues(Collector):
    def __init__(
        self,
        expire_s: float = PROMETHEUS_STALENESS_SECONDS,
        clock=time.monotonic,
        max_bytes: float = math.inf,
        wall=time.time,
    ) -> None:
        # Served family name -> Family. Two names alike once sanitised (``a.b``, ``a_b``)
        # are one family, as they are one series in Prometheus (the remote-write exporter
        # sends the last value of the two too).
        self.families: dict[str, Family] = {}
        # Sample name -> the family whose samples may have it (``claims``).
        self.claimed: dict[str, str] = {}
        self.expire_s = expire_s
        self.clock, self.wall = clock, wall
        self.swept = -math.inf
        # What the endpoint's memory takes for the series and families held
        # (``series_cost``, ``family_cost``): its bytes at most max_bytes (pull.max_series_bytes).
        self.held = Cost()
        self.max_bytes = max_bytes

    @property
    def held_bytes(self) -> int:
        return self.held.bytes

    def split(self, snap: MetricSnapshot) -> tuple[list[Any], list[tuple[Any, str]]]:
        """The series of ``snap`` the endpoint can serve, and those it cannot, each with
        why: one with no Prometheus name or an empty label name, a label Prometheus
        reserves (``reserved``; the aggregate writes none), a histogram with a sum or a
        bound below zero (OpenMetrics' _sum is a counter), a name another type's series
        have (``clash``: a gauge ``x_count``, whatever else is served; the aggregate
        writes none either), of a family served as another type, or whose samples'
        names another family's may have (a gauge ``x_created`` beside a counter ``x``).
        One such series in a scrape's text would fail the whole scrape, or be taken
        for another metric's. Refused one by one, not with their snapshot: a writer of
        a clashing series (a buggy or hostile one, or one first after a restart) would
        otherwise keep every snapshot carrying the family it clashes with, every host's,
        off the endpoint."""
        types: dict[str, str] = {}  # (families and sample names this snapshot's served series take)
        claimed: dict[str, str] = {}
        served, refused = [], []
        for row in snap.series:
            why = self._problem(row, types, claimed)
            if why is None:
                served.append(row)
            else:
                refused.append((row, why))
        return served, refused

    def _problem(self, row: Any, types: dict[str, str], claimed: dict[str, str]) -> str | None:
        name, typ, labels, value = row
        why = unnamed([row])
        if why:
            return why
        for label in labels:
            if reserved(label, typ):
                return f"series {name!r:.100}: a label Prometheus reserves ({label!r:.100})"
        if typ == "histogram" and (value["sum"] < 0 or min(value["bounds"], default=0) < 0):
            # OpenMetrics takes a histogram's _sum for a counter: never below zero, and
            # absent where a bucket is below zero (its observations may be), while a
            # scrape always has it; one such histogram fails the whole scrape. The
            # aggregate writes none (it drops observations below zero: the kernel's log2
            # buckets start at 0).
            return (
                f"series {name!r:.100}: a histogram with a sum or a bucket bound below zero, "
                "which OpenMetrics cannot carry with its _sum"
            )
        why = clash(name, typ)
        if why:
            return f"series {name!r:.100}: {why}"
        fam = family_name(name, typ)
        if not fam:
            return f"series {name!r:.100}: no Prometheus name (empty once sanitised)"
        have = self.families.get(fam)
        other = types.get(fam, typ if have is None else have.type)
        if other != typ:
            return f"series {name!r:.100}: a {typ}, but {fam} is served as a {other}"
        if have is None and fam not in types:
            for sample in claims(fam, typ):
                owner = self.claimed.get(sample) or claimed.get(sample, fam)
                if owner != fam:
                    return f"series {name!r:.100}: its samples' names clash with those of {owner}"
            claimed.update(dict.fromkeys(claims(fam, typ), fam))
        types[fam] = typ
        return None

    def update(self, snap: MetricSnapshot, partition: int, offset: int) -> list[tuple[Any, str]]:
        """Take a snapshot read at ``offset`` of ``partition`` (see the module doc), of
        series the endpoint can serve (``split``). Returns the series not taken, each
        with why: those that would take what the series held take past ``max_bytes``.
        Its series expire ``expire_s`` after the snapshot was made, by its own time, up
        to half of it before it was read (one read late, as the lookback after a restart,
        is not fresh for that long again)."""
        # (at most half the expiry: a live series, sent again every refresh_seconds, read
        # late or by a clock ahead of its worker's must not expire before its next is read)
        now = self.clock() - min(max(0.0, self.wall() - snap.ts_ms / 1000), self.expire_s / 2)
        refused = []
        for row in snap.series:
            name, typ, labels, value = row
            fam = family_name(name, typ)
            family = self.families.get(fam)
            if family is None and snap.stale:
                continue
            key = series_key(name, typ, labels)
            old = family.series.get(key) if family is not None else None
            # (at the same offset: another row of this snapshot alike once sanitised, whose
            # last value is served, as the remote-write exporter sends the last)
            later = old is None or old[0] != partition or old[1] <= offset
            if not later:
                continue  # an earlier snapshot of the partition: its values are older
            if snap.stale:
                if family is not None:
                    if old is not None:
                        del family.series[key]
                        self.held -= series_cost(key, family.type, old[2])
                    if not family.series:
                        self._forget(fam)
                continue
            # (its name and labels are its key's: only a histogram's buckets change what it takes)
            grown = None
            if old is None:
                grown = series_cost(key, typ, value)
                if family is None:
                    grown += family_cost(fam, name)
            elif typ == "histogram" and len(value["counts"]) != len(old[2]["counts"]):
                grown = series_cost(key, typ, value) - series_cost(key, typ, old[2])
            if grown is not None:
                if (self.held + grown).bytes > max(self.held.bytes, self.max_bytes):
                    refused.append((row, self._full(name)))
                    continue
                self.held += grown
            if family is None:
                family = self.families[fam] = Family(typ, name)
                self.claimed.update(dict.fromkeys(claims(fam, typ), fam))
            family.series[key] = (partition, offset, value, now)
        return refused

    def _full(self, name: str) -> str:
        return (
            f"series {name!r:.100}: the pull endpoint's series take {self.held_bytes:,} bytes of its memory, "
            f"and this one would take them past pull.max_series_bytes ({self.max_bytes:,})"
        )

    def expire(self) -> int:
        """Forget the series no snapshot named for ``expire_s``: the aggregate sends every
        live series again well within Prometheus' 5 minutes, so one it has not is over
        (its host's stale marker lost, or never sent: a snapshot written to ktel.metrics by
        something else). How many it forgot. A sweep walks every series: one at most every
        ``SWEEP_S``, whatever the rate of snapshots."""
        now = self.clock()
        if now - self.swept < SWEEP_S:
            return 0
        self.swept = now
        oldest = now - self.expire_s
        gone = 0
        for fam, family in list(self.families.items()):
            old = [key for key, (_p, _o, _v, read) in list(family.series.items()) if read < oldest]
            for key in old:
                self.held -= series_cost(key, family.type, family.series.pop(key)[2])
            gone += len(old)
            if not family.series:
                self._forget(fam)
        return gone

    def _forget(self, fam: str) -> None:
        family = self.families.pop(fam)
        self.held -= family_cost(fam, family.name)
        for sample in claims(fam, family.type):
            del self.claimed[sample]

    def collect(self):
        # Runs on the HTTP server's thread while the event loop updates the dicts:
        # each is copied before it is walked.
        for fam_name, family in list(self.families.items()):
            help_text = f"ktel aggregate {family.name}"
            fam: Metric
            if family.type == "histogram":
                fam = HistogramMetricFamily(fam_name, help_text)
                bucket, total, count = f"{fam_name}_bucket", f"{fam_name}_sum", f"{fam_name}_count"
                for (_name, key), (_p, _o, value, _r) in list(family.series.items()):
                    for le, v in classic_buckets(value):
                        fam.add_sample(bucket, BucketLabels(key, le), v)
                    fam.add_sample(total, SampleLabels(key), float(value["sum"]))
                    fam.add_sample(count, SampleLabels(key), float(value["count"]))
                yield fam
                continue
            if family.type == "counter":
                # (not CounterMetricFamily, which cuts a name's _total: a family x_total, of
                # samples x_total_total, was typed as x_total, its samples left untyped)
                fam = Metric(fam_name, help_text, "counter")
            else:
                fam = GaugeMetricFamily(fam_name, help_text)
            for (sample_name, key), (_p, _o, value, _r) in list(family.series.items()):
                fam.add_sample(sample_name, SampleLabels(key), value)
            yield fam


class SampleLabels(Mapping[str, str]):
    """A scrape's sample's labels: its series' key's (sorted label items), read in place.
    A scrape holds every sample of a family at once, each with its labels, and a dict of
    its own took a sample 184 bytes and more, 30 to 40 a label (with 64 labels, 3 KB a
    sample): this takes 40 (48 a bucket's). ``items`` gives the pairs themselves, which
    is all prometheus_client's exposition reads (it sorts them)."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: tuple[tuple[str, str], ...]) -> None:
        self.pairs = pairs

    def items(self) -> Iterable[tuple[str, str]]:  # type: ignore[override]
        return self.pairs

    def __getitem__(self, name: str) -> str:
        for k, v in self.items():
            if k == name:
                return v
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self.items())

    def __len__(self) -> int:
        return len(self.pairs)


class BucketLabels(SampleLabels):
    """A histogram's bucket's labels: its series' and its ``le``."""

    __slots__ = ("le",)

    def __init__(self, pairs: tuple[tuple[str, str], ...], le: str) -> None:
        self.pairs = pairs
        self.le = le

    def items(self) -> Iterable[tuple[str, str]]:  # type: ignore[override]
        return (*self.pairs, ("le", self.le))

    def __len__(self) -> int:
        return len(self.pairs) + 1


async def deliver(
    latest: LatestValues, window: Window, records: list[Record], producer: DeadLetterSink
) -> None:
    # Swept first: what expired gives its room to this batch's new series.
    sweep(latest)
    now = time.time_ns()
    for rec in records:
        snap = rec.item
        problem = window.problem(snap.ts_ms * 1_000_000, now)
        if problem is not None:
            await consume.refuse(producer, STAGE, rec, problem, signal="series", items=len(snap.series))
            continue
        served, refused = latest.split(snap)
        if refused:
            snap = dataclasses.replace(snap, series=served)
        refused += latest.update(snap, rec.partition, rec.offset)
        if refused:
            await consume.refuse_series(producer, STAGE, rec, refused, signal="series", items=len(refused))
    HELD_BYTES.set(latest.held_bytes)


def sweep(latest: LatestValues) -> None:
    EXPIRED.inc(latest.expire())
    HELD_BYTES.set(latest.held_bytes)


async def sweeping(latest: LatestValues) -> None:
    """Sweep every ``SWEEP_S`` whether records come or not: with ktel.metrics silent (the
    workers down), the last values would otherwise be served for ever, and Prometheus,
    taking each scrape's time, would draw them on as if fresh instead of showing the gap.
    (On the event loop, as ``deliver``: the scrape thread only reads.)"""
    while True:
        sweep(latest)
        await asyncio.sleep(SWEEP_S)


async def run(cfg: Config, stop: asyncio.Event) -> None:
    latest = LatestValues(max_bytes=cfg.pull.max_series_bytes)
    registry = CollectorRegistry()
    registry.register(latest)
    # The fleet's series on pull.port, the endpoint's own counters on pull.metrics_port
    # like every ktel process's: a scrape of one never mixes in the other's. Both with
    # /healthz and /readyz.
    agg = cfg.aggregate
    lookback_s = agg.refresh_seconds + LOOKBACK_WINDOWS * agg.window_seconds
    # The lookback comes oldest first: a scrape while it is read would serve a counter's
    # older value after the newer one Prometheus scraped before a restart, which it reads
    # as a reset (and rate() and increase() count again). Until it is read, a scrape fails
    # (a gap in the series) rather than go back.
    read_up = asyncio.Event()

    def unserved() -> str | None:
        if read_up.is_set():
            return None
        return f"reading the last {lookback_s:g} s of {cfg.kafka.topics.metrics}, every series' latest value"

    selfmetrics.serve(cfg.pull.port, cfg.pull.host, "pull.port", registry, "pull.host", unserved=unserved)
    selfmetrics.serve(cfg.pull.metrics_port, cfg.service.metrics_bind, "pull.metrics_port")

    window = Window(math.inf, cfg.pull.max_future_seconds, "pull")
    start_ms = time.time_ns() // 1_000_000 - int(lookback_s * 1000)
    sweeper = asyncio.create_task(sweeping(latest))
    try:
        await consume.run(
            kafka=cfg.kafka,
            group_id=None,
            stage=STAGE,
            topics={cfg.kafka.topics.metrics: decode_snapshot},
            deliver=lambda records, producer: deliver(latest, window, records, producer),
            stop=stop,
            start_ms=start_ms,
            read_up=read_up,
        )
    finally:
        sweeper.cancel()
