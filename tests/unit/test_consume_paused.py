"""An exporter's consumer keeps polling, its partitions paused, for as long as what it
read waits somewhere (exporters/consume.py, _deliver_paused): aiokafka leaves the group
when ``getmany`` has not been called for ``max_poll_interval_ms`` (5 minutes), and
another member then delivers the same records again. ``ktel.dlq`` may be away (its
leader down) while the topics read are not: the dead letters of records that do not
decode wait for it within the same paused delivery. Stub clients stand for aiokafka's."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError, TopicAuthorizationFailedError
from aiokafka.structs import ConsumerRecord

from exporters import consume
from ktel.wire import MetricSnapshot, decode_dead_letter, decode_snapshot, encode_snapshot

TP = TopicPartition("ktel.metrics", 0)
GOOD = MetricSnapshot(1_764_000_000_000, [])
BAD = b"\xc1"  # a byte msgpack never uses
# Failed sends of a dead letter with no poll in between before the stub gives up (with
# an error the exporter does not retry): without the polls the test ends, not hangs.
PATIENCE = 4


def record(offset: int, value: bytes) -> ConsumerRecord:
    return ConsumerRecord(TP.topic, TP.partition, offset, 0, 0, b"h1", value, None, 2, len(value), ())


class Consumer:
    """One partition holding a record that does not decode and one that does; the
    fetch is returned once, and nothing while the partition is paused."""

    def __init__(self, done: asyncio.Event) -> None:
        self.done = done
        self.fetches = [{TP: [record(7, BAD), record(8, encode_snapshot(GOOD))]}]
        self.paused_ = False
        self.paused_polls = 0
        self.committed: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def subscribe(self, topics, listener=None) -> None:
        pass

    def assignment(self):
        return {TP}

    def pause(self, *parts) -> None:
        self.paused_ = self.paused_ or TP in parts

    def resume(self, *parts) -> None:
        self.paused_ = False

    def paused(self):
        return {TP} if self.paused_ else set()

    async def getmany(self, timeout_ms: int = 0):
        if self.paused_:
            self.paused_polls += 1
            return {}
        return self.fetches.pop(0) if self.fetches else {}

    async def commit(self, offsets) -> None:
        self.committed.update(offsets)
        self.done.set()

    def highwater(self, tp):
        return None


class Producer:
    """ktel.dlq away until the consumer has been polled since the dead letter was first
    sent; a send then fails as aiokafka's does when its request times out."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.sent: list[tuple[str, bytes, bytes | None]] = []
        self.polls_when_first_sent: int | None = None
        self.failed = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def send_and_wait(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        polls = self.consumer.paused_polls
        if self.polls_when_first_sent is None:
            self.polls_when_first_sent = polls
        if polls == self.polls_when_first_sent:
            self.failed += 1
            if self.failed > PATIENCE:
                raise TopicAuthorizationFailedError(f"not polled in {PATIENCE} attempts")
            raise KafkaTimeoutError()
        self.sent.append((topic, value, key))


@pytest.fixture
def stubs(monkeypatch):
    stop = asyncio.Event()
    consumer = Consumer(stop)
    producer = Producer(consumer)
    monkeypatch.setattr(consume, "AIOKafkaConsumer", lambda **kw: consumer)
    monkeypatch.setattr(consume, "AIOKafkaProducer", lambda **kw: producer)
    monkeypatch.setattr(consume, "tune_gc", lambda: None)  # (process-wide)
    monkeypatch.setattr(consume.selfmetrics, "ready_when", lambda check: None)
    monkeypatch.setattr(consume, "POLL_WHILE_PAUSED_S", 0)
    return stop, consumer, producer


async def test_the_consumer_is_polled_while_the_dead_letter_of_an_undecodable_record_waits(stubs):
    stop, consumer, producer = stubs
    delivered: list[list[tuple[int, MetricSnapshot]]] = []

    async def deliver(items, producer) -> None:
        delivered.append([(rec.offset, rec.item) for rec in items])

    await consume.run(
        kafka="127.0.0.1:9",
        group_id="ktel-export-test",
        stage="test",
        topics={TP.topic: decode_snapshot},
        deliver=deliver,
        stop=stop,
    )
    [(topic, value, key)] = producer.sent
    assert (topic, key) == ("ktel.dlq", b"h1")
    letter = decode_dead_letter(value)
    assert (letter.offset, letter.payload) == (7, BAD)
    assert consumer.paused_polls > producer.polls_when_first_sent
    assert delivered == [[(8, GOOD)]]
    assert consumer.committed == {TP: 9}  # once both were dead-lettered or delivered
    assert not consumer.paused_  # resumed for the next fetch


async def test_the_lag_is_exported_from_kafkas_ends_while_a_delivery_waits(stubs, monkeypatch):
    """A paused partition is not fetched: without asking Kafka for its end, the lag would
    stay where the last fetch left it (or never appear, the first delivery waiting), and
    no alert on it would fire while the backend is away."""
    from prometheus_client import REGISTRY

    stop, consumer, producer = stubs
    monkeypatch.setattr(consume, "LAG_WHILE_PAUSED_S", 0)
    consumer.fetches = [{TP: [record(7, encode_snapshot(GOOD)), record(8, encode_snapshot(GOOD))]}]
    labels = {"group": "ktel-export-lag", "topic": TP.topic, "partition": str(TP.partition)}
    seen: list[float | None] = []

    async def end_offsets(parts):
        return {tp: 20 + len(seen) for tp in parts}  # (records keep arriving)

    consumer.end_offsets = end_offsets

    async def deliver(items, producer) -> None:  # the backend away until the lag has grown
        while len(seen) < 3 or seen[-1] is None or seen[-1] < 15:
            await asyncio.sleep(0)
            seen.append(REGISTRY.get_sample_value("ktel_consumer_lag_records", labels))

    await asyncio.wait_for(
        consume.run(
            kafka="127.0.0.1:9",
            group_id="ktel-export-lag",
            stage="test",
            topics={TP.topic: decode_snapshot},
            deliver=deliver,
            stop=stop,
        ),
        10,
    )
    # From the first record being delivered (7) to the end as Kafka has it now.
    lags = [lag for lag in seen if lag is not None]
    assert lags and lags[0] >= 13 and lags == sorted(lags) and lags[-1] >= 15
    assert consumer.committed == {TP: 9}


class _NoCommitConsumer(Consumer):
    """Partition 0 has a commit and two records; 1 and 2 have none. As aiokafka's with
    auto_offset_reset="none": a partition with no commit has a position only once getmany
    raised its NoOffsetForPartitionError (one a call) and it was sought, and position()
    waits until then."""

    def __init__(self) -> None:  # (Consumer's start, stop and subscribe)
        self.tps = [TopicPartition("ktel.metrics", p) for p in range(3)]
        self.first = True
        self.no_commit = self.tps[1:]
        self.positions = {self.tps[0]: 0}
        self.paused_: set[TopicPartition] = set()  # type: ignore[assignment]
        self.getmany_calls = 0

    def assignment(self):
        return set(self.tps)

    def pause(self, *parts) -> None:
        self.paused_ |= set(parts)

    def resume(self, *parts) -> None:
        self.paused_ -= set(parts)

    def paused(self):
        return set(self.paused_)

    def highwater(self, tp):
        return 10 if tp == self.tps[0] else None

    async def getmany(self, timeout_ms: int = 0):
        from aiokafka.errors import NoOffsetForPartitionError

        self.getmany_calls += 1
        if self.first:
            self.first = False
            self.positions[self.tps[0]] = 2
            good = encode_snapshot(GOOD)
            tp = self.tps[0]
            return {
                tp: [ConsumerRecord(tp.topic, 0, o, 0, 0, b"h", good, None, 1, len(good), ()) for o in (0, 1)]
            }
        if self.no_commit:
            raise NoOffsetForPartitionError(self.no_commit.pop(0))
        await asyncio.sleep(timeout_ms / 1000)
        return {}

    async def beginning_offsets(self, tps):
        return dict.fromkeys(tps, 0)

    async def end_offsets(self, tps):
        return dict.fromkeys(tps, 10)

    async def committed(self, tp):
        return None

    def seek(self, tp, offset) -> None:
        self.positions[tp] = offset

    async def commit(self, offsets) -> None:
        pass

    async def position(self, tp):
        while tp not in self.positions:
            await asyncio.sleep(0.01)
        return self.positions[tp]


async def test_the_lag_while_a_delivery_waits_never_waits_for_a_position_only_getmany_gives(monkeypatch):
    """Asking a partition with no commit (a group's first run, a topic's new partitions)
    for its position waited for good: only getmany starts such a partition over, and the
    loop no longer called it; aiokafka then left the group."""
    consumer = _NoCommitConsumer()
    monkeypatch.setattr(consume, "AIOKafkaConsumer", lambda **kw: consumer)
    monkeypatch.setattr(consume, "AIOKafkaProducer", lambda **kw: Producer(consumer))
    monkeypatch.setattr(consume, "tune_gc", lambda: None)
    monkeypatch.setattr(consume.selfmetrics, "ready_when", lambda check: None)
    monkeypatch.setattr(consume, "POLL_WHILE_PAUSED_S", 0.01)
    monkeypatch.setattr(consume, "LAG_WHILE_PAUSED_S", 0)
    stop = asyncio.Event()

    async def deliver(items, producer) -> None:  # a slow backend
        await asyncio.sleep(0.5)

    run = asyncio.ensure_future(
        consume.run(
            kafka="127.0.0.1:9",
            group_id="g",
            stage="t",
            topics={"ktel.metrics": decode_snapshot},
            deliver=deliver,
            stop=stop,
        )
    )
    try:
        await asyncio.sleep(1.5)
        calls = consumer.getmany_calls
        await asyncio.sleep(0.5)
        assert consumer.getmany_calls > calls
        assert consumer.positions.keys() == set(consumer.tps)  # (every partition started over)
    finally:
        stop.set()
        await asyncio.wait_for(run, 5)
