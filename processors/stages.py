"""The processing stages' one Faust runner: ``ktel process <stage>``.

Each worker runs one chain of stage cores (processors/chain.py; the shape
they share: processors/stage.py): every record of its source topic decoded
and given to the chain, what it changed of the host's table value written to
the changelog (one record: processors/changelog.py), what the chain emitted
sent to its topics, the batch it passed on sent to the next stage's topic, and
each stage's window work on its timer.

Split mode, each stage its own Faust app and consumer group, scaled by
starting more workers of it::

    ktel.raw --dedupe--> ktel.deduped --enrich--> ktel.enriched --sample--> ktel.sampled
                                        ^                             |
                      ktel.heartbeats --+                             +--> ktel.control (fidelity commands)

    ktel.sampled --aggregate--> ktel.metrics, ktel.spans, ktel.logs

Fused mode (``ktel process all``, for small setups and ``ktel up``) runs
enrich, sample and aggregate (which drops re-sent batches itself, see below)
in one worker from ``ktel.raw`` (and ``ktel.heartbeats``). Records stay
batches all the way.

Every topic is keyed by host id, so a host's batches stay in one partition and
one worker, and each stage keeps its per-host state in a changelog-backed
Faust table co-partitioned with its input (the sample stage's anomaly
detector keeps its per-host rates in the worker; see processors/sample_core.py).
A stage that keeps counts dedupes its own input in the same table value as the
counts, so redelivery after a crash (its input is at-least-once) neither loses
nor doubles anything.

Records are untrusted (docs/design.md, principle 11): one that does not decode,
whose key is not its host id, or that a stage refuses (processors/dedupe_core.py)
goes to ktel.dlq with the reason, and the host's state is left as it was. So
does one that would grow the host's table value past ``process.max_state_bytes``
encoded (its head and its entries, ``Persisted``): what a host may hold in a
worker's memory, and what its snapshot record takes, which Kafka bounds
(``max.message.bytes``). The stages keep their
own parts within it (the aggregate's series take at most half, the enrich stage's
process and container tables 3/8, see processors/aggregate_core.py and
processors/enrich_core.py); this bound catches whatever else grows, and such a
record leaves the worker's own state (the sampler's rates, the process gauge) as
it was too (``Result.undo``). Window
work sees only the hosts of the partitions this worker holds now, and a host a
stage is done with (aggregate.host_ttl_seconds) has its table value deleted: a
tombstone on the changelog for its snapshot and each delta key, so a worker that
recovers the table forgets it too; unless, fused, its heartbeats still come: then
only that stage's section goes (``drop_section``).
The enrich stage keeps no counts and passes a redelivered batch on (the
aggregate stage drops it); it takes heartbeats into the same table, which is
why ``ktel.heartbeats`` is partitioned like ``ktel.raw``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Set
from pathlib import Path
from typing import Any, cast

import faust
from aiokafka.partitioner import murmur2
from faust.serializers import codecs
from opentelemetry.semconv._incubating.attributes.host_attributes import HOST_ID
from prometheus_client import Counter, Gauge, Histogram

from ktel import consumer_lag, logs, selfmetrics
from ktel.config import Config, KafkaConfig, check_sample_commands
from ktel.kafka_client import faust_settings, reachable
from ktel.retry import retry
from ktel.topics import TopicSpec, create_topics, partition_counts, replication, resolved
from ktel.wire import (
    DeadLetter,
    MetricSnapshot,
    RawBatch,
    WireError,
    dead_letter_record,
    decode_batch,
    decode_heartbeat,
    encode_batch,
    encode_command,
    encoded_parts,
)
from ktel.wire.codec import SEND_MAX_BYTES, compress
from ktel.wire.signals import Signal
from ktel.wire.topics import Topics
from processors import aggregate_core, changelog
from processors.chain import build
from processors.faust_app import App
from processors.fleet_metrics import BOUNDS, FleetMetrics
from processors.host_cap import HostCap
from processors.stage import Result, Stage
from processors.stop import Poisoned, StageFailed, Worker, stop
from processors.table_store import MEMORY_URL, REFUSED, DiskBackedStore, HostTable
from processors.table_store import URL as DISK_BACKED_URL
from processors.upstream import Upstream, check_every, inputs_up_to

log = logging.getLogger("ktel.process")

# Each stage's input and output (ktel/wire/topics.py, Topics.topic); the last stages
# write only ktel.metrics, ktel.spans and ktel.logs.
SOURCE = {"dedupe": "raw", "enrich": "deduped", "sample": "enriched", "aggregate": "sampled", "all": "raw"}
SINK = {"dedupe": "deduped", "enrich": "enriched", "sample": "sampled"}
# The split stages in the order records go through them.
SPLIT_ORDER = ("dedupe", "enrich", "sample", "aggregate")

BATCHES = Counter("ktel_processor_batches", "batches a stage processed", ["stage"])
EVENTS = Counter("ktel_processor_events", "events counted into the aggregates (weighted)", ["stage"])
DUPLICATES = Counter(
    "ktel_processor_duplicate_batches", "re-sent batches dropped by (host, boot, seq)", ["stage"]
)
SAMPLED_OUT = Counter("ktel_processor_sampled_out", "events the sample stage dropped", ["stage"])
COMMANDS = Counter("ktel_processor_commands", "fidelity commands sent to ktel.control", ["stage"])
DEAD_LETTERS = Counter("ktel_processor_dead_letters", "records sent to ktel.dlq", ["stage"])
OVERFLOW = Counter("ktel_processor_series_overflow", "events folded into an overflow series", ["stage"])
SERIES_DROPPED = Counter(
    "ktel_processor_series_dropped",
    "events counted in no series, by reason: "
    + "; ".join(f"{why}: {what}" for why, what in aggregate_core.DROPPED.items()),
    ["stage", "reason"],
)
SNAPSHOTS = Counter("ktel_processor_snapshots", "metric snapshot records produced", ["stage"])
SNAPSHOTS_SKIPPED = Counter(
    "ktel_processor_snapshots_skipped",
    "window snapshots not sent: a rebalance was under way (reason rebalancing) or had taken their "
    "host's partition (revoked), whose owner sends its hosts' snapshots",
    ["stage", "reason"],
)
SPANS = Counter("ktel_processor_spans", "kernel spans sent to ktel.spans", ["stage"])
LOGS = Counter("ktel_processor_logs", "kernel logs and OOM kills sent to ktel.logs", ["stage"])
HEARTBEATS = Counter("ktel_processor_heartbeats", "agent heartbeats the enrich stage read", ["stage"])
EVICTED = Counter(
    "ktel_processor_enrich_evicted",
    "processes and containers the enrich stage forgot to keep a host's state within its bounds",
    ["stage", "table"],
)
NODE_READINGS_LEFT_OUT = Counter(
    "ktel_processor_node_readings_left_out",
    "readings of heartbeats' node maps not exported as per-host series: past what one host may "
    "have (disks, BPF maps: processors/fleet_metrics.py), with an illegible name, or left out of "
    "the heartbeat by its agent (past the 1,024 readings one takes)",
    ["stage", "reading"],
)
HOST_CONFLICTS = Counter(
    "ktel_processor_host_conflicts",
    "batches of a host id's older boot while a newer one is live (two machines, one host id)",
    ["stage"],
)
SEQUENCE_REANCHORS = Counter(
    "ktel_processor_sequence_reanchors",
    "hosts' batch numbering taken up again more than 2^24 past its highest (batches a full agent "
    "spool dropped): the batch that showed the jump was dead-lettered",
    ["stage"],
)
HOSTS = Gauge(
    "ktel_processor_hosts",
    "hosts this worker holds state of, over the partitions it holds (at most process.max_hosts)",
    ["stage"],
)
HOSTS_LIMIT = Gauge("ktel_processor_hosts_limit", "process.max_hosts of this worker", ["stage"])
HOSTS_REFUSED = Counter(
    "ktel_processor_hosts_refused",
    "records of a host new to this worker sent to ktel.dlq: it already held process.max_hosts hosts",
    ["stage"],
)
EXPIRED_HOSTS = Counter(
    "ktel_processor_expired_hosts", "hosts forgotten after aggregate.host_ttl_seconds of silence", ["stage"]
)
HOSTS_RESET = Counter(
    "ktel_processor_hosts_reset",
    "hosts forgotten, to start afresh, because their stored state was already past "
    "process.max_state_bytes (recovered from a changelog written under a higher limit, or a hostile one)",
    ["stage"],
)
UNCHANGED_SERIES = Counter(
    "ktel_processor_unchanged_series",
    "series left out of a window's snapshot: unchanged since last emitted (refreshed every "
    "aggregate.refresh_seconds)",
    ["stage"],
)
PROCESSES = Gauge(
    "ktel_processor_processes_known", "processes the enrich stage knows, over the hosts it served", ["stage"]
)
WINDOW_DELAY = Histogram(
    "ktel_processor_window_delay_seconds",
    "how long after its due time a stage's window closed (its timer shares the worker's event "
    "loop with the stream)",
    ["stage", "window"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
INPUT_AGE = Histogram(
    "ktel_processor_input_age_seconds",
    "how old each record of the stage's source topic was when the worker took it: now minus "
    "its Kafka timestamp (set by its producer as it sent it, so clock offsets count too)",
    ["stage"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
# The size past which a batch passed on to the next stage is compressed (passed_on):
# below it, compressing costs more than the bytes it saves.
COMPRESS_ABOVE = 64 << 10
# A host no record (batch or heartbeat) named for aggregate.host_ttl_seconds times this,
# plus two windows, is forgotten by the worker whatever its stages: the aggregate
# forgets a host silent for host_ttl_seconds itself, with a last, stale snapshot of its
# series, but a stage without it (dedupe, enrich in split mode), or a host that only
# ever sent heartbeats, would keep its state for good, a fleet's every host that ever
# was. Past the aggregate's, so that it goes first where it counts. Looked at every
# SILENT_CHECK_S (a quarter of the TTL at most).
SILENT_TTL_MARGIN = 1.1
SILENT_CHECK_S = 30.0
# How far ahead of the worker's clock a heartbeat's time may be. A heartbeat is taken only
# if it is newer than those its host's boot sent before (ktel.wire.control.heartbeat_older),
# so one stamped far ahead, by a wrong clock or by any writer of ktel.heartbeats, would
# have every later heartbeat of its host ignored until then: its host shown down, its
# attributes frozen. Prometheus takes samples up to 10 minutes ahead, too.
MAX_HEARTBEAT_AHEAD_S = 600.0
# How often a worker exports its partitions' consumer lag.
LAG_INTERVAL_S = 5.0
# Per-host SLIs from the heartbeats this worker reads (its hosts are forgotten as make_app configures).
FLEET = FleetMetrics(forget_after_s=3600.0)  # (served after REGISTRY's series: serve_metrics)
SAMPLER_EMITTED = Counter(
    "ktel_processor_sampler_emitted_events", "events the sample stage was given, per kind", ["stage", "kind"]
)
SAMPLER_KEPT = Counter(
    "ktel_processor_sampler_kept_events", "events the sample stage kept, per kind", ["stage", "kind"]
)
SERIES = Gauge(
    "ktel_processor_series",
    "series per metric in the last window's snapshots of this worker's hosts (a histogram counts once)",
    ["stage", "metric"],
)
# The self-metric (and its labels past the stage) of each name a stage counts in Result.counts.
COUNTED: dict[str, tuple[Counter | Gauge, tuple[str, ...]]] = {
    "duplicates": (DUPLICATES, ()),
    "host_conflicts": (HOST_CONFLICTS, ()),
    "sequence_reanchors": (SEQUENCE_REANCHORS, ()),
    "unchanged_series": (UNCHANGED_SERIES, ()),
    "events": (EVENTS, ()),
    "overflowed": (OVERFLOW, ()),
    **{f"series_dropped_{why}": (SERIES_DROPPED, (why,)) for why in aggregate_core.DROPPED},
    "sampled_out": (SAMPLED_OUT, ()),
    "evicted_processes": (EVICTED, ("processes",)),
    "evicted_containers": (EVICTED, ("containers",)),
    "processes": (PROCESSES, ()),
}
# ... and of each name a stage counts per event kind in Result.kind_counts.
KIND_COUNTED: dict[str, Counter] = {"sampler_emitted": SAMPLER_EMITTED, "sampler_kept": SAMPLER_KEPT}


def keep(table: Any, key: str, value: dict[str, Any], source: Any) -> None:
    """``table[key] = value`` in the worker's memory, as Faust's own write
    (``Table.on_key_set``) keeps it, minus the key TTL of windowed tables (which this one
    is not) and minus the changelog record, which the stage sends itself (``persist``).
    ``source``: the record (a Faust message) it came from, whose partition the changelog
    record goes to: the table is co-partitioned with its topic, which Faust checks as its
    own write does (PartitionsMismatch)."""
    table._verify_source_topic_partitions(source.topic)
    table.data[key] = value
    table._sensor_on_set(table, key, value)


async def persist(
    table: Any, key: bytes, record: bytes, partition: int, acked: Callable[[Any], None] | None = None
) -> None:
    """Hand a host's changelog record (a snapshot or a delta, processors/changelog.py,
    encoded as the table encodes values) to the Kafka producer, once the outputs of the
    record that made it are on Kafka (``OutputsFirst``) and before the source record is
    acked, so before its offset can be committed. ``acked`` is called once Kafka has it.

    Faust's own ``table[key] = value`` queues the record in its ProducerBuffer,
    and the producer flush that precedes every offset commit can return while the
    buffer's sender still holds a record (faust-streaming 0.15.3,
    ``ProducerBuffer.flush_atmost``). Seen here: a commit went through with a host's
    last changelog record unsent, and a worker SIGKILLed right then lost that
    batch's counts. Records sent by ``produce`` are in aiokafka's accumulator, whose
    flush waits for the broker's acknowledgement (acks=all)."""
    await send(table, key, record, partition, acked)


