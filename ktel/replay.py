"""Forensic replay of ``ktel.raw``: one time window of some hosts and kinds (``ktel replay``).

Which records are read, and which events are kept
--------------------------------------------------
Kafka gives each record a timestamp: for ktel's topics (Kafka's default
``CreateTime``) the producing agent's wall clock when it sent the batch. A batch's
events are older than that: they were drained, sealed and possibly held in the
agent's spool while Kafka was away. So the record timestamp only bounds what to
read, and each event is judged by its own ``ts_ns``. For every partition:

1. Start at the first record whose timestamp is >= ``--from`` (Kafka's
   ``offsets_for_times``). Nothing earlier can hold a matching event: an event's
   ``ts_ns`` and its record's timestamp come from the same host's clock, the event's
   first, so a record older than ``--from`` holds only events older than ``--from``
   (unless that clock was stepped back in between).
2. Read up to the partition's end offset as it was when the replay started, so a
   replay always ends however fast agents keep writing. Nothing else ends a
   partition early: record timestamps come from many hosts' clocks, and a host
   whose clock runs ahead would otherwise end the read before other hosts' events.
3. Skip, without decoding, a record whose timestamp is later than ``--to`` plus the
   margin (``--margin``, default 5 minutes). The margin covers batches that reached
   Kafka after ``--to`` with events from before it (sealing, spooling during an
   outage). The record's timestamp and its events' come from the same host's
   clock, so this judges each host by its own clock: a batch that reached Kafka
   more than the margin after ``--to`` by its host's clock is not read (widen
   ``--margin`` to read it), and no other host's records are affected.
4. Keep an event when ``--from <= ts_ns < --to`` (wall clock, ns since epoch; a kind
   without ``ts_ns`` is judged by its batch's ``sent`` time), its record is of one of
   ``--host`` and its kind is one of ``--kind``. A batch is matched when it keeps an
   event. A record is of the host its key names and of the host its batch names: the
   two differ only when something wrote a record the processors dead-letter (its key
   is not its host id, or it has none), and whoever investigates either host must
   see it. So with ``--host`` every record read is decoded, not only those keyed by
   a wanted host. Each line of such a record carries its key
   (``messaging.kafka.message.key``, null for none), and the summary counts the
   matched batches keyed so.

A record replay cannot use is counted and reported, optionally dead-lettered
(``--dlq``), and skipped, when its key names one of ``--host`` or it has none (its
host unknown); another host's, by its key, is only counted as read. That is a record
that does not decode, and one whose batch decodes but whose key is no host id a batch
may carry (``ktel.wire.raw.key_problem``), also when its batch names one of
``--host``: a key is any bytes up to the record's size, and one echoed on each line
of its batch's events would multiply it by their number (a 1 MB record, nearly all
key beside 100,000 small compressed events, would write 100 GB). It is reported once,
cut and escaped. A key that is a host id adds no more to a line than its batch's own
``host.id`` does.

The consumer has no group and commits nothing, so a replay never moves the offsets of
a live consumer group.

``--from`` and ``--to`` are exact to the nanosecond, as ``ts_ns`` is: RFC 3339 allows
as many digits of a second as one gives, and a time between two nanoseconds keeps
what the later one keeps. Every time replay prints reads back as the same nanosecond.

``--to-topic`` may not name one of ktel's own topics (``ktel topics`` lists them)
or the topic being read on the Kafka cluster replay reads from: the live stages
would take the copies for new data. Whether ``--to-bootstrap`` is that cluster is
decided by the clusters' ids, not by how the two addresses are spelt.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import decimal
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from opentelemetry.semconv._incubating.attributes.host_attributes import HOST_ID
from opentelemetry.semconv._incubating.attributes.messaging_attributes import MESSAGING_KAFKA_MESSAGE_KEY

from ktel import topic_window
from ktel import topics as topics_mod
from ktel.config import AgentConfig, Config, KafkaConfig
from ktel.kafka_client import client_kwargs, compression_type, refused, settings
from ktel.topics import TopicSpec, create_topics
from ktel.wire import (
    KINDS,
    DeadLetter,
    RawBatch,
    WireError,
    dead_letter_record,
    decode_batch,
    encode_batch,
    event_dict,
    key_problem,
)
from ktel.wire.codec import MAX_RECORD_BYTES

STAGE = "replay"  # the DeadLetter stage of records replay could not use
NS = 1_000_000_000
# Records replay cannot use (and batches not re-published) reported one by one on
# stderr; beyond that only counted.
FAILURES_SHOWN = 20
# How much of a key that is no host id a report shows (escaped: it is any bytes).
KEY_SHOWN = 64
# Re-published batches in flight before waiting for their acknowledgements.
MAX_IN_FLIGHT = 1000
# The most a re-published record may take, its key and batch together, as aiokafka
# measures it (before compressing it; 1 MiB by default): a batch read from ktel.raw
# decodes to at most MAX_RECORD_BYTES, its key is a host id, and the broker checks what
# it gets, compressed, against the topic's limit, as it did for ktel.raw.
REPUBLISH_MAX_BYTES = MAX_RECORD_BYTES + (64 << 10)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhd])")
# The fraction of a second in an ISO-8601 time (the first one: the date has none).
_FRACTION = re.compile(r"[.,](\d+)")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# The times format_ns can show (datetime's years, in UTC): every time parse_time gives is
# one of them, so that an error naming --from and --to shows both.
_FIRST_NS = (dt.datetime.min.replace(tzinfo=dt.UTC) - _EPOCH) // dt.timedelta(microseconds=1) * 1000
_LAST_NS = (dt.datetime.max.replace(tzinfo=dt.UTC) - _EPOCH) // dt.timedelta(microseconds=1) * 1000 + 999
TIME_EXAMPLES = (
    "ISO-8601 like 2025-06-01T12:00:00Z (UTC unless it names a zone), relative like -15m or -2h, or now"
)


class ReplayError(Exception):
    """Bad arguments or an unusable source; ``str(err)`` is the message for the user."""


# ------------------------------------------------------------------ arguments


def parse_duration(text: str) -> int:
    """``90s``, ``15m``, ``2h``, ``7d``, ``1.5h`` or ``0`` -> ns."""
    if text == "0":
        return 0
    m = _DURATION.fullmatch(text)
    if m is None:
        raise ReplayError(f"bad duration {text!r}: use a number and a unit s, m, h or d, like 90s or 15m")
    # Decimal, not float: 0.009m is 540000000 ns, not 539999999.
    return int(decimal.Decimal(m[1]) * _UNITS[m[2]] * NS)


def parse_time(text: str, now_ns: int) -> int:
    """A point in time for ``--from``/``--to`` -> ns since epoch."""
    text = text.strip()
    ns = _parse_time(text, now_ns)
    if not _FIRST_NS <= ns <= _LAST_NS:
        raise ReplayError(f"bad time {text!r}: not within the years 1 to 9999 UTC")
    return ns


def _parse_time(text: str, now_ns: int) -> int:
    if text == "now":
        return now_ns
    if text.startswith("-"):
        try:
            return now_ns - parse_duration(text[1:])
        except ReplayError:
            raise ReplayError(f"bad time {text!r}: use {TIME_EXAMPLES}") from None
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ReplayError(f"bad time {text!r}: use {TIME_EXAMPLES}") from None
    if when.tzinfo is None:
        # A fleet spans time zones; the replaying machine's own zone would be a guess.
        when = when.replace(tzinfo=dt.UTC)
    # Integer arithmetic: a float timestamp would lose the microseconds at ns scale.
    return (when - _EPOCH) // dt.timedelta(microseconds=1) * 1000 + _below_microseconds(text)


def _below_microseconds(text: str) -> int:
    """The ns past the microsecond of an ISO-8601 time, which datetime drops."""
    m = _FRACTION.search(text)
    # One after a sign past the date (which ends by the 10th character) is the zone's.
    if m is None or len(m[1]) <= 6 or re.search(r"[+-]", text[10 : m.start()]):
        return 0
    digits = m[1][6:]
    # Past the nanosecond, round up: an event is kept from --from and up to --to by
    # whole ns, so a time between two nanoseconds keeps what the later one keeps.
    return -(-int(digits) * 1000 // 10 ** len(digits))


def parse_kinds(names: Sequence[str]) -> frozenset[int] | None:
    """Kind names -> kind ids; None (every kind) when no name is given."""
    if not names:
        return None
    by_name = {k.name: k.id for k in KINDS.values()}
    unknown = sorted(set(names) - by_name.keys())
    if unknown:
        raise ReplayError(f"unknown kind {', '.join(unknown)}; the kinds are: {', '.join(sorted(by_name))}")
    return frozenset(by_name[n] for n in names)


def format_ns(ns: int) -> str:
    """ISO-8601 in UTC, to the millisecond or as many more digits as ``ns`` needs:
    ``parse_time`` reads it back as ``ns`` (integers throughout: a float second has no
    room for the nanoseconds)."""
    seconds, fraction = divmod(ns, NS)
    when = (_EPOCH + dt.timedelta(seconds=seconds)).replace(tzinfo=None).isoformat()
    digits = 3 if fraction % 1_000_000 == 0 else 6 if fraction % 1000 == 0 else 9
    return f"{when}.{fraction:09d}"[: len(when) + 1 + digits] + "+00:00"


def key_text(key: bytes | None) -> str | None:
    """A record's key as text, bytes that are not UTF-8 escaped (``\\xff``)."""
    return None if key is None else key.decode(errors="backslashreplace")


