"""What ``ktel.dlq`` holds, and re-publishing it where it came from (``ktel dlq``).

Every record a stage, an exporter or ``ktel replay --dlq`` could not use goes to
``ktel.dlq`` as a dead letter (``ktel.wire.control.DeadLetter``): the stage, the
reason, where the record was (topic, partition, offset) and the record's bytes, keyed
by the record's key. ``ktel dlq`` reads the dead letters written in a time window (by
their own record time: when they were dead-lettered), keeps those that ``--stage``,
``--source``, ``--host`` and ``--reason`` select, and prints them.

Re-driving
----------
Once the cause is gone (``process.max_hosts`` raised for hosts it refused, a stage
fixed for records it could not take), ``--redrive`` re-publishes each selected dead
letter's record, with its key, to the topic it was read from, where the live stages
take it as new. Running it again is safe while the workers hold the host: they drop a
batch they have already counted (same host, boot and sequence; docs/design.md,
"Delivery guarantees") and take only the newest heartbeat of a boot. A host silent
past ``aggregate.host_ttl_seconds`` is forgotten, and its batches re-driven after that
are counted again. A record that fails again is dead-lettered again.

A dead letter is left where it is, and the reason said, when:

- its topic is not one a ktel stage reads (``ktel.raw``, the stages' intermediate
  topics and ``ktel.heartbeats``, under ``kafka.prefix``). The output topics are read by
  every exporter, so a record one exporter refused would reach the others twice; and a
  dead letter can name any topic (anyone who may write ``ktel.dlq`` writes it), so
  re-publishing is never sent outside ktel's topics;
- its payload was cut to fit ``ktel.dlq`` (its reason says so): the whole record is
  still on its topic, at the offset the dead letter names, until retention takes it;
- it has no payload (the record was a tombstone), or its key is as long as a dead
  letter's key may be, so may have been cut;
- its record does not decode as its topic's records do, or its key is not the host id
  it carries: the stages would only dead-letter it again.

Each re-published record carries a ``ktel-redriven-from`` header naming the dead
letter (``ktel.dlq[partition]@offset``), so that a record found twice can be traced.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from opentelemetry.semconv._incubating.attributes.host_attributes import HOST_ID

from ktel import topic_window
from ktel.config import Config, KafkaConfig
from ktel.kafka_client import client_kwargs
from ktel.replay import ReplayError, format_ns, parse_time
from ktel.wire import DeadLetter, WireError, decode_batch, decode_dead_letter, decode_heartbeat
from ktel.wire.codec import MAX_RECORD_BYTES
from ktel.wire.control import DEAD_LETTER_KEY_BYTES, PAYLOAD_CUT

HEADER = "ktel-redriven-from"
# Dead letters that do not decode, reported one by one on stderr; beyond that only counted.
FAILURES_SHOWN = 20
# Re-published records in flight before waiting for their acknowledgements.
MAX_IN_FLIGHT = 1000


# How a stage topic's record names its host: its host id, or WireError.
HostOf = Callable[[bytes], str]


class DlqError(Exception):
    """Bad arguments or an unusable Kafka; ``str(err)`` is the message for the user."""


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which dead letters ``ktel dlq`` takes; an empty set takes every one."""

    from_ms: int = 0
    to_ms: int = 2**63 - 1
    stages: frozenset[str] = frozenset()
    sources: frozenset[str] = frozenset()
    hosts: frozenset[str] = frozenset()
    reason: re.Pattern[str] | None = None

    def takes(self, dl: DeadLetter, key: bytes | None) -> bool:
        return (
            (not self.stages or dl.stage in self.stages)
            and (not self.sources or dl.topic in self.sources)
            and (not self.hosts or (key is not None and key_text(key) in self.hosts))
            and (self.reason is None or self.reason.search(dl.reason) is not None)
        )


def key_text(key: bytes | None) -> str | None:
    return None if key is None else key.decode(errors="backslashreplace")


def why_not_redrivable(dl: DeadLetter, key: bytes | None, stage_topics: Mapping[str, HostOf]) -> str | None:
    """Why the dead letter's record cannot be re-published (module docstring), or None."""
    host_of = stage_topics.get(dl.topic)
    if host_of is None:
        return f"{dl.topic[:256]!r} is not a topic a ktel stage reads"
    if PAYLOAD_CUT in dl.reason:
        return (
            f"its payload was cut; the whole record is at {dl.topic}[{dl.partition}]@{dl.offset} "
            "until retention takes it"
        )
    if not dl.payload:
        return "it has no payload (a tombstone)"
    if key is not None and len(key) >= DEAD_LETTER_KEY_BYTES:
        return f"its key is {len(key)} bytes, the most a dead letter keeps, so may have been cut"
    try:
        host_id = host_of(dl.payload)
    except WireError as err:
        return f"it does not decode ({err})"
    if key != host_id.encode():
        return f"its key {key!r:.60} is not its host id {host_id!r:.60}"
    return None


