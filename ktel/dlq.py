"""What ``ktel.dlq`` holds, and re-driving it: re-published where it came from, or sent to
its exporter's backend (``ktel dlq``).

Every record a stage, an exporter or ``ktel replay --dlq`` could not use goes to
``ktel.dlq`` as a dead letter (``ktel.wire.control.DeadLetter``): the stage, the
reason, where the record was (topic, partition, offset) and the record's bytes, keyed
by the record's key. ``ktel dlq`` reads the dead letters written in a time window (by
their own record time: when they were dead-lettered), keeps those that ``--stage``,
``--source``, ``--host`` and ``--reason`` select, and prints them. A bound of the window
not given is open: by default every dead letter is read, whatever time its record
carries (any a writer of ``ktel.dlq`` gives it, before 1970 or past now).

Re-driving
----------
Once the cause is gone (``process.max_hosts`` raised for hosts it refused, a stage
fixed for records it could not take), ``--redrive`` re-publishes each selected stage's
dead letter's record, with its key, to the topic it was read from, where the live stages
take it as new, and sends each exporter's to that exporter's backend ("An exporter's dead
letters", below). What it re-publishes is the record the dead letter names, read back
from its topic at its partition and offset, and only if it is the one the dead letter
carries (same key, same bytes, or the bytes starting with them where the dead letter's
payload was cut): anyone who may write ``ktel.dlq`` (every stage and exporter) can
write a dead letter, but not make ``--redrive`` write what its record was not.

Running it again re-publishes only what an earlier run did not mark re-driven ("Re-driving
once", below), and is safe while the workers hold the host: they drop a batch they have
already counted (same host, boot and sequence; docs/design.md, "Delivery guarantees"),
and a heartbeat older than the one they hold of its boot changes nothing. A host
silent past ``aggregate.host_ttl_seconds`` is forgotten, and its batches re-driven
after that are counted again. A gauge keeps the last value counted, so one re-driven
from batches older than its host's latest holds the older value until the next one.

A dead letter is left where it is, and the reason said, when:

- its topic is not one a ktel stage reads (``ktel.raw``, the stages' intermediate
  topics and ``ktel.heartbeats``, under ``kafka.prefix``), nor, its stage an exporter that
  sends to a backend (``remote-write``, ``otlp``), one that exporter reads. The output
  topics are read by every exporter, so they are never re-published to: a record one
  exporter refused would reach the others twice. Re-publishing is never sent outside
  ktel's topics. The pull endpoint's dead letters are left: it sends nowhere;
- it has no payload (the record was a tombstone), or its key is as long as a dead
  letter's key may be, so may have been cut;
- its record does not decode as its topic's records do, or its key is not the host id
  it carries: the stages (or the exporter) would only dead-letter it again;
- (``--redrive``) its topic no longer holds the record (retention took it), or holds
  another one there. That is the answer of the partition's leader: a fetch that finds
  the offset out of range (a replica behind the leader answered) or brings nothing, or
  a retriable error, is made again (``ktel.retry``), for as long as a read waits on
  Kafka (``topic_window.STALL_S``).

Each re-published record carries a ``ktel-redriven-from`` header naming the dead
letter (``ktel.dlq[partition]@offset``), so that a record found twice can be traced.

An exporter's dead letters
--------------------------
What a backend refused (a request too large for the Collector, a sample older than
Prometheus' head takes, a tenant's series limit) or the exporter would not send (a
timestamp outside its window) is in ``ktel.dlq`` under the exporter's stage, its payload
the record, or a record of just the refused series, spans or log records. Once the cause
is gone (the Collector's limit raised, Prometheus' out-of-order window, the exporter's
``max_age_seconds``), ``--redrive`` sends it to that exporter's backend as configured here
(``[remote_write]``, ``[otlp]``), through the exporter's own delivery
(``remote_write.delivery``, ``otlp.delivery``): its encoding, its window and other checks,
its retries and its reading of the backend's answers, as if the exporter read the record
again. What it sends is the record the dead letter names, read back from its topic, when
the dead letter carries it (as above), or, when it carries a record of some of its items,
those items, when each is one of the record's, as the record holds it
(``ktel.wire.not_part_of``): a writer of ``ktel.dlq`` cannot make ``--redrive`` send what
was not on the exporter's topic. The record's other items, which the backend took, are not
sent again. A dead letter of some items whose payload was cut to fit ``ktel.dlq`` is left:
what it held cannot be checked item by item, nor sent.

Nor, within a run, are items it sent already: an exporter restarted after it wrote a dead
letter but before it committed its record writes the same dead letter again, and anyone
who may write ``ktel.dlq`` can copy one. What each dead letter sent of its record (by the
exporter's stage, the topic, partition and offset), whatever the backend answered, is
taken out of the later dead letters of that record, item by item as the record holds
them (an item twice in it is two, as ``not_part_of`` counts them): one whose items were
all sent is left, saying with which dead letter, and counted left; one of which some
were sent sends the rest, its line saying so.

What the backend refuses again (or the exporter's checks: a timestamp still outside the
window) is reported on the dead letter's line with the backend's new answer and counted
as refused again in the summary (exit status 1), and not dead-lettered again: the dead
letter stays on ``ktel.dlq`` as every dead letter does, and can be sent once more after the
next fix; a second dead letter of the same items would have them sent twice then. So are
samples a remote-write receiver answers it holds a newer sample of (or another value at
their timestamp): the exporter counts them held, as it does records read again after a
restart, but one sent from ``ktel.dlq`` was most likely never stored, and is only where the
receiver takes samples older than its series' newest (Prometheus' out-of-order window).
An OTLP backend's partial success (it took the request but rejected some items, naming
none) is reported so too. Sending again is safe to repeat to a remote-write receiver,
which takes a sample it holds again without a word; an OTLP backend stores twice what it
is sent twice: a run skips what an earlier one marked delivered (below), but sends again
what it did not mark. The output topics are kept
``kafka.output_retention_hours`` (a day by default), ``ktel.dlq`` longer: an exporter's dead
letter whose record retention took is left, as any is. A backend that
does not take a dead letter within ``--backend-wait`` seconds (``BACKEND_WAIT_S``, 120, by
default), answering nothing or what is retried (down, unreachable, throttling, refusing
ktel's credentials: the exporter's retries, warned of on stderr), ends ``--redrive`` with
exit status 2, what was sent before counted. One that asks for a wait (HTTP Retry-After,
gRPC RetryInfo) ending past that ends it at once, saying what it asked for and the
``--backend-wait`` that waits for it, rather than after waiting for nothing
(``ktel.retry.deadline``). An exporter's delivery that fails otherwise ends it too (what
it sent of the dead letter is not known). One dead letter is sent at a time, in its
partition's order (a cumulative metric's points must reach an OTLP backend in order), each
as one delivery of the exporter: a few requests each.

Re-driving once
---------------
Each dead letter a run delivered (re-published and acknowledged by Kafka; sent and taken
whole by its backend, or all its items sent in the run by other dead letters so taken) is
marked on ktel.dlq: a re-drive marker (``ktel.wire.control.Redriven``, a record of the
dead letters' schema) keyed as the dead letter, in its partition, so after it, naming it
(partition, offset), the time and what it went to. Before it re-drives anything, a run
reads the markers of its window's partitions (``read_markers``; a marker follows its dead
letter, so the window holds it) and skips each dead letter marked, saying so and counting
it, unless ``--again``. A marker is never a dead letter: it is neither listed nor
re-driven, and a listing only counts the markers it reads.

Delivery and marker are two steps: a run killed between them (SIGKILL) delivers that dead
letter again next time (at least once), and a marker Kafka does not take is reported and
leaves the dead letter to the next run (exit status 1). Anyone who may write ktel.dlq can
write a marker, so a marker is trusted only to skip, never to send: one that does not
decode is a record that is not a dead letter; one that names no record before it in its
own partition, or is keyed otherwise than the dead letter it names, is reported and
ignored. One that passes keeps its dead letter from the run (as deleting it would), its
line naming the marker, which ``--again`` overrides.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError, OffsetOutOfRangeError
from opentelemetry.semconv._incubating.attributes.host_attributes import HOST_ID
from prometheus_client import Counter

from exporters import otlp, pull, remote_write
from exporters.consume import Decoder, Delivery, Record
from ktel import topic_window
from ktel.config import AgentConfig, Config, ConfigError, KafkaConfig
from ktel.kafka_batches import BATCH_NOT_READ
from ktel.kafka_client import client_kwargs, compression_type, refused
from ktel.replay import ReplayError, format_ns, key_text, parse_time
from ktel.retry import AskedPastDeadline, Permanent, Transient, retry
from ktel.retry import deadline as retry_deadline
from ktel.wire import (
    DeadLetter,
    Redriven,
    WireError,
    check_keyed,
    decode_batch,
    decode_dead_letter,
    decode_dlq_record,
    decode_heartbeat,
    encode_redriven,
    encode_signal,
    not_part_of,
    row_bytes,
    rows_of,
    with_rows,
)
from ktel.wire.codec import MAX_RECORD_BYTES
from ktel.wire.control import DEAD_LETTER_KEY_BYTES, PAYLOAD_CUT, REDRIVEN

log = logging.getLogger("ktel.dlq")

HEADER = "ktel-redriven-from"
# Dead letters that do not decode, reported one by one on stderr; beyond that only counted.
FAILURES_SHOWN = 20
# Re-published records in flight before waiting for their acknowledgements.
MAX_IN_FLIGHT = 1000
# How long the delivery of an exporter's dead letter waits for its backend to take it unless
# --backend-wait says otherwise, asking again meanwhile as the exporter does (a backend down,
# a Retry-After): the exporter waits for ever, as nothing it read is lost meanwhile; a
# command ends (exit status 2) rather than hang, what it sent being sent, the rest left in
# ktel.dlq.
BACKEND_WAIT_S = 120.0


# How a stage topic's record names its host: its host id, or WireError.
HostOf = Callable[[bytes], str]


class DlqError(Exception):
    """Bad arguments or an unusable Kafka; ``str(err)`` is the message for the user."""


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which dead letters ``ktel dlq`` takes; an empty set takes every one, and a window
    not bounded (None) every time a record may carry."""

    from_ms: int | None = None
    to_ms: int | None = None
    stages: frozenset[str] = frozenset()
    sources: frozenset[str] = frozenset()
    hosts: frozenset[str] = frozenset()
    reason: re.Pattern[str] | None = None

    def within(self, time_ms: int) -> bool:
        """Whether a record of this time (its Kafka timestamp) is in the window."""
        return (self.from_ms is None or self.from_ms <= time_ms) and (
            self.to_ms is None or time_ms < self.to_ms
        )

    def takes(self, dl: DeadLetter, key: bytes | None) -> bool:
        return (
            (not self.stages or dl.stage in self.stages)
            and (not self.sources or dl.topic in self.sources)
            and (not self.hosts or (key is not None and key_text(key) in self.hosts))
            and (self.reason is None or self.reason.search(dl.reason) is not None)
        )


