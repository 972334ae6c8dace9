"""The exporters' shared Kafka loop: at-least-once from ktel's output topics.

An offset is committed only after ``deliver`` returned, i.e. after the backend
acknowledged everything made from the records up to it (docs/design.md, principle 4).
Records that do not decode, or that speak for a host other than their key's
(``check_keyed``), go to ``ktel.dlq`` with the reason; ``deliver`` gets
each decoded record with where it came from (``Record``), so that what it cannot
send is dead-lettered pointing back at its record.

While ``deliver`` waits for a backend (which may be down for minutes: the retry
helper keeps trying), and while the dead letters of records that did not decode wait
for ``ktel.dlq``, the consumer's partitions are paused and ``getmany`` keeps
being called. Paused partitions return nothing, so nothing piles up in memory,
and the calls keep the consumer in its group: aiokafka leaves the group when
``getmany`` has not been called for ``max_poll_interval_ms``.

The process is ready (/readyz, ktel/selfmetrics.py) once the consumer is connected
and holds partitions; without a group, once it also knows where in each partition
it starts, so that a record written after /readyz said ready is read.

Where to read from is never left to aiokafka (``auto_offset_reset`` "none"): its
"earliest" went on silently past records Kafka's retention had deleted before they were
delivered (a backend away for longer than the topic keeps records), which is data lost
with nothing to show for it. Instead (``_start_over``): a group's partition with no
commit is read from its first record; a position retention has passed is counted
(``ktel_exporter_records_expired_total``) and logged, then read on from the partition's
first record; a position past a partition's end (the topic deleted and made again,
records lost in an unclean leader election) is read again from its first record, as a
new group would. A group commits where it starts over.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    KafkaTimeoutError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
)
from prometheus_client import Counter, Histogram

from ktel import consumer_lag, selfmetrics
from ktel.kafka_client import Kafka, client_kwargs, settings, started
from ktel.retry import Permanent, retry
from ktel.runtime import tune_gc
from ktel.wire import (
    DeadLetter,
    WireError,
    check_keyed,
    dead_letter_fits,
    dead_letter_record,
    encode_signal,
    encode_snapshot,
    with_rows,
)

log = logging.getLogger("ktel.export")

DEAD_LETTERS = Counter("ktel_exporter_dead_letters", "records sent to ktel.dlq", ["exporter"])
DEAD_LETTERED_ITEMS = Counter(
    "ktel_exporter_dead_lettered_items",
    "samples, spans, log records or data points in the records sent to ktel.dlq",
    ["exporter", "signal"],
)

EXPIRED = Counter(
    "ktel_exporter_records_expired",
    "records Kafka's retention deleted before this exporter delivered them",
    ["exporter", "topic"],
)

# End-to-end ingestion latency (SLI M2): from the time a record's data was made
# (a snapshot's sample timestamp, the window's close that counted the kernel's
# events; a span's end; a log record's time) to the backend's acknowledgement
# (remote-write 2xx, OTLP success). One observation per record (a snapshot, a batch
# of spans or logs) and request that carried it; dead-lettered records are not
# observed. Buckets span the aggregate windows in use (2 s to 60 s) and a backlog.
INGESTION_LATENCY = Histogram(
    "ktel_exporter_ingestion_latency_seconds",
    "from a record's data timestamp to the backend's acknowledgement",
    ["exporter"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 15, 30, 60, 120, 300, 600),
)


def observe_acknowledged(exporter: str, oldest_ts_ns: Iterable[int]) -> None:
    """Record the ingestion latency of records the backend just acknowledged, each
    from the oldest timestamp it carried."""
    now = time.time_ns()
    hist = INGESTION_LATENCY.labels(exporter)
    for ts in oldest_ts_ns:
        hist.observe(max(now - ts, 0) / 1e9)


# How often a paused consumer calls getmany while a delivery is in flight.
POLL_WHILE_PAUSED_S = 1.0
# How often a delivery that waits (its backend away, refusing, misconfigured) exports
# the lag anew, from the ends Kafka has now: a paused partition is not fetched, so the
# end its last fetch saw stays, and the lag would show none of what arrived since
# (KtelConsumerLagHigh, for a backend that is away, reads it). And how long that lookup
# may hold up the polls.
LAG_WHILE_PAUSED_S = 10.0
LAG_LOOKUP_S = 5.0
# How long a group-less read waits for its partitions to be read up to where they ended
# when it began before it says it is (``run``'s ``read_up``) all the same: one without a
# leader would otherwise hold that up for as long as it has none.
READ_UP_S = 120.0


@dataclass(frozen=True, slots=True)
class Record:
    """A decoded record (``item``), the Kafka record it was read from, and the
    dead-letter topic of what cannot be made of it (``dlq``)."""

    item: Any
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    dlq: str
    # Whether ``item`` holds every row of ``value`` (False: ``keeping`` some of them).
    whole: bool = True


def keeping(rec: Record, rows: Sequence[Any]) -> Record:
    """``rec`` with only ``rows`` of its item's, the others gone another way (dead-lettered
    apart, taken by the backend in another request): what is refused of it is a record of
    just those (``refuse``), not the record it was read from, which holds the others."""
    return dataclasses.replace(rec, item=with_rows(rec.item, rows), whole=False)


class DeadLetterSink(Protocol):
    """Where an exporter's dead letters go: ``ktel.dlq``, through the exporter's Kafka
    producer; or, when ``ktel dlq --redrive`` delivers a dead letter to its backend again,
    what the backend refused of it once more, reported there and not dead-lettered a second
    time (ktel/dlq.py)."""

    async def send_and_wait(self, topic: str, value: bytes, key: bytes | None = None) -> Any: ...


Decoder = Callable[[bytes], Any]
Deliver = Callable[[list[Record], DeadLetterSink], Awaitable[None]]


@dataclass(frozen=True)
class Delivery:
    """An exporter's delivery to its configured backend (``deliver``), and where that is,
    for a person (``backend``): used by the exporter's loop and by ``ktel dlq --redrive``."""

    deliver: Deliver
    backend: str