@dataclasses.dataclass(frozen=True)
class Found:
    """A dead letter as read from ktel.dlq."""

    at: str  # where it is: ktel.dlq[partition]@offset
    time_ms: int  # when it was dead-lettered (its record's time)
    key: bytes | None
    letter: DeadLetter
    unusable: str | None  # why it cannot be re-driven, or None

    def line(self) -> str:
        dl = self.letter
        key = "" if self.key is None else f" key={key_text(self.key)!r}"
        state = f"left: {self.unusable}" if self.unusable else "can be re-driven"
        return (
            f"{format_ns(self.time_ms * 1_000_000)} {self.at} {dl.stage}: {dl.topic}[{dl.partition}]"
            f"@{dl.offset}{key} {len(dl.payload or b'')} B ({state}): {dl.reason}"
        )

    def json(self) -> str:
        dl = self.letter
        return json.dumps(
            {
                "dlq": self.at,
                "time": format_ns(self.time_ms * 1_000_000),
                "stage": dl.stage,
                "topic": dl.topic,
                "partition": dl.partition,
                "offset": dl.offset,
                "key": key_text(self.key),
                "reason": dl.reason,
                "payload_bytes": len(dl.payload or b""),
                "payload": (dl.payload or b"").hex(),
                "redrive": self.unusable is None,
                "left_because": self.unusable,
            }
        )


@dataclasses.dataclass
class Summary:
    partitions: int = 0
    records: int = 0
    undecodable: int = 0
    selected: int = 0
    redriven: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    left: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)

    def line(self, topic: str, redrive: bool) -> str:
        parts = [
            f"read {self.records} dead letters from {self.partitions} partitions of {topic}",
            *([f"{self.undecodable} not dead letters"] if self.undecodable else []),
            f"selected {self.selected}",
        ]
        if redrive:
            to = ", ".join(f"{n} to {t}" for t, n in sorted(self.redriven.items()))
            parts.append(f"re-published {sum(self.redriven.values())}{f' ({to})' if to else ''}")
            parts.append(f"left {self.left}")
        return "; ".join(parts)


@dataclasses.dataclass(frozen=True)
class Options:
    bootstrap: str
    selection: Selection
    dlq_topic: str
    stage_topics: Mapping[str, HostOf]
    redrive: bool = False
    json: bool = False
    client: KafkaConfig = dataclasses.field(default_factory=KafkaConfig)


async def run(opts: Options, write: Callable[[str], None], report: Callable[[str], None]) -> Summary:
    """Read the window of dead letters, ``write`` a line for each selected one, and
    re-publish them when ``opts.redrive``; ``report`` what is not a dead letter."""
    summary = Summary()
    sel = opts.selection
    parts = await topic_window.partitions(opts.client, opts.bootstrap, opts.dlq_topic)
    summary.partitions = len(parts)
    reader = topic_window.consumer(opts.client, opts.bootstrap)
    out = (
        AIOKafkaProducer(
            **client_kwargs(opts.client, opts.bootstrap),
            enable_idempotence=True,  # a retried send must not duplicate a record
            # A dead letter's payload is at most what its topic took (MAX_RECORD_BYTES);
            # aiokafka's own limit (1 MiB) is below that.
            max_request_size=MAX_RECORD_BYTES + (64 << 10),
        )
        if opts.redrive
        else None
    )
    in_flight: list[asyncio.Future[Any]] = []

    async def handle(tp: TopicPartition, rec: ConsumerRecord) -> None:
        summary.records += 1
        at = f"{tp.topic}[{tp.partition}]@{rec.offset}"
        try:
            dl = decode_dead_letter(rec.value or b"")
        except WireError as err:
            summary.undecodable += 1
            if len(summary.failures) < FAILURES_SHOWN:
                summary.failures.append(f"{at}: {err}")
                report(f"ktel dlq: {summary.failures[-1]}")
            return
        if not sel.takes(dl, rec.key):
            return
        summary.selected += 1
        found = Found(at, rec.timestamp, rec.key, dl, why_not_redrivable(dl, rec.key, opts.stage_topics))
        write(found.json() if opts.json else found.line())
        if out is None:
            return
        if found.unusable is not None:
            summary.left += 1
            return
        fut = await out.send(dl.topic, dl.payload, key=rec.key, headers=[(HEADER, at.encode())])
        in_flight.append(fut)
        summary.redriven[dl.topic] += 1
        if len(in_flight) >= MAX_IN_FLIGHT:
            await _settle(in_flight)

    started: list[AIOKafkaConsumer | AIOKafkaProducer] = []
    try:
        for client in (reader, out):
            if client is not None:
                await client.start()
                started.append(client)
        async with contextlib.aclosing(topic_window.records(reader, parts, sel.from_ms)) as window:
            async for tp, rec in window:
                if rec.timestamp < sel.to_ms:
                    await handle(tp, rec)
        # What was re-published is acknowledged before the summary counts it.
        await _settle(in_flight)
    except KafkaError as err:
        raise DlqError(f"Kafka failed: {err}") from None
    finally:
        for f in in_flight:
            f.cancel()
        for client in reversed(started):
            await client.stop()
    return summary