@dataclasses.dataclass(frozen=True)
class Exporter:
    """An exporter whose dead letters ``--redrive`` delivers to its backend."""

    topics: Mapping[str, Decoder]  # the topics it reads, each with its records' decoder
    delivery: Callable[[], contextlib.AbstractAsyncContextManager[Delivery]]  # to its backend
    items: str  # what it sends: samples, items
    acknowledged: Counter  # its count of the items the backend acknowledged
    unstored: Counter  # of those the backend answered it did not store, though it refused none
    unstored_are: str  # what those are, as a dead letter sent again tells


def exporters(cfg: Config) -> dict[str, Exporter]:
    """The exporters whose dead letters ``--redrive`` sends, by the stage their dead
    letters name, each with its configured backend."""
    return {
        remote_write.STAGE: Exporter(
            remote_write.topics(cfg),
            functools.partial(remote_write.delivery, cfg),
            "samples",
            remote_write.SAMPLES,
            remote_write.ALREADY_STORED_SAMPLES,
            "samples the receiver answered it holds a newer sample of (or another value at their "
            "timestamp): not stored unless an earlier --redrive stored them (Prometheus takes a sample "
            "older than its series' newest within its out-of-order window alone)",
        ),
        otlp.STAGE: Exporter(
            otlp.topics(cfg),
            functools.partial(otlp.delivery, cfg),
            "items",
            otlp.ITEMS,
            otlp.REJECTED,
            "items the backend took but said it rejected (a partial success: OTLP forbids sending "
            "them again)",
        ),
    }


