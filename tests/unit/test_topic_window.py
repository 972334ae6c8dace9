"""Reading a stretch of a topic (ktel/topic_window.py) without Kafka: when a read is
taken for stalled. A fake consumer hands out one partition's records, and a fake clock
moves as the test says, so that no assertion waits on real time."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import OffsetOutOfRangeError

from ktel import topic_window
from ktel.config import KafkaConfig

TP = TopicPartition("ktel.raw", 0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class Reader:
    """One partition of offsets [0, end): each getmany hands out the records of the next
    of ``fetches`` (a list of offsets, possibly empty: a fetch of only control batches
    moves the position without a record), or nothing once they are out, taking the
    fetch's timeout on ``clock``."""

    def __init__(self, clock: Clock, end: int, fetches: list[list[int]]) -> None:
        self.clock = clock
        self.end = end
        self.fetches = list(fetches)
        self.at = 0

    async def end_offsets(self, parts):
        return {tp: self.end for tp in parts}

    async def offsets_for_times(self, times):
        return {tp: SimpleNamespace(offset=0, timestamp=ms) for tp, ms in times.items()}

    def assign(self, parts) -> None:
        pass

    def seek(self, tp, offset) -> None:
        self.at = offset

    def pause(self, tp) -> None:
        pass

    async def position(self, tp) -> int:
        return self.at

    async def getmany(self, *parts, timeout_ms):
        offsets = self.fetches.pop(0) if self.fetches else None
        if not offsets:
            self.clock.now += timeout_ms / 1000  # no record came: the whole timeout passed
            if offsets is not None:
                self.at += 1
            return {}
        self.at = offsets[-1] + 1
        return {TP: [SimpleNamespace(offset=o) for o in offsets]}


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(topic_window.time, "monotonic", c.monotonic)
    return c


async def read(reader: Reader, clock: Clock, handling_s: float = 0.0) -> list[int]:
    """The offsets ``records`` yields, the caller taking ``handling_s`` with each."""
    got = []
    async for _, rec in topic_window.records(reader, [TP], 0, "k:9092", stall_s=60):
        got.append(rec.offset)
        clock.now += handling_s
    return got


async def test_a_caller_slow_with_the_records_is_no_stall_of_kafka(clock):
    # The caller takes 40 s with each record (a pager on stdout nobody scrolls, a
    # --redrive reading back and writing each): 80 s between two fetches that each came
    # at once. The read goes on to the end.
    reader = Reader(clock, end=4, fetches=[[0, 1], [2, 3]])
    assert await read(reader, clock, handling_s=40) == [0, 1, 2, 3]


async def test_positions_moving_without_records_are_no_stall(clock):
    # Control batches (transaction markers) move the position and yield no record: 200
    # fetches of them, each taking its timeout, come to 100 s without a record.
    reader = Reader(clock, end=201, fetches=[[0]] + [[]] * 199 + [[200]])
    assert await read(reader, clock) == [0, 200]


async def test_kafka_giving_nothing_for_the_stall_time_ends_the_read_naming_it(clock):
    reader = Reader(clock, end=4, fetches=[[0, 1]])
    with pytest.raises(topic_window.ReadError) as err:
        await read(reader, clock)
    assert str(err.value) == (
        "no record from k:9092 for 60 s while partitions [0] of ktel.raw were unfinished"
    )


class Log:
    """A topic's partitions as Kafka holds them, each [first, end), and a consumer of
    them that does not reset a position out of range (as topic_window.consumer's):
    each getmany hands out up to two records of each partition asked from its
    position, after ``before_fetch[n]`` changed the partitions before the n-th fetch. A
    fetch that brings nothing takes its timeout on ``clock``, when given."""

    def __init__(
        self,
        ends: dict[int, int],
        before_fetch: dict[int, Callable[[Log], None]],
        clock: Clock | None = None,
    ) -> None:
        self.first = dict.fromkeys(ends, 0)
        self.end = dict(ends)
        self.at: dict[TopicPartition, int] = {}
        self.before_fetch = before_fetch
        self.fetches = 0
        self.clock = clock

    async def beginning_offsets(self, parts):
        return {tp: self.first[tp.partition] for tp in parts}

    async def end_offsets(self, parts):
        return {tp: self.end[tp.partition] for tp in parts}

    async def offsets_for_times(self, times):
        return {
            tp: SimpleNamespace(offset=self.first[tp.partition], timestamp=ms) for tp, ms in times.items()
        }

    def assign(self, parts) -> None:
        pass

    def seek(self, tp, offset) -> None:
        self.at[tp] = offset

    def pause(self, tp) -> None:
        pass

    async def position(self, tp) -> int:
        return self.at[tp]

    async def getmany(self, *parts, timeout_ms):
        self.fetches += 1
        if self.fetches in self.before_fetch:
            self.before_fetch[self.fetches](self)
        out = {
            tp: self.at[tp]
            for tp in parts
            if not self.first[tp.partition] <= self.at[tp] <= self.end[tp.partition]
        }
        if out:
            raise OffsetOutOfRangeError(out)
        fetched = {}
        for tp in parts:
            offsets = range(self.at[tp], min(self.at[tp] + 2, self.end[tp.partition]))
            if offsets:
                fetched[tp] = [SimpleNamespace(offset=o) for o in offsets]
                self.at[tp] = offsets[-1] + 1
        if not fetched and self.clock is not None:
            self.clock.now += timeout_ms / 1000
        return fetched


