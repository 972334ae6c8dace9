"""Reading a stretch of a topic (ktel/topic_window.py) without Kafka: when a read is
taken for stalled. A fake consumer hands out one partition's records, and a fake clock
moves as the test says, so that no assertion waits on real time."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition

from ktel import topic_window

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
