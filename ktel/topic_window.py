"""Reading a stretch of a topic by time, outside any consumer group (``ktel replay``,
``ktel dlq``).

Every partition is read from its first record whose timestamp is at or after a start
time (Kafka's ``offsets_for_times``), or from its oldest record, up to its end offset
as it was when the read began, so a read always ends however fast producers keep
writing. The consumer has no group and commits nothing, so a read never moves the
offsets of a live consumer group.

Kafka may find a read's position out of its partition's range midway. When retention
deleted the records ahead of it, the read goes on from the oldest record left. When
the partition's end moved back below it (an unclean leader election lost records, or
the topic was deleted and created again), that partition's read ends there, the others
are read to their end, and then ``records`` raises ReadError naming it: going on from
the oldest record, as a consumer reset to "earliest" would, read the partition a
second time, every record already handed on handed on again.

The end may also move back to the read's position or above it, still below the end
the read was to reach. No fetch is then out of range: the records up to the new end
are read, and past them Kafka has nothing to give, the records the read was to take
there being gone. A fetch that brings nothing asks for the partitions' ends, and a
partition whose end moved back below the end of its read is read to its new end and
ends there, named in the same ReadError: waiting on it would wait the whole stall
time (``STALL_S``) for records that are no more, and end with an error blaming Kafka.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError, OffsetOutOfRangeError

from ktel.config import KafkaConfig
from ktel.kafka_client import client_kwargs, explain, settings
from ktel.topics import topic_partitions

# Without a fetch that moves any partition for this long, the broker is taken to be
# gone: the read reports it and ends rather than waiting forever. Only the time spent
# waiting on Kafka counts, not what the caller takes with the records handed to it.
STALL_S = 60.0


class ReadError(Exception):
    """The topic cannot be read; ``str(err)`` is the message for the user."""


def quiet_client_logs() -> None:
    """Below debug, keep aiokafka's INFO lines (assignments, topic updates) off stderr,
    where they would bury a command's summary."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("aiokafka").setLevel(logging.WARNING)


def consumer(client: KafkaConfig, bootstrap: str) -> AIOKafkaConsumer:
    """A consumer for ``records``: no group, no commits."""
    return AIOKafkaConsumer(
        **client_kwargs(client, bootstrap),
        group_id=None,
        enable_auto_commit=False,
        # A position out of range raises OffsetOutOfRangeError, for ``records`` to tell
        # records deleted by retention from an end moved back (module docstring).
        auto_offset_reset="none",
    )


async def partitions(client: KafkaConfig, bootstrap: str, topic: str) -> list[TopicPartition]:
    """The topic's partitions; ReadError when the topic or the Kafka is not there."""
    kafka = settings(client, bootstrap)
    # The admin client answers for a missing topic at once (a producer would wait
    # for its metadata until a timeout, and a group-less consumer does not fetch it).
    try:
        n = await topic_partitions(kafka, topic)
    except (KafkaError, OSError) as err:
        raise ReadError(await explain(err, kafka)) from None
    if not n:
        # (a principal is shown only the topics it may describe)
        raise ReadError(
            f"topic {topic} is not on {bootstrap}, or this principal may not describe it: check the "
            "topic's name and kafka.prefix, or grant the role with `ktel acls`"
        )
    return [TopicPartition(topic, p) for p in range(n)]