# --------------------------------------------------------------------- filter


@dataclasses.dataclass(frozen=True)
class Filter:
    """What a replay keeps (rule 4 of the module docstring)."""

    from_ns: int
    to_ns: int
    hosts: frozenset[str] | None = None  # None: every host
    kinds: frozenset[int] | None = None  # None: every kind

    def __post_init__(self) -> None:
        if self.from_ns >= self.to_ns:
            raise ReplayError(
                f"--from ({format_ns(self.from_ns)}) must be before --to ({format_ns(self.to_ns)})"
            )

    def wants_key(self, key: bytes | None, host_id: str | None = None) -> bool:
        """Whether a record replay cannot use is reported: its key or its batch's host
        id (``host_id``, when its batch decodes) names a wanted host, or it has no key
        (its host unknown)."""
        return self.hosts is None or key is None or key_text(key) in self.hosts or host_id in self.hosts

    def select(self, batch: RawBatch, key: bytes | None = None) -> RawBatch | None:
        """The batch of a record keyed ``key`` with only the events kept (weights
        alongside), or None when none is."""
        if self.hosts is not None and batch.host_id not in self.hosts and key_text(key) not in self.hosts:
            return None
        keep = [i for i, ev in enumerate(batch.events) if self._wants(ev, batch.sent_ns)]
        if not keep:
            return None
        if len(keep) == len(batch.events):
            return batch
        return batch.keeping(
            [batch.events[i] for i in keep],
            None if batch.weights is None else [batch.weights[i] for i in keep],
        )

    def _wants(self, event: Sequence[Any], sent_ns: int) -> bool:
        kind = event[0]
        if self.kinds is not None and kind not in self.kinds:
            return False
        at = _TS_INDEX.get(kind)
        ts = event[at] if at is not None else sent_ns
        return isinstance(ts, int) and self.from_ns <= ts < self.to_ns