async def send(
    table: Any, key: bytes, value: bytes | None, partition: int, acked: Callable[[Any], None] | None = None
) -> None:
    """A changelog record (None: a tombstone, as Faust's own delete writes); ``acked``
    is called, after the store's own copy, once Kafka has it."""
    calls = [f for f in (on_changelog_acked(table, key, value), acked) if f is not None]

    def each(meta: Any) -> None:
        for f in calls:
            f(meta)

    await produce(
        table.app, table.changelog_topic.get_topic_name(), key, value, partition, each if calls else None
    )


async def produce(
    app: Any,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    partition: int | None = None,
    acked: Callable[[Any], None] | None = None,
) -> None:
    """Hand a record to the worker's Kafka producer, aiokafka's, which Faust holds and
    flushes (waiting for the broker's acknowledgement, acks=all) before every offset
    commit: what a source record made is on Kafka before that record is committed.
    ``acked`` is called with the record's metadata once it is.

    Faust's own ``Topic.send`` wraps the same call in a future, sensors and callbacks of
    its own: about 100 µs more per record (bench/RESULTS.md, "The stream's cost per
    record"), which the worker pays per batch and per snapshot. It also only logs a
    record the producer failed to deliver, and the commit that follows goes past it;
    here that stops the worker first (processors/faust_app.py ``Producer``)."""
    await app.producer.send_checked(topic, key, value, partition, acked)


def passed_on(batch: RawBatch, key: bytes) -> list[bytes]:
    """A batch as a stage passes it on to the next one's topic (with ``key``): above
    ``COMPRESS_ABOVE`` bytes, one zstd frame, as the agent sends its own (ktel/wire/codec.py);
    one that even so does not fit a record (``SEND_MAX_BYTES``), in parts, as the agent
    splits its own (``RawBatch.part``): its events halved until each part fits.

    The enrich stage can make a small batch far larger than it came (a container's
    attributes copied into each of its processes): 200 process starts in one container
    with 16 KB of attributes come to 3.4 MB, past what a Kafka record takes (the
    producer's 1,000,000 bytes), and each restart would stop on it again. Most of it
    compresses away; attributes that do not (a hostile writer's, random) need parts.
    The aggregate's guard counts a part's events once whatever the parts were, so parts
    of a part are parts of its batch. A single event too large alone stays one record,
    which ``too_large`` names."""
    data = encode_batch(batch)
    if len(data) > COMPRESS_ABOVE:
        data = compress(data)
    if len(data) + len(key) <= SEND_MAX_BYTES or len(batch.events) < 2:
        return [data]
    if len(compress(encode_batch(batch.keeping([], None)))) > SEND_MAX_BYTES // 2:
        # What every part carries (its resource) takes half a record or more: halving
        # would copy it into one part per event or so. It stays whole, and too_large
        # names it.
        return [data]
    first, total = batch.part or (0, len(batch.events))
    mid = len(batch.events) // 2
    weights = batch.weights
    halves = (
        dataclasses.replace(
            batch.keeping(batch.events[lo:hi], None if weights is None else weights[lo:hi]),
            part=[first + lo, total],
        )
        for lo, hi in ((0, mid), (mid, len(batch.events)))
    )
    return [data for half in halves for data in passed_on(half, key)]


