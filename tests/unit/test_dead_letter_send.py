"""An exporter's dead letters while Kafka is away (exporters/consume.py dead_letter)."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, TopicAuthorizationFailedError

from exporters import consume
from ktel.retry import Permanent
from ktel.wire import DeadLetter, decode_dead_letter


class Producer:
    """aiokafka's producer as the dead letter uses it: each send fails with the next
    of ``failures``, then succeeds."""

    def __init__(self, *failures: Exception):
        self.failures = list(failures)
        self.sent: list[tuple[str, bytes, bytes | None]] = []

    async def send_and_wait(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append((topic, value, key))


def letter() -> DeadLetter:
    return DeadLetter("remote_write", "HTTP 400: bad sample", "ktel.metrics", 3, 41, b"\x81\xa1v\x01")


def test_a_dead_letter_kafka_did_not_take_in_time_is_sent_again_once_it_does():
    before = consume.DEAD_LETTERS.labels("remote_write")._value.get()
    producer = Producer(KafkaTimeoutError(), KafkaTimeoutError())
    asyncio.run(consume.dead_letter(producer, "ktel.dlq", letter(), b"host-1"))
    [(topic, value, key)] = producer.sent
    assert (topic, key) == ("ktel.dlq", b"host-1")
    assert decode_dead_letter(value).reason == "HTTP 400: bad sample"
    assert consume.DEAD_LETTERS.labels("remote_write")._value.get() == before + 1


@pytest.mark.parametrize("err", [TopicAuthorizationFailedError(), MessageSizeTooLargeError()])
def test_a_dead_letter_kafka_refuses_for_good_ends_the_exporter_naming_the_topic(err):
    producer = Producer(err)
    with pytest.raises(Permanent, match=f"^ktel.dlq refused a dead letter: {type(err).__name__}"):
        asyncio.run(consume.dead_letter(producer, "ktel.dlq", letter()))
    assert producer.sent == []
