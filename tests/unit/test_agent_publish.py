"""The agent's publisher (Agent.publish, Agent._deliver) against Kafka producers faked
at aiokafka's interface: what it does with the errors Kafka answers."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import msgpack
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, ProducerFenced

from edge_agent import agent as agent_mod
from edge_agent import control as control_mod
from edge_agent import spool as spool_mod
from edge_agent import statelock
from ktel import retry as retry_mod
from ktel.wire import ControlCommand, decode_batch
from ktel.wire.codec import ZSTD_MAGIC, WireError, decompress
from tests.unit.test_agent_batches import file_events, make_agent, packed


class StillRefused(BaseException):
    """Raised by a fake producer past its last answer: the publisher went on sending to
    it. (Not an Exception: the retry helper retries those for good.)"""


class Producer:
    """An aiokafka producer whose sends are acknowledged; with ``refusing``, answered
    with it at every send (``tries`` of them); those of ``too_large`` refused as too
    large."""

    def __init__(
        self, refusing: BaseException | None = None, tries: int = 4, too_large: tuple[bytes, ...] = ()
    ) -> None:
        self.refusing = refusing
        self.tries = tries  # sends a refusing producer answers before StillRefused
        self.too_large = too_large
        self.acknowledged: list[bytes] = []
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        if value in self.too_large:
            fut.set_exception(MessageSizeTooLargeError())
            return fut
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


async def published(agent: agent_mod.Agent, monkeypatch) -> None:
    """Run the agent's publisher until its spool is empty (every batch acknowledged,
    or moved out of it)."""
    emptied = asyncio.Event()
    ack = agent.spool.ack

    def acknowledged(upto):
        ack(upto)
        if agent.spool.empty():
            emptied.set()

    monkeypatch.setattr(agent.spool, "ack", acknowledged)
    agent.spooled.set()
    publishing = asyncio.create_task(agent.publish())
    waiting = asyncio.ensure_future(emptied.wait())
    try:
        await asyncio.wait({publishing, waiting}, return_when=asyncio.FIRST_COMPLETED)
        assert emptied.is_set(), publishing.exception()
    finally:
        waiting.cancel()
        assert await agent_mod.cancelled([publishing], 1.0) == set()


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
    renewals = agent_mod.PRODUCER_RENEWALS._value.get()
    await published(agent, monkeypatch)
    assert agent.producer is fresh and fresh.started and fenced.stopped
    assert fresh.acknowledged == [payload]
    assert agent_mod.PRODUCER_RENEWALS._value.get() == renewals + 1


async def test_a_fenced_producer_is_replaced_when_sending_a_batch_alone(agent, monkeypatch):
    """The same where the batch is sent alone (a re-send, a heartbeat): the retries go to
    a new producer."""
    fenced = Producer(refusing=ProducerFenced())
    fresh = Producer()
    agent.producer = fenced  # type: ignore[assignment]
    monkeypatch.setattr(agent, "_new_producer", lambda: fresh)
    [(_, payload)] = agent.encoded(packed(file_events(2)), [1.0] * 2)
    assert await agent._deliver(payload, 2) == 0
    assert agent.producer is fresh and fenced.stopped
    assert fresh.acknowledged == [payload]


async def test_a_producer_that_does_not_stop_in_time_fails_the_sends_it_held(monkeypatch):
    """A broken producer whose stop waits for a broker that is gone is closed: its
    sender, cancelled, leaves the sends it had not finished unanswered (aiokafka fails
    them only when its sender ends with an error), and the publisher, waiting on its
    oldest batch in flight, would wait for ever while heartbeats went out through the
    new producer. ``close_producer`` fails them: the publisher sends each again. A real
    aiokafka producer, its broker an address nothing listens on."""
    monkeypatch.setattr(agent_mod, "PRODUCER_STOP_TIMEOUT_S", 0.2)
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9")
    await producer._sender.start()
    sent = await producer._message_accumulator.add_message(
        TopicPartition("ktel.raw", 0), None, b"a batch", timeout=60
    )
    await agent_mod.close_producer(producer)
    assert sent.done()
    with pytest.raises(KafkaConnectionError):
        sent.result()


def undecodable(agent: agent_mod.Agent, n: int) -> bytes:
    """A batch of ``n`` events this agent's decoder refuses, as one spooled by another
    version of it may be: an event of a kind it does not know."""
    [(_, spooled)] = agent.encoded(packed(file_events(n)), [1.0] * n)
    raw = msgpack.unpackb(decompress(spooled, "batch") if spooled[:4] == ZSTD_MAGIC else spooled)
    raw["events"][0][0] = 200
    payload = msgpack.packb(raw)
    with pytest.raises(WireError):
        decode_batch(payload)
    return payload


def set_aside() -> float:
    return agent_mod.SET_ASIDE._value.get()


async def test_a_batch_too_large_that_does_not_decode_is_set_aside_with_its_reason(agent, monkeypatch):
    """Kafka refusing it as too large, it was to be sent in halves, which took decoding
    it: the publisher failed on it, and at every start after, the spool stuck behind
    it. It is moved out of the spool with its reason, its events counted, and the next
    batches go."""
    bad = undecodable(agent, 3)
    [(_, good)] = agent.encoded(packed(file_events(2)), [1.0] * 2)
    producer = Producer(too_large=(bad,))
    agent.producer = producer  # type: ignore[assignment]
    assert agent.spool.append(bad, 3) and agent.spool.append(good, 2)
    before = set_aside()
    await published(agent, monkeypatch)
    assert producer.acknowledged == [good]
    assert set_aside() == before + 3
    where = agent.cfg.agent.state_dir / agent_mod.SET_ASIDE_DIR
    [kept] = where.glob("*.batch")
    assert kept.read_bytes() == bad
    reason = kept.with_suffix(".reason").read_text()
    assert "too large" in reason and "kind" in reason
    assert (where.stat().st_mode & 0o777, kept.stat().st_mode & 0o777) == (0o700, 0o600)


async def test_set_aside_batches_past_their_bound_are_counted_not_kept(agent, monkeypatch):
    first, second = undecodable(agent, 40), undecodable(agent, 50)
    # room for the first (and its reason), not the second
    monkeypatch.setattr(agent_mod, "SET_ASIDE_MAX_BYTES", len(first) + len(second) - 1)
    agent.producer = Producer(too_large=(first, second))  # type: ignore[assignment]
    assert agent.spool.append(first, 40) and agent.spool.append(second, 50)
    before = set_aside()
    await published(agent, monkeypatch)
    assert set_aside() == before + 90
    [kept] = (agent.cfg.agent.state_dir / agent_mod.SET_ASIDE_DIR).glob("*.batch")
    assert kept.read_bytes() == first


async def test_acknowledgements_of_a_heartbeat_cancelled_in_its_send_go_in_the_next(agent):
    """A stop cancels the periodic heartbeat in its send (Kafka slow or away): the
    command acknowledgements it carried go in the last heartbeat, as those of one that
    timed out do, not lost uncounted."""

    class Hanging(Producer):
        async def send_and_wait(self, topic: str, value: bytes, key: bytes) -> None:
            await asyncio.Event().wait()

    agent.producer = Hanging()  # type: ignore[assignment]
    t0 = control_mod.now_ms()
    assert agent.control.handle(ControlCommand("raise-1", "*", "file_created", 10, 0, 60_000), t0, now=t0)
    beating = asyncio.create_task(agent.beat(60.0))
    for _ in range(500):  # until the heartbeat took them and waits on its send
        await asyncio.sleep(0.01)
        if not agent.control._acks._items:
            break
    assert not beating.done()
    assert await agent_mod.cancelled([beating], 1.0) == set()
    assert agent.control.take_acks() == ["raise-1"]


class EIOReads:
    """A spool segment file whose reads the disk refuses with EIO, ``fails`` of them in
    all (counted down in ``left``, shared by every open of the file), then read as it is."""

    def __init__(self, f, left: list[float]) -> None:
        self.f, self.left = f, left

    def read(self, n: int = -1) -> bytes:
        if self.left[0] > 0:
            self.left[0] -= 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return self.f.read(n)

    def seek(self, *args) -> int:
        return self.f.seek(*args)

    def close(self) -> None:
        self.f.close()


def restarted_with(tmp_path, monkeypatch, payloads: list[bytes], failing: int, fails: float):
    """An agent started on a spool that holds ``payloads`` on disk, one segment each (a
    restart after Kafka was away), whose segment ``failing`` the disk refuses to read
    ``fails`` times; the number of refused reads left."""
    sp = spool_mod.Spool(tmp_path / "spool", segment_bytes=1)
    for p in payloads:
        assert sp.append(p, 1)
    sp.close()
    bad = sp._path(failing).name
    left = [fails]
    real_open = open

    def opened(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        return EIOReads(f, left) if not isinstance(path, int) and Path(path).name == bad else f

    monkeypatch.setattr(spool_mod, "open", opened, raising=False)
    return make_agent(tmp_path), left


@pytest.fixture
def no_backoff(monkeypatch):
    async def no_wait(_s: float) -> None:
        pass

    monkeypatch.setattr(retry_mod, "_sleep", no_wait)


def unreadable_scraped(agent: agent_mod.Agent) -> float:
    [family] = [
        f for f in agent_mod.AgentCollector(agent).collect() if f.name == "ktel_agent_spool_unreadable_bytes"
    ]
    [sample] = family.samples
    return sample.value


async def test_a_segment_the_disk_keeps_refusing_to_read_is_set_aside_and_the_next_ones_sent(
    tmp_path, monkeypatch, no_backoff, caplog
):
    """Its read raised EIO out of the publisher, which failed the agent; restarted, it
    read the segment first and failed again, for good, nothing after it sent. It is read
    SPOOL_READ_TRIES times, then set aside: kept under its set-aside name, its bytes
    counted on the scrape and the heartbeat, one line naming it; the next segments go."""
    payloads = [f"batch {i}".encode() * 100 for i in range(4)]
    agent, left = restarted_with(tmp_path, monkeypatch, payloads, failing=1, fails=float("inf"))
    try:
        producer = Producer()
        agent.producer = producer  # type: ignore[assignment]
        spool_dir = tmp_path / "spool"
        bad = spool_dir / "0000000000000001.seg"
        held = bad.read_bytes()
        await published(agent, monkeypatch)
        assert producer.acknowledged == [payloads[0], *payloads[2:]]
        assert left == [float("inf")]  # (never read through)
        aside = spool_dir / "0000000000000001.seg.unreadable"
        assert not bad.exists() and aside.read_bytes() == held
        lost = len(held)
        assert agent.spool.unreadable_bytes == lost
        assert unreadable_scraped(agent) == lost
        assert agent.heartbeat(1.0, {}, [], {})[0]["counters"]["spool_unreadable_bytes"] == lost
        [line] = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
        assert str(bad) in line and str(aside) in line
        tries = [r for r in caplog.records if "read the spool failed" in r.getMessage()]
        assert len(tries) == agent_mod.SPOOL_READ_TRIES - 1
    finally:
        agent.spool.close()
        statelock.release(agent.state_lock)
    # Restarted again: the set-aside segment is neither read nor deleted.
    again = spool_mod.Spool(spool_dir)
    try:
        assert again.read(again.ack_cursor) == [] and aside.read_bytes() == held
    finally:
        again.close()


async def test_a_segment_the_disk_refuses_once_is_read_again_and_sent(tmp_path, monkeypatch, no_backoff):
    payloads = [f"batch {i}".encode() * 100 for i in range(3)]
    agent, left = restarted_with(tmp_path, monkeypatch, payloads, failing=1, fails=1)
    try:
        producer = Producer()
        agent.producer = producer  # type: ignore[assignment]
        await published(agent, monkeypatch)
        assert producer.acknowledged == payloads
        assert left == [0]
        assert agent.spool.unreadable_bytes == 0
        assert not list((tmp_path / "spool").glob("*.unreadable"))
    finally:
        agent.spool.close()
        statelock.release(agent.state_lock)
