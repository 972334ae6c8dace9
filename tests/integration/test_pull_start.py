"""Where the pull endpoint (`ktel export pull`, a real child process) starts reading
ktel.metrics of a real broker: ``aggregate.refresh_seconds`` plus a few windows back,
not the whole retained topic; and once /readyz says ready, nothing written after is
missed, in a partition that held records and in one that held none."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from exporters import pull
from ktel import config, topics
from ktel.kafka_client import client_kwargs
from ktel.stack.proc import free_port
from ktel.wire import MetricSnapshot, encode_snapshot
from tests.integration.test_health import Ktel, started  # noqa: F401 (a fixture)

pytestmark = pytest.mark.kafka


async def produce(
    kafka: config.KafkaConfig, topic: str, partition: int, age_s: float, directory: str
) -> None:
    """A snapshot of file_created_total{directory} = 1, ``age_s`` old by its own
    timestamp and the record's, into ``partition``."""
    ts_ms = int((time.time() - age_s) * 1000)
    snap = MetricSnapshot(ts_ms, [["file_created_total", "counter", {"directory": directory}, 1]])
    producer = AIOKafkaProducer(**client_kwargs(kafka), enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(topic, encode_snapshot(snap), partition=partition, timestamp_ms=ts_ms)
    finally:
        await producer.stop()


def served(port: int) -> set[str]:
    """The directories of file_created_total the endpoint serves (none while it reads its
    lookback: a 503)."""
    resp = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False)
    if resp.status_code == 503:
        assert resp.text.startswith("not served yet: reading the last"), resp.text
        return set()
    text = resp.text
    return {
        s.labels["directory"]
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "file_created_total"
    }


def test_the_pull_endpoint_starts_a_refresh_back_and_misses_nothing_after_ready(kafka, tmp_path, started):  # noqa: F811
    prefix = f"pullstart-{uuid.uuid4().hex[:8]}."  # topics of this test's own
    kcfg = config.KafkaConfig(bootstrap=kafka.bootstrap, prefix=prefix)
    cfg = config.Config(kafka=kcfg, agent=config.AgentConfig(host_id="t"))
    asyncio.run(topics.create_topics(kafka.bootstrap, topics.specs(cfg)))
    metrics = cfg.kafka.topics.metrics
    lookback = cfg.aggregate.refresh_seconds + pull.LOOKBACK_WINDOWS * cfg.aggregate.window_seconds
    # Partition 0: one snapshot before the lookback, one within it; partition 1 empty.
    asyncio.run(produce(kcfg, metrics, 0, lookback + 300, "too-old"))
    asyncio.run(produce(kcfg, metrics, 0, 10, "recent"))

    port = free_port()
    endpoint = Ktel(
        tmp_path,
        ["export", "pull"],
        KTEL_KAFKA__BOOTSTRAP=kafka.bootstrap,
        KTEL_KAFKA__PREFIX=prefix,
        KTEL_PULL__PORT=str(port),
        KTEL_PULL__METRICS_PORT="0",
    )
    started.append(endpoint)
    assert endpoint.until_ready(port).text == "ready\n"
    # Written the moment it is ready: into the partition that had records, and into
    # the empty one (which starts at its end).
    asyncio.run(produce(kcfg, metrics, 0, 0, "after-ready-0"))
    asyncio.run(produce(kcfg, metrics, 1, 0, "after-ready-1"))

    want = {"recent", "after-ready-0", "after-ready-1"}
    deadline = time.monotonic() + 60
    while (got := served(port)) != want and time.monotonic() < deadline:
        time.sleep(0.5)
    assert got == want  # and never "too-old"
