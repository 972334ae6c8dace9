"""Every Kafka client a ktel component makes is stopped however the component ends:
cancelled while the client connects (the process stopping while Kafka is away), or
failed at a client's start. One left unstopped keeps its tasks and connections, and
aiokafka's retries, after its owner is gone, and aiokafka warns of it unclosed.

The clients are aiokafka's own, pointed at a loopback port where nothing listens, so
each start fails (and ktel's retries go on) without a broker."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from edge_agent.control import Bounds, Control
from exporters import consume
from ktel import dlq, kafka_client, replay, topic_window
from ktel.replay import NS, Filter
from ktel.stack.proc import free_port

NOW = 1_764_000_000 * NS


@pytest.fixture
def made(monkeypatch) -> list[AIOKafkaProducer | AIOKafkaConsumer]:
    """Every aiokafka producer and consumer made during the test, wherever it was made."""
    clients: list[AIOKafkaProducer | AIOKafkaConsumer] = []
    for cls in (AIOKafkaProducer, AIOKafkaConsumer):

        def recording(self, *args, _init=cls.__init__, **kwargs):
            _init(self, *args, **kwargs)
            clients.append(self)

        monkeypatch.setattr(cls, "__init__", recording)
    return clients


@pytest.fixture
def nowhere() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there: refused at once


class _Failed(logging.Handler):
    def __init__(self, event: asyncio.Event) -> None:
        super().__init__()
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying until it can" in record.getMessage():
            self.event.set()


async def cancelled_once_a_start_failed(coro) -> None:
    """Run ``coro`` until kafka_client.start has said a start failed (it is retrying
    then), and cancel it there."""
    failed = asyncio.Event()
    handler = _Failed(failed)
    logger = logging.getLogger("ktel.kafka")
    logger.addHandler(handler)
    task = asyncio.ensure_future(coro)
    said = asyncio.ensure_future(failed.wait())
    try:
        # (the timeout only keeps a broken test from hanging)
        await asyncio.wait({task, said}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    finally:
        said.cancel()
        logger.removeHandler(handler)
    assert failed.is_set() and not task.done(), task
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def assert_all_stopped(made) -> None:
    assert made
    assert [c for c in made if not c._closed] == []


async def test_the_probe_of_reachable_is_stopped_when_its_caller_is_cancelled(made, nowhere):
    await cancelled_once_a_start_failed(kafka_client.reachable(nowhere, "ktel test"))
    assert_all_stopped(made)


async def test_the_control_consumer_is_stopped_when_the_agent_stops_while_it_connects(
    made, nowhere, tmp_path
):
    ctl = Control("h1", {}, lambda probe, every: None, Bounds(1000, 3_600_000, 64), tmp_path)
    await cancelled_once_a_start_failed(ctl.follow(nowhere))
    assert_all_stopped(made)


async def test_an_exporter_stopped_while_its_consumer_connects_leaves_no_client(made, nowhere, monkeypatch):
    monkeypatch.setattr(consume, "tune_gc", lambda: None)  # (process-wide)
    monkeypatch.setattr(consume.selfmetrics, "ready_when", lambda check: None)

    async def deliver(items, producer) -> None:
        raise AssertionError("nothing can be read")

    run = consume.run(
        kafka=nowhere,
        group_id="ktel-export-test",
        stage="test",
        topics={"ktel.metrics": lambda value: value},
        deliver=deliver,
        stop=asyncio.Event(),
    )
    await cancelled_once_a_start_failed(run)
    assert_all_stopped(made)


async def partitions(client, bootstrap, topic) -> list[TopicPartition]:
    return [TopicPartition(topic, 0)]  # (as an admin client would find them)


async def test_replay_stops_every_client_it_made_when_one_fails_to_start(made, nowhere, monkeypatch):
    monkeypatch.setattr(topic_window, "partitions", partitions)
    opts = replay.Options(nowhere, Filter(NOW, NOW + NS), to_topic="scratch", dlq=True)
    with pytest.raises(replay.ReplayError):
        await replay.replay(opts, lambda line: None, lambda line: None)
    assert len(made) == 3  # the reader, the dead-letter producer and --to-topic's
    assert_all_stopped(made)


async def test_dlq_stops_every_client_it_made_when_one_fails_to_start(made, nowhere, monkeypatch):
    monkeypatch.setattr(topic_window, "partitions", partitions)
    opts = dlq.Options(nowhere, dlq.Selection(), "ktel.dlq", {}, {}, redrive=True)
    with pytest.raises(dlq.DlqError):
        await dlq.run(opts, dlq.Summary(), lambda line: None, lambda line: None)
    # the reader, the originals' reader, the re-driving producer and the reader of the
    # re-drive markers of earlier runs
    assert len(made) == 4
    assert_all_stopped(made)
