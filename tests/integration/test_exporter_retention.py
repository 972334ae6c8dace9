"""Records Kafka deletes before an exporter delivered them (a backend away for longer than
the topic keeps records) are counted and logged, and the exporter reads on from what is
left; a partition its group never committed is read from its first record
(exporters/consume.py). A real broker, where ``DeleteRecords`` moves a partition's first
offset as retention does, and the remote-write exporter into a real Prometheus."""

from __future__ import annotations

import time
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from prometheus_client import REGISTRY

from exporters import remote_write
from ktel import config, topics
from ktel.stack.proc import free_port
from ktel.stack.prometheus import LocalPrometheus
from ktel.topics import create_topics
from ktel.wire import MetricSnapshot, encode_snapshot
from tests.integration.test_remote_write_security import Exporter, wait_for

pytestmark = pytest.mark.kafka

SNAPSHOTS = 10
DELETED = 6  # of the first host's snapshots, after the group's commit


def expired(topic: str) -> float:
    labels = {"exporter": "remote-write", "topic": topic}
    return REGISTRY.get_sample_value("ktel_exporter_records_expired_total", labels) or 0.0


async def publish(bootstrap: str, topic: str, run: str, host: str) -> list[tuple[int, int, int]]:
    """SNAPSHOTS gauge snapshots of ``host`` a second apart: (timestamp, partition, offset)
    of each."""
    t0 = time.time_ns() // 1_000_000 - 60_000  # recent: Prometheus refuses samples far in the past
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        out = []
        for i in range(SNAPSHOTS):
            ts = t0 + 1000 * i
            row = ["ktel_retained", "gauge", {"ktel.run": run, "host.id": host}, float(i)]
            meta = await producer.send_and_wait(
                topic, encode_snapshot(MetricSnapshot(ts, [row])), key=host.encode()
            )
            out.append((ts, meta.partition, meta.offset))
        return out
    finally:
        await producer.stop()


async def test_records_retention_deleted_before_delivery_are_counted_and_the_rest_delivered(kafka, tmp_path):
    run = uuid.uuid4().hex[:12]
    prom = LocalPrometheus(tmp_path / "prometheus", free_port())
    cfg = config.Config(
        kafka={"bootstrap": kafka.bootstrap, "prefix": f"ret{run}."},
        remote_write={"url": prom.remote_write_url, "metrics_port": 0},
    )
    topic, group = cfg.kafka.topics.metrics, cfg.kafka.topics.group(remote_write.GROUP)
    await create_topics(kafka.bootstrap, topics.specs(cfg))
    # Two hosts on two partitions: the first's snapshots partly deleted past the group's
    # commit, the second's on a partition the group never committed.
    sent: dict[str, list[tuple[int, int, int]]] = {}
    n = 0
    while len({s[0][1] for s in sent.values()}) < 2:
        host = f"{run}-{n}"
        got = await publish(kafka.bootstrap, topic, run, host)
        if all(s[0][1] != got[0][1] for s in sent.values()):
            sent[host] = got
        n += 1
    first, second = sent
    tp = TopicPartition(topic, sent[first][0][1])
    start = sent[first][0][2]
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.commit({tp: start})
    finally:
        await consumer.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.delete_records({tp: RecordsToDelete(before_offset=start + DELETED)})
    finally:
        await admin.close()

    before = expired(topic)
    with prom:

        def stored(host: str) -> list[int]:
            result = prom.query(f'ktel_retained{{ktel_run="{run}",host_id="{host}"}}[10m]')
            return sorted(round(ts * 1000) for r in result for ts, _ in r["values"])

        async with Exporter(cfg, group):
            await wait_for(
                lambda: len(stored(first)) >= SNAPSHOTS - DELETED and len(stored(second)) >= SNAPSHOTS
            )
        assert stored(first) == [ts for ts, _, _ in sent[first][DELETED:]]
        assert stored(second) == [ts for ts, _, _ in sent[second]]
    # Exactly the records deleted between the commit and the partition's new first offset
    # (the records of hosts published before the first on its partition were never the
    # group's to deliver: they sit before its commit).
    assert expired(topic) - before == DELETED