def why_not_redrivable(
    dl: DeadLetter,
    key: bytes | None,
    stage_topics: Mapping[str, HostOf],
    exporter_topics: Mapping[str, Mapping[str, Decoder]],
) -> str | None:
    """Why the dead letter cannot be re-driven, as far as it tells (module docstring), or
    None: a stage's re-published to its topic, an exporter's (``exporter_topics``: the
    topics each reads, by its stage's name) sent to its backend."""
    host_of = stage_topics.get(dl.topic)
    decode = None if host_of is not None else exporter_topics.get(dl.stage, {}).get(dl.topic)
    if host_of is None and decode is None:
        return nowhere_to_go(dl, exporter_topics)
    if not dl.payload:
        if BATCH_NOT_READ in dl.reason:
            return "its Kafka record batch was not read (see the reason): it carries none of its records"
        return "it has no payload (a tombstone)"
    if key is not None and len(key) >= DEAD_LETTER_KEY_BYTES:
        return f"its key is {len(key)} bytes, the most a dead letter keeps, so may have been cut"
    if PAYLOAD_CUT in dl.reason:
        return None  # (what its record is, only the record on its topic tells)
    if host_of is not None:
        return not_for_the_stages(dl.payload, key, host_of)
    assert decode is not None
    return not_for_the_exporter(dl.payload, key, decode)


def nowhere_to_go(dl: DeadLetter, exporter_topics: Mapping[str, Mapping[str, Decoder]]) -> str:
    """Why a dead letter of a topic no stage reads is not re-driven. (reprs: escaped, and
    cut: a dead letter's fields are whatever its writer put there)"""
    topic, stage = f"{dl.topic[:256]!r}", f"{dl.stage[:64]!r}"
    if dl.stage in exporter_topics:
        return f"{topic} is not a topic the {stage} exporter reads"
    if not any(dl.topic in topics for topics in exporter_topics.values()):
        return f"{topic} is not a topic a ktel stage reads"
    if dl.stage == pull.STAGE:
        return (
            "the pull endpoint sends nowhere: it serves the series it reads, and the next snapshots hold them"
        )
    names = ", ".join(sorted(exporter_topics))
    return (
        f"{topic} is not a topic a ktel stage reads (every exporter reads it), and {stage} not an exporter "
        f"whose backend --redrive sends to ({names})"
    )


def not_for_the_exporter(value: bytes, key: bytes | None, decode: Decoder) -> str | None:
    """Why the exporter would dead-letter the record again at once, or None."""
    try:
        item = decode(value)
    except WireError as err:
        return f"it does not decode ({err})"
    try:
        check_keyed(item, key)
    except WireError as err:
        return f"it speaks for a host its key does not name ({err})"
    return None


def gone(where: str) -> str:
    return f"no record is at {where} now (retention took it, or there never was one)"


def carried(dl: DeadLetter, key: bytes | None, original: ConsumerRecord) -> bool:
    """Whether ``original``, the record read back where ``dl`` says, is the one ``dl``
    carries: the same key, and the same bytes, or bytes starting with them where its
    payload was cut."""
    payload, value = dl.payload or b"", original.value or b""
    cut = PAYLOAD_CUT in dl.reason
    return original.key == key and (value == payload or (cut and value.startswith(payload)))


def to_send(
    dl: DeadLetter, key: bytes | None, original: ConsumerRecord | None, decode: Decoder
) -> tuple[Any, bytes] | str:
    """What to send to its backend of an exporter's dead letter, given the record it
    names as read back from its topic (None: there is none there): the items decoded and
    their bytes, or why nothing. A dead letter carrying that record (its start, if its
    payload was cut) sends the record; one carrying a record of some of its items (what
    an exporter dead-letters of a record's series, spans or log records) sends those, if
    each is one of the record's (``not_part_of``): a writer of ktel.dlq cannot make
    ``--redrive`` send what was not on the exporter's topic."""
    where = f"{dl.topic}[{dl.partition}]@{dl.offset}"
    if original is None:
        return gone(where)
    whole = carried(dl, key, original)
    if not whole and original.key != key:
        return f"the record at {where} is not the one it carries (not an exporter's dead letter?)"
    if not whole and PAYLOAD_CUT in dl.reason:
        return (
            f"its payload, cut to fit ktel.dlq, is not the start of the record at {where}: "
            "a record of some of its items, cut, cannot be checked against it item by item"
        )
    value = original.value or b""
    try:
        record = decode(value)
        check_keyed(record, key)
    except WireError as err:  # (its exporter dead-lettered it whole: the dead letter did not say so)
        return f"the record at {where} is not one its exporter sends ({err})"
    if whole:
        return record, value
    try:
        part = decode(dl.payload or b"")
    except WireError as err:
        return f"it does not decode ({err})"
    why = not_part_of(part, record)
    if why is not None:
        return f"the record at {where} does not hold what it carries: {why} (not an exporter's dead letter?)"
    return part, dl.payload or b""


def row_digest(item: Any, row: Any) -> bytes:
    """A row of ``item`` as ``SentBefore`` keeps it: 16 bytes of BLAKE2b of its wire form."""
    return hashlib.blake2b(row_bytes(item, row), digest_size=16).digest()


@dataclasses.dataclass
class SentBefore:
    """What ``--redrive`` sent in this run of one exporter's record, and the dead letters
    that carried it (``ktel.dlq[partition]@offset``): all of it, or some of its rows, each
    by a digest of what the wire writes of it (``row_digest``), as many times as sent (a
    multiset, as ``not_part_of`` counts a record's rows). A record sent whole is not kept
    row by row, and a row by 16 bytes, not its own: a run may send thousands of snapshots
    of thousands of series."""

    whole: bool = False
    rows: collections.Counter[bytes] = dataclasses.field(default_factory=collections.Counter)
    by: list[str] = dataclasses.field(default_factory=list)
    # The backend each delivery went to while its backend took all of them; None once one
    # was refused (some of it) again: a dead letter all of whose items were sent is marked
    # re-driven only then.
    taken_by: str | None = None
    refused: bool = False

    def rest(self, item: Any) -> Any | None:
        """``item`` (the record, or some of its rows) less the rows sent before: ``item``
        itself when none was, None when it holds nothing else."""
        if self.whole:
            return None
        if not self.rows:
            return item
        left = self.rows.copy()
        rows = []
        for row in rows_of(item):
            digest = row_digest(item, row)
            if left[digest]:
                left[digest] -= 1
            else:
                rows.append(row)
        if len(rows) == len(rows_of(item)):
            return item  # (none of its rows was sent: its line says nothing of the others)
        return with_rows(item, rows) if rows else None

    def add(self, item: Any, whole: bool, at: str, taken_by: str | None = None) -> None:
        """``item`` sent by the dead letter at ``at``; ``whole``: it carried the record, all
        of whose rows are sent now; ``taken_by``: the backend that took all of it, or None."""
        self.by.append(at)
        self.refused = self.refused or taken_by is None
        self.taken_by = None if self.refused else taken_by
        if whole:
            self.whole = True
            self.rows.clear()
        else:
            self.rows.update(row_digest(item, row) for row in rows_of(item))

    def named(self) -> str:
        return self.by[0] + (f" and {len(self.by) - 1} more" if len(self.by) > 1 else "")


