"""Where a group-less exporter consumer starts (exporters/consume.py, _seek): at the
first record at or after the start time, else at the partition's end as it was
before that lookup, so that a record written during the lookups is still read.
A stub consumer stands for the broker here; tests/integration/test_pull_start.py
runs the pull endpoint against a real one."""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndTimestamp

from exporters.consume import READ_UP_S, _read_up, _seek

HAS_RECENT, EMPTY = TopicPartition("ktel.metrics", 0), TopicPartition("ktel.metrics", 1)


class Broker:
    """A consumer's view of two partitions: one with a record at or after the start
    time (offset 7), one without; a record is written to each while the offsets for
    the start time are looked up."""

    def __init__(self) -> None:
        self.ends = {HAS_RECENT: 10, EMPTY: 4}
        self.positions: dict[TopicPartition, int] = {}

    async def end_offsets(self, parts):
        return {tp: self.ends[tp] for tp in parts}

    async def offsets_for_times(self, timestamps):
        found = {HAS_RECENT: OffsetAndTimestamp(7, 1_000), EMPTY: None}
        for tp in self.ends:  # written meanwhile
            self.ends[tp] += 1
        return {tp: found[tp] for tp in timestamps}

    def seek(self, tp, offset):
        self.positions[tp] = offset

    async def seek_to_end(self, *parts):
        for tp in parts:
            self.positions[tp] = self.ends[tp]

    async def beginning_offsets(self, parts):
        return dict.fromkeys(parts, 0)


async def test_a_partition_without_a_recent_record_starts_where_it_ended_before_the_lookup():
    broker = Broker()
    behind = await _seek(broker, [HAS_RECENT, EMPTY], start_ms=500)
    # EMPTY's record written during the lookup (offset 4) is read, not skipped.
    assert broker.positions == {HAS_RECENT: 7, EMPTY: 4}
    # What the read has to take before it holds what the partitions held as it began.
    assert behind == {HAS_RECENT: 10}


async def test_without_a_start_time_every_partition_is_read_from_its_beginning():
    broker = Broker()
    behind = await _seek(broker, [HAS_RECENT, EMPTY], start_ms=None)
    assert broker.positions == {HAS_RECENT: 0, EMPTY: 0}
    assert behind == {HAS_RECENT: 10, EMPTY: 4}


class Reading:
    """A consumer's positions and high watermarks (None: not fetched yet)."""

    def __init__(self, positions, highwaters) -> None:
        self.positions, self.highwaters = positions, highwaters

    async def position(self, tp):
        return self.positions[tp]

    def highwater(self, tp):
        return self.highwaters[tp]


async def test_the_read_is_up_once_each_partition_reaches_its_end_or_where_that_end_moved_back_to():
    """A partition's end moved back below where the read began to end (records lost in an
    unclean leader election, the topic made again) never grows back: read to its end as
    it is now, it is read up."""
    read_up = asyncio.Event()
    behind = {HAS_RECENT: 10, EMPTY: 4}
    reading = Reading({HAS_RECENT: 6, EMPTY: 3}, {HAS_RECENT: 12, EMPTY: None})
    await _read_up(reading, behind, read_up, 1.0)
    assert behind == {HAS_RECENT: 10, EMPTY: 4} and not read_up.is_set()
    reading.positions[HAS_RECENT], reading.highwaters[EMPTY] = 10, 3  # (EMPTY's end: 4, then 3)
    await _read_up(reading, behind, read_up, 2.0)
    assert behind == {} and read_up.is_set()


async def test_a_partition_that_is_never_read_up_holds_the_read_up_for_so_long_only(caplog):
    read_up = asyncio.Event()
    behind = {HAS_RECENT: 10}
    reading = Reading({HAS_RECENT: 6}, {HAS_RECENT: None})  # (no leader: not fetched)
    await _read_up(reading, behind, read_up, READ_UP_S - 1)
    assert not read_up.is_set()
    await _read_up(reading, behind, read_up, READ_UP_S + 1)
    assert read_up.is_set()
    assert "partitions ktel.metrics[0] not read up to where they ended" in caplog.text