async def dead_letter(producer: DeadLetterSink, dlq: str, dl: DeadLetter, key: bytes | None = None) -> None:
    """Send a dead letter, retried while Kafka is away (the producer gives a record up
    after its request timeout): giving up would end the exporter, and its restart
    would send the records since its last commit to the backend, and these dead
    letters, again. An error that retrying cannot mend (not authorized, too large)
    still ends it, naming the topic."""
    key, record = dead_letter_record(dl, key)

    async def send() -> None:
        try:
            await producer.send_and_wait(dlq, record, key=key)
        except KafkaError as err:
            if not (err.retriable or isinstance(err, KafkaTimeoutError)):
                raise Permanent(f"{dlq} refused a dead letter: {type(err).__name__}: {err}") from err
            raise

    await retry(send, what=f"dead-letter {dl.topic}[{dl.partition}]@{dl.offset} to {dlq}")
    DEAD_LETTERS.labels(dl.stage).inc()


async def refuse(
    producer: DeadLetterSink,
    stage: str,
    rec: Record,
    reason: str,
    *,
    signal: str,
    items: int,
    payload: bytes | None = None,
) -> None:
    """Dead-letter ``items`` of ``signal`` from ``rec``: ``payload`` (a wire record of
    just those items) or, by default, what ``rec`` holds: the record's own bytes, or,
    once ``keeping`` some of its rows, a record of just those (the record's own bytes
    when that would not fit ktel.dlq whole)."""
    log.warning(
        "dead letter %s[%d]@%d (%d %s): %s", rec.topic, rec.partition, rec.offset, items, signal, reason
    )
    dl = DeadLetter(
        stage, reason, rec.topic, rec.partition, rec.offset, rec.value if payload is None else payload
    )
    if payload is None and not rec.whole:
        # A record of just its rows, unless ktel.dlq would take only the start of it: cut,
        # it could not be checked row by row against its record, and `ktel dlq --redrive`
        # would never send it; the record as read, cut, is sent whole from its topic.
        rows = dataclasses.replace(dl, payload=encode_signal(rec.item))
        if dead_letter_fits(rows, rec.key):
            dl = rows
    await dead_letter(producer, rec.dlq, dl, rec.key)
    DEAD_LETTERED_ITEMS.labels(stage, signal).inc(items)