class Refused:
    """What a backend refused again of a dead letter sent to it, as its exporter would
    dead-letter it (``exporters.consume.DeadLetterSink``): its reasons, reported and not
    dead-lettered again (module docstring)."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    async def send_and_wait(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        self.reasons.append(decode_dead_letter(value).reason)


def counted(counter: Counter) -> float:
    """What ``counter`` holds, over all its labels."""
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


def outcome(
    backend: str, refused: list[str], taken: float, unstored: float, exporter: Exporter
) -> str | None:
    """Why a dead letter sent to ``backend`` is not all there, or None: what it refused again
    (``refused``, the reasons) or answered it did not store (``unstored`` items), and what
    it took of it (``taken`` items)."""
    if not refused and not unstored:
        return None
    said = []
    if refused:
        more = f" (and {len(refused) - 1} more refusals)" if len(refused) > 1 else ""
        said.append(f"{backend} refused it again: {refused[0]}{more}")
    if unstored:
        said.append(f"{backend} answered for {unstored:g} {exporter.unstored_are}")
    if taken:
        said.append(f"it took {taken:g} other {exporter.items} of it")
    return "; ".join(said)


def not_for_the_stages(value: bytes, key: bytes | None, host_of: HostOf) -> str | None:
    """Why the stages would dead-letter the record again, or None."""
    try:
        host_id = host_of(value)
    except WireError as err:
        return f"it does not decode ({err})"
    if key != host_id.encode():
        return f"its key {key!r:.60} is not its host id {host_id!r:.60}"
    return None


def printable(text: str) -> str:
    """``text`` with what could fake or garble a line (newlines, terminal escapes) escaped:
    a dead letter's fields are whatever its writer put there."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def record_time(ms: int) -> str:
    """A record's Kafka timestamp as ``format_ns`` shows a time, or in ms since 1970
    outside the years it shows: a client may give a record any 64-bit time."""
    try:
        return format_ns(ms * 1_000_000)
    except OverflowError:
        return f"{ms} ms since 1970"


@dataclasses.dataclass(frozen=True)
class Found:
    """A dead letter as read from ktel.dlq."""

    at: str  # where it is: ktel.dlq[partition]@offset
    time_ms: int  # when it was dead-lettered (its record's time)
    key: bytes | None
    letter: DeadLetter
    unusable: str | None  # why it cannot be re-driven (or its backend refused it again), or None
    sent_to: str | None = None  # the backend an exporter's dead letter was sent to
    sent_already: str | None = None  # what of it was not sent, as sent already in this run
    redriven: Marked | None = None  # the marker of an earlier --redrive that delivered it, skipped

    def line(self) -> str:
        dl = self.letter
        key = "" if self.key is None else f" key={key_text(self.key)!r}"
        state = (
            f"skipped: {self.redriven.text()}; --again re-drives it again"
            if self.redriven
            else f"left: {self.unusable}"
            if self.unusable
            else f"sent: {self.sent_to}"
            if self.sent_to
            else "can be re-driven"
        ) + (f"; {self.sent_already}" if self.sent_already else "")
        return (
            f"{record_time(self.time_ms)} {self.at} {printable(dl.stage)}: "
            f"{printable(dl.topic)}[{dl.partition}]@{dl.offset}{key} {len(dl.payload or b'')} B ({state}): "
            f"{printable(dl.reason)}"
        )

    def json(self) -> str:
        dl = self.letter
        return json.dumps(
            {
                "dlq": self.at,
                "time": record_time(self.time_ms),
                "stage": dl.stage,
                "topic": dl.topic,
                "partition": dl.partition,
                "offset": dl.offset,
                "key": key_text(self.key),
                "reason": dl.reason,
                "payload_bytes": len(dl.payload or b""),
                "payload": (dl.payload or b"").hex(),
                "redrive": self.unusable is None and self.redriven is None,
                "left_because": self.unusable,
                "sent_to": self.sent_to,
                "sent_already": self.sent_already,
                "redriven": None if self.redriven is None else self.redriven.json(),
            }
        )


@dataclasses.dataclass(frozen=True)
class Marked:
    """A re-drive marker read from ktel.dlq: ``marker`` at ``at`` (ktel.dlq[partition]@offset),
    keyed ``key``."""

    marker: Redriven
    at: str
    key: bytes | None

    def text(self) -> str:
        to = printable(self.marker.to)
        return f"re-driven at {record_time(self.marker.at_ms)} to {to} (marked at {self.at})"

    def json(self) -> dict[str, str]:
        return {"at": record_time(self.marker.at_ms), "to": self.marker.to, "marker": self.at}


