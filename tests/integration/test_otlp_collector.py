"""The OTLP exporter against a real OpenTelemetry Collector, over gRPC and over HTTP.

Wire records go onto the real Kafka topics; the real exporter (``exporters.otlp.run``)
reads and sends them; the Collector's file exporter shows exactly what arrived.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaProducer

from exporters import otlp
from ktel import config, topics
from ktel.stack.otelcol import LocalCollector, attributes
from ktel.stack.proc import free_port
from ktel.topics import create_topics
from ktel.wire import (
    LOGS_TOPIC,
    METRICS_TOPIC,
    SPANS_TOPIC,
    LogBatch,
    MetricSnapshot,
    SpanBatch,
    encode_logs,
    encode_snapshot,
    encode_spans,
)

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    with LocalCollector(tmp_path_factory.mktemp("otelcol"), free_port(), free_port()) as col:
        yield col


def hexid(b: bytes) -> str:
    return b.hex()


async def produce(bootstrap: str, records: list[tuple[str, bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for topic, key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def wait_for(predicate, what: str, timeout: float = 60) -> None:
    # A guard against hanging forever, not a timing assertion.
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.2)


def point_value(p: dict):
    return int(p["asInt"]) if "asInt" in p else p.get("asDouble")


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
async def test_spans_metrics_and_logs_arrive_exactly(kafka, collector, protocol):
    run = uuid.uuid4().hex[:12]
    host = f"host-{run}"
    endpoint = collector.grpc_endpoint if protocol == "grpc" else collector.http_endpoint
    cfg = config.Config(
        kafka=config.KafkaConfig(bootstrap=kafka.bootstrap),
        otlp=config.OtlpConfig(protocol=protocol, endpoint=endpoint, metrics_port=0),
    )
    await create_topics(kafka.bootstrap, topics.specs(cfg))

    resource = {"host.id": host, "host.name": "node-1", "os.type": "linux"}
    trace_id = uuid.uuid4().bytes
    root, child, grandchild = (uuid.uuid4().bytes[:8] for _ in range(3))
    t0 = 1_700_000_000_000_000_000
    spans = [
        [trace_id, root, b"", "syscall openat", t0, t0 + 9000, 1, "", {"process.pid": 42, "ktel.run": run}],
        [
            trace_id,
            child,
            root,
            "vfs_open",
            t0 + 1000,
            t0 + 8000,
            0,
            "",
            {"path": "/tmp/x", "flags": [64, 1]},
        ],
        [
            trace_id,
            grandchild,
            child,
            "may_create",
            t0 + 2000,
            t0 + 3000,
            2,
            "EACCES",
            {"ok": False, "ratio": 0.5},
        ],
    ]
    logs = [
        [
            t0 + 5000,
            17,
            "ERROR",
            "oom-kill: process 42 (stress) killed",
            {"process.pid": 42},
            trace_id,
            child,
        ],
        [t0 + 6000, 9, "INFO", "tcp retransmit", {"net.peer.port": 443}, b"", b""],
    ]
    hist = {"count": 6, "sum": 0.0215, "bounds": [0.001, 0.01], "counts": [1, 3, 2]}
    ts_ms = 1_700_000_000_123
    series = [
        ["file_created_total", "counter", {"host.id": host, "directory": "/tmp/somewhere"}, 23],
        ["ktel_spool_bytes", "gauge", {"host.id": host}, 1.5],
        ["runq_latency_seconds", "histogram", {"host.id": host, "cpu": "1"}, hist],
    ]
    key = host.encode()
    await produce(
        kafka.bootstrap,
        [
            (SPANS_TOPIC, key, encode_spans(SpanBatch(resource, spans))),
            (LOGS_TOPIC, key, encode_logs(LogBatch(resource, logs))),
            (METRICS_TOPIC, key, encode_snapshot(MetricSnapshot(ts_ms, series))),
        ],
    )

    def mine(items: list[dict]) -> list[dict]:
        return [i for i in items if i["resource"].get("host.id") == host]

    stop = asyncio.Event()
    exporter = asyncio.create_task(otlp.run(cfg, stop, group_id=f"test-otlp-{run}"))
    try:
        await wait_for(
            lambda: (
                len(mine(collector.spans())) >= 3
                and len(mine(collector.logs())) >= 2
                and len(mine(collector.metrics())) >= 3
            ),
            "spans, logs and metrics at the Collector",
        )
    finally:
        stop.set()
        await asyncio.wait_for(exporter, 30)

    got_spans = sorted(mine(collector.spans()), key=lambda s: s["startTimeUnixNano"])
    assert [
        (
            s["traceId"],
            s["spanId"],
            s.get("parentSpanId", ""),
            s["name"],
            int(s["startTimeUnixNano"]),
            int(s["endTimeUnixNano"]),
            s.get("status", {}).get("code", 0),
            s.get("status", {}).get("message", ""),
            attributes(s.get("attributes", [])),
            s["resource"],
            s["scope"]["name"],
        )
        for s in got_spans
    ] == [
        (hexid(tid), hexid(sid), hexid(parent), name, start, end, status, msg, attrs, resource, "ktel")
        for tid, sid, parent, name, start, end, status, msg, attrs in spans
    ]

    got_logs = sorted(mine(collector.logs()), key=lambda r: r["timeUnixNano"])
    assert [
        (
            int(r["timeUnixNano"]),
            r["severityNumber"],
            r["severityText"],
            r["body"]["stringValue"],
            attributes(r.get("attributes", [])),
            r.get("traceId", ""),
            r.get("spanId", ""),
            r["resource"],
        )
        for r in got_logs
    ] == [
        (t0 + 5000, 17, "ERROR", "oom-kill: process 42 (stress) killed", {"process.pid": 42}, hexid(trace_id),
         hexid(child), resource),
        (t0 + 6000, 9, "INFO", "tcp retransmit", {"net.peer.port": 443}, "", "", resource),
    ]  # fmt: skip

    got = {m["name"]: m for m in mine(collector.metrics())}
    assert set(got) == {"file_created_total", "ktel_spool_bytes", "runq_latency_seconds"}
    for m in got.values():
        # host.id moved from the labels to the resource; the resource holds nothing else.
        assert m["resource"] == {"host.id": host}
    t_ns = str(ts_ms * 1_000_000)
    counter = got["file_created_total"]["sum"]
    assert counter["isMonotonic"] is True and counter["aggregationTemporality"] == 2  # cumulative
    [p] = counter["dataPoints"]
    assert (attributes(p["attributes"]), p["timeUnixNano"], point_value(p)) == (
        {"directory": "/tmp/somewhere"}, t_ns, 23
    )  # fmt: skip
    [p] = got["ktel_spool_bytes"]["gauge"]["dataPoints"]
    assert (p.get("attributes", []), p["timeUnixNano"], point_value(p)) == ([], t_ns, 1.5)
    h = got["runq_latency_seconds"]["histogram"]
    assert h["aggregationTemporality"] == 2
    [p] = h["dataPoints"]
    assert attributes(p["attributes"]) == {"cpu": "1"}
    assert (p["timeUnixNano"], int(p["count"]), p["sum"]) == (t_ns, 6, 0.0215)
    assert ([int(c) for c in p["bucketCounts"]], p["explicitBounds"]) == ([1, 3, 2], [0.001, 0.01])
