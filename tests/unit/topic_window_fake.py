"""A topic read without Kafka, for the unit tests of what reads a time window of a
topic through ktel/topic_window.py (ktel replay, ktel dlq)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from aiokafka import TopicPartition

from ktel import topic_window


class IdleClient:
    """The window's consumer, started and stopped, never fetched from: ``read`` stands
    for its fetches. Made from its settings as aiokafka's clients are, so that a test's
    subclass with a producer's sends stands for the producer too."""

    def __init__(self, **settings: Any) -> None:
        pass

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def read_through(
    monkeypatch: Any,
    tp: TopicPartition,
    read: Callable[..., AsyncIterator[Any]],
    consumer: Any = None,
) -> None:
    """Have topic_window give a topic of one partition, ``tp``, whose records are what
    ``read`` (``topic_window.records``' signature) yields, through ``consumer`` (an
    IdleClient unless given)."""

    async def partitions(client, bootstrap, topic):
        return [tp]

    monkeypatch.setattr(topic_window, "partitions", partitions)
    monkeypatch.setattr(topic_window, "consumer", lambda client, bootstrap: consumer or IdleClient())
    monkeypatch.setattr(topic_window, "records", read)
