"""Prometheus down for 60 s in the middle of a stream of snapshots: afterwards every
sample is there exactly once, and meanwhile the exporter (``ktel export remote-write``,
a real process) paused its consumer instead of buffering, so its memory stayed flat."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from exporters import remote_write
from ktel import config, topics
from ktel.stack import proc
from ktel.stack.proc import free_port
from ktel.stack.prometheus import LocalPrometheus
from ktel.topics import create_topics
from ktel.wire import METRICS_TOPIC, MetricSnapshot, encode_snapshot
from tests.integration.agent_harness import start_group_at_end

pytestmark = pytest.mark.kafka

OUTAGE_S = 60
HOSTS = 2
SERIES = 400  # per snapshot
RATE_HZ = 10  # snapshots per second per host
# Generous: the stream during the outage is ~30 MB of msgpack, several times that
# once decoded, so an exporter that kept reading would exceed this many times over.
RSS_GROWTH_BOUND_MB = 40
METRIC = "ktel_backend_down_files_total"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def test_prometheus_down_60s_everything_arrives_memory_bounded(kafka, tmp_path):
    run = uuid.uuid4().hex[:12]
    prom = LocalPrometheus(tmp_path / "prometheus", free_port())
    prom.start()
    cfg = config.Config(kafka=config.KafkaConfig(bootstrap=kafka.bootstrap))
    await create_topics(kafka.bootstrap, topics.specs(cfg))
    await start_group_at_end(kafka.bootstrap, cfg.kafka.topics.group(remote_write.GROUP), METRICS_TOPIC)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KTEL_")},
        "KTEL_KAFKA__BOOTSTRAP": kafka.bootstrap,
        "KTEL_REMOTE_WRITE__URL": prom.remote_write_url,
        "KTEL_REMOTE_WRITE__METRICS_PORT": "0",
    }
    log_path = tmp_path / "exporter.log"
    exporter = proc.spawn(
        [sys.executable, "-m", "ktel.cli", "--log-level", "warning", "export", "remote-write"],
        log_path,
        tmp_path,
        env,
    )

    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", linger_ms=5)
    await producer.start()
    produced = {"snapshots": 0, "bytes": 0}
    stop_producing = asyncio.Event()

    async def stream() -> None:
        last = dict.fromkeys(range(HOSTS), 0)
        # On a fixed schedule: a slow send is caught up, not added to every step.
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not stop_producing.is_set():
            for h in range(HOSTS):
                ts = max(time.time_ns() // 1_000_000, last[h] + 1)  # strictly increasing per series
                last[h] = ts
                rows = [
                    [
                        METRIC,
                        "counter",
                        {"host.id": f"{run}-{h}", "directory": f"/d/{i}", "ktel.run": run},
                        ts,
                    ]
                    for i in range(SERIES)
                ]
                value = encode_snapshot(MetricSnapshot(ts, rows))
                await producer.send_and_wait(METRICS_TOPIC, value, key=f"{run}-{h}".encode())
                produced["snapshots"] += 1
                produced["bytes"] += len(value)
            due += 1 / RATE_HZ
            await asyncio.sleep(max(0.0, due - loop.time()))

    def arrived() -> int:
        res = prom.query(f'sum(count_over_time({METRIC}{{ktel_run="{run}"}}[1h]))')
        return int(float(res[0]["value"][1])) if res else 0

    streamer = asyncio.create_task(stream())
    try:
        # Warm up: the exporter keeps up with the stream before the outage.
        async with asyncio.timeout(120):
            while await asyncio.to_thread(arrived) < 20 * HOSTS * SERIES:
                await asyncio.sleep(1)
        baseline = rss_mb(exporter.pid)
        before = dict(produced)

        prom.stop()
        peak = baseline
        deadline = time.monotonic() + OUTAGE_S
        while time.monotonic() < deadline:
            assert exporter.poll() is None, proc.tail(log_path)
            peak = max(peak, rss_mb(exporter.pid))
            await asyncio.sleep(0.5)
        during_mb = (produced["bytes"] - before["bytes"]) / 2**20
        await asyncio.to_thread(prom.start)

        await asyncio.sleep(5)
        stop_producing.set()
        await streamer
        expected = produced["snapshots"] * SERIES
        deadline = time.monotonic() + 180  # a guard against hanging, not a timing assertion
        while (got := await asyncio.to_thread(arrived)) < expected and time.monotonic() < deadline:
            assert exporter.poll() is None, proc.tail(log_path)
            await asyncio.sleep(1)
    finally:
        stop_producing.set()
        await producer.stop()
        proc.stop(exporter, 10)
        prom.stop()

    # Count conservation: every sample of every snapshot (Prometheus keeps one sample
    # per series and timestamp, so a sample sent twice after the outage counts once).
    print(f"outage: {during_mb:.0f} MB produced; exporter RSS {baseline:.0f} MB before, peak {peak:.0f} MB")
    assert got == expected, f"{got} of {expected} samples arrived; exporter log:\n{proc.tail(log_path)}"
    assert during_mb > 20, f"the stream during the outage was only {during_mb:.1f} MB"
    assert peak - baseline < RSS_GROWTH_BOUND_MB, (
        f"exporter RSS grew from {baseline:.0f} to {peak:.0f} MB while {during_mb:.0f} MB "
        "of snapshots arrived on Kafka"
    )