async def refuse_series(
    producer: DeadLetterSink,
    stage: str,
    rec: Record,
    refused: list[tuple[Any, str]],
    *,
    signal: str,
    items: int,
) -> None:
    """Dead-letter some series of the snapshot ``rec`` holds, each with why, as a
    snapshot of just those (the rest of it is delivered): one writer's series the
    exporter cannot take keeps no other series of its snapshot from the backend."""
    rows = [row for row, _ in refused]
    more = f" (and {len(rows) - 1} more series of this snapshot)" if len(rows) > 1 else ""
    payload = encode_snapshot(dataclasses.replace(rec.item, series=rows))
    await refuse(producer, stage, rec, refused[0][1] + more, signal=signal, items=items, payload=payload)


async def run(
    *,
    kafka: Kafka,
    group_id: str | None,
    stage: str,
    topics: Mapping[str, Decoder],
    deliver: Deliver,
    stop: asyncio.Event,
    start_ms: int | None = None,
    read_up: asyncio.Event | None = None,
) -> None:
    """Consume ``topics`` (topic -> wire decoder) and hand the decoded records to
    ``deliver`` chunk by chunk, in partition order.

    ``group_id=None`` reads every partition without a group (the pull endpoint: each
    instance needs the whole picture), from the first record at or after ``start_ms``
    (ms since epoch), or from the beginning when it is None; ``read_up`` is set once
    what the partitions held from there when the read began has been delivered.
    """
    tune_gc()
    dlq = settings(kafka).topics.dlq
    # As 0 from the start: Prometheus' increase() takes a series' first value as its
    # start, so a count that appeared with its first increment would raise no alert.
    DEAD_LETTERS.labels(stage)
    if group_id is not None:
        consumer_lag.up(group_id)
        for topic in topics:
            EXPIRED.labels(stage, topic)
    consumer = AIOKafkaConsumer(
        **client_kwargs(kafka),
        group_id=group_id,
        enable_auto_commit=False,
        # Raised to the loop instead (``_fetch``): see the module docstring.
        auto_offset_reset="none",
        max_poll_records=500,
    )
    connected = positioned = False

    def readiness() -> str | None:
        if not connected:
            return f"not connected to Kafka at {settings(kafka).bootstrap}"
        if not consumer.assignment():
            return f"no partition of {', '.join(topics)} assigned"
        if not positioned:
            return f"looking up where to start reading {', '.join(topics)}"
        return None

    selfmetrics.ready_when(readiness)
    who = f"ktel export {stage}"
    async with (
        started(consumer, kafka, who),
        # Made once the consumer is started: made before, it was never stopped when the
        # exporter stopped while the consumer connected (aiokafka warns of it unclosed).
        started(AIOKafkaProducer(**client_kwargs(kafka), enable_idempotence=True), kafka, who) as producer,
    ):
        connected = True
        if group_id is None:
            parts = await retry(
                lambda: _partitions(producer, topics), what=f"find the partitions of {list(topics)}"
            )
            consumer.assign(parts)
            behind = await retry(
                lambda: _seek(consumer, parts, start_ms), what=f"find where to start in {list(topics)}"
            )
        else:
            consumer.subscribe(list(topics))
            behind = {}
        positioned = True
        reading_since = time.monotonic()
        while not stop.is_set():
            if read_up is not None and not read_up.is_set():
                await _read_up(consumer, behind, read_up, time.monotonic() - reading_since)
            fetched = await _fetch(consumer, stage, 500, group_id is not None)
            _fetcher_alive(consumer)
            if not fetched:
                if group_id is not None:
                    consumer_lag.export(group_id, await _lags(consumer))
                continue
            items: list[Record] = []
            undecoded: list[tuple[DeadLetter, bytes | None]] = []
            for tp, records in fetched.items():
                decode = topics[tp.topic]
                for rec in records:
                    try:
                        value = decode(rec.value)
                        check_keyed(value, rec.key)
                        items.append(
                            Record(value, tp.topic, tp.partition, rec.offset, rec.key, rec.value, dlq)
                        )
                    except WireError as err:
                        log.warning("dead letter %s[%d]@%d: %s", tp.topic, tp.partition, rec.offset, err)
                        dl = DeadLetter(stage, str(err), tp.topic, tp.partition, rec.offset, rec.value)
                        undecoded.append((dl, rec.key))
            if items or undecoded:
                # The dead letters go out within the paused delivery too: ktel.dlq may be
                # away (its leader down) while the topics read are not, and the retries
                # must not keep getmany from being called meanwhile.
                await _deliver_paused(
                    consumer,
                    stage,
                    group_id,
                    {tp: recs[0].offset for tp, recs in fetched.items()},
                    _dead_letters_then(producer, dlq, undecoded, deliver, items),
                )
            if group_id is not None:
                await _commit(consumer, {tp: recs[-1].offset + 1 for tp, recs in fetched.items()})
                consumer_lag.export(group_id, await _lags(consumer))


