"""Compressed record batches from a real broker, as a ktel reader polls them
(ktel/kafka_batches.py): a poll over many partitions hands over at most twice the
expansion bound, the partitions it did not walk wait for the next poll, and nothing is
lost or read twice."""

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ktel import config
from ktel.kafka_batches import EXPAND_MAX_BYTES
from ktel.kafka_client import client_kwargs
from ktel.topics import TopicSpec, create_topics

pytestmark = pytest.mark.kafka

PARTITIONS = 4
RECORD = 7 << 20  # four to a batch: 28 MiB expanded, within the bound


async def produce_batches(bootstrap: str, topic: str) -> None:
    """One zstd batch of four 7 MiB records (a few KB in Kafka) on each partition."""
    room = 5 * RECORD
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, compression_type="zstd", max_batch_size=room, max_request_size=room
    )
    await producer.start()
    try:
        for partition in range(PARTITIONS):
            batch = producer.create_batch()
            for _ in range(4):
                assert batch.append(key=b"k", value=bytes(RECORD), timestamp=None) is not None
            await (await producer.send_batch(batch, topic, partition=partition))
    finally:
        await producer.stop()


async def polls(bootstrap: str, topic: str) -> list[dict[int, list[int]]]:
    """Each non-empty poll of a ktel reader of ``topic``: the offsets it returned by
    partition, and what their values held together (checked against the bound)."""
    consumer = AIOKafkaConsumer(**client_kwargs(config.KafkaConfig(bootstrap=bootstrap)), group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        got: list[dict[int, list[int]]] = []
        while sum(len(offsets) for poll in got for offsets in poll.values()) < 4 * PARTITIONS:
            fetched = await consumer.getmany(timeout_ms=10_000)
            assert fetched, f"no records within 10 s after {got}"
            held = sum(len(r.value) for records in fetched.values() for r in records)
            assert held <= 2 * EXPAND_MAX_BYTES, f"a poll handed over {held >> 20} MiB"
            got.append({tp.partition: [r.offset for r in records] for tp, records in fetched.items()})
        return got
    finally:
        await consumer.stop()


def test_a_poll_of_many_partitions_hands_over_at_most_twice_the_bound_and_the_rest_waits(kafka):
    topic = f"ktel.batches-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_topics(kafka.bootstrap, [TopicSpec(topic, PARTITIONS)]))
    asyncio.run(produce_batches(kafka.bootstrap, topic))
    got = asyncio.run(polls(kafka.bootstrap, topic))
    # One fetch brings all four partitions (a few KB each, 112 MiB expanded): the polls
    # (each checked above) took them two at a time, each partition whole and once.
    assert len(got) >= 2
    every = sorted((p, o) for poll in got for p, offsets in poll.items() for o in offsets)
    assert every == [(p, o) for p in range(PARTITIONS) for o in range(4)]