def too_large(records: list[tuple[str, bytes]], key: bytes | None) -> str | None:
    """Why one of ``records`` (topic, value), sent with ``key``, cannot be: past what a
    Kafka record takes even split as far as it goes (a single event, span or log row
    carrying megabytes of attributes a hostile writer gave it); None if all can."""
    for topic, data in records:
        if len(data) + len(key or b"") > SEND_MAX_BYTES:
            return (
                f"its {topic} record would take {len(data)} bytes, more than Kafka takes ({SEND_MAX_BYTES})"
            )
    return None


def encoded(table: Any, value: dict[str, Any]) -> bytes:
    """A host's table value as its changelog record carries it (the table's serializer)."""
    return codecs.dumps(table.value_serializer, value)


def decoded(table: Any, data: bytes) -> dict[str, Any]:
    return codecs.loads(table.value_serializer, data)


class ChangelogAcks:
    """The table's changelog records on their way to Kafka, numbered as they are sent.

    A window emits what the hosts' values hold only once Kafka has every record sent
    before it looked at them (``wait``): a worker SIGKILLed after emitting a value its
    changelog did not have yet is replaced by one that counts the batch again from the
    value before it, and would emit the host's new series at 0 again after their values
    (a counter reset: counted twice), or a value below the one emitted (the fused sample
    stage's rates are memory, so a batch read again may be sampled otherwise). A record
    is numbered when its value is changed, before any await, so one a take has not yet
    handed to the producer is waited for too."""

    def __init__(self) -> None:
        self.last = 0  # the number of the last record sent
        self._unacked: set[int] = set()
        self._acked = asyncio.Event()

    def sent(self) -> Callable[[Any], None]:
        """A record of a host's value on its way: what to call once Kafka has it."""
        self.last += 1
        n = self.last
        self._unacked.add(n)

        def acked(_meta: Any) -> None:
            self._unacked.discard(n)
            self._acked.set()

        return acked

    async def wait(self, last: int) -> None:
        """Until Kafka has every record numbered ``last`` or below. (One it never gets
        stops the worker: processors/faust_app.py ``Producer.delivered``.)"""
        while self._unacked and min(self._unacked) <= last:
            self._acked.clear()
            await self._acked.wait()


# What ``emit`` calls as it sends each record: what Kafka's acknowledgement of it is to
# call (``OutputsFirst.output``), or None.
OnItsWay = Callable[[], Callable[[Any], None] | None]


class OutputsFirst:
    """A stage's changelog records, held back until Kafka has what the source records
    that made them sent on.

    A host's changelog record says its source record is counted: a worker that starts
    from it takes that record, read again (its offset was not committed), for a duplicate,
    and makes nothing of it. So Kafka must have what the record made (its spans and logs,
    the batch passed on to the next stage, a fidelity command) first. Sent side by side,
    to other partitions and other brokers in other requests, the changelog record can be
    on Kafka and those not when the worker is SIGKILLed: they were lost for good.

    So the records of a fetched list are handled in turn, each one's outputs handed to
    the producer (numbered as they are: ``output``) and its changelog record ``hold``-ed
    after them; once the list is handled, ``release`` waits for Kafka to have every output
    sent so far, then sends the held changelog records in the order they were held, and
    only then are the list's records acked (processors/faust_app.py ``App.before_acks``).
    One wait a list, not one a record. Every other changelog write of the worker (a
    window's, a forgotten host's tombstones) releases the held records first, so none
    overtakes a record of its host held before it."""

    def __init__(self) -> None:
        self._outputs = ChangelogAcks()  # (numbered as the changelog records are)
        self._held: list[Callable[[], Awaitable[None]]] = []
        self._releasing = asyncio.Lock()  # (two releases at once would send out of order)

    def output(self) -> Callable[[Any], None]:
        """An output on its way: what to call once Kafka has it."""
        return self._outputs.sent()

    def hold(self, send: Callable[[], Awaitable[None]]) -> None:
        """A changelog record to ``send`` once Kafka has the outputs sent before now."""
        self._held.append(send)

    async def release(self) -> None:
        async with self._releasing:
            if not self._held:
                return
            # Those held now came after their outputs were numbered: no later output is
            # waited for, however many a window sends meanwhile.
            held, self._held = self._held, []
            sent = 0
            try:
                await self._outputs.wait(self._outputs.last)
                for send in held:
                    await send()
                    sent += 1
            finally:
                # A release cut off (its task cancelled): the rest go with the next one,
                # first, rather than never while the list they came from is acked.
                self._held[:0] = held[sent:]


@dataclasses.dataclass
class Persisted:
    """What of a host's table value is on the changelog, as this worker wrote or found it."""

    value: dict[str, Any]  # the value (the object itself)
    head: bytes  # its head encoded
    entries: int  # what its entries take (changelog.sizes)
    # The version of its last snapshot (None: unknown here, the next record is one).
    snapshot: int | None = None

    def snapshot_due(self, v: int) -> bool:
        """Whether the record of version ``v`` must be a snapshot: the delta keys are
        those of the versions since the last one."""
        return self.snapshot is None or v - self.snapshot >= changelog.SLOTS


def on_changelog_acked(table: Any, key: bytes, value: bytes | None) -> Callable[[Any], None] | None:
    """What a changelog send calls with the record's metadata once Kafka has it: the
    on-disk store copies it (processors/table_store.py); the memory store has nothing to do."""
    if isinstance(table.data, DiskBackedStore):
        return table.data.acknowledged(key, value)
    return None


# process.table_store -> the Faust store URL of the stages' table.
STORES = {"memory": MEMORY_URL, "rocksdict": DISK_BACKED_URL}


