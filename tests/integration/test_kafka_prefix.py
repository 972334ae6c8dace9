"""Two pipelines on one real broker, each under its own kafka.prefix: each worker
reads only its own ktel.raw and writes only its own ktel.metrics."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from aiokafka import AIOKafkaProducer

from ktel import config, topics
from ktel.wire import FILE_CREATED, RawBatch, decode_snapshot, encode_batch
from tests.integration.agent_harness import read_topic
from tests.integration.test_processing_stages import Worker

pytestmark = pytest.mark.kafka


def pipeline(bootstrap: str, prefix: str) -> config.Config:
    return config.Config(
        kafka=config.KafkaConfig(bootstrap=bootstrap, prefix=prefix), agent=config.AgentConfig(host_id="t")
    )


async def send(bootstrap: str, topic: str, batch: RawBatch) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(topic, encode_batch(batch), key=batch.key)
    finally:
        await producer.stop()


def hosts_in(bootstrap: str, topic: str) -> set[str]:
    return {
        host
        for r in asyncio.run(read_topic(bootstrap, topic, idle_s=1))
        for host, _snap in [(r.key.decode(), decode_snapshot(r.value))]
    }


def test_two_prefixed_pipelines_on_one_broker_do_not_see_each_other(kafka, tmp_path):
    run = uuid.uuid4().hex[:8]
    blue, green = pipeline(kafka.bootstrap, f"blue{run}."), pipeline(kafka.bootstrap, f"green{run}-")
    for cfg in (blue, green):
        assert asyncio.run(topics.ensure(cfg, lambda _: None)) == 0
    workers = [
        Worker(tmp_path, kafka.bootstrap, name, KTEL_KAFKA__PREFIX=cfg.kafka.prefix).start()
        for name, cfg in (("blue", blue), ("green", green))
    ]
    try:
        for cfg, host in ((blue, "blue-host"), (green, "green-host")):
            event = [FILE_CREATED.id, 1, 2, 2, 0, "w", "/d/f", 0o101, False]
            asyncio.run(send(kafka.bootstrap, cfg.kafka.topics.raw, RawBatch(host, "boot", 0, 1, [event])))
        # A guard against waiting forever, not a measure: the workers take seconds.
        deadline = time.monotonic() + 300
        while True:
            for w in workers:
                assert w.proc is not None and w.proc.poll() is None, w.log.read_text()[-4000:]
            seen = {name: hosts_in(kafka.bootstrap, cfg.kafka.topics.metrics) for name, cfg in
                    (("blue", blue), ("green", green))}  # fmt: skip
            if seen["blue"] and seen["green"]:
                break
            assert time.monotonic() < deadline, [w.log.read_text()[-2000:] for w in workers]
            time.sleep(1)
        # A few more windows: a worker that also read the other pipeline would report its host by now.
        time.sleep(3)
        assert hosts_in(kafka.bootstrap, blue.kafka.topics.metrics) == {"blue-host"}
        assert hosts_in(kafka.bootstrap, green.kafka.topics.metrics) == {"green-host"}
        names = asyncio.run(topics.partition_counts(kafka.bootstrap))
        assert f"blue{run}.ktel-all-host-state-changelog" in names
        assert f"green{run}-ktel-all-host-state-changelog" in names
    finally:
        for w in workers:
            w.stop()
