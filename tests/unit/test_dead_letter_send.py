"""An exporter's dead letters while Kafka is away (exporters/consume.py dead_letter)."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, TopicAuthorizationFailedError

from exporters import consume
from ktel.retry import Permanent
from ktel.wire import DeadLetter, MetricSnapshot, decode_dead_letter, decode_snapshot, encode_snapshot
from ktel.wire.control import PAYLOAD_CUT


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


@pytest.mark.parametrize("series", [1, 3_000])
def test_some_rows_of_a_record_are_dead_lettered_as_a_record_of_them_when_it_fits_else_the_record(series):
    """A record the exporter kept some rows of (``consume.keeping``) is dead-lettered as a
    record of just those, which `ktel dlq --redrive` checks row by row; one too large for
    ktel.dlq as the record read, cut, which it sends whole from its topic (a record of
    some rows, cut, it could never send)."""
    rows = [[f"m{i}", "gauge", {"host.id": "h", "pad": "x" * 400}, i] for i in range(series + 1)]
    value = encode_snapshot(MetricSnapshot(1, rows))
    rec = consume.Record(decode_snapshot(value), "ktel.metrics", 0, 7, b"h", value, "ktel.dlq")
    kept = consume.keeping(rec, rec.item.series[1:])
    producer = Producer()
    asyncio.run(consume.refuse(producer, "remote-write", kept, "HTTP 400", signal="samples", items=series))
    [(_topic, sent, _key)] = producer.sent
    dl = decode_dead_letter(sent)
    if series == 1:
        assert decode_snapshot(dl.payload).series == [rows[1]]
    else:
        assert PAYLOAD_CUT in dl.reason
        assert value.startswith(dl.payload)
