"""Kernel code's telemetry, from the raw topic to a real OpenTelemetry Collector.

Raw batches hold what the ktel_api probe decodes from the ktel:* tracepoints
(kernel spans, logs and metrics, as tests/vm checks them from the real module)
and an OOM kill; a real processing worker (``ktel process all``) turns them into
span, log and metric records, and the real OTLP exporter delivers them. The
Collector's file exporter shows exactly what arrived.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from exporters import otlp
from ktel import config
from ktel.stack.otelcol import LocalCollector, attributes
from ktel.stack.proc import free_port
from ktel.wire import KTEL_LOG, KTEL_METRIC, KTEL_SPAN, OOM_KILL, RawBatch, encode_batch
from tests.integration.test_otlp_collector import point_value, wait_for
from tests.integration.test_processing_stages import Worker, produce

pytestmark = pytest.mark.kafka

N = 23  # operations of the kernel code below, as tests/vm fires the sample module


def kernel_batch(host: str, pid: int, t0: int) -> tuple[RawBatch, list[tuple[bytes, bytes]]]:
    """What the agent publishes for N operations of a module like kmod/ktel_sample.c."""
    events: list[list] = []
    ids = []
    for i in range(N):
        trace_id, root, child = uuid.uuid4().bytes, uuid.uuid4().bytes[:8], uuid.uuid4().bytes[:8]
        ids.append((trace_id, root, child))
        start = t0 + i * 10_000
        events += [
            [KTEL_SPAN.id, start + 5000, pid, pid, trace_id, child, root, "checksum", start + 1000,
             start + 5000, 1, {"algorithm": "jhash"}],
            [KTEL_SPAN.id, start + 9000, pid, pid, trace_id, root, b"", "operation", start, start + 9000,
             2 if i == 0 else 1, {}],
            [KTEL_METRIC.id, start + 9000, pid, "counter", "ops_total", {"result": "ok"}, 1],
            [KTEL_METRIC.id, start + 9000, pid, "histogram", "op_duration_ns", {}, 1500],
            [KTEL_LOG.id, start + 8000, pid, pid, 13, f"operation {i} took 9000 ns", {"op": str(i)},
             trace_id, root],
        ]  # fmt: skip
    events.append([OOM_KILL.id, t0 + 999_999, 4242, "hog", 1000, 2048, 1024, 0, 0, 8, 0, pid, "allocator"])
    return RawBatch(host, "boot", 0, t0, events), ids


async def test_kernel_spans_logs_and_metrics_reach_the_collector(private_kafka, tmp_path):
    run = uuid.uuid4().hex[:12]
    # Now: the OTLP exporter sends nothing older than otlp.max_age_seconds.
    host, pid, t0 = f"host-{run}", 777, time.time_ns() - 60 * 10**9
    batch, ids = kernel_batch(host, pid, t0)
    worker = Worker(tmp_path, private_kafka.bootstrap, "all").start()
    with LocalCollector(tmp_path / "otelcol", free_port(), free_port()) as collector:
        cfg = config.Config(
            kafka=config.KafkaConfig(bootstrap=private_kafka.bootstrap),
            otlp=config.OtlpConfig(protocol="grpc", endpoint=collector.grpc_endpoint, metrics_port=0),
        )
        stop = asyncio.Event()
        exporter = asyncio.create_task(otlp.run(cfg, stop, group_id=f"test-kernel-{run}"))
        try:
            await asyncio.to_thread(
                lambda: asyncio.run(produce(private_kafka.bootstrap, [(batch.key, encode_batch(batch))]))
            )

            def mine(items: list[dict]) -> list[dict]:
                return [i for i in items if i["resource"].get("host.id") == host]

            def counted() -> bool:
                return any(
                    m["name"] == "ops_total" and any(point_value(p) == N for p in m["sum"]["dataPoints"])
                    for m in mine(collector.metrics())
                )

            await wait_for(
                lambda: (
                    len(mine(collector.spans())) >= 2 * N
                    and len(mine(collector.logs())) >= N + 1
                    and counted()
                ),
                "kernel spans, logs and metrics at the Collector",
                timeout=120,
            )
        finally:
            stop.set()
            await asyncio.wait_for(exporter, 30)
            worker.stop()
        spans, logs, metrics = mine(collector.spans()), mine(collector.logs()), mine(collector.metrics())

    # Every span exactly once, with its parent link, status and the process it ran in.
    assert len(spans) == 2 * N
    by_id = {s["spanId"]: s for s in spans}
    for i, (trace_id, root, child) in enumerate(ids):
        r, c = by_id[root.hex()], by_id[child.hex()]
        assert (r["traceId"], r.get("parentSpanId", ""), r["name"]) == (trace_id.hex(), "", "operation")
        assert (c["traceId"], c["parentSpanId"], c["name"]) == (trace_id.hex(), root.hex(), "checksum")
        assert (
            int(r["startTimeUnixNano"]) == t0 + i * 10_000
            and int(r["endTimeUnixNano"]) == t0 + i * 10_000 + 9000
        )
        assert r.get("status", {}).get("code", 0) == (2 if i == 0 else 1)
        assert attributes(c.get("attributes", [])) == {"algorithm": "jhash"}
        # service.name: the exporter's service.name setting, default ktel.
        assert r["resource"] == c["resource"] == {"service.name": "ktel", "host.id": host, "process.pid": pid}

    kernel_logs = sorted((lg for lg in logs if lg["severityNumber"] == 13), key=lambda lg: lg["timeUnixNano"])
    assert [lg["body"]["stringValue"] for lg in kernel_logs] == [
        f"operation {i} took 9000 ns" for i in range(N)
    ]
    assert all(
        (lg["severityText"], lg["traceId"], lg["spanId"]) == ("WARN", t.hex(), r.hex())
        for lg, (t, r, _c) in zip(kernel_logs, ids, strict=True)
    )
    [oom] = [lg for lg in logs if lg["severityNumber"] == 17]
    assert oom["body"]["stringValue"] == "OOM killer killed process 4242 (hog)"
    assert attributes(oom["attributes"])["oom.trigger.pid"] == pid
    assert oom["resource"] == {"service.name": "ktel", "host.id": host}

    # A new counter: at 0 first, 1 ms before its count, then at its count (rate() and
    # increase() count from the second point on).
    ops = [p for m in metrics if m["name"] == "ops_total" for p in m["sum"]["dataPoints"]]
    ops.sort(key=lambda p: int(p["timeUnixNano"]))
    assert (point_value(ops[0]) or 0, point_value(ops[-1])) == (0, N)
    # A log2 histogram of nanoseconds: an exponential histogram, exact in nanoseconds.
    h = [m for m in metrics if m["name"] == "op_duration_nanoseconds"][-1]["exponentialHistogram"][
        "dataPoints"
    ][-1]
    assert int(h["count"]) == N and h["sum"] == pytest.approx(N * 1500)
    # 1500 ns: the log2 bucket [1024, 2048) ns, scale-0 bucket 10, (2^10, 2^11].
    assert (h["positive"]["offset"], [int(c) for c in h["positive"]["bucketCounts"]]) == (10, [N])
