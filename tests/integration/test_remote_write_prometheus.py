"""Remote-write against the real Prometheus: what ktel writes, its query API returns
with the exact values, timestamps and labels."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from aiokafka import AIOKafkaProducer

from exporters import remote_write
from ktel import config, topics
from ktel.topics import create_topics
from ktel.wire import METRICS_TOPIC, MetricSnapshot, encode_snapshot
from tests.integration.agent_harness import start_group_at_end

pytestmark = pytest.mark.kafka


async def test_samples_arrive_with_exact_values_and_labels(kafka, prometheus):
    run = uuid.uuid4().hex[:12]
    host = f"host-{run}"
    cfg = config.Config(
        kafka=config.KafkaConfig(bootstrap=kafka.bootstrap),
        remote_write=config.RemoteWriteConfig(url=prometheus.remote_write_url, metrics_port=0),
    )
    await create_topics(kafka.bootstrap, topics.specs(cfg))
    group = f"test-rw-{run}"
    await start_group_at_end(kafka.bootstrap, group, METRICS_TOPIC)

    # Recent timestamps: Prometheus refuses samples far outside its head block.
    t0 = (time.time_ns() // 1_000_000) - 60_000
    labels = {"host.id": host, "directory": "/tmp/somewhere", "ktel.run": run, "empty": ""}
    snaps = [
        MetricSnapshot(
            t0 + 1000 * i,
            [
                ["file_created_total", "counter", labels, 23 + i],
                ["ktel_ratio", "gauge", {"host.id": host, "ktel.run": run}, 0.25 * i - 1],
                [
                    "runq_latency_seconds",
                    "histogram",
                    {"host.id": host, "ktel.run": run},
                    {"count": 6 + i, "sum": 0.5 + i, "bounds": [0.001, 0.01], "counts": [1, 3 + i, 2]},
                ],
            ],
        )
        for i in range(3)
    ]
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()
    try:
        for snap in snaps:
            await producer.send_and_wait(METRICS_TOPIC, encode_snapshot(snap), key=host.encode())
    finally:
        await producer.stop()

    query = f'{{ktel_run="{run}"}}[10m]'
    stop = asyncio.Event()
    exporter = asyncio.create_task(remote_write.run(cfg, stop, group_id=group))
    try:
        async with asyncio.timeout(60):  # a guard against hanging, not a timing assertion
            while sum(len(r["values"]) for r in await asyncio.to_thread(prometheus.query, query)) < 7 * 3:
                await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.wait_for(exporter, 30)

    got = {
        tuple(sorted(r["metric"].items())): [(round(ts * 1000), float(v)) for ts, v in r["values"]]
        for r in prometheus.query(query)
    }
    ts = [t0 + 1000 * i for i in range(3)]
    common = {"host_id": host, "ktel_run": run}

    def key(name: str, **extra: str) -> tuple[tuple[str, str], ...]:
        return tuple(sorted({"__name__": name, **common, **extra}.items()))

    assert got == {
        # "host.id" and "ktel.run" become host_id and ktel_run; the empty label is dropped.
        key("file_created_total", directory="/tmp/somewhere"): list(zip(ts, [23.0, 24.0, 25.0], strict=True)),
        key("ktel_ratio"): list(zip(ts, [-1.0, -0.75, -0.5], strict=True)),
        key("runq_latency_seconds_bucket", le="0.001"): list(zip(ts, [1.0, 1.0, 1.0], strict=True)),
        key("runq_latency_seconds_bucket", le="0.01"): list(zip(ts, [4.0, 5.0, 6.0], strict=True)),
        key("runq_latency_seconds_bucket", le="+Inf"): list(zip(ts, [6.0, 7.0, 8.0], strict=True)),
        key("runq_latency_seconds_sum"): list(zip(ts, [0.5, 1.5, 2.5], strict=True)),
        key("runq_latency_seconds_count"): list(zip(ts, [6.0, 7.0, 8.0], strict=True)),
    }
