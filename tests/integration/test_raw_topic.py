"""The agent's publish path against the real local broker."""

import asyncio
import uuid

import pytest

from edge_agent.agent import Agent
from ktel import config, topics
from ktel.probes.decode import PackedEvents, pack_event
from ktel.topics import create_topics
from ktel.wire import FILE_CREATED, RAW_TOPIC, decode_batch
from tests.integration.agent_harness import read_topic

pytestmark = pytest.mark.kafka


def make_cfg(kafka, tmp_path, host_id):
    cfg = config.Config(
        kafka=config.KafkaConfig(bootstrap=kafka.bootstrap),
        agent=config.AgentConfig(host_id=host_id, state_dir=tmp_path / host_id),
    )
    return cfg


async def test_batches_are_keyed_by_host_numbered_and_ordered(kafka, tmp_path):
    # Unique host ids: the session's broker holds other tests' batches too.
    run = uuid.uuid4().hex[:8]
    host_a, host_b = f"host-a-{run}".encode(), f"host-b-{run}".encode()
    cfg_a = make_cfg(kafka, tmp_path, host_a.decode())
    cfg_b = make_cfg(kafka, tmp_path, host_b.decode())
    await create_topics(kafka.bootstrap, topics.specs(cfg_a))
    ev = [FILE_CREATED.id, 1, 2, 2, 0, "touch", "/tmp/x", 0o101, False]
    for cfg, n in ((cfg_a, 5), (cfg_b, 3)):
        agent = Agent(cfg)
        agent.producer = agent._new_producer()  # the one the agent makes in run()
        await agent.producer.start()
        publisher = asyncio.create_task(agent.publish())
        for i in range(n):
            agent.spool_batch(PackedEvents([pack_event(ev)] * (i + 1)), [1.0] * (i + 1))
        async with asyncio.timeout(30):
            while not agent.spool.empty():  # the spool's cursor advances on acknowledgement
                await asyncio.sleep(0.05)
        publisher.cancel()
        await agent.producer.stop()

    records = [r for r in await read_topic(kafka.bootstrap, RAW_TOPIC) if r.key in (host_a, host_b)]
    assert len(records) == 8
    by_host: dict[bytes, list] = {}
    for rec in records:
        batch = decode_batch(rec.value)
        assert rec.key == batch.host_id.encode()
        by_host.setdefault(rec.key, []).append((rec.partition, batch))
    assert set(by_host) == {host_a, host_b}
    for key, n in ((host_a, 5), (host_b, 3)):
        parts = {p for p, _ in by_host[key]}
        assert len(parts) == 1  # one host's batches stay in one partition, in order
        assert [b.seq for _, b in by_host[key]] == list(range(n))
        assert [len(b.events) for _, b in by_host[key]] == list(range(1, n + 1))


def test_sequence_numbers_continue_across_restarts(tmp_path):
    from edge_agent.seqstore import SeqStore

    s = SeqStore(tmp_path, block=10)
    first = [s.next() for _ in range(15)]
    assert first == list(range(15))
    # A new store on the same dir (a restart, even after SIGKILL) never reuses a number.
    s2 = SeqStore(tmp_path, block=10)
    assert s2.next() == 20


async def test_a_producer_broken_for_good_is_replaced_and_the_batch_still_arrives(kafka, tmp_path):
    """aiokafka's idempotent producer can fail every send with OutOfOrderSequenceNumber
    after a broker restart (aio-libs/aiokafka#1017); the agent starts a new one."""
    from aiokafka.errors import OutOfOrderSequenceNumber

    from edge_agent import agent as agent_mod
    from ktel.retry import retry

    class BrokenForGood:  # what such a producer does: every send fails, and keeps failing
        stopped = False

        async def send_and_wait(self, *_a, **_k):
            raise OutOfOrderSequenceNumber()

        async def stop(self):
            self.stopped = True

    host = f"host-renew-{uuid.uuid4().hex[:8]}"
    cfg = make_cfg(kafka, tmp_path, host)
    await create_topics(kafka.bootstrap, topics.specs(cfg))
    agent = Agent(cfg)
    broken = agent.producer = BrokenForGood()  # type: ignore[assignment]
    renewals = agent_mod.PRODUCER_RENEWALS._value.get()
    async with asyncio.timeout(60):  # without a renewal, the retries would go on for ever
        await retry(lambda: agent._send_and_wait(RAW_TOPIC, b"payload"), what="test send")
    try:
        assert broken.stopped and agent.producer is not broken
        assert agent_mod.PRODUCER_RENEWALS._value.get() == renewals + 1
        records = [r for r in await read_topic(kafka.bootstrap, RAW_TOPIC) if r.key == host.encode()]
        assert [r.value for r in records] == [b"payload"]
    finally:
        await agent.producer.stop()


async def test_a_renewal_a_sender_stops_waiting_for_still_puts_a_started_producer_in_place(
    kafka, tmp_path, monkeypatch
):
    """The heartbeat waits on its send for one interval only. Its timeout used to
    cancel the renewal after the broken producer's stop and before the new one's
    start, which left the stopped producer in place: every later send failed with
    ProducerClosed, and publishing never resumed."""
    from aiokafka.errors import OutOfOrderSequenceNumber, ProducerClosed

    from edge_agent import agent as agent_mod
    from ktel.retry import retry

    class BrokenForGood:
        stopped = False

        async def send_and_wait(self, *_a, **_k):
            raise ProducerClosed() if self.stopped else OutOfOrderSequenceNumber()

        async def stop(self):
            self.stopped = True

    real_start = agent_mod.start

    async def slow_start(*args):  # a broker slow to take the new producer
        await asyncio.sleep(1.0)
        await real_start(*args)

    monkeypatch.setattr(agent_mod, "start", slow_start)
    host = f"host-renew-cut-{uuid.uuid4().hex[:8]}"
    cfg = make_cfg(kafka, tmp_path, host)
    await create_topics(kafka.bootstrap, topics.specs(cfg))
    agent = Agent(cfg)
    broken = agent.producer = BrokenForGood()  # type: ignore[assignment]
    with pytest.raises(TimeoutError):  # the heartbeat's send, given up during the renewal
        await asyncio.wait_for(agent._send_and_wait(RAW_TOPIC, b"heartbeat"), 0.3)
    async with asyncio.timeout(60):  # a stopped producer left in place fails for ever
        await retry(lambda: agent._send_and_wait(RAW_TOPIC, b"payload"), what="test send")
    try:
        assert broken.stopped and agent.producer is not broken
        records = [r for r in await read_topic(kafka.bootstrap, RAW_TOPIC) if r.key == host.encode()]
        assert [r.value for r in records] == [b"payload"]
    finally:
        await agent.producer.stop()