async def _dead_letters_then(
    producer: AIOKafkaProducer,
    dlq: str,
    undecoded: list[tuple[DeadLetter, bytes | None]],
    deliver: Deliver,
    items: list[Record],
) -> None:
    """Dead-letter the records of a fetch that did not decode, then deliver the rest."""
    for dl, key in undecoded:
        await dead_letter(producer, dlq, dl, key)
    if items:
        await deliver(items, producer)


async def _deliver_paused(
    consumer: AIOKafkaConsumer,
    stage: str,
    group_id: str | None,
    busy: Mapping[TopicPartition, int],
    delivery: Awaitable[None],
) -> None:
    """Await ``delivery`` (of records of the partitions ``busy``, each from the offset
    given) with every assigned partition paused, still polling, and the group's lag
    exported every LAG_WHILE_PAUSED_S."""
    task = asyncio.ensure_future(delivery)
    lag_due = time.monotonic() + LAG_WHILE_PAUSED_S
    try:
        while not task.done():
            # Re-paused every turn: a rebalance meanwhile may have assigned new partitions.
            consumer.pause(*consumer.assignment())
            await asyncio.wait({task}, timeout=POLL_WHILE_PAUSED_S)
            stray = await _fetch(consumer, stage, 0, group_id is not None, busy.keys())
            for tp, recs in stray.items():  # not expected; re-read them later rather than lose them
                consumer.seek(tp, recs[0].offset)
            if group_id is not None and not task.done() and time.monotonic() >= lag_due:
                lag_due = time.monotonic() + LAG_WHILE_PAUSED_S
                try:
                    # (all of it bounded: a position may wait for what only getmany does)
                    async with asyncio.timeout(LAG_LOOKUP_S):
                        ends = await consumer.end_offsets(list(consumer.assignment()))
                        lags = await _lags(consumer, ends, busy)
                except (KafkaError, TimeoutError) as err:
                    log.debug("no lag while delivering: Kafka did not give the ends (%r)", err)
                else:
                    consumer_lag.export(group_id, lags)
        task.result()
    finally:
        if not task.done():
            task.cancel()
        consumer.resume(*consumer.paused())


async def _fetch(
    consumer: AIOKafkaConsumer,
    stage: str,
    timeout_ms: int,
    grouped: bool,
    busy: Set[TopicPartition] = frozenset(),
) -> dict[TopicPartition, list[Any]]:
    """``getmany``, with the positions Kafka refuses set right (module docstring): nothing
    is returned then, and the next call reads from there. ``grouped``: the consumer is a
    group's, which commits where such a partition now starts; ``busy``: partitions whose
    records are being delivered, left as they are until that is done (``_start_over``)."""
    try:
        return await consumer.getmany(timeout_ms=timeout_ms)
    except NoOffsetForPartitionError as err:
        tp = err.args[0] if err.args else None
        if isinstance(tp, TopicPartition):
            await _start_over(consumer, {tp: -1}, stage, grouped, busy)
    except OffsetOutOfRangeError as err:
        at = err.args[0] if err.args and isinstance(err.args[0], dict) else {}
        await _start_over(consumer, at, stage, grouped, busy)
    return {}


