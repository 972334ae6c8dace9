"""The agent's publisher (Agent.publish, Agent._deliver) against Kafka producers faked
at aiokafka's interface: what it does with the errors Kafka answers."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import ProducerFenced

from edge_agent import agent as agent_mod
from edge_agent import statelock
from ktel import retry as retry_mod
from tests.unit.test_agent_batches import file_events, make_agent, packed


class StillRefused(BaseException):
    """Raised by a fake producer past its last answer: the publisher went on sending to
    it. (Not an Exception: the retry helper retries those for good.)"""


class Producer:
    """An aiokafka producer whose sends are acknowledged; with ``refusing``, answered
    with it at every send (``tries`` of them)."""

    def __init__(self, refusing: BaseException | None = None, tries: int = 4) -> None:
        self.refusing = refusing
        self.tries = tries  # sends a refusing producer answers before StillRefused
        self.acknowledged: list[bytes] = []
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        if self.refusing is None:
            self.acknowledged.append(value)
            fut.set_result(None)
            return fut
        self.tries -= 1
        if self.tries < 0:
            raise StillRefused(f"sent again to a producer answered {self.refusing!r}")
        fut.set_exception(self.refusing)
        return fut

    async def send_and_wait(self, topic: str, value: bytes, key: bytes) -> None:
        await (await self.send(topic, value, key))


@pytest.fixture
def agent(tmp_path, monkeypatch):
    async def no_wait(_s: float) -> None:
        pass

    monkeypatch.setattr(retry_mod, "_sleep", no_wait)  # (the retries' backoff, not waited here)
    a = make_agent(tmp_path)
    yield a
    a.spool.close()
    statelock.release(a.state_lock)


async def test_a_fenced_producer_is_replaced_and_the_batch_delivered_by_the_new_one(agent, monkeypatch):
    """ProducerFenced (the broker refuses the producer's epoch, InvalidProducerEpoch)
    answers every later send of that producer the same: it was retried for good. The
    producer is replaced, and the batch, kept in the spool until acknowledged, goes
    with the new one."""
    fenced = Producer(refusing=ProducerFenced())
    fresh = Producer()
    agent.producer = fenced  # type: ignore[assignment]
    monkeypatch.setattr(agent, "_new_producer", lambda: fresh)
    [(_, payload)] = agent.encoded(packed(file_events(3)), [1.0] * 3)
    assert agent.spool.append(payload, 3)
    agent.spooled.set()
    acked = asyncio.Event()
    ack = agent.spool.ack

    def acknowledged(upto):
        ack(upto)
        acked.set()

    monkeypatch.setattr(agent.spool, "ack", acknowledged)
    renewals = agent_mod.PRODUCER_RENEWALS._value.get()
    publishing = asyncio.create_task(agent.publish())
    waiting = asyncio.ensure_future(acked.wait())
    try:
        await asyncio.wait({publishing, waiting}, return_when=asyncio.FIRST_COMPLETED)
        assert acked.is_set(), publishing.exception()
    finally:
        waiting.cancel()
        assert await agent_mod.cancelled([publishing], 1.0) == set()
    assert agent.producer is fresh and fresh.started and fenced.stopped
    assert fresh.acknowledged == [payload]
    assert agent.spool.empty()
    assert agent_mod.PRODUCER_RENEWALS._value.get() == renewals + 1


async def test_a_fenced_producer_is_replaced_when_sending_a_batch_alone(agent, monkeypatch):
    """The same where the batch is sent alone (a re-send, a heartbeat): the retries go to
    a new producer."""
    fenced = Producer(refusing=ProducerFenced())
    fresh = Producer()
    agent.producer = fenced  # type: ignore[assignment]
    monkeypatch.setattr(agent, "_new_producer", lambda: fresh)
    [(_, payload)] = agent.encoded(packed(file_events(2)), [1.0] * 2)
    assert await agent._deliver(payload) == 0
    assert agent.producer is fresh and fenced.stopped
    assert fresh.acknowledged == [payload]