async def read_log(log: Log, start_ms: int | None = 0) -> list[tuple[int, int]]:
    got = []
    parts = [TopicPartition("ktel.raw", p) for p in sorted(log.end)]
    async for tp, rec in topic_window.records(log, parts, start_ms, "k:9092", stall_s=60):
        got.append((tp.partition, rec.offset))
    return got


async def test_a_partition_whose_end_moved_back_below_the_read_ends_with_an_error_not_read_again(clock):
    # Partition 0 loses its records from offset 2 on (an unclean leader election) while
    # the read is at offset 4 of it: read from its oldest record, as a consumer reset to
    # "earliest" does, offsets 0 and 1 came a second time. Partition 1 is read to its end.
    def lose_records(log: Log) -> None:
        log.end[0] = 2

    log = Log({0: 6, 1: 6}, {3: lose_records})
    got = []
    with pytest.raises(topic_window.ReadError) as err:
        parts = [TopicPartition("ktel.raw", 0), TopicPartition("ktel.raw", 1)]
        async for tp, rec in topic_window.records(log, parts, 0, "k:9092", stall_s=60):
            got.append((tp.partition, rec.offset))
    assert sorted(got) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5)]
    assert str(err.value) == (
        "partition 0 of ktel.raw: its end moved back, from offset 6 to 2, below the read at offset 4 "
        "(records lost in an unclean leader election, or the topic deleted and created again); "
        "its read stopped there"
    )


@pytest.mark.parametrize(
    ("new_end", "read"),
    [
        (4, [(0, 0), (0, 1), (0, 2), (0, 3)]),  # records left past the read: read up to the new end
        (2, [(0, 0), (0, 1)]),  # none left past it
    ],
)
async def test_a_partition_whose_end_moved_back_not_below_the_read_ends_there_at_once(clock, new_end, read):
    # Partition 0 loses its records from offset new_end on while the read is at offset 2
    # of it, its end to reach 6. No fetch is out of range, and past the new end Kafka has
    # nothing to give: waited on, the read stalled for the whole stall time and ended
    # blaming Kafka. Partition 1 is read to its end.
    def lose_records(log: Log) -> None:
        log.end[0] = new_end

    log = Log({0: 6, 1: 6}, {2: lose_records}, clock)
    began = clock.now
    got = []
    with pytest.raises(topic_window.ReadError) as err:
        parts = [TopicPartition("ktel.raw", 0), TopicPartition("ktel.raw", 1)]
        async for tp, rec in topic_window.records(log, parts, 0, "k:9092", stall_s=60):
            got.append((tp.partition, rec.offset))
    assert sorted(got) == [*read, (1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5)]
    assert str(err.value) == (
        f"partition 0 of ktel.raw: its end moved back, from offset 6 to {new_end}, the read being at "
        f"offset {new_end} (records lost in an unclean leader election, or the topic deleted and "
        f"created again); its read stopped at offset {new_end}"
    )
    assert clock.now - began < 60  # (the fetches' timeouts, on the test's clock)


async def test_records_retention_deleted_ahead_of_the_read_are_passed_over(clock):
    def retention(log: Log) -> None:
        log.first[0] = 5

    assert await read_log(Log({0: 8}, {2: retention})) == [(0, 0), (0, 1), (0, 5), (0, 6), (0, 7)]

    def all_of_it(log: Log) -> None:
        log.first[0] = 8

    assert await read_log(Log({0: 8}, {2: all_of_it})) == [(0, 0), (0, 1)]


async def test_the_consumer_leaves_a_position_out_of_range_to_records_to_judge():
    # Reset to "earliest", the consumer read a partition whose end moved back a second time.
    reader = topic_window.consumer(KafkaConfig(), "k:9092")
    try:
        assert reader._auto_offset_reset == "none"
    finally:
        await reader.stop()


async def test_a_read_without_a_start_time_takes_every_record_whatever_its_time(clock):
    class BeforeTime(Log):
        """Every record timed before 1970: Kafka finds none at or after a time >= 0."""

        async def offsets_for_times(self, times):
            return dict.fromkeys(times)

    log = BeforeTime({0: 3}, {})
    log.first[0] = 1
    assert await read_log(log, start_ms=0) == []
    assert await read_log(log, start_ms=None) == [(0, 1), (0, 2)]