@dataclasses.dataclass
class Summary:
    partitions: int = 0
    records: int = 0
    undecodable: int = 0
    selected: int = 0
    redriven: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    sent: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # by backend
    refused: int = 0  # sent to its backend, which refused it (or some of it) again
    left: int = 0
    failed: int = 0  # re-published, but Kafka did not take it
    markers: int = 0  # re-drive markers read (not dead letters)
    already: int = 0  # skipped: an earlier --redrive marked them delivered
    unmarked: int = 0  # delivered, but Kafka did not take the marker saying so
    output_closed: bool = False  # stdout's reader went away; the listing was not read to its end
    failures: list[str] = dataclasses.field(default_factory=list)

    def line(self, topic: str, redrive: bool) -> str:
        parts = [
            f"read {self.records} dead letters from {self.partitions} partitions of {topic}",
            *([f"{self.markers} re-drive markers"] if self.markers else []),
            *([f"{self.undecodable} not dead letters"] if self.undecodable else []),
            f"selected {self.selected}",
        ]
        if redrive:
            if self.already:
                parts.append(f"skipped {self.already} already re-driven (--again re-drives them)")
            to = ", ".join(f"{n} to {t}" for t, n in sorted(self.redriven.items()))
            parts.append(f"re-published {sum(self.redriven.values())}{f' ({to})' if to else ''}")
            if self.sent or self.refused:
                by = ", ".join(f"{n} {b}" for b, n in sorted(self.sent.items()))
                parts.append(f"sent {sum(self.sent.values())}{f' ({by})' if by else ''}")
                parts.append(f"refused again {self.refused}")
            parts.append(f"left {self.left}")
            if self.failed:
                parts.append(f"failed {self.failed}")
            if self.unmarked:
                parts.append(f"not marked re-driven {self.unmarked}")
        if self.output_closed:
            parts.append("stopped early: the reader of stdout went away")
        return "; ".join(parts)


class OutputClosed(Exception):
    """stdout's reader went away (``ktel dlq | head``): a listing stops quietly."""


@dataclasses.dataclass(frozen=True)
class Options:
    bootstrap: str
    selection: Selection
    dlq_topic: str
    stage_topics: Mapping[str, HostOf]
    exporters: Mapping[str, Exporter]
    redrive: bool = False
    again: bool = False  # --again: re-drive also what an earlier --redrive marked delivered
    json: bool = False
    client: KafkaConfig = dataclasses.field(default_factory=KafkaConfig)
    # The codec of what --redrive writes: the agent's (agent.compression).
    compression: str = AgentConfig.model_fields["compression"].default
    # How long an exporter's dead letter waits for its backend to take it (--backend-wait).
    backend_wait: float = BACKEND_WAIT_S