def _fetcher_alive(consumer: AIOKafkaConsumer) -> None:
    """End the exporter if aiokafka's fetch task has ended on an error: ``getmany`` would
    return nothing for good while the consumer stays in its group and /readyz says ready.
    With ``auto_offset_reset`` "none" an assert of its own can end it (``Fetcher._set_error``,
    two refusals of one partition in flight during a leader move); nothing in aiokafka
    looks at the task (its ``error_future``). Ended, the exporter is restarted and reads on
    from its group's commit. (aiokafka 0.14's private ``_fetcher``: none is a stub's.)"""
    task = getattr(getattr(consumer, "_fetcher", None), "error_future", None)
    if isinstance(task, asyncio.Future) and task.done() and not task.cancelled():
        err = task.exception()
        if err is not None:
            raise RuntimeError(f"aiokafka's fetcher stopped: {type(err).__name__}: {err}") from err


async def _start_over(
    consumer: AIOKafkaConsumer,
    at: dict[TopicPartition, int],
    stage: str,
    grouped: bool,
    busy: Set[TopicPartition],
) -> None:
    """Seek each partition of ``at`` (where its fetch was refused; -1: a group's partition
    with no commit) that is still held to its first record, counting what retention deleted
    past the position, and commit there for a group: a restart before the next delivery
    would count those again, and a partition with no commit would have what retention
    deleted before it was read passed over uncounted.

    A lookup that fails does nothing: the next fetch is refused again, and this runs again,
    while ``getmany`` keeps being called (retrying here for longer than
    ``max_poll_interval_ms`` would have the consumer leave its group)."""
    # A partition being delivered is left until that is done: a rebalance meanwhile took its
    # position back to the group's commit, before the records being delivered, and their
    # commit, once delivered, would go back past where it started over.
    held = [tp for tp in at if tp in consumer.assignment() and tp not in busy]
    if not held:
        return
    try:
        firsts = await consumer.beginning_offsets(held)
        lasts = await consumer.end_offsets(held)
        # What was delivered is up to the group's commit, which may be past the position
        # refused (a rebalance takes the position back to it, and records delivered before
        # may be read again): only what was not is counted as deleted undelivered.
        done = {tp: await consumer.committed(tp) for tp in held if grouped and at[tp] >= 0}
    except KafkaError as err:
        log.warning("cannot look up where %s begin (%s): asked again at the next fetch", held, err)
        return
    sought: dict[TopicPartition, int] = {}
    for tp in held:
        if tp not in consumer.assignment():
            continue  # (revoked meanwhile: its new member reads it from the group's commit)
        name, was, first = f"{tp.topic}[{tp.partition}]", at[tp], firsts[tp]
        if was < 0:
            pass  # (a new group's partition: read from its first record, as "earliest")
        elif was < first:
            # (delivered up to the group's commit: read on from it when it is past the first)
            was = max(was, done.get(tp) or 0)
            if was < first:
                log.error(
                    "%s: %d records (offsets %d to %d) were deleted by Kafka's retention before "
                    "they were delivered (the backend away for longer than the topic keeps "
                    "records?); reading on from offset %d",
                    name,
                    first - was,
                    was,
                    first - 1,
                    first,
                )
                EXPIRED.labels(stage, tp.topic).inc(first - was)
            first = min(max(first, was), lasts[tp])
        elif was > lasts[tp]:
            log.warning(
                "%s ends at offset %d, before this exporter's position %d (the topic deleted and "
                "made again, or records lost in an unclean leader election): reading it again "
                "from its first record, offset %d",
                name,
                lasts[tp],
                was,
                first,
            )
        else:
            # In range as the leader tells now: a replica behind it answered, and the fetch is
            # made again; or the partition was cut back below the position and has grown past
            # it since, and the records between its new end then and the position are passed
            # over, which nothing here can tell from the former.
            log.warning(
                "%s: Kafka refused offset %d as out of range, and now has it (offsets %d to %d): "
                "fetching it again",
                name,
                was,
                first,
                lasts[tp],
            )
            continue
        consumer.seek(tp, first)
        sought[tp] = first
    if grouped and sought:
        await _commit(consumer, sought)