# Position of ts_ns in each kind's event array (after the kind id).
_TS_INDEX = {k.id: k.index("ts_ns") for k in KINDS.values() if "ts_ns" in k.field_names}


def read_bounds(flt: Filter, margin_ns: int) -> tuple[int, int]:
    """Record timestamps (ms) to read from, and past which to skip a record (rules 1 and 3)."""
    # offsets_for_times refuses a negative time (a --from before 1970).
    return max(0, flt.from_ns // 1_000_000), (flt.to_ns + margin_ns) // 1_000_000


# --------------------------------------------------------------------- output


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(_jsonable(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def event_lines(batch: RawBatch, key: bytes | None) -> Iterator[str]:
    """One JSON object per event of a record keyed ``key``: the batch's identity (and
    the key, when it is not the batch's host id), then the event's named fields.

    The batch's fields have dotted names so that no event field (dns_slow has a
    ``host``) can shadow them."""
    ident: dict[str, Any] = {HOST_ID: batch.host_id, "boot.id": batch.boot_id, "batch.seq": batch.seq}
    if key != batch.key:
        ident[MESSAGING_KAFKA_MESSAGE_KEY] = key_text(key)
    for i, ev in enumerate(batch.events):
        obj = {**ident, **event_dict(ev)}
        if batch.weights is not None:
            obj["sample.weight"] = batch.weights[i]
        yield json.dumps(_jsonable(obj))


# ----------------------------------------------------------------------- run


@dataclasses.dataclass(frozen=True)
class Options:
    bootstrap: str
    filter: Filter
    margin_ns: int = 5 * 60 * NS
    topic: str = ""  # empty: the configured ktel.raw (under client.prefix)
    to_topic: str | None = None
    to_bootstrap: str | None = None  # None: the source's
    to_topic_spec: TopicSpec | None = None  # how to create to_topic when it does not exist
    # Topics --to-topic may not name on the cluster being read (see the module doc).
    protected_topics: frozenset[str] = frozenset()
    dlq: bool = False
    jsonl: bool = True
    # TLS and SASL (kafka.*) for both Kafkas; its bootstrap is not used, the fields above are.
    client: KafkaConfig = dataclasses.field(default_factory=KafkaConfig)
    # The codec of what --to-topic gets: the agent's (agent.compression).
    compression: str = AgentConfig.model_fields["compression"].default

    def __post_init__(self) -> None:
        if not self.topic:
            object.__setattr__(self, "topic", self.client.topics.raw)


@dataclasses.dataclass
class Summary:
    partitions: int = 0
    records: int = 0
    late: int = 0  # skipped: sent more than the margin after --to (rule 3)
    batches: int = 0
    keyed_otherwise: int = 0  # of the batches, those whose key is not their host id (rule 4)
    events: int = 0
    decode_failures: int = 0
    bad_keys: int = 0  # records whose batch decodes, keyed with no host id (module docstring)
    dead_lettered: int = 0
    republished: int = 0
    # Matched, but more than a record replay writes may take (REPUBLISH_MAX_BYTES).
    not_republished: int = 0
    output_closed: bool = False  # stdout's reader went away; the window was not read to its end
    read_began: bool = False  # the window's read began: an error after it has a summary to print
    error: str | None = None  # what ended the replay before the window's end
    failures: list[str] = dataclasses.field(default_factory=list)

    def line(self, opts: Options) -> str:
        parts = [
            f"read {self.records} records from {self.partitions} partitions of {opts.topic}",
            *([f"skipped {self.late} sent more than --margin after --to"] if self.late else []),
            f"matched {self.batches} batches"
            + (
                f" ({self.keyed_otherwise} keyed otherwise than their host id)"
                if self.keyed_otherwise
                else ""
            )
            + f", {self.events} events",
            f"decode failures {self.decode_failures}",
            *([f"{self.bad_keys} keyed with no host id"] if self.bad_keys else []),
        ]
        if opts.dlq:
            parts.append(f"dead-lettered {self.dead_lettered} to {opts.client.topics.dlq}")
        if opts.to_topic:
            parts.append(f"re-published {self.republished} batches to {opts.to_topic}")
            if self.not_republished:
                parts.append(f"not re-published {self.not_republished} too large")
        if self.output_closed:
            parts.append("stopped early: the reader of stdout went away")
        if self.error is not None:
            parts.append("stopped early by the error below")
        return "; ".join(parts)


class _OutputClosed(Exception):
    """stdout's reader went away (``ktel replay ... | head``): stop quietly."""


async def replay(
    opts: Options,
    write: Callable[[str], None],
    report: Callable[[str], None],
    summary: Summary | None = None,
) -> Summary:
    """Read the window (see the module docstring), hand each kept event's JSON line to
    ``write`` (when ``opts.jsonl``), re-publish kept batches to ``opts.to_topic`` and
    report decode failures and batches not re-published to ``report``. Counts go to
    ``summary`` (a new one when None), which holds what was done also when this raises."""
    summary = Summary() if summary is None else summary
    start_ms, stop_ms = read_bounds(opts.filter, opts.margin_ns)
    try:
        parts = await topic_window.partitions(opts.client, opts.bootstrap, opts.topic)
    except topic_window.ReadError as err:
        raise ReplayError(str(err)) from None
    summary.partitions = len(parts)
    if opts.to_topic is not None and opts.to_topic in opts.protected_topics:
        await _refuse_the_live_cluster(
            opts.client, opts.bootstrap, opts.to_bootstrap or opts.bootstrap, opts.to_topic
        )
    consumer = topic_window.consumer(opts.client, opts.bootstrap)
    dlq = AIOKafkaProducer(**client_kwargs(opts.client, opts.bootstrap), acks="all") if opts.dlq else None
    out = (
        AIOKafkaProducer(
            **client_kwargs(opts.client, opts.to_bootstrap or opts.bootstrap),
            enable_idempotence=True,  # a retried send must not duplicate a batch
            compression_type=compression_type(opts.compression),  # as the agent writes ktel.raw
            max_request_size=REPUBLISH_MAX_BYTES,
        )
        if opts.to_topic
        else None
    )
    in_flight: list[asyncio.Future[Any]] = []

    def shown(what: str) -> None:
        """Report a record replay cannot use or a batch not re-published (the first few)."""
        if len(summary.failures) < FAILURES_SHOWN:
            summary.failures.append(what)
            report(f"ktel replay: {what}")

    async def unusable(tp: TopicPartition, rec: ConsumerRecord, payload: bytes, why: str) -> None:
        """Report a record replay cannot use, and dead-letter it with ``--dlq``."""
        shown(f"{tp.topic}[{tp.partition}]@{rec.offset}: {why}")
        if dlq is not None:
            dl = DeadLetter(STAGE, why, tp.topic, tp.partition, rec.offset, payload)
            key, value = dead_letter_record(dl, rec.key)
            await dlq.send_and_wait(opts.client.topics.dlq, value, key=key)
            summary.dead_lettered += 1

    async def handle(tp: TopicPartition, rec: ConsumerRecord) -> None:
        summary.records += 1
        payload = rec.value or b""  # a tombstone (None) is a record that does not decode
        try:
            batch = decode_batch(payload)
        except WireError as err:
            if opts.filter.wants_key(rec.key):  # (else another host's, as far as its key tells)
                summary.decode_failures += 1
                await unusable(tp, rec, payload, str(err))
            return
        problem = None if rec.key is None else key_problem(rec.key)
        if problem is not None:
            # Told once, not on each of its events' lines (module docstring).
            if opts.filter.wants_key(rec.key, batch.host_id):
                summary.bad_keys += 1
                await unusable(tp, rec, payload, bad_key(rec.key, problem))
            return
        kept = opts.filter.select(batch, rec.key)
        if kept is None:
            return
        summary.batches += 1
        if rec.key != batch.key:
            summary.keyed_otherwise += 1  # one the processors dead-letter (rule 4)
        summary.events += len(kept.events)
        if opts.jsonl:
            for line in event_lines(kept, rec.key):
                write(line)
        if out is not None and opts.to_topic is not None:
            # Same key (same host, same partitioning) and same timestamp, so the new
            # topic can itself be replayed by time.
            value = encode_batch(kept)
            try:
                fut = await out.send(opts.to_topic, value, key=rec.key, timestamp_ms=rec.timestamp)
            except MessageSizeTooLargeError:
                # aiokafka refuses it before queueing it, and goes on with the others: a
                # record no agent writes (a batch of nearly the most that decodes, written
                # back larger than it came: numbers sent as 32-bit floats take 64 bits)
                # must not end the replay of the window.
                summary.not_republished += 1
                size = len(value) + len(rec.key or b"")
                shown(
                    f"{tp.topic}[{tp.partition}]@{rec.offset}: not re-published to {opts.to_topic}: "
                    f"its key and batch take {size} bytes and Kafka's framing, more than the "
                    f"{REPUBLISH_MAX_BYTES} a record replay writes may"
                )
                return
            in_flight.append(fut)
            if len(in_flight) >= MAX_IN_FLIGHT:
                await _settle(in_flight, summary)

    # Every client made is stopped, also one whose start failed or never came: aiokafka
    # warns of any left unstopped, and one whose start failed may have its metadata task
    # running (an idempotent producer refused a producer id).
    clients: list[AIOKafkaConsumer | AIOKafkaProducer] = [c for c in (consumer, dlq, out) if c is not None]
    try:
        for client in clients:
            await client.start()
        if out is not None and opts.to_topic_spec is not None:
            await create_topics(
                settings(opts.client, opts.to_bootstrap or opts.bootstrap), [opts.to_topic_spec]
            )

        summary.read_began = True
        read_error: topic_window.ReadError | KafkaError | None = None
        try:
            async with contextlib.aclosing(
                topic_window.records(consumer, parts, start_ms, opts.bootstrap)
            ) as window:
                async for tp, rec in window:
                    if rec.timestamp > stop_ms:
                        summary.records += 1
                        summary.late += 1
                        continue
                    await handle(tp, rec)
        except _OutputClosed:
            summary.output_closed = True
        except (topic_window.ReadError, KafkaError) as err:
            read_error = err
        # What was re-published is acknowledged before the summary counts it, also when
        # the read failed or Kafka midway (a dead letter's send, a batch re-published):
        # the batches sent before it are written all the same.
        await _settle(in_flight, summary)
        if read_error is not None:
            raise read_error
    except KafkaError as err:
        raise ReplayError(f"Kafka failed: {refused(err)}") from None
    except topic_window.ReadError as err:
        raise ReplayError(str(err)) from None
    finally:
        for f in in_flight:
            f.cancel()
        for client in reversed(clients):
            await client.stop()
    return summary


def bad_key(key: bytes, problem: str) -> str:
    """Why a record keyed ``key``, no host id for ``problem``, is not replayed: its
    first KEY_SHOWN bytes, escaped (a Python bytes literal: a newline or a terminal
    escape in it cannot fake or garble a line)."""
    cut = "..." if len(key) > KEY_SHOWN else ""
    return f"its key of {len(key)} bytes, {key[:KEY_SHOWN]!r}{cut}, is no host id: {problem}"


async def cluster_id(client: KafkaConfig, bootstrap: str, what: str) -> str | None:
    """The Kafka cluster's id (None from a broker too old to tell); ``what`` names
    the setting of ``bootstrap`` in the error."""
    admin = AIOKafkaAdminClient(**client_kwargs(client, bootstrap))
    try:
        await admin.start()
        found = (await admin.describe_cluster()).get("cluster_id")
    except (KafkaError, OSError) as err:
        raise ReplayError(f"cannot reach Kafka at {bootstrap} ({err}); check {what}") from None
    finally:
        await admin.close()
    return found if isinstance(found, str) else None


async def _refuse_the_live_cluster(
    client: KafkaConfig, bootstrap: str, to_bootstrap: str, to_topic: str
) -> None:
    """ReplayError unless ``to_bootstrap`` is known to be another cluster than ``bootstrap``."""
    source = await cluster_id(client, bootstrap, "kafka.bootstrap")
    dest = source if to_bootstrap == bootstrap else await cluster_id(client, to_bootstrap, "--to-bootstrap")
    if source is None or dest is None or source == dest:
        same = "cannot tell whether it is" if source is None or dest is None else "is"
        # In the live ktel.raw the stages would drop the batches as duplicates (same host,
        # boot and seq), or count them twice where dedupe has forgotten their boot; in a
        # stage's topic or ktel.control they would be taken for live data.
        raise ReplayError(
            f"--to-topic {to_topic}: ktel's own topic, and {to_bootstrap} {same} the Kafka cluster "
            f"replay reads from ({bootstrap}, cluster id {source}): name another topic, "
            "or another Kafka with --to-bootstrap"
        )


async def _settle(in_flight: list[asyncio.Future[Any]], summary: Summary) -> None:
    """Wait for the re-published batches' acknowledgements and count those Kafka gave
    (``summary.republished``), then raise the first failure: the others are written all
    the same, and the summary printed after the error counts them."""
    results = await asyncio.gather(*in_flight, return_exceptions=True)
    in_flight.clear()
    failed = [r for r in results if isinstance(r, BaseException)]
    summary.republished += len(results) - len(failed)
    if failed:
        raise failed[0]


# ------------------------------------------------------------------------ cli


def options(cfg: Config, args: Any, now_ns: int | None = None) -> Options:
    """Options from ``ktel replay``'s arguments; raises ReplayError naming what is wrong."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    flt = Filter(
        from_ns=parse_time(args.from_, now_ns),
        to_ns=parse_time(args.to, now_ns),
        hosts=frozenset(args.host) if args.host else None,
        kinds=parse_kinds(args.kind or []),
    )
    margin_ns = parse_duration(args.margin)
    if args.to_topic is None and args.to_bootstrap is not None:
        raise ReplayError("--to-bootstrap needs --to-topic")
    if args.to_bootstrap is not None:
        try:
            KafkaConfig._hostports(args.to_bootstrap)  # (kafka.bootstrap's own check)
        except ValueError as err:
            raise ReplayError(f"--to-bootstrap {args.to_bootstrap!r:.200}: {err}") from None
    to_bootstrap = args.to_bootstrap or cfg.kafka.bootstrap
    spec = None
    if args.to_topic is not None:
        known = {s.name: s for s in topics_mod.specs(cfg)}
        # A new topic is laid out like ktel.raw: keyed by host, as many partitions, kept as long.
        spec = dataclasses.replace(known.get(args.to_topic, known[cfg.kafka.topics.raw]), name=args.to_topic)
    fmt = args.format or ("none" if args.to_topic else "jsonl")
    return Options(
        bootstrap=cfg.kafka.bootstrap,
        filter=flt,
        margin_ns=margin_ns,
        topic=args.topic or cfg.kafka.topics.raw,
        to_topic=args.to_topic,
        to_bootstrap=to_bootstrap if args.to_topic else None,
        to_topic_spec=spec,
        protected_topics=frozenset(s.name for s in topics_mod.specs(cfg))
        | {args.topic or cfg.kafka.topics.raw},
        dlq=args.dlq,
        jsonl=fmt == "jsonl",
        client=cfg.kafka,
        compression=cfg.agent.compression,
    )


def main(cfg: Config, args: Any, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """``ktel replay``: 0 when the window was read (decode failures included), 1 when
    a matched batch was too large to re-publish to --to-topic (each reported), 2 on a
    bad argument or an unusable source; the summary is printed also when the read
    failed once begun, before the error."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    topic_window.quiet_client_logs()

    def report(msg: str) -> None:
        print(msg, file=stderr, flush=True)

    try:
        opts = options(cfg, args)
    except ReplayError as err:
        report(f"ktel replay: {err}")
        return 2
    retention_ns = int(cfg.kafka.raw_retention_hours * 3600 * NS)
    if opts.topic == cfg.kafka.topics.raw and opts.filter.from_ns < time.time_ns() - retention_ns:
        report(
            f"ktel replay: note: --from is older than {opts.topic}'s retention "
            f"({cfg.kafka.raw_retention_hours:g} h, kafka.raw_retention_hours): older events may be gone"
        )

    closed = False

    def write(line: str) -> None:
        nonlocal closed
        try:
            print(line, file=stdout)
        except BrokenPipeError:
            closed = True
            raise _OutputClosed from None

    summary = Summary()
    try:
        asyncio.run(replay(opts, write, report, summary))
    except ReplayError as err:
        if not summary.read_began:
            report(f"ktel replay: {err}")
            return 2
        # What was read and written before it failed, as a replay that ends prints it: a
        # window cut short by a partition whose end moved back, or a Kafka gone midway,
        # has read the others, and --to-topic and --dlq have written to Kafka.
        summary.error = str(err)
    try:
        stdout.flush()
    except BrokenPipeError:
        closed = True
    if closed and stdout is sys.stdout:
        # Python's own flush of stdout at exit would fail again and print a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    more = summary.decode_failures + summary.bad_keys + summary.not_republished - len(summary.failures)
    if more > 0:
        report(f"ktel replay: ... and {more} more like those")
    report(f"ktel replay: {summary.line(opts)}")
    if summary.error is not None:
        report(f"ktel replay: {summary.error}")
        return 2
    return 1 if summary.not_republished else 0