@functools.lru_cache(maxsize=1 << 16)
def partition_of(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (the agent's, and the table's changelog)
    gives a host id."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


async def forget(table: Any, key: str, partitions: int, holds: Callable[[], bool] = lambda: True) -> None:
    """Delete a host's table value outside a stream: a tombstone for its snapshot and
    each of its delta keys, to its changelog partition, which ``persist`` cannot name
    without the record being processed.

    The snapshot's first: a worker killed after it recovers no such host, whichever
    of the rest Kafka has, the deltas left folded onto no value. (The deltas' first
    left, once compacted, the snapshot with some of the deltas after it gone: the
    host's value of before the first gap, the batches of the deltas after it lost
    though committed.)

    ``holds`` is asked before the value goes and before each tombstone: each send may
    wait for room in the producer, and a revocation begun meanwhile gives the partition
    to a worker whose records of the host the rest would delete. Once it says no, the
    rest are not sent, as if the worker had been killed there (a value not gone yet is
    forgotten again by the next window or silent-host check that finds it so)."""
    if not holds():
        return
    table.data.pop(key, None)
    partition = partition_of(key, partitions)
    await send(table, table.data._encode_key(key), None, partition)
    for slot in range(changelog.SLOTS):
        if not holds():
            return
        await send(table, changelog.delta_key(key, slot), None, partition)


def make_app(cfg: Config, stage: str) -> faust.App:
    """The Faust app of ``ktel process <stage>``: its chain (processors/chain.py)
    on its source topic, and on ktel.heartbeats if the chain reads them."""
    chain = build(stage, cfg)
    exported: tuple[Counter | Gauge, ...] = (
        BATCHES,
        EVENTS,
        DUPLICATES,
        DEAD_LETTERS,
        HOST_CONFLICTS,
        HOSTS,
        HOSTS_REFUSED,
    )
    if chain.durable:
        exported += (HOSTS_RESET,)
    if chain.heartbeats:
        exported += (HEARTBEATS, PROCESSES)
        for table in ("processes", "containers"):
            EVICTED.labels(stage, table)
        for reading in BOUNDS:
            NODE_READINGS_LEFT_OUT.labels(stage, reading)
        FLEET.forget_after_s = cfg.aggregate.host_ttl_seconds
        FLEET.clear()  # (one app a process: the hosts its cap counts are those it reads)
    for metric in exported:  # as 0 from the start
        metric.labels(stage)
    if any(isinstance(s, aggregate_core.Aggregate) for s in chain.stages):
        OVERFLOW.labels(stage)
        for why in ("rebalancing", "revoked"):
            SNAPSHOTS_SKIPPED.labels(stage, why)
    HOSTS_LIMIT.labels(stage).set(cfg.process.max_hosts)
    consumer_lag.up(cfg.kafka.topics.group(stage))

    session = cfg.process.session_timeout_seconds
    datadir = data_dir(cfg, stage)
    datadir.mkdir(parents=True, exist_ok=True)
    names = cfg.kafka.topics
    app = App(
        names.group(stage),
        **faust_settings(cfg.kafka),
        store=STORES[cfg.process.table_store],
        Table=HostTable,
        datadir=str(datadir),
        web_enabled=False,
        # Standbys would put other workers' hosts into this worker's timers.
        table_standby_replicas=0,
        topic_replication_factor=replicas(cfg.kafka),
        topic_partitions=cfg.kafka.raw_partitions,
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=session,
        # A few heartbeats per session, as Kafka advises; Faust's 3 s past 30 s.
        broker_heartbeat_interval=min(3.0, session / 10),
        broker_request_timeout=max(90.0, session),  # Faust: never below the session
    )

    def raw_topic(name: str) -> Any:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    source_name = names.topic(SOURCE[stage])
    from_agents = SOURCE[stage] == "raw"
    source = raw_topic(source_name)
    sink = names.topic(SINK[stage]) if stage in SINK else None
    # A split stage after the first that keeps hosts (not sample): the stages before it
    # may hold its hosts' records.
    upstream = (
        None
        if from_agents or not chain.durable
        else Upstream(
            stage,
            inputs_up_to(stage, SPLIT_ORDER, names.group, lambda s: names.topic(SOURCE[s])),
            cfg.kafka.raw_partitions,
            check_every(cfg.aggregate.host_ttl_seconds),
        )
    )
    app.upstream = upstream
    # A chain whose stages all keep their state in the worker (sample) keeps no
    # table: a table it never writes would still need its changelog topic at start.
    hosts: Any = {}
    if chain.durable:
        # (options: its store's, which counts the changelog records it leaves out by stage)
        hosts = app.Table(
            "host-state",
            default=dict,
            partitions=cfg.kafka.raw_partitions,
            options={"stage": stage},
        )
        REFUSED.labels(stage)  # (as 0 from the start)
    limit = cfg.process.max_state_bytes
    # host id -> what of its table value is on the changelog: what a record that would
    # grow the value past the limit leaves behind, and what the value takes. Kept with
    # the value object itself, so a value recovered from the changelog since (a
    # rebalance) is never mistaken for it; emptied when partitions go, so hosts another
    # worker took over cost nothing here.
    persisted: dict[str, Persisted] = {}
    acks = ChangelogAcks()
    outputs = OutputsFirst()
    app.before_acks = outputs.release

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # (mode types handlers narrower than it calls them)
    def forget_persisted(_app: Any, *_revoked: Any, signal: Any, **_kwargs: Any) -> None:
        persisted.clear()  # the hosts still here are measured again at their next record
        cap.recount()  # (the hosts of the partitions gone are another worker's now)

    # The source's partitions this worker was last assigned, and how many times each was
    # assigned elsewhere since it started (``holding``): Kafka revokes every partition at
    # each rebalance, so only an assignment tells one kept from one another worker had.
    assigned_before: set[int] = set()
    lost: collections.Counter[int] = collections.Counter()

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    def count_hosts_again(_app: Any, assigned: Any = (), *_: Any, signal: Any, **_kwargs: Any) -> None:
        cap.recount()  # (the new partitions' hosts, once recovered, are this worker's)
        held = {tp.partition for tp in assigned if tp.topic == source_name}
        gone = assigned_before - held
        lost.update(gone)
        assigned_before.clear()
        assigned_before.update(held)
        # A host of a partition another worker has may be heard from there (a heartbeat
        # that changes nothing writes no changelog record): if the partition comes back,
        # the host has the whole delay again. (Timed anew, not taken out: the next check
        # of silent hosts forgets what the chain keeps of the hosts no longer this
        # worker's, by those it finds here.)
        n = cfg.kafka.raw_partitions
        now = time.monotonic()
        for host_id in [h for h in last_seen if partition_of(h, n) in gone]:
            last_seen[host_id] = now

    def held_hosts() -> Any:
        """The hosts this worker holds: those of its partitions in the table, or, for a
        chain without one (sample), those its stages keep in memory. A chain that reads
        heartbeats also holds the hosts of its partitions in its per-host series (FLEET),
        for aggregate.host_ttl_seconds after their last heartbeat, including those whose
        heartbeats change no table value (no boot.id): counted only until the next
        recount, ever new host ids in such heartbeats took max_hosts more places at each."""
        if not chain.durable:
            return {h for states in chain.memory.values() for h in states}
        assigned = my_partitions()
        held = set(my_hosts(assigned))
        if chain.heartbeats:
            n = cfg.kafka.raw_partitions
            held.update(h for h in FLEET.host_ids() if partition_of(h, n) in assigned)
        return held

    # What process.max_hosts counts: a record of a host not held past it is refused
    # before it touches any state (processors/host_cap.py).
    cap = HostCap(cfg.process.max_hosts, held_hosts, HOSTS.labels(stage).set)

    async def refuse_new_host(msg: Any, host_id: str) -> bool:
        """Dead-letter ``msg`` if its host is new and the worker holds its fill (True)."""
        if cap.admits(host_id):
            return False
        child(HOSTS_REFUSED).inc()
        await dead_letter(
            msg,
            f"host {host_id!r:.60}: not one of the {len(cap.held())} hosts this worker holds, "
            f"and process.max_hosts = {cap.limit}",
        )
        return True

    def as_persisted(host_id: str, value: dict[str, Any]) -> Persisted:
        kept = persisted.get(host_id)
        if kept is None or kept.value is not value:
            entries = changelog.sizes(host_id, changelog.entries(value))
            kept = persisted[host_id] = Persisted(value, encoded(hosts, changelog.head(value)), entries)
        return kept

    def undo(host_id: str, value: dict[str, Any], result: Result) -> None:
        """Put back what a refused record changed: the host's table value as the changelog
        has it, and the worker's own state (``Result.revert``). Of a host new to the
        worker nothing stays (its value is the table's default, not in the table), so
        that invented hosts whose records are all refused take no place of max_hosts."""
        if chain.durable and host_id not in hosts.data:
            persisted.pop(host_id, None)
            last_seen.pop(host_id, None)
        elif result.changed:
            kept = as_persisted(host_id, value)
            restored = changelog.restored(decoded(hosts, kept.head), value, result.touched)
            hosts.data[host_id] = restored
            persisted[host_id] = dataclasses.replace(kept, value=restored)
        result.revert()

    async def save(
        msg: Any, host_id: str, value: dict[str, Any], result: Result
    ) -> Callable[[], Awaitable[None]] | None:
        """Keep what ``result`` changed of the host's value, and return the send of its
        changelog record, for the caller to hold after the record's outputs
        (``OutputsFirst``); or, past the limit, put back what the record changed and
        dead-letter it (None)."""
        kept = as_persisted(host_id, value)
        v = value[changelog.VERSION] = changelog.version(value) + 1
        its_head = changelog.head(value)
        head = encoded(hosts, its_head)
        entries = changelog.entries_size(host_id, value, result.touched, kept.entries)
        if len(head) + entries > limit:
            stored = len(kept.head) + kept.entries  # (the value as it was before the record)
            undo(host_id, value, result)  # (before any await: no other record has run since)
            why = (
                f"host {host_id!r:.60}: its state would take {len(head) + entries} bytes encoded, over "
                f"process.max_state_bytes = {limit}"
            )
            if stored <= limit:
                await dead_letter(msg, why)
                return None
            # Past the limit before the record: recovered so (a snapshot written under a
            # higher limit, or a hostile one). Every record that grows it would be refused,
            # and its records keep it from being forgotten as silent: stuck for good. So it
            # is forgotten now, and starts afresh with its next record (this one can be
            # re-driven from ktel.dlq).
            log.warning(
                "host %.60r forgotten: its stored state takes %d bytes encoded, over process.max_state_bytes "
                "= %d (counted in ktel_processor_hosts_reset_total)",
                host_id,
                stored,
                limit,
            )
            await dead_letter(msg, f"{why}; its stored state already took {stored}: the host is forgotten")
            child(HOSTS_RESET).inc()
            await drop_host(host_id, in_stream=True)
            return None
        key = changelog.delta_key(host_id, v)
        record = (
            None if kept.snapshot_due(v) else encoded(hosts, changelog.delta(value, result.touched, its_head))
        )
        if record is None or len(record) >= len(head) + entries:  # (a delta no smaller than the value)
            key, record = hosts.data._encode_key(host_id), encoded(hosts, value)
            kept.snapshot = v
        # With the value: a later record of the host refused while this one's changelog
        # record is held (until its list is handled) puts back ``kept``, which must be it.
        kept.head, kept.entries = head, entries
        keep(hosts, host_id, value, msg)
        return functools.partial(persist, hosts, key, record, msg.partition, acks.sent())

    async def dead_letter(msg: Any, err: WireError | str) -> None:
        """Send the record ``msg`` (a Faust message) to ktel.dlq with the reason."""
        DEAD_LETTERS.labels(stage).inc()
        log.warning("dead letter %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, err)
        dl = DeadLetter(stage, str(err), msg.topic, msg.partition, msg.offset, msg.value)
        await produce(app, names.dlq, *dead_letter_record(dl, msg.key))

    @functools.cache
    def child(metric: Any, *labels: str) -> Any:
        """The stage's series of ``metric`` with ``labels``, looked up once (per batch,
        prometheus_client's lookup costs)."""
        return metric.labels(stage, *labels)

    def records_of(result: Result, key: bytes | None) -> list[tuple[str, bytes]]:
        """The records (topic, value) of what a batch made: its spans and logs, and the
        batch it passes on to the sink."""
        records = [(names.spans, data) for sb in result.spans for data in encoded_parts(sb, key)]
        records += [(names.logs, data) for lb in result.logs for data in encoded_parts(lb, key)]
        if result.batch is not None and sink is not None:
            records += [(sink, data) for data in passed_on(result.batch, key or b"")]
        return records

    async def emit(
        result: Result,
        key: bytes | None = None,
        records: list[tuple[str, bytes]] | None = None,
        held: Callable[[str], bool] | None = None,
        on_its_way: OnItsWay = lambda: None,
    ) -> set[str]:
        """What a stage made; ``key``: that of the batch's record, and ``records`` what
        ``records_of`` made of it (else its spans and logs are encoded here);
        ``on_its_way``: called as each record is sent, what to call once Kafka has it
        (a source record's outputs: ``OutputsFirst.output``).

        ``held``: for a window's snapshots, whether their host is still this worker's
        (``window_holds``), asked before each is sent, as each send before it may wait for
        room in the producer across a revocation: the partition's new owner sends the
        host's snapshots from then on, and one of this worker's written after them is a
        sample out of order (remote-write's receiver refuses it, and the pull endpoint and
        OTLP show the series a step back until the next window). A snapshot not sent is
        counted (ktel_processor_snapshots_skipped_total); the hosts of those are returned.
        A record's own snapshots need no check: a revocation waits for its handling."""
        for name, n in result.counts.items():
            metric, labels = COUNTED[name]
            child(metric, *labels).inc(n)
        for name, by_kind in result.kind_counts.items():
            for kind, n in by_kind.items():
                child(KIND_COUNTED[name], kind).inc(n)
        for topic, data in records_of(result, key) if records is None else records:
            await produce(app, topic, key, data, acked=on_its_way())
        if result.spans:
            child(SPANS).inc(sum(len(sb.spans) for sb in result.spans))
        if result.logs:
            child(LOGS).inc(sum(len(lb.logs) for lb in result.logs))
        skipped: set[str] = set()
        for host_id, snap in result.snapshots:
            if held is not None and not held(host_id):
                child(SNAPSHOTS_SKIPPED, "rebalancing" if app.rebalancing else "revoked").inc()
                skipped.add(host_id)
                continue
            await send_signal(names.metrics, host_id.encode(), snap, on_its_way)
            child(SNAPSHOTS).inc()
        for cmd in result.commands:
            log.info(
                "host %s: %s sampled 1 in %d (command %s)", cmd.target, cmd.probe, cmd.sample_every, cmd.id
            )
            await produce(app, names.control, cmd.key, encode_command(cmd), acked=on_its_way())
            child(COMMANDS).inc()
        return skipped

    async def send_signal(
        topic: str,
        key: bytes | None,
        signal: Signal,
        on_its_way: OnItsWay = lambda: None,
    ) -> None:
        for data in encoded_parts(signal, key):  # (one record, unless it is too large for one)
            await produce(app, topic, key, data, acked=on_its_way())

    input_age = INPUT_AGE.labels(stage)

    def on_its_partition(msg: Any, host_id: str, what: str) -> None:
        """Refuse a record (WireError) that is not on the partition its key hashes to, as
        Kafka's default partitioner puts it: any client can name a partition when it
        writes. The table's value of a host is written to the changelog partition of the
        record, and read back from each one a host's records went to, in no set order:
        one on another partition would mix its writes into the host's state, and the
        worker holding the host's own partition would not report it (a stage without a
        table has nothing to mix)."""
        if not chain.durable:
            return
        want = partition_of(host_id, cfg.kafka.raw_partitions)
        if msg.partition != want:
            raise WireError(
                f"{what}: host {host_id!r:.60} is on partition {msg.partition} of {msg.topic}, not "
                f"{want}, where its key puts it"
            )

    async def take_batch(msg: Any) -> None:
        # (Faust gives the record's timestamp in seconds)
        input_age.observe(max(0.0, time.time() - msg.timestamp))
        try:
            batch = decode_batch(msg.value)
            if msg.key != batch.key:
                # Its key decides the partition, hence the worker and the table entry:
                # a batch keyed otherwise could write another host's state.
                raise WireError(f"raw batch: key {msg.key!r:.60} is not its host id {batch.host_id!r:.60}")
            if from_agents and (batch.resource is not None or batch.processes is not None):
                # (what enrich adds: carried from ktel.raw, a resource of megabytes was copied
                # into every part of a batch the dedupe stage passed on, down to one event each)
                raise WireError("raw batch: it carries res or proc, which enrich adds, not an agent")
            on_its_partition(msg, batch.host_id, "raw batch")
        except WireError as err:
            await dead_letter(msg, err)
            return
        if await refuse_new_host(msg, batch.host_id):
            return
        if batch.host_id in dropping:
            await after_drop(batch.host_id)
        value = hosts[batch.host_id] if chain.durable else {}
        if chain.durable:
            last_seen[batch.host_id] = time.monotonic()
            as_persisted(batch.host_id, value)  # (what a refused record puts back)
        try:
            result = chain.on_batch(value, batch, time.time_ns() // 1_000_000)
        except Exception as err:
            raise StageFailed from err
        if result.refused is not None:
            undo(batch.host_id, value, result)  # (the stages leave the table value as it was)
            await dead_letter(msg, result.refused)
            return
        # Encoded before anything is saved: a record Kafka would refuse, sent after the
        # counts were, would stop the worker with them counted and the rest unsent, and
        # its restart on the same record again.
        records = records_of(result, msg.key)
        if (why := too_large(records, msg.key)) is not None:
            undo(batch.host_id, value, result)
            await dead_letter(msg, f"host {batch.host_id!r:.60}: {why}")
            return
        # (only stages that keep state change it)
        saved = await save(msg, batch.host_id, value, result) if result.changed else None
        if result.changed and saved is None:
            return
        cap.add(batch.host_id)
        if result.batch is not None:  # (not a duplicate)
            child(BATCHES).inc()
        await emit(result, key=msg.key, records=records, on_its_way=outputs.output)
        if saved is not None:
            outputs.hold(saved)

    async def take_heartbeat(msg: Any) -> None:
        try:
            hb = decode_heartbeat(msg.value)
            host_id = hb["host"][HOST_ID]
            if msg.key != host_id.encode():
                # The table key must hash to the partition the record came from.
                raise WireError(f"heartbeat: key {msg.key!r:.60} is not its host.id {host_id!r:.60}")
            on_its_partition(msg, host_id, "heartbeat")
            ahead_s = hb["ts"] / 1000 - time.time()
            if ahead_s > MAX_HEARTBEAT_AHEAD_S:
                raise WireError(
                    f"heartbeat: stamped {ahead_s:.0f} s ahead of this worker's clock (at most "
                    f"{MAX_HEARTBEAT_AHEAD_S:.0f} s are taken): its agent's clock is wrong, or the time "
                    "is forged; taken, it would have its host's heartbeats until then ignored as older"
                )
        except WireError as err:
            await dead_letter(msg, err)
            return
        if await refuse_new_host(msg, host_id):
            return
        if host_id in dropping:
            await after_drop(host_id)
        last_seen[host_id] = time.monotonic()
        value = hosts[host_id]
        as_persisted(host_id, value)
        try:
            result = chain.on_heartbeat(value, host_id, cast(dict[str, Any], hb))  # (JSON to the stages)
        except Exception as err:
            raise StageFailed from err
        saved = None
        if not result.changed and host_id not in hosts.data:
            # (one without boot.id: no value of it kept, so no note of one either, which
            # only a rebalance would clear, for every host id a writer could make up)
            persisted.pop(host_id, None)
        elif result.changed and (saved := await save(msg, host_id, value, result)) is None:
            return
        cap.add(host_id)
        child(HEARTBEATS).inc()
        for reading, n in FLEET.observe(host_id, hb).items():
            child(NODE_READINGS_LEFT_OUT, reading).inc(n)
        await emit(result, on_its_way=outputs.output)
        if saved is not None:
            outputs.hold(saved)

    poisoned = Poisoned(datadir / "poisoned.json")

    async def take(msg: Any, handle: Any) -> None:
        """``handle`` the record (a Faust message), unless it stopped a worker before
        (processors/stop.py)."""
        why = poisoned.reason(msg)
        if why is not None:
            await dead_letter(msg, why)
            return
        try:
            await handle(msg)
        except StageFailed as err:
            poisoned.add(msg, err)
            stop(stage, msg, err.__cause__ or err)
        except Exception as err:  # whatever it is: the record must stay uncommitted
            stop(stage, msg, err)

    # The source's records, and the heartbeats, in lists, below Faust's per-record stream
    # (why: processors/faust_app.py).
    app.take_in_lists(source, functools.partial(take, handle=take_batch))
    if chain.heartbeats:
        app.take_in_lists(raw_topic(names.heartbeats), functools.partial(take, handle=take_heartbeat))

    exported_series: set[str] = set()

    def count_series(snapshots: list[tuple[str, MetricSnapshot]], now_ms: int) -> None:
        """SLI M11: series per metric, from a window's snapshots of every host held: those
        stamped at its close (one stamped before holds new series at zero, which its
        host's snapshot after it names again: processors/aggregate_core.py)."""
        per_metric = collections.Counter(
            row[0] for _, snap in snapshots if snap.ts_ms == now_ms for row in snap.series
        )
        for gone in exported_series - set(per_metric):
            SERIES.remove(stage, gone)
        for metric, n in per_metric.items():
            SERIES.labels(stage, metric).set(n)
        exported_series.clear()
        exported_series.update(per_metric)

    async def close_window(timed: Stage, now_ms: int) -> None:
        if timed.durable and (why := readiness(app, source_name)) is not None:
            # Its hosts' values are being recovered (a rebalance, a restart from the disk
            # copy): a value not yet folded up to the changelog's end is old, and its
            # window would report old counts and forget hosts as silent that another
            # worker kept alive meanwhile. The first window after does this one's work.
            log.info("%s window skipped: %s", timed.name, why)
            return
        assigned = my_partitions()
        # Hosts of partitions another worker holds now are that worker's to report. (A
        # stage without a table windows its own memory: the pass over every host held,
        # taken only if it forgets any.)
        mine = my_hosts(assigned) if timed.durable else {}
        result = chain.on_window(
            timed, mine, now_ms, len(assigned) / cfg.kafka.raw_partitions, reading=backlog_hosts(mine)
        )
        if result.forget and not timed.durable:
            mine = my_hosts(assigned)
        # The hosts it forgets, as it found them: one with a record taken since (while
        # this close waits below) is alive, and that record's counts are committed with
        # it, so its value must stay, its series not be marked stale (the next window
        # emits them, its memory of them gone), and it is not counted as forgotten. So
        # each one's last, stale snapshot goes as it is forgotten, its records held.
        looked = {h: (mine[h], changelog.version(mine[h])) for h in result.forget if h in mine}
        last = {h: Result() for h in result.forget}

        def silent(host_id: str) -> bool:
            if host_id not in looked:
                return True  # (not a table value's host)
            value, v = looked[host_id]
            return hosts.data.get(host_id) is value and changelog.version(value) == v

        if result.snapshots:
            count_series(result.snapshots, now_ms)
            for host_id, snap in result.snapshots:
                if host_id in last:
                    last[host_id].snapshots.append((host_id, snap))
            result.snapshots = [(h, snap) for h, snap in result.snapshots if h not in last]
        if result.snapshots or result.forget:
            await acks.wait(acks.last)  # (what it emits, Kafka has: ChangelogAcks)
        for host_id in await emit(result, held=window_holds()):
            # Its snapshot not sent, though the stage took it for sent: a host still this
            # worker's after the rebalance is emitted whole at the next window, as after any.
            await emit(timed.forget(host_id))
        forgotten = 0
        for host_id in result.forget:
            if not silent(host_id):  # (emit, or the forgetting of another, may have waited)
                continue
            if host_id in looked and heard(host_id, looked[host_id][0], timed):
                await drop_section(host_id, timed, last[host_id])
            elif await drop_host(host_id, last[host_id]):  # (not if a revocation stopped it)
                forgotten += 1
        if forgotten:
            child(EXPIRED_HOSTS).inc(forgotten)
        if not chain.durable:
            # The sample stage forgets hosts in its window work, the worker does not
            # see which (a durable stage's go through drop_host). In a chain with a
            # table the hosts held are the table's (held_hosts), which that leaves as
            # they were: counting them again there cost a pass over every host of the
            # worker each window (about 10 % of the fused worker at 10,000 hosts).
            cap.recount()
            cap.held()  # (and the gauge follows)

    def backlog_hosts(mine: Iterable[str], *topics: str) -> set[str]:
        """The hosts of ``mine`` whose partition of ``topics`` (the source's, by default) the
        worker has not yet read up to where it ended when the worker took it
        (``App.backlog``), or a stage before it has not passed on (``Upstream``): silent
        here, they may have records in what is still unread."""
        behind: set[int] = set()
        for topic in topics or (source_name,):
            behind |= app.reading(topic)
        if app.upstream is not None:  # (or in a stage before this one: processors/upstream.py)
            behind |= app.upstream.held()
        if not behind:
            return set()
        n = cfg.kafka.raw_partitions
        return {h for h in mine if partition_of(h, n) in behind}

    def my_partitions() -> set[int]:
        return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == source_name}

    def my_hosts(assigned: set[int]) -> dict[str, Any]:
        n = cfg.kafka.raw_partitions
        return {h: v for h, v in hosts.items() if partition_of(h, n) in assigned}

    # Host id -> set once its tombstones are sent, for a host being forgotten (drop_host).
    dropping: dict[str, asyncio.Event] = {}

    async def after_drop(host_id: str) -> None:
        """Wait until ``host_id``'s tombstones are sent, if it is being forgotten. A record
        of it taken before then would start the host afresh, and be handled and committed
        with its changelog record sent, which tombstones sent after it (its snapshot key's
        or its delta keys') delete: a worker killed then recovers no such host, and the record's
        counts are lost for good. Taken after them, its record is the host's last."""
        while (gone := dropping.get(host_id)) is not None:
            await gone.wait()

    def still_mine(host_id: str) -> bool:
        """Whether no rebalance is under way and ``host_id``'s partition is this worker's."""
        return not app.rebalancing and partition_of(host_id, cfg.kafka.raw_partitions) in my_partitions()

    def window_holds() -> Callable[[str], bool]:
        """``still_mine`` for the many hosts of one window: the partitions held are read
        now, and again only once a rebalance began since (Faust counts them as they begin,
        ``app.rebalancing_count``, before any partition is revoked), not for each host:
        ``my_partitions`` builds its sets anew, about 70 µs with 32 partitions of each
        topic held, which a window of 10,000 hosts would pay 10,000 times."""
        n = cfg.kafka.raw_partitions
        began, assigned = app.rebalancing_count, my_partitions()

        def held(host_id: str) -> bool:
            nonlocal began, assigned
            if app.rebalancing_count != began:
                began, assigned = app.rebalancing_count, my_partitions()
            return not app.rebalancing and partition_of(host_id, n) in assigned

        return held

    async def holding(
        host_id: str,
        work: Callable[[Callable[[], bool]], Awaitable[None]],
        last: Result | None,
        in_stream: bool = False,
    ) -> bool:
        """``work`` on ``host_id``'s value outside the stream, after ``last`` (its last,
        stale snapshot) is emitted, its records waiting meanwhile (``after_drop``): one
        taken between the two would be counted into series that snapshot ends. Whether
        ``work`` ran.

        Not done if, by then, a rebalance is under way or took the host's partition: the
        window or timer that asked for it may have waited (for the changelog, for room in
        the producer) across the revocation, and the worker now holding the partition,
        recovered from the changelog, writes the host's records there; tombstones or a
        snapshot written after them are what the next worker to recover it would find
        (the host's counts since lost). ``work`` is given that check to ask again before
        each changelog record it sends, each of which may wait as long, and stops there
        when it fails; also once the partition was another worker's meanwhile and came
        back (two rebalances within one wait): that worker may have written the host's
        records since, which the rest would delete. A record's own handling
        (``in_stream``) is one a revocation waits for, its partition still this worker's."""
        partition = partition_of(host_id, cfg.kafka.raw_partitions)
        was_lost = lost[partition]
        holds = (lambda: True) if in_stream else (lambda: lost[partition] == was_lost and still_mine(host_id))
        dropping[host_id] = gone = asyncio.Event()
        try:
            if last is not None:  # (a window's: not sent either, if no longer the host's to send)
                await emit(last, held=lambda _host_id: holds())
            if not holds():
                return False
            await work(holds)
            return True
        finally:
            if dropping.get(host_id) is gone:  # (not a later drop's of the same host)
                del dropping[host_id]
            gone.set()

    async def drop_host(host_id: str, last: Result | None = None, in_stream: bool = False) -> bool:
        """Forget ``host_id`` everywhere: this worker's memory, the chain's, the table
        (tombstones in its changelog), after ``last`` is emitted. Its records wait
        meanwhile (``after_drop``); ``in_stream``: asked by the record being handled.
        Whether it was forgotten (not, if a revocation came first: ``holding``)."""

        async def work(holds: Callable[[], bool]) -> None:
            persisted.pop(host_id, None)
            last_seen.pop(host_id, None)
            cap.drop(host_id)
            await emit(chain.forget(host_id))
            await outputs.release()  # (a record of the host held would come after its tombstones)
            await forget(hosts, host_id, cfg.kafka.raw_partitions, holds)

        return await holding(host_id, work, last, in_stream)

    async def drop_section(host_id: str, done: Stage, last: Result | None = None) -> None:
        """Forget what the stage ``done`` keeps of ``host_id`` (its section of the table
        value, its memory) and keep the rest, the value without it written to the
        changelog as a snapshot, after ``last`` is emitted. Its records wait meanwhile
        (``after_drop``)."""

        async def work(holds: Callable[[], bool]) -> None:
            value = hosts.data.get(host_id)
            if value is None:  # (its partition revoked while ``last`` waited for the producer)
                return
            await emit(done.forget(host_id))
            await outputs.release()  # (a record of the host held would come after this one)
            # Asked again after that send, and the value changed only then: from here to the
            # record's send there is no wait, so it is changed only if the record is sent.
            if hosts.data.get(host_id) is not value or not holds():
                return
            value.pop(done.section, None)
            v = value[changelog.VERSION] = changelog.version(value) + 1
            entries = changelog.sizes(host_id, changelog.entries(value))
            head = encoded(hosts, changelog.head(value))
            persisted[host_id] = Persisted(value, head, entries, snapshot=v)
            record = encoded(hosts, value)
            partition = partition_of(host_id, cfg.kafka.raw_partitions)
            await send(hosts, hosts.data._encode_key(host_id), record, partition, acks.sent())

        await holding(host_id, work, last)

    def heard(host_id: str, value: dict[str, Any], done: Stage) -> bool:
        """Whether ``host_id``, which the stage ``done`` is done with, is still alive to the
        others of the chain: a record it does not take (a heartbeat, to the fused aggregate)
        named the host within aggregate.host_ttl_seconds, and its value holds more than
        ``done``'s section. Such a host keeps the rest of its value (``drop_section``): in
        split mode too, the enrich stage keeps what a heartbeating host's heartbeats gave
        when the aggregate forgets its series."""
        now = time.monotonic()
        others = value.keys() - {changelog.VERSION, done.section}
        return bool(others) and now - last_seen.setdefault(host_id, now) <= ttl_s

    # Host id -> the worker's monotonic clock at the host's last record here, batch or
    # heartbeat (one the expiry finds missing is taken as seen then: after a restart
    # or a rebalance, a host has the whole delay again).
    last_seen: dict[str, float] = {}
    ttl_s = cfg.aggregate.host_ttl_seconds
    silent_s = ttl_s * SILENT_TTL_MARGIN + 2 * cfg.aggregate.window_seconds

    async def forget_silent() -> None:
        """Forget the hosts of this worker's partitions that no record named for
        ``silent_s``, and its memory of hosts that are no longer its own."""
        if readiness(app, source_name) is not None:
            return  # (values being recovered: their hosts' records may be on their way)
        assigned = my_partitions()
        # The values of hosts of partitions this worker no longer holds (written here
        # before a rebalance took them): another worker holds them now, recovered from
        # the changelog, so this copy is only memory this worker would never free.
        n = cfg.kafka.raw_partitions
        # (A partition that comes back was revoked in between, and Faust then recovers
        # its hosts again, from the changelog or the on-disk copy, not from memory.)
        for host_id in [h for h in hosts.data if partition_of(h, n) not in assigned]:
            hosts.data.pop(host_id, None)
            persisted.pop(host_id, None)
        mine = my_hosts(assigned).keys()
        for host_id in last_seen.keys() - mine:
            del last_seen[host_id]
            await emit(chain.forget(host_id))
        now = time.monotonic()
        # (not one of a partition still being read: its records may be in what is unread)
        behind = backlog_hosts(mine, source_name, *([names.heartbeats] if chain.heartbeats else []))
        silent = [h for h in mine if now - last_seen.setdefault(h, now) > silent_s and h not in behind]
        forgotten = 0
        for host_id in silent:
            if now - last_seen.get(host_id, now) <= silent_s:
                # A record of it taken while an earlier host's tombstones waited for room
                # in the producer: it is alive, and that record's counts are committed.
                continue
            silent_for = now - last_seen[host_id]
            if await drop_host(host_id):  # (not if a revocation stopped it)
                log.info("host %.60r forgotten: no record for %.0f s", host_id, silent_for)
                forgotten += 1
        if forgotten:
            child(EXPIRED_HOSTS).inc(forgotten)
        cap.recount()
        cap.held()  # (and the gauge follows)

    if chain.durable:
        app.timer(min(SILENT_CHECK_S, ttl_s / 4), name="forget_silent_hosts")(forget_silent)

    def every_window(timed: Stage) -> None:
        """Close ``timed``'s windows (``close_windows``) in a task, as Faust runs its
        timers: an exception in it stops the worker."""
        assert timed.window_s is not None
        window_ms = max(1, round(timed.window_s * 1000))
        delay = WINDOW_DELAY.labels(stage, timed.name)
        closing = asyncio.Lock()

        async def close(now_ms: int) -> None:
            async with closing:
                await close_window(timed, now_ms)

        async def closed() -> None:
            async with closing:
                pass

        # A graceful stop stops the producer, then cancels the app's tasks: a close under
        # way when it began finishes first, its records flushed with the rest, rather
        # than being cut off halfway (its snapshots lost) or sending to a stopped producer.
        app.on_before_shutdown.connect(lambda *_, **__: closed())

        @app.task
        async def window() -> None:
            await close_windows(window_ms, close, delay.observe, app.sleep, lambda: app.should_stop)

    for timed in chain.timed():
        every_window(timed)

    @app.task
    async def serve_metrics():
        selfmetrics.ready_when(lambda: readiness(app, names.topic(SOURCE[stage])))
        selfmetrics.serve(
            cfg.process.metrics_port, cfg.service.metrics_bind, "process.metrics_port", extra=FLEET.exposition
        )

    if upstream is not None:
        checker = upstream

        @app.task
        async def check_upstream() -> None:
            await checker.follow(cfg.kafka, lambda: app.should_stop, app.sleep)

    @app.timer(LAG_INTERVAL_S, name="consumer_lag")
    async def export_lag() -> None:
        consumer_lag.export(app.conf.id, held_lags(app.monitor, app.assignor.assigned_actives()))

    return app


def next_window(now_ms: int, window_ms: int, last_due_ms: int | None = None) -> int:
    """When a window closing every ``window_ms`` is due next (ms since the epoch).

    Windows close on multiples of their length since the epoch, so a window that
    closed late (its timer shares the event loop with the stream) does not push the
    ones after it back, as a timer sleeping a window after each close would. After
    ``last_due_ms``, the next is the one after it; if that too has passed, the latest
    that has (the ones between are skipped: a worker behind its windows closes one
    at a time, late, rather than several back to back)."""
    if last_due_ms is None:
        return (now_ms // window_ms + 1) * window_ms
    return max(last_due_ms + window_ms, now_ms // window_ms * window_ms)


async def close_windows(
    window_ms: int,
    close: Callable[[int], Awaitable[None]],
    observe_delay: Callable[[float], None],
    sleep: Callable[[float], Awaitable[None]],
    stopping: Callable[[], bool],
    clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
) -> None:
    """``close(now_ms)`` each window on its deadline (``next_window``), as soon as the
    event loop lets it, until ``stopping``; how late each closed goes to ``observe_delay``."""
    due_ms = next_window(clock_ms(), window_ms)
    while True:
        if due_ms - clock_ms() > window_ms:
            # The wall clock stepped back: the deadlines from the clock as it is now, not
            # a sleep as long as the step with no window closed.
            due_ms = next_window(clock_ms(), window_ms)
        await sleep((due_ms - clock_ms()) / 1000)
        if stopping():
            return
        now_ms = clock_ms()
        if now_ms < due_ms:
            continue  # (the loop's clock woke it a little early)
        # Woken more than a window late (a blocked loop, the clock stepped forward, the
        # process paused): this close is the latest deadline passed, so the next is
        # after it, never another one right away (the sample stage would take the few
        # ms between the two for a window and see a spike).
        due_ms = max(due_ms, now_ms // window_ms * window_ms)
        observe_delay((now_ms - due_ms) / 1000)
        await close(now_ms)
        due_ms = next_window(clock_ms(), window_ms, due_ms)


def held_lags(monitor: Any, held: Set[Any]) -> dict[tuple[str, int], int]:
    """Each held partition's lag, from what Faust's monitor tracks: its end (at each
    fetch) and the offset this worker committed. A partition whose commit the monitor
    has not seen is left out: it knows of none until this worker's first commit there,
    and clears them at every rebalance, and counting from 0 gave the partition's whole
    history (millions of records on ktel.raw) as its lag until that commit."""
    committed = monitor.tp_committed_offsets
    return {
        (tp.topic, tp.partition): end - committed[tp]
        for tp, end in monitor.tp_end_offsets.items()
        if tp in held and tp in committed
    }


def readiness(app: Any, source: str) -> str | None:
    """Why a worker is not ready (/readyz), or None: partitions of its source topic
    assigned and its tables recovered from their changelogs, no rebalance under way."""
    if app.rebalancing:
        return "rebalancing"
    if not any(tp.topic == source for tp in app.assignor.assigned_actives()):
        return f"no partition of {source} assigned"
    if app.in_recovery or not app.tables.recovery.completed.is_set():
        return "recovering tables from their changelogs"
    return None


def data_dir(cfg: Config, stage: str) -> Path:
    """Where a stage keeps its tables' on-disk copies: named by the prefix too, since the
    copies are named by table, and two pipelines sharing process.data_dir must not read
    each other's (a copy of another pipeline's changelog would be taken as this one's)."""
    return cfg.process.data_dir / f"{cfg.kafka.prefix}{stage}"


def changelog_topic(names: Topics, stage: str) -> str:
    # Faust's name for the "host-state" table of the stage's app (make_app)
    return f"{names.group(stage)}-host-state-changelog"


def check_partitions(cfg: Config, stage: str) -> None:
    """Refuse to start a stage whose table would not be co-partitioned with its input.

    The table (and its changelog) has ``kafka.raw_partitions`` partitions; Faust
    refuses a table write from a record of a topic partitioned otherwise, and a
    worker would crash on its first batch. That happens after ``kafka.raw_partitions``
    is changed once the topics exist, and with a ktel.heartbeats made before the
    enrich stage existed (then it followed ``kafka.output_partitions``).
    """
    if stage == "sample":
        return  # it keeps no table
    want = cfg.kafka.raw_partitions
    # What to do about each topic, by the partition count it has ({n}). ktel.raw
    # comes first: when it is the one that differs, the others follow from it.
    remake = "delete it with the stages stopped and run `ktel topics`, or set kafka.raw_partitions = {n}"
    names = cfg.kafka.topics
    fixes = {names.raw: "set kafka.raw_partitions = {n}"}
    fixes.setdefault(names.topic(SOURCE[stage]), remake)  # never "delete ktel.raw"
    fixes[changelog_topic(names, stage)] = (
        "delete it with the stage stopped (the stage makes it again, empty), and the "
        f"copy of it under process.data_dir ({data_dir(cfg, stage)})"
    )
    if stage in ("enrich", "all"):
        fixes[names.heartbeats] = "delete it (it holds only recent heartbeats) and run `ktel topics`"
    counts = asyncio.run(retry(functools.partial(partition_counts, cfg.kafka), what="describe the topics"))
    for topic, fix in fixes.items():
        n = counts.get(topic)
        if n is not None and n != want:
            raise SystemExit(
                f"ktel process {stage}: {topic} has {n} partitions but kafka.raw_partitions = {want}, "
                f"which the stage's table has and must share with {topic}: {fix.format(n=n)}"
            )


def replicas(kafka: KafkaConfig) -> int:
    """The replication factor of the topics Faust creates (make_app)."""
    if kafka.replication_factor == "auto":
        # Resolved against the cluster by run(), before the app is made.
        raise ValueError("kafka.replication_factor 'auto' must be resolved (ktel.topics.replication) first")
    return kafka.replication_factor


# The collector's first threshold (Python's default: 700). A worker allocates a few
# hundred containers per record (Faust's event and message, the stages' results) and
# holds every host's state, so with the default it collects its youngest objects every
# few records, and the older ones, which that promotes, every few dozen: about a tenth
# of the stages' own work at 10,000 hosts (bench/RESULTS.md, "The chain's own work per
# batch"). What it collects is the same, a little later.
GC_THRESHOLD = 10_000


def run(cfg: Config, stage: str, log_level: str = "info") -> None:
    if stage in ("sample", "all"):
        check_sample_commands(cfg)
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
    # Faust, left to find out, would log a traceback per attempt and no reason.
    asyncio.run(reachable(cfg.kafka, f"ktel process {stage}"))
    check_partitions(cfg, stage)
    # Faust's topics get the replication ktel's own get: "auto" resolved once, here.
    rf_isr = asyncio.run(retry(lambda: replication(cfg.kafka), what="find the replication factor"))
    cfg = cfg.model_copy(update={"kafka": resolved(cfg.kafka, rf_isr)})
    # Faust's assignor topic (unused by the stages, but Faust makes it at start), made
    # here so that it gets kafka.min_insync_replicas too.
    names = cfg.kafka.topics
    specs = [TopicSpec(f"{names.group(stage)}-__assignor-__leader", 1)]
    if stage != "sample":
        # Created before Faust starts: when Faust creates it itself, a worker that
        # reads metadata a moment too early fails its table writes with
        # PartitionsMismatch (seen with Kafka 3.9 and faust-streaming 0.15), which
        # stops it (processors/stop.py).
        specs.append(
            TopicSpec(
                changelog_topic(names, stage),
                cfg.kafka.raw_partitions,
                extra_config={"cleanup.policy": "compact"},
            )
        )
    asyncio.run(retry(lambda: create_topics(cfg.kafka, specs), what="create the stage's own topics"))
    # ktel's logging (ktel/logs.py), which the worker would otherwise replace with its own.
    worker = Worker(
        make_app(cfg, stage),
        stage,
        loglevel=log_level.upper(),
        logging_config=logs.config(log_level, cfg.service.log_format),
        quiet=True,
    )
    worker.execute_from_commandline()