class Originals:
    """The records dead letters name, read back from their topics: a dead letter is
    re-driven only as the record it names is there (a writer of ktel.dlq cannot make
    ``--redrive`` write what it likes), and whole when its payload was cut."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.reader = topic_window.consumer(opts.client, opts.bootstrap)
        self._partitions: dict[str, int] = {}
        self._bounds: dict[TopicPartition, tuple[int, int]] = {}

    async def record(self, topic: str, partition: int, offset: int) -> ConsumerRecord | None:
        """The record at ``topic[partition]@offset``; None when there is none (retention
        took it, or the dead letter named a place that never held one)."""
        if topic not in self._partitions:
            self._partitions[topic] = len(
                await topic_window.partitions(self.opts.client, self.opts.bootstrap, topic)
            )
        tp = TopicPartition(topic, partition)
        if partition >= self._partitions[topic]:
            return None
        if tp not in self._bounds:
            first = (await self.reader.beginning_offsets([tp]))[tp]
            self._bounds[tp] = (first, (await self.reader.end_offsets([tp]))[tp])
        first, end = self._bounds[tp]
        if not first <= offset < end:
            return None

        async def attempt() -> ConsumerRecord | None:
            try:
                return await self._fetch(tp, offset)
            except Transient:
                raise
            except KafkaError as err:
                if err.retriable:  # (a connection lost, a leader moving: asked again)
                    raise
                raise Permanent(str(err)) from err
            except Exception as err:
                raise Permanent(str(err)) from err  # (not Kafka's answer: no reason to ask again)

        # Once, not at each attempt: an assign drops the fetch in flight (a new assignment)
        # and a seek what it brought, so that a fetch longer than a getmany waits (a large
        # record, a Kafka far off) made anew at each attempt would never bring the record.
        # Nothing moves the position but the fetch: not even one out of range.
        self.reader.assign([tp])
        self.reader.seek(tp, offset)
        try:
            # As long as a read of a window waits for Kafka to move (topic_window.STALL_S).
            async with asyncio.timeout(topic_window.STALL_S):
                return await retry(attempt, what=f"reading {topic}[{partition}]@{offset} back", quiet=True)
        except TimeoutError:
            raise topic_window.ReadError(
                f"no record from {self.opts.bootstrap} for {topic}[{partition}]@{offset}"
            ) from None
        except Permanent as err:
            raise err.__cause__ or err from None

    async def _fetch(self, tp: TopicPartition, offset: int) -> ConsumerRecord | None:
        """One fetch of the record at ``offset``: it, None when Kafka's answer is that
        there is none, or Transient when it is not an answer; the position is at it
        (``record``)."""
        try:
            fetched = await self.reader.getmany(tp, timeout_ms=500)
        except OffsetOutOfRangeError:
            # The consumer does not reset a position out of range (topic_window), and its
            # range is told by whichever replica answered: one behind its leader (read from
            # a follower, or a new leader catching up) finds the record out of range
            # while the leader holds it. Only the leader's range tells it is gone.
            await self._unless_held(tp, offset, "it is out of range as a replica tells")
            return None
        for rec in fetched.get(tp, []):
            if rec.offset >= offset:  # (past it: compaction or retention took it meanwhile)
                return rec if rec.offset == offset else None
        if await self.reader.position(tp) > offset:
            return None
        # Nothing yet, or nothing to fetch there: the partition's end moved back to the
        # offset (no fetch is out of range there), which the leader's range tells.
        await self._unless_held(tp, offset, "no fetch brought it yet")
        return None

    async def _unless_held(self, tp: TopicPartition, offset: int, why: str) -> None:
        """Transient(``why``), for the fetch to be made again, when the partition's leader
        holds ``offset`` in its range; else it holds no record there now (retention took
        it, or its end moved back to it or below): the definitive answer."""
        first = (await self.reader.beginning_offsets([tp]))[tp]
        end = (await self.reader.end_offsets([tp]))[tp]
        if first <= offset < end:
            raise Transient(f"{tp.topic}[{tp.partition}]@{offset}: {why}")
        return None


async def run(
    opts: Options, summary: Summary, write: Callable[[str], None], report: Callable[[str], None]
) -> None:
    """Read the window of dead letters into ``summary``, ``write`` a line for each
    selected one, and re-publish them when ``opts.redrive``; ``report`` what is not a
    dead letter and what Kafka did not take."""
    sel = opts.selection
    parts = await topic_window.partitions(opts.client, opts.bootstrap, opts.dlq_topic)
    summary.partitions = len(parts)
    reader = topic_window.consumer(opts.client, opts.bootstrap)
    originals = Originals(opts) if opts.redrive else None
    out = (
        AIOKafkaProducer(
            **client_kwargs(opts.client, opts.bootstrap),
            enable_idempotence=True,  # a retried send must not duplicate a record
            # A record reads back uncompressed: one an agent sent with a Kafka codec
            # (agent.compression lz4 or gzip) took up to the topic's limit compressed, and
            # sent again uncompressed it would not fit. Compressed as the agent does, it
            # is the size it was, as replay's --to-topic writes it.
            compression_type=compression_type(opts.compression),
            # A record of a stage's topic is at most MAX_RECORD_BYTES (what ktel.raw takes);
            # aiokafka's own limit (1 MiB) is below that.
            max_request_size=MAX_RECORD_BYTES + (64 << 10),
        )
        if opts.redrive
        else None
    )
    # (the send, its topic, its dead letter: where it is, its partition, offset and key)
    in_flight: list[tuple[asyncio.Future[Any], str, str, int, int, bytes | None]] = []
    # The re-drive markers of the dead letters to skip, by the dead letter's (partition, offset):
    # read before any is re-driven (``read_markers``), unless --again.
    marks: dict[tuple[int, int], dict[bytes | None, Marked]] = {}
    marks_reader = (
        topic_window.consumer(opts.client, opts.bootstrap) if opts.redrive and not opts.again else None
    )
    # The exporters' deliveries to their backends, each opened at its first dead letter.
    backends = contextlib.AsyncExitStack()
    deliveries: dict[str, Delivery] = {}
    # What was sent of each exporter's record, by (stage, topic, partition, offset): two dead
    # letters of the same items (an exporter restarted before it committed the record writes
    # its dead letters again; anyone who may write ktel.dlq can copy one) send them once.
    sent_before: collections.defaultdict[tuple[str, str, int, int], SentBefore] = collections.defaultdict(
        SentBefore
    )
    exporter_topics = {stage: exporter.topics for stage, exporter in opts.exporters.items()}

    def shown(what: str) -> None:
        """Report a record that is not a dead letter, or a send Kafka refused (the first few)."""
        if len(summary.failures) < FAILURES_SHOWN:
            summary.failures.append(what)
            report(f"ktel dlq: {what}")

    async def mark(partition: int, offset: int, key: bytes | None, to: str) -> asyncio.Future[Any]:
        """Send the marker of the dead letter at ktel.dlq[partition]@offset, delivered to
        ``to``: keyed as it is, in its partition, so after it."""
        assert out is not None
        marker = Redriven(partition, offset, time.time_ns() // 1_000_000, to)
        return await out.send(opts.dlq_topic, encode_redriven(marker), key=key, partition=partition)

    def unmarked(at: str, err: BaseException) -> None:
        summary.unmarked += 1
        shown(
            f"{at}: delivered, but not marked re-driven on {opts.dlq_topic} ({err!r}): a later --redrive "
            "delivers it again unless it is kept from it"
        )

    async def marked(partition: int, offset: int, key: bytes | None, to: str, at: str) -> None:
        """Mark the dead letter at ``at`` delivered to ``to``, and wait for Kafka to take it."""
        try:
            await (await mark(partition, offset, key, to))
        except Exception as err:
            unmarked(at, err)

    async def settle() -> None:
        results = await asyncio.gather(*(f for f, *_ in in_flight), return_exceptions=True)
        marking: list[tuple[str, asyncio.Future[Any]]] = []
        for (_, topic, at, partition, offset, key), result in zip(in_flight, results, strict=True):
            if isinstance(result, BaseException):
                summary.redriven[topic] -= 1
                summary.failed += 1
                shown(f"{at}: not re-published to {topic}: {result!r}")
                continue
            try:
                marking.append((at, await mark(partition, offset, key, topic)))
            except Exception as err:
                unmarked(at, err)
        in_flight.clear()
        done = await asyncio.gather(*(f for _, f in marking), return_exceptions=True)
        for (at, _), result in zip(marking, done, strict=True):
            if isinstance(result, BaseException):
                unmarked(at, result)

    async def redriven(dl: DeadLetter, key: bytes | None) -> tuple[bytes, str | None]:
        """The record to re-publish for ``dl``, or why there is none."""
        assert originals is not None
        rec = await originals.record(dl.topic, dl.partition, dl.offset)
        where = f"{dl.topic}[{dl.partition}]@{dl.offset}"
        if rec is None:
            return b"", gone(where)
        if not carried(dl, key, rec):
            return b"", f"the record at {where} is not the one it carries (not a ktel stage's dead letter?)"
        value = rec.value or b""
        cut = PAYLOAD_CUT in dl.reason
        return value, not_for_the_stages(value, key, opts.stage_topics[dl.topic]) if cut else None

    async def delivery(stage: str) -> Delivery:
        if stage not in deliveries:
            try:
                deliveries[stage] = await backends.enter_async_context(opts.exporters[stage].delivery())
            except ConfigError as err:
                raise DlqError(f"cannot send the {stage} exporter's dead letters: {err}") from None
        return deliveries[stage]

    async def sent(
        dl: DeadLetter, key: bytes | None, at: str
    ) -> tuple[str | None, str | None, str | None, str | None]:
        """Send an exporter's dead letter to its backend: (the backend, None, ...) when it
        took all of it, (the backend, why not, ...) when it refused some of it again, (None,
        why, None, ...) when it was not sent; the third, what of it was left out as sent
        already in this run, or None; the last, the backend that took all it carries, to
        mark it re-driven to, or None."""
        assert originals is not None
        exporter = opts.exporters[dl.stage]
        rec = await originals.record(dl.topic, dl.partition, dl.offset)
        found = to_send(dl, key, rec, exporter.topics[dl.topic])
        if isinstance(found, str):
            return None, found, None, None
        item, value = found
        before = sent_before[(dl.stage, dl.topic, dl.partition, dl.offset)]
        whole = rec is not None and carried(dl, key, rec)
        rest = before.rest(item)
        if rest is None:
            return (
                None,
                f"all it carries was sent in this run already, with {before.named()} (its items "
                "dead-lettered again, or a copy: an OTLP backend stores twice what it is sent twice)",
                None,
                # (taken whole by the backend, it is marked as the ones that sent it are: a
                # later --redrive would send it as the first of its items)
                before.taken_by,
            )
        less = None
        if rest is not item:
            item, value = rest, encode_signal(rest)
            less = f"less what {before.named()} sent of its record in this run"
        to = await delivery(dl.stage)
        refused = Refused()
        taken, unstored = counted(exporter.acknowledged), counted(exporter.unstored)
        # As the exporter read it, from where the dead letter says; what it refuses again
        # comes to ``refused``, not to ktel.dlq.
        record = Record(item, dl.topic, dl.partition, dl.offset, key, value, opts.dlq_topic)
        limit = opts.backend_wait
        end = asyncio.get_running_loop().time() + limit
        waited = asyncio.timeout_at(end)
        try:
            async with waited:
                # A wait the backend asks for past the limit is not waited for: the run would
                # end before the next attempt (in every task the delivery starts, too).
                with retry_deadline(end):
                    await to.deliver([record], refused)
        except Exception as err:
            if isinstance(err, TimeoutError) and waited.expired():
                raise DlqError(
                    f"{to.backend} did not take {at} in {limit:g} s, asked again meanwhile (the warnings "
                    "above say what it answered): stopped there, the dead letters from it on left; "
                    "--backend-wait SECONDS waits longer"
                ) from None
            if isinstance(err, AskedPastDeadline):
                # (what it waits for: the time this dead letter took so far, and the wait asked)
                enough = math.ceil(limit - err.left + err.asked)
                raise DlqError(
                    f"{to.backend} asked to be sent {at} again in {round(err.asked, 3):g} s "
                    f"({printable(str(err.failure))[:500]}), past the --backend-wait of {limit:g} s "
                    f"({err.left:.0f} s of it left): stopped there without waiting, the dead letters "
                    f"from it on left; --backend-wait {enough} or more waits for it"
                ) from None
            # Not the backend's answer (the exporter's delivery failed: a TimeoutError of its
            # own among them): what it sent of the dead letter is not known, so the run ends
            # there, its summary printed, as when Kafka fails or its read does.
            log.debug("sending %s to %s failed", at, to.backend, exc_info=True)
            raise DlqError(
                f"sending {at} to {to.backend} failed: {type(err).__name__}: {printable(str(err))[:500]}: "
                "stopped there, the dead letters from it on left"
            ) from err
        taken, unstored = counted(exporter.acknowledged) - taken, counted(exporter.unstored) - unstored
        why = outcome(to.backend, refused.reasons, taken, unstored, exporter)
        # Sent, whatever the backend answered: what it refused, it refuses again in this run.
        before.add(item, whole, at, to.backend if why is None else None)
        return to.backend, why, less, to.backend if why is None else None

    async def handle(tp: TopicPartition, rec: ConsumerRecord) -> None:
        at = f"{tp.topic}[{tp.partition}]@{rec.offset}"
        try:
            dl = decode_dlq_record(rec.value or b"")
        except WireError as err:
            summary.records += 1
            summary.undecodable += 1
            shown(f"{at}: {err}")
            return
        if isinstance(dl, Redriven):
            summary.markers += 1
            why = marker_of(tp, rec, dl)
            if isinstance(why, str):
                shown(why)
            return
        summary.records += 1
        if not sel.takes(dl, rec.key):
            return
        summary.selected += 1
        its = marks.get((tp.partition, rec.offset), {})
        earlier = its.get(rec.key)  # (one keyed otherwise hides none keyed as it)
        for other in (m for key, m in its.items() if key != rec.key):
            shown(f"{other.at}: a re-drive marker of {at}, keyed otherwise than it: ignored")
        unusable = why_not_redrivable(dl, rec.key, opts.stage_topics, exporter_topics)
        value = b""
        backend = less = None
        if out is not None and unusable is None and earlier is None:
            if dl.topic in opts.stage_topics:
                value, unusable = await redriven(dl, rec.key)
            else:
                backend, unusable, less, mark_to = await sent(dl, rec.key, at)
                if mark_to is not None:
                    await marked(tp.partition, rec.offset, rec.key, mark_to, at)
        line = Found(at, rec.timestamp, rec.key, dl, unusable, backend, less, earlier)
        try:
            write(line.json() if opts.json else line.line())
        except OutputClosed:
            if out is None:
                raise  # (a listing ends; a --redrive goes on without one)
        if out is None:
            return
        if earlier is not None:
            summary.already += 1
            return
        if backend is not None:
            if unusable is None:
                summary.sent[backend] += 1
            else:
                summary.refused += 1
            return
        if unusable is not None:
            summary.left += 1
            return
        fut = await out.send(dl.topic, value, key=rec.key, headers=[(HEADER, at.encode())])
        in_flight.append((fut, dl.topic, at, tp.partition, rec.offset, rec.key))
        summary.redriven[dl.topic] += 1
        if len(in_flight) >= MAX_IN_FLIGHT:
            await settle()

    # Every client made is stopped, also one whose start failed or never came: aiokafka
    # warns of any left unstopped, and one whose start failed may have its metadata task
    # running (an idempotent producer refused a producer id).
    clients: list[AIOKafkaConsumer | AIOKafkaProducer] = [
        c for c in (reader, marks_reader, originals.reader if originals else None, out) if c is not None
    ]
    try:
        for client in clients:
            await client.start()
        failure: topic_window.ReadError | KafkaError | DlqError | None = None
        if marks_reader is not None:
            marks.update(await read_markers(marks_reader, parts, sel.from_ms, opts.bootstrap))
        try:
            async with contextlib.aclosing(
                topic_window.records(reader, parts, sel.from_ms, opts.bootstrap)
            ) as window:
                async for tp, rec in window:
                    if sel.within(rec.timestamp):
                        try:
                            await handle(tp, rec)
                        except OutputClosed:
                            return
        except (topic_window.ReadError, KafkaError, DlqError) as err:
            failure = err
        # What was re-published is acknowledged before the summary counts it, also when
        # the read failed midway or an exporter's backend did not answer (or could not be
        # set up), whose summary is printed: the records sent before it are written all
        # the same, or refused.
        await settle()
        if failure is not None:
            raise failure
    except KafkaError as err:
        raise DlqError(f"Kafka failed: {refused(err)}") from None
    finally:
        for f, *_ in in_flight:
            f.cancel()
        try:
            await backends.aclose()
        finally:
            for client in reversed(clients):
                await client.stop()


def marker_of(tp: TopicPartition, rec: ConsumerRecord, marker: Redriven) -> Marked | str:
    """``marker``, read at ``tp`` from ``rec``, as it marks a dead letter, or why it marks
    none: one naming a place that is not before it in its own partition (where ``--redrive``
    writes every marker) is ignored, as the dead letter it names is not one it can follow."""
    at = f"{tp.topic}[{tp.partition}]@{rec.offset}"
    if marker.partition != tp.partition or marker.offset >= rec.offset:
        return (
            f"{at}: a re-drive marker naming {tp.topic}[{marker.partition}]@{marker.offset}, not a record "
            "before it in its partition: ignored"
        )
    return Marked(marker, at, rec.key)


async def read_markers(
    reader: AIOKafkaConsumer, parts: list[TopicPartition], start_ms: int | None, bootstrap: str
) -> dict[tuple[int, int], dict[bytes | None, Marked]]:
    """The re-drive markers of ``parts`` (ktel.dlq's) from ``start_ms`` on, the last of each
    dead letter and key, by the dead letter's (partition, offset), then the marker's key: a
    marker follows its dead letter, so those of the dead letters a window holds are in it.
    Any other record, a marker that does not decode or marks no dead letter included,
    marks none (the read of the dead letters reports it)."""
    marks: dict[tuple[int, int], dict[bytes | None, Marked]] = {}
    needle = REDRIVEN.encode()
    async with contextlib.aclosing(topic_window.records(reader, parts, start_ms, bootstrap)) as window:
        async for tp, rec in window:
            value = rec.value or b""
            if needle not in value:  # (a marker's map holds its key: no dead letter is decoded here)
                continue
            try:
                record = decode_dlq_record(value)
            except WireError:
                continue
            if isinstance(record, Redriven):
                found = marker_of(tp, rec, record)
                if isinstance(found, Marked):
                    # (by key too: one keyed otherwise, which handle ignores, must not
                    # take the place of the dead letter's own)
                    marks.setdefault((tp.partition, record.offset), {})[rec.key] = found
    return marks


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
        # Not given, a bound is open: whoever may write ktel.dlq gives a record any time
        # (before 1970, past now: a clock set so, or to hide it), and it must be listed.
        from_ms = None if args.from_ is None else parse_time(args.from_, now_ns) // 1_000_000
        to_ms = None if args.to is None else parse_time(args.to, now_ns) // 1_000_000
    except ReplayError as err:
        raise DlqError(str(err)) from None
    if args.again and not args.redrive:
        raise DlqError("--again goes with --redrive: it re-drives what an earlier --redrive marked delivered")
    if from_ms is not None and to_ms is not None and from_ms >= to_ms:
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
        exporters=exporters(cfg),
        redrive=args.redrive,
        again=args.again,
        json=args.json,
        client=cfg.kafka,
        compression=cfg.agent.compression,
        backend_wait=BACKEND_WAIT_S if args.backend_wait is None else args.backend_wait,
    )


def main(cfg: Config, args: Any, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """``ktel dlq``: 0 when every selected dead letter was listed (and, with --redrive,
    re-published or sent); 1 when --redrive left some, or a backend refused some again; 2
    on a bad argument, an unusable Kafka, or a backend that did not take a dead letter within
    --backend-wait or asked for a wait past it (or a delivery to it that failed)."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    topic_window.quiet_client_logs()

    def report(msg: str) -> None:
        print(msg, file=stderr, flush=True)

    summary = Summary()
    # A dead letter's text is whatever its writer put there: a character stdout's
    # encoding has no bytes for (a locale not UTF-8: LANG=C, PYTHONIOENCODING=ascii) is
    # written escaped (\xe9), as stderr does, not raised as UnicodeEncodeError midway.
    encoding = getattr(stdout, "encoding", None) or "utf-8"

    def write(line: str) -> None:
        if summary.output_closed:
            return
        try:
            print(line.encode(encoding, "backslashreplace").decode(encoding), file=stdout)
        except BrokenPipeError:  # `ktel dlq | head`: a listing ends there, a --redrive goes on
            summary.output_closed = True
            raise OutputClosed from None

    try:
        opts = options(cfg, args)
    except DlqError as err:
        report(f"ktel dlq: {err}")
        return 2
    error = None
    exporters_log = logging.getLogger("ktel.export")  # (exporters.consume's; the parent of theirs)
    level = exporters_log.level

    def errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # Below debug, the exporters' warnings of what they dead-letter (exporters.consume's:
        # a dead letter sent again is not, its line says what its backend answered), and
        # their notes of what a receiver holds already (info), stay off stderr. Their other
        # warnings do not: what an OTLP backend said of the items it rejected in a partial
        # success (the line counts them, without its words), an attribute left out of what
        # was sent; nor their errors (a backend refusing ktel's credentials), nor the
        # retries' warnings (a backend away). (A logger's filter sees only what is logged on
        # that logger, not on its children.)
        exporters_log.setLevel(max(logging.WARNING, exporters_log.getEffectiveLevel()))
        exporters_log.addFilter(errors_only)
    try:
        asyncio.run(run(opts, summary, write, report))
    except (DlqError, topic_window.ReadError) as err:
        error = str(err)
    finally:
        exporters_log.removeFilter(errors_only)
        exporters_log.setLevel(level)
    try:
        stdout.flush()
    except BrokenPipeError:
        summary.output_closed = True
    if summary.output_closed and stdout is sys.stdout:
        # Python's own flush of stdout at exit would fail again and print a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    shown = len(summary.failures)
    if summary.undecodable + summary.failed > shown:
        report(f"ktel dlq: ... and {summary.undecodable + summary.failed - shown} more like those")
    if error is not None:
        # What was done before it failed, so that a --redrive cut short can be told.
        report(f"ktel dlq: {summary.line(opts.dlq_topic, opts.redrive)}")
        report(f"ktel dlq: {error}")
        return 2
    report(f"ktel dlq: {summary.line(opts.dlq_topic, opts.redrive)}")
    return 1 if summary.left or summary.refused or summary.failed or summary.unmarked else 0
