"""Where an exporter reads on from when Kafka refuses its position (exporters/consume.py,
``_fetch``, ``_start_over``): past records retention deleted, counted, and committed
there; past a partition's end, from its first record; with no commit, from its first
record. A stub stands for aiokafka's consumer (tests/integration/test_exporter_retention.py:
a real broker)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, NoOffsetForPartitionError, OffsetOutOfRangeError
from prometheus_client import REGISTRY

from exporters import consume

TP = TopicPartition("ktel.metrics", 3)
OTHER = TopicPartition("ktel.metrics", 4)


class Consumer:
    def __init__(self, error: Exception | None = None, first: int = 100, last: int = 200) -> None:
        self.error = error
        self.first, self.last = first, last
        self.held = {TP, OTHER}
        self.seeks: dict[TopicPartition, int] = {}
        self.new_commits: dict[TopicPartition, int] = {}
        self.lookups_fail = False
        self.revoke_on_lookup: set[TopicPartition] = set()
        self.commits: dict[TopicPartition, int] = {}  # the group's, before this

    def assignment(self):
        return set(self.held)

    async def getmany(self, timeout_ms: int = 0):
        if self.error is not None:
            raise self.error
        return {}

    async def beginning_offsets(self, parts):
        if self.lookups_fail:
            raise KafkaConnectionError("no broker")
        self.held -= self.revoke_on_lookup  # (a rebalance meanwhile)
        return {tp: self.first for tp in parts}

    async def end_offsets(self, parts):
        return {tp: self.last for tp in parts}

    def seek(self, tp, offset) -> None:
        assert tp in self.held, "aiokafka raises IllegalStateError"
        self.seeks[tp] = offset

    async def commit(self, offsets) -> None:
        self.new_commits.update(offsets)

    async def committed(self, tp):
        return self.commits.get(tp)


def expired() -> float:
    labels = {"exporter": "test", "topic": TP.topic}
    return REGISTRY.get_sample_value("ktel_exporter_records_expired_total", labels) or 0.0


async def test_a_position_retention_passed_is_counted_read_on_from_the_first_record_and_committed():
    consumer = Consumer(OffsetOutOfRangeError({TP: 40}))
    before = expired()
    assert await consume._fetch(consumer, "test", 0, grouped=True) == {}
    assert consumer.seeks == {TP: 100}
    assert expired() - before == 60
    # (committed there: a restart before the next delivery meets no gap to count again)
    assert consumer.new_commits == {TP: 100}


async def test_without_a_group_nothing_is_committed():
    consumer = Consumer(OffsetOutOfRangeError({TP: 40}))
    assert await consume._fetch(consumer, "test", 0, grouped=False) == {}
    assert (consumer.seeks, consumer.new_commits) == ({TP: 100}, {})


async def test_a_position_past_the_end_is_read_again_from_the_first_record_and_not_counted():
    consumer = Consumer(OffsetOutOfRangeError({TP: 250}))
    before = expired()
    assert await consume._fetch(consumer, "test", 0, grouped=True) == {}
    assert consumer.seeks == {TP: 100}
    assert expired() == before


async def test_a_position_in_range_as_the_leader_tells_is_fetched_again():
    consumer = Consumer(OffsetOutOfRangeError({TP: 150}))
    before = expired()
    assert await consume._fetch(consumer, "test", 0, grouped=True) == {}
    assert (consumer.seeks, consumer.new_commits) == ({}, {})
    assert expired() == before


async def test_a_partition_no_longer_held_is_left_alone():
    gone = TopicPartition("ktel.metrics", 9)
    consumer = Consumer(OffsetOutOfRangeError({gone: 40}))
    assert await consume._fetch(consumer, "test", 0, grouped=True) == {}
    assert consumer.seeks == {}


async def test_a_partition_revoked_while_its_range_is_looked_up_is_left_to_its_new_member():
    consumer = Consumer(OffsetOutOfRangeError({TP: 40}))
    consumer.revoke_on_lookup = {TP}
    before = expired()
    assert await consume._fetch(consumer, "test", 0, grouped=True) == {}
    assert (consumer.seeks, consumer.new_commits) == ({}, {})
    assert expired() == before  # (its new member counts it, once)


async def test_a_lookup_that_fails_leaves_the_position_for_the_next_fetch():
    consumer = Consumer(OffsetOutOfRangeError({TP: 40}))
    consumer.lookups_fail = True
    before = expired()
    assert await consume._fetch(consumer, "test", 0, grouped=True) == {}
    assert (consumer.seeks, consumer.new_commits) == ({}, {})
    assert expired() == before


async def test_a_groups_partition_without_a_commit_is_read_from_its_first_record_and_committed():
    consumer = Consumer(NoOffsetForPartitionError(OTHER))
    before = expired()
    assert await consume._fetch(consumer, "test", 0, grouped=True) == {}
    assert consumer.seeks == {OTHER: 100}
    assert consumer.new_commits == {OTHER: 100}
    assert expired() == before


async def test_what_the_group_delivered_before_is_not_counted_as_deleted():
    """A rebalance took the position back to an older commit's, while the records after
    it were delivered and committed: only those after the commit were lost."""
    consumer = Consumer(OffsetOutOfRangeError({TP: 40}))
    consumer.commits = {TP: 70}
    before = expired()
    assert await consume._fetch(consumer, "test", 0, grouped=True) == {}
    assert expired() - before == 30
    assert (consumer.seeks, consumer.new_commits) == ({TP: 100}, {TP: 100})


async def test_a_commit_past_the_first_record_is_read_on_from_and_nothing_counted():
    consumer = Consumer(OffsetOutOfRangeError({TP: 40}))
    consumer.commits = {TP: 130}
    before = expired()
    assert await consume._fetch(consumer, "test", 0, grouped=True) == {}
    assert expired() == before
    assert consumer.seeks == {TP: 130}


async def test_a_partition_being_delivered_is_left_until_that_is_done():
    """Its records' commit, once delivered, would go back past where it started over,
    and what they held would be counted as deleted."""
    consumer = Consumer(OffsetOutOfRangeError({TP: 40}))
    before = expired()
    assert await consume._fetch(consumer, "test", 0, grouped=True, busy={TP}) == {}
    assert (consumer.seeks, consumer.new_commits) == ({}, {})
    assert expired() == before


async def test_an_exporter_whose_fetcher_ended_on_an_error_ends_not_stalls():
    """aiokafka's fetch task, ended by an error it does not handle, leaves getmany returning
    nothing for good; the exporter ends instead, to be restarted."""
    from types import SimpleNamespace

    from aiokafka.consumer.fetcher import Fetcher

    assert isinstance(Fetcher.error_future, property)  # (the private API this relies on)
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    ended.set_exception(AssertionError("tp in self._records"))
    with pytest.raises(RuntimeError, match="aiokafka's fetcher stopped: AssertionError"):
        consume._fetcher_alive(SimpleNamespace(_fetcher=SimpleNamespace(error_future=ended)))
    running = loop.create_future()
    consume._fetcher_alive(SimpleNamespace(_fetcher=SimpleNamespace(error_future=running)))
    consume._fetcher_alive(Consumer())  # (a stub: no fetcher)
    running.cancel()


@pytest.mark.parametrize("exporter", ["otlp", "remote-write"])
async def test_an_exporters_series_alerts_read_are_there_from_its_start(exporter):
    """Before Kafka answers: Prometheus' increase() takes a series' first value as its
    start, so a count that first appeared at its first increment (records expired, once
    a partition) would raise no alert; and KtelConsumerGroupGone reads that it is up.
    (Series of this test's prefix are 0; the others this process's earlier tests may
    have counted: they must be there.)"""
    from exporters import otlp, remote_write
    from ktel.config import Config, KafkaConfig, OtlpConfig, RemoteWriteConfig

    names = {"otlp": ("exporter", "otlp"), "remote-write": ("exporter", "remote-write")}
    cfg = Config(
        kafka=KafkaConfig(bootstrap="127.0.0.1:1", prefix=f"zero-{exporter}."),
        otlp=OtlpConfig(metrics_port=0),
        remote_write=RemoteWriteConfig(metrics_port=0),
    )
    module = otlp if exporter == "otlp" else remote_write
    run = asyncio.ensure_future(module.run(cfg, asyncio.Event()))
    try:
        await asyncio.sleep(0.5)
        assert not run.done()
        label = dict([names[exporter]])
        for topic in module.topics(cfg):
            assert (
                REGISTRY.get_sample_value("ktel_exporter_records_expired_total", {**label, "topic": topic})
                == 0
            )
        assert REGISTRY.get_sample_value("ktel_exporter_dead_letters_total", label) is not None
        group = f"zero-{exporter}.ktel-export-{exporter}"
        assert REGISTRY.get_sample_value("ktel_consumer_group_up", {"group": group}) == 1
        if exporter == "otlp":
            for signal in ("spans", "logs", "metrics"):
                for name in ("items", "rejected_items", "failed_exports"):
                    assert (
                        REGISTRY.get_sample_value(f"ktel_exporter_otlp_{name}_total", {"signal": signal})
                        is not None
                    )
        else:
            assert REGISTRY.get_sample_value("ktel_exporter_samples_total", label) is not None
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
