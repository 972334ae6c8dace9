"""Where an exporter reads on from when Kafka refuses its position (exporters/consume.py,
``_fetch``, ``_FromFirst``): past records retention deleted, counted; past a partition's
end, from its first record; with no commit, from its first record. A stub stands for
aiokafka's consumer (tests/integration/test_exporter_retention.py: a real broker)."""

from __future__ import annotations

from aiokafka import TopicPartition
from aiokafka.errors import NoOffsetForPartitionError, OffsetOutOfRangeError
from prometheus_client import REGISTRY

from exporters import consume

TP = TopicPartition("ktel.metrics", 3)
OTHER = TopicPartition("ktel.metrics", 4)


class Consumer:
    def __init__(self, error: Exception | None = None, first: int = 100, last: int = 200) -> None:
        self.error = error
        self.first, self.last = first, last
        self.seeks: dict[TopicPartition, int] = {}
        self.to_beginning: list[TopicPartition] = []
        self.commits: dict[TopicPartition, int | None] = {TP: 150, OTHER: None}

    def assignment(self):
        return {TP, OTHER}

    async def getmany(self, timeout_ms: int = 0):
        if self.error is not None:
            raise self.error
        return {}

    async def beginning_offsets(self, parts):
        return {tp: self.first for tp in parts}

    async def end_offsets(self, parts):
        return {tp: self.last for tp in parts}

    def seek(self, tp, offset) -> None:
        self.seeks[tp] = offset

    async def seek_to_beginning(self, *parts) -> None:
        self.to_beginning += parts

    async def committed(self, tp):
        return self.commits[tp]


def expired() -> float:
    labels = {"exporter": "test", "topic": TP.topic}
    return REGISTRY.get_sample_value("ktel_exporter_records_expired_total", labels) or 0.0


async def test_a_position_retention_passed_is_counted_and_read_on_from_the_first_record():
    consumer = Consumer(OffsetOutOfRangeError({TP: 40}))
    before = expired()
    assert await consume._fetch(consumer, "test", 0) == {}
    assert consumer.seeks == {TP: 100}
    assert expired() - before == 60


async def test_a_position_past_the_end_is_read_again_from_the_first_record_and_not_counted():
    consumer = Consumer(OffsetOutOfRangeError({TP: 250}))
    before = expired()
    assert await consume._fetch(consumer, "test", 0) == {}
    assert consumer.seeks == {TP: 100}
    assert expired() == before


async def test_a_position_in_range_as_the_leader_tells_is_fetched_again():
    consumer = Consumer(OffsetOutOfRangeError({TP: 150}))
    before = expired()
    assert await consume._fetch(consumer, "test", 0) == {}
    assert consumer.seeks == {}
    assert expired() == before


async def test_a_partition_no_longer_held_is_left_alone():
    gone = TopicPartition("ktel.metrics", 9)
    consumer = Consumer(OffsetOutOfRangeError({gone: 40}))
    assert await consume._fetch(consumer, "test", 0) == {}
    assert consumer.seeks == {}


async def test_a_partition_without_a_commit_met_at_a_fetch_is_read_from_its_first_record():
    consumer = Consumer(NoOffsetForPartitionError(OTHER))
    assert await consume._fetch(consumer, "test", 0) == {}
    assert consumer.to_beginning == [OTHER]


async def test_a_new_groups_partitions_are_sought_to_their_first_record_when_assigned():
    consumer = Consumer()
    await consume._FromFirst(consumer).on_partitions_assigned({TP, OTHER})
    assert consumer.to_beginning == [OTHER]  # TP has a commit: read from there