async def _settle(in_flight: list[asyncio.Future[Any]]) -> None:
    await asyncio.gather(*in_flight)
    in_flight.clear()


def stage_topics(cfg: Config) -> dict[str, HostOf]:
    """The topics a ktel stage reads, the only ones dead letters are re-published to,
    each with how its records name their host."""
    t = cfg.kafka.topics
    batch, beat = _batch_host, _heartbeat_host
    return {t.raw: batch, t.deduped: batch, t.enriched: batch, t.sampled: batch, t.heartbeats: beat}


def _batch_host(value: bytes) -> str:
    return decode_batch(value).host_id


def _heartbeat_host(value: bytes) -> str:
    return str(decode_heartbeat(value)["host"][HOST_ID])


def options(cfg: Config, args: Any, now_ns: int | None = None) -> Options:
    """Options from ``ktel dlq``'s arguments; raises DlqError naming what is wrong."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    try:
        from_ms = 0 if args.from_ is None else parse_time(args.from_, now_ns) // 1_000_000
        to_ms = parse_time(args.to, now_ns) // 1_000_000
    except ReplayError as err:
        raise DlqError(str(err)) from None
    if from_ms >= to_ms:
        raise DlqError(
            f"--from ({format_ns(from_ms * 1_000_000)}) must be before --to ({format_ns(to_ms * 1_000_000)})"
        )
    try:
        reason = None if args.reason is None else re.compile(args.reason)
    except re.error as err:
        raise DlqError(f"--reason {args.reason!r} is not a regular expression: {err}") from None
    return Options(
        bootstrap=cfg.kafka.bootstrap,
        selection=Selection(
            from_ms=from_ms,
            to_ms=to_ms,
            stages=frozenset(args.stage or ()),
            sources=frozenset(args.source or ()),
            hosts=frozenset(args.host or ()),
            reason=reason,
        ),
        dlq_topic=cfg.kafka.topics.dlq,
        stage_topics=stage_topics(cfg),
        redrive=args.redrive,
        json=args.json,
        client=cfg.kafka,
    )


def main(cfg: Config, args: Any, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """``ktel dlq``: 0 when every selected dead letter was listed (and, with --redrive,
    re-published); 1 when --redrive left some; 2 on a bad argument or an unusable Kafka."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    topic_window.quiet_client_logs()

    def report(msg: str) -> None:
        print(msg, file=stderr, flush=True)

    closed = False

    def write(line: str) -> None:
        nonlocal closed
        if closed:
            return
        try:
            print(line, file=stdout)
        except BrokenPipeError:  # `ktel dlq | head`: the listing ends, a --redrive goes on
            closed = True

    try:
        opts = options(cfg, args)
        summary = asyncio.run(run(opts, write, report))
    except (DlqError, topic_window.ReadError) as err:
        report(f"ktel dlq: {err}")
        return 2
    try:
        stdout.flush()
    except BrokenPipeError:
        closed = True
    if closed and stdout is sys.stdout:
        # Python's own flush of stdout at exit would fail again and print a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if summary.undecodable > len(summary.failures):
        report(
            f"ktel dlq: ... and {summary.undecodable - len(summary.failures)} more that are not dead letters"
        )
    report(f"ktel dlq: {summary.line(opts.dlq_topic, opts.redrive)}")
    return 1 if summary.left else 0