async def _commit(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
    # A partition revoked during the delivery belongs to another member now, which
    # re-reads it from the last commit: at least once, possibly twice, never lost.
    owned = {tp: off for tp, off in offsets.items() if tp in consumer.assignment()}
    if not owned:
        return
    try:
        await consumer.commit(owned)
    except (CommitFailedError, IllegalStateError) as err:
        log.warning("offsets not committed (%s); those records will be delivered again", err)


async def _lags(
    consumer: AIOKafkaConsumer,
    ends: Mapping[TopicPartition, int] | None = None,
    delivering: Mapping[TopicPartition, int] | None = None,
) -> dict[tuple[str, int], int]:
    """Each assigned partition's end (``ends``, or as of the last fetch) minus where it is
    delivered up to: the first offset of what is being delivered (``delivering``), or the
    position this consumer commits up to once the records before it are delivered."""
    lags = {}
    for tp in consumer.assignment():
        # A rebalance may revoke partitions while a position is awaited (one waiting for
        # its reset): aiokafka then asserts in highwater() and raises in position(). The
        # lag is a metric; a partition no longer held is not this exporter's to report,
        # and must not end it.
        if tp not in consumer.assignment():
            continue
        fetched = consumer.highwater(tp)  # (None: never fetched)
        if delivering is not None and tp in delivering:
            start = delivering[tp]
        elif fetched is None:
            # No position to wait for: one with no commit gets it only once getmany has
            # started it over (_start_over).
            continue
        else:
            try:
                start = await consumer.position(tp)
            except IllegalStateError:
                continue
        end = fetched if ends is None else ends.get(tp)
        if end is not None:
            lags[(tp.topic, tp.partition)] = end - start
    return lags


async def _read_up(
    consumer: AIOKafkaConsumer, behind: dict[TopicPartition, int], read_up: asyncio.Event, reading_s: float
) -> None:
    """Take out of ``behind`` the partitions read up to their end there, and set ``read_up``
    once none is left, or after ``READ_UP_S`` whatever is left, saying which."""
    for tp, end in list(behind.items()):
        # By position: a partition's last records may be a transaction's markers, which
        # move it without a record. Up to the end as it is now if it moved back (records
        # lost in an unclean leader election, the topic made again), which never grows
        # back to where it was.
        now_at = consumer.highwater(tp)
        if await consumer.position(tp) >= (end if now_at is None else min(end, now_at)):
            del behind[tp]
    if behind and reading_s > READ_UP_S:
        log.warning(
            "partitions %s not read up to where they ended %.0f s ago (no leader?): taken as read",
            ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(behind)),
            reading_s,
        )
        behind.clear()
    if not behind:
        read_up.set()


async def _seek(
    consumer: AIOKafkaConsumer, parts: list[TopicPartition], start_ms: int | None
) -> dict[TopicPartition, int]:
    """Seek each of ``parts`` to its first record at or after ``start_ms`` (None: its
    first); returns where each partition with records to read from there ends now."""
    # The ends are looked up first: a partition with nothing at or after start_ms
    # starts at its end as it was before that lookup, so a record written meanwhile
    # is still read (seeking to the end afterwards would skip it).
    ends = await consumer.end_offsets(parts)
    if start_ms is None:
        starts = await consumer.beginning_offsets(parts)
    else:
        found = await consumer.offsets_for_times({tp: start_ms for tp in parts})
        starts = {tp: ends[tp] if found.get(tp) is None else found[tp].offset for tp in parts}
    for tp in parts:
        consumer.seek(tp, starts[tp])
    return {tp: ends[tp] for tp in parts if starts[tp] < ends[tp]}


async def _partitions(producer: AIOKafkaProducer, topics: Mapping[str, Decoder]) -> list[TopicPartition]:
    # The producer fetches metadata for a topic on demand; a group-less consumer does not.
    parts = []
    for topic in topics:
        ps = await producer.partitions_for(topic)
        parts += [TopicPartition(topic, p) for p in sorted(ps)]
    return parts