async def records(
    reader: AIOKafkaConsumer,
    parts: list[TopicPartition],
    start_ms: int | None,
    bootstrap: str,
    *,
    stall_s: float = STALL_S,
) -> AsyncGenerator[tuple[TopicPartition, ConsumerRecord], None]:
    """Each partition's records from ``start_ms`` (record time, ms since epoch; None:
    from its oldest record, whatever the times its records carry) to its end offset at
    the call, partition by partition in fetch order. ReadError when no fetch moves for
    ``stall_s`` (naming ``bootstrap``, the Kafka read), and at the end when a
    partition's end moved back below the read (module docstring)."""
    ends = await reader.end_offsets(parts)
    if start_ms is None:
        starts = await reader.beginning_offsets(parts)
    else:
        # offsets_for_times refuses a negative time (a start before 1970).
        found = await reader.offsets_for_times({tp: max(0, start_ms) for tp in parts})
        starts = {tp: hit.offset for tp, hit in found.items() if hit is not None}
    # Partition -> the end offset to read up to; a partition is dropped when done.
    active: dict[TopicPartition, int] = {}
    for tp in parts:
        if tp in starts and starts[tp] < ends[tp]:
            active[tp] = ends[tp]
    reader.assign(list(active))
    for tp in active:
        reader.seek(tp, starts[tp])

    def done(tp: TopicPartition) -> None:
        del active[tp]
        reader.pause(tp)  # no more prefetching of a finished partition

    # Partition -> what to say of its read, ended where its end moved back.
    cut: dict[TopicPartition, str] = {}

    def moved_back(tp: TopicPartition, end: int, position: int) -> None:
        """End the read of a partition whose end moved back from its read's end to
        ``end``, the read being at ``position``: at once when the end is at or below it,
        else at the new end, once the records up to it are read."""
        where = (
            f"below the read at offset {position}"
            if end < position
            else f"the read being at offset {position}"
        )
        cut[tp] = (
            f"partition {tp.partition} of {tp.topic}: its end moved back, from offset "
            f"{ends[tp]} to {end}, {where} (records lost in an unclean leader election, or the "
            "topic deleted and created again); its read stopped "
            + ("there" if end < position else f"at offset {end}")
        )
        if end <= position:
            done(tp)
        else:
            active[tp] = end

    async def out_of_range(err: OffsetOutOfRangeError) -> None:
        """Go on past records retention deleted, or end the read of a partition whose
        end moved back below its position."""
        at = err.args[0] if err.args and isinstance(err.args[0], dict) else {}
        named = [tp for tp in at if tp in active]
        if not named:
            return
        firsts = await reader.beginning_offsets(named)
        lasts = await reader.end_offsets(named)
        for tp in named:
            if at[tp] < firsts[tp]:
                if firsts[tp] >= active[tp]:
                    done(tp)
                else:
                    reader.seek(tp, firsts[tp])
            elif at[tp] > lasts[tp]:
                moved_back(tp, lasts[tp], at[tp])
            # Else in range as the leader tells (a replica behind it answered): the consumer
            # fetches it again, from its leader.

    positions: dict[TopicPartition, int] = {}

    async def ends_moved_back(wait_s: float) -> None:
        """End, as ``moved_back`` does, the read of each partition whose end is now below
        the end its read is to reach (module docstring). Asked only when a fetch brought
        nothing: when one moves, the read is not waiting on a lost end. A Kafka that does
        not answer within ``wait_s`` (what is left of the stall time) tells nothing, and
        the read is then taken for stalled as before."""
        try:
            async with asyncio.timeout(max(wait_s, 0.0)):
                lasts = await reader.end_offsets(list(active))
        except (KafkaError, TimeoutError):
            return
        for tp in list(active):
            # The end a partition's read is to reach was its end when the read began, and
            # Kafka's end offset (its high watermark) only grows while no record is lost:
            # below it now, records the read was to take are gone. Those between the
            # position and the new end are still there, and read; past it a fetch finds
            # nothing, so the read would wait for them until the stall time.
            if lasts[tp] < active[tp]:
                moved_back(tp, lasts[tp], positions[tp])

    progress_at = time.monotonic()
    while active:
        try:
            fetched = await reader.getmany(*active, timeout_ms=500)
        except OffsetOutOfRangeError as err:
            await out_of_range(err)
            fetched = {}
        moved = bool(fetched)
        for tp, batch in fetched.items():
            for rec in batch:
                if rec.offset >= active[tp]:
                    done(tp)
                    break
                yield tp, rec
        for tp in list(active):
            # Compacted or transactional gaps can carry the position past the last record,
            # and control batches move it without one: progress all the same.
            position = await reader.position(tp)
            if position >= active[tp]:
                done(tp)
            elif positions.get(tp) != position:
                positions[tp] = position
                moved = True
        if not moved and active:
            await ends_moved_back(stall_s - (time.monotonic() - progress_at))
        # Taken after the records were handed on: the caller may hold them for long (a
        # pager on stdout nobody scrolls, a --redrive reading back and writing each).
        if moved:
            progress_at = time.monotonic()
        elif active and time.monotonic() - progress_at > stall_s:
            raise ReadError(
                f"no record from {bootstrap} for {stall_s:.0f} s while partitions "
                f"{sorted(tp.partition for tp in active)} of {parts[0].topic} were unfinished"
            )
    if cut:
        raise ReadError("; ".join(cut[tp] for tp in sorted(cut)))
