"""The OTLP exporter against a real OpenTelemetry Collector, over gRPC and over HTTP:
what arrives, and what the exporter does with records it must not send and with
requests the Collector refuses.

Wire records go onto the real Kafka topics; the real exporter (``exporters.otlp.run``)
reads and sends them; the Collector's file exporter shows exactly what arrived.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import msgpack
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY

from exporters import otlp
from ktel import config, topics
from ktel.stack.otelcol import LocalCollector, attributes
from ktel.stack.proc import free_port
from ktel.topics import create_topics
from ktel.wire import (
    HIST_SLOTS,
    LOGS_TOPIC,
    METRICS_TOPIC,
    SPANS_TOPIC,
    LogBatch,
    MetricSnapshot,
    SpanBatch,
    WireError,
    decode_logs,
    decode_snapshot,
    decode_spans,
    encode_logs,
    encode_snapshot,
    encode_spans,
    log2_bounds,
)
from tests.integration.agent_harness import dead_letters_of, start_group_at_end

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    with LocalCollector(tmp_path_factory.mktemp("otelcol"), free_port(), free_port()) as col:
        yield col


async def exporter_group(bootstrap: str, name: str) -> str:
    """``name``, a consumer group starting at the end of the exporter's topics: the exporter
    then reads only what the test produces next, not the records the session's other tests
    left there (a bad one among them would be dead-lettered again, into this test's counts)."""
    await start_group_at_end(bootstrap, name, SPANS_TOPIC, LOGS_TOPIC, METRICS_TOPIC)
    return name


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
async def test_spans_metrics_and_logs_arrive_exactly(kafka, collector, protocol, monkeypatch):
    run = uuid.uuid4().hex[:12]
    host = f"host-{run}"
    endpoint = collector.grpc_endpoint if protocol == "grpc" else collector.http_endpoint
    cfg = config.Config(
        kafka=config.KafkaConfig(bootstrap=kafka.bootstrap),
        otlp=config.OtlpConfig(protocol=protocol, endpoint=endpoint, metrics_port=0),
        service=config.ServiceConfig(name=f"ktel-{run}"),
    )
    # Every resource carries service.name (the setting) and OTEL_RESOURCE_ATTRIBUTES.
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", f"deployment.environment.name=test,ktel.run={run}")
    service = {"service.name": f"ktel-{run}", "deployment.environment.name": "test", "ktel.run": run}
    await create_topics(kafka.bootstrap, topics.specs(cfg))
    group = await exporter_group(kafka.bootstrap, f"test-otlp-{run}")

    resource = {"host.id": host, "host.name": "node-1", "os.type": "linux"}
    trace_id = uuid.uuid4().bytes
    root, child, grandchild = (uuid.uuid4().bytes[:8] for _ in range(3))
    t0 = time.time_ns() - 60 * 10**9  # recent: the exporter refuses what is a day old
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
    ts_ms = t0 // 1_000_000 + 123
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
    exporter = asyncio.create_task(otlp.run(cfg, stop, group_id=group))
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
        (
            hexid(tid),
            hexid(sid),
            hexid(parent),
            name,
            start,
            end,
            status,
            msg,
            attrs,
            {**service, **resource},
            "ktel",
        )
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
         hexid(child), {**service, **resource}),
        (t0 + 6000, 9, "INFO", "tcp retransmit", {"net.peer.port": 443}, "", "", {**service, **resource}),
    ]  # fmt: skip

    got = {m["name"]: m for m in mine(collector.metrics())}
    assert set(got) == {"file_created_total", "ktel_spool_bytes", "runq_latency_seconds"}
    for m in got.values():
        # host.id moved from the labels to the resource; besides it, the service's attributes.
        assert m["resource"] == {**service, "host.id": host}
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


async def test_a_stale_snapshot_reaches_the_collector_as_points_of_no_recorded_value(kafka, collector):
    """A forgotten host's last snapshot ends its series: its points arrive flagged as
    holding no recorded value (OTLP's stale marker), its live points before it not."""
    run = uuid.uuid4().hex[:12]
    host = f"host-{run}"
    cfg = await otlp_config(kafka.bootstrap, "grpc", collector.grpc_endpoint)
    group = await exporter_group(kafka.bootstrap, f"test-otlp-stale-{run}")
    ts_ms = time.time_ns() // 1_000_000 - 60_000
    series = [["ktel_g", "gauge", {"host.id": host}, 2], ["ktel_c", "counter", {"host.id": host}, 7]]
    key = host.encode()
    await produce(
        kafka.bootstrap,
        [
            (METRICS_TOPIC, key, encode_snapshot(MetricSnapshot(ts_ms, series))),
            (METRICS_TOPIC, key, encode_snapshot(MetricSnapshot(ts_ms + 1000, series, stale=True))),
        ],
    )

    def points() -> dict[tuple[str, int], int]:
        return {
            (m["name"], int(p["timeUnixNano"]) // 1_000_000 - ts_ms): p.get("flags", 0)
            for m in collector.metrics()
            if m["resource"].get("host.id") == host
            for p in m.get("gauge", m.get("sum", {})).get("dataPoints", [])
        }

    stop = asyncio.Event()
    exporter = asyncio.create_task(otlp.run(cfg, stop, group_id=group))
    try:
        await wait_for(lambda: len(points()) >= 4, "the live and the stale points at the Collector")
    finally:
        stop.set()
        await asyncio.wait_for(exporter, 30)
    assert points() == {("ktel_g", 0): 0, ("ktel_c", 0): 0, ("ktel_g", 1000): 1, ("ktel_c", 1000): 1}


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def span(run: str, name: str, start: int, attrs: dict | None = None) -> list:
    return [
        uuid.uuid4().bytes,
        uuid.uuid4().bytes[:8],
        b"",
        name,
        start,
        start + 1000,
        0,
        "",
        {"ktel.run": run, **(attrs or {})},
    ]


async def otlp_config(bootstrap: str, protocol: str, endpoint: str) -> config.Config:
    """A config exporting over OTLP to ``endpoint``, ktel's topics created."""
    cfg = config.Config(
        kafka=config.KafkaConfig(bootstrap=bootstrap),
        otlp=config.OtlpConfig(protocol=protocol, endpoint=endpoint, metrics_port=0),
    )
    await create_topics(bootstrap, topics.specs(cfg))
    return cfg


async def test_bad_records_are_dead_lettered_and_the_rest_delivered(kafka, collector):
    """The operator's cases, published with a plain Kafka client between good records:
    a span with start_ns -1 (once killed the exporter), a histogram with count -1 (once
    retried forever), a list as a label value, a span and a log record an hour ahead of
    the clock inside batches of good ones. The exporter keeps going; exactly the good
    items arrive; each bad one is in ktel.dlq with its reason."""
    run = uuid.uuid4().hex[:12]
    host = f"host-{run}"
    cfg = await otlp_config(kafka.bootstrap, "grpc", collector.grpc_endpoint)
    group = await exporter_group(kafka.bootstrap, f"test-otlp-bad-{run}")
    resource = {"host.id": host}
    now = time.time_ns()
    ahead = now + 3600 * 10**9
    good_spans = [span(run, f"good-{i}", now + i) for i in range(5)]
    late_span = span(run, "late", ahead)
    log_row = [now, 9, "INFO", f"good log {run}", {}, b"", b""]
    late_log = [ahead, 9, "INFO", f"late log {run}", {}, b"", b""]
    hist = {"count": 2, "sum": 1.0, "bounds": [1.0], "counts": [1, 1]}
    ts_ms = now // 1_000_000

    def raw(obj: dict) -> bytes:
        return msgpack.packb({"v": 1, **obj})  # what the wire encoders would not write

    minus_one = span(run, "minus one", 0)
    minus_one[4] = -1
    bad_records = {
        "start_ns -1": (SPANS_TOPIC, raw({"resource": resource, "spans": [minus_one]})),
        "count -1": (
            METRICS_TOPIC,
            raw({"ts": ts_ms, "series": [["ktel_h", "histogram", {"host.id": host}, {**hist, "count": -1}]]}),
        ),
        "list label": (
            METRICS_TOPIC,
            raw({"ts": ts_ms, "series": [["ktel_g", "gauge", {"host.id": host, "ktel.run": [run]}, 1]]}),
        ),
    }
    key = host.encode()
    await produce(
        kafka.bootstrap,
        [
            (SPANS_TOPIC, key, encode_spans(SpanBatch(resource, good_spans[:2]))),
            (bad_records["start_ns -1"][0], key, bad_records["start_ns -1"][1]),
            (
                SPANS_TOPIC,
                key,
                encode_spans(SpanBatch(resource, [good_spans[2], late_span, *good_spans[3:]])),
            ),
            (LOGS_TOPIC, key, encode_logs(LogBatch(resource, [late_log, log_row]))),
            (
                METRICS_TOPIC,
                key,
                encode_snapshot(MetricSnapshot(ts_ms, [["ktel_h", "histogram", {"host.id": host}, hist]])),
            ),
            (bad_records["count -1"][0], key, bad_records["count -1"][1]),
            (bad_records["list label"][0], key, bad_records["list label"][1]),
            (
                METRICS_TOPIC,
                key,
                encode_snapshot(MetricSnapshot(ts_ms + 1, [["ktel_g", "gauge", {"host.id": host}, 2]])),
            ),
        ],
    )

    def mine(items: list[dict]) -> list[dict]:
        return [i for i in items if i["resource"].get("host.id") == host]

    letters_before = counter("ktel_exporter_dead_letters_total", exporter="otlp")
    stop = asyncio.Event()
    exporter = asyncio.create_task(otlp.run(cfg, stop, group_id=group))
    try:
        letters = await dead_letters_of(kafka.bootstrap, run, 5)
        await wait_for(
            lambda: (
                len(mine(collector.spans())) >= 5
                and mine(collector.logs())
                and len(mine(collector.metrics())) >= 2
            ),
            "the good spans, log and points at the Collector",
        )
        assert not exporter.done()  # still up after all of them
    finally:
        stop.set()
        await asyncio.wait_for(exporter, 30)

    assert sorted(s["name"] for s in mine(collector.spans())) == [f"good-{i}" for i in range(5)]
    assert [r["body"]["stringValue"] for r in mine(collector.logs())] == [f"good log {run}"]
    assert sorted(m["name"] for m in mine(collector.metrics())) == ["ktel_g", "ktel_h"]

    assert {dl.stage for dl in letters} == {"otlp"}
    for topic, value in bad_records.values():
        [dl] = [dl for dl in letters if dl.payload == value]  # the record as it was read
        decode = decode_spans if topic == SPANS_TOPIC else decode_snapshot
        with pytest.raises(WireError) as err:
            decode(value)
        assert (dl.topic, dl.reason) == (topic, str(err.value))
    bad_payloads = {value for _, value in bad_records.values()}
    [late] = [dl for dl in letters if dl.topic == SPANS_TOPIC and dl.payload not in bad_payloads]
    assert "ahead of the exporter's clock (more than otlp.max_future_seconds = 600)" in late.reason
    assert decode_spans(late.payload) == SpanBatch(resource, [late_span])  # just that span
    [late_l] = [dl for dl in letters if dl.topic == LOGS_TOPIC]
    assert "ahead of the exporter's clock" in late_l.reason
    assert decode_logs(late_l.payload) == LogBatch(resource, [late_log])
    assert counter("ktel_exporter_dead_letters_total", exporter="otlp") == letters_before + 5


class LimitedCollector(LocalCollector):
    """The real Collector with its OTLP receiver's request size limits lowered: over
    HTTP a body above ``max_request_body_size`` is answered 400 ("request body too
    large"), over gRPC a message above ``max_recv_msg_size_mib`` RESOURCE_EXHAUSTED
    ("received message larger than max")."""

    HTTP_LIMIT = 64 << 10

    def _config(self) -> dict:
        cfg = super()._config()
        protocols = cfg["receivers"]["otlp"]["protocols"]
        protocols["http"]["max_request_body_size"] = self.HTTP_LIMIT
        protocols["grpc"]["max_recv_msg_size_mib"] = 1
        return cfg


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
async def test_requests_the_collector_refuses_are_split_and_what_it_cannot_take_dead_lettered(
    kafka, tmp_path, protocol
):
    """Spans arriving together make a request above the Collector's limit, which it
    refuses: the exporter splits it until each part is taken; a span above the limit on
    its own (over HTTP: 64 KiB; a span over 1 MiB cannot cross Kafka) is refused alone
    and dead-lettered with the Collector's answer. Every other span arrives once."""
    run = uuid.uuid4().hex[:12]
    host = f"host-{run}"
    with LimitedCollector(tmp_path, free_port(), free_port()) as col:
        endpoint = col.grpc_endpoint if protocol == "grpc" else col.http_endpoint
        cfg = await otlp_config(kafka.bootstrap, protocol, endpoint)
        group = await exporter_group(kafka.bootstrap, f"test-otlp-limit-{run}")
        resource = {"host.id": host}
        now = time.time_ns()
        filler = "x" * 4000
        if protocol == "grpc":  # three of ~400 KiB: over 1 MiB together, each alone under it
            big = [span(run, f"big-{i}", now, {f"a{j}": filler for j in range(100)}) for i in range(3)]
            refused_alone: list[str] = []
        else:  # two of ~100 KiB: each over 64 KiB alone
            big = [span(run, f"big-{i}", now, {f"a{j}": filler for j in range(25)}) for i in range(2)]
            refused_alone = ["big-0", "big-1"]
        small = [span(run, f"small-{i}", now + i) for i in range(20)]
        # One record per partition: a consumer fetches at most 1 MiB of a partition at a
        # time, and all of them in one fetch, so together they make one request over 1 MiB.
        records = [SpanBatch(resource, small[:10]), *(SpanBatch(resource, [s]) for s in big)]
        records.append(SpanBatch(resource, small[10:]))
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", max_request_size=4 << 20)
        await producer.start()
        try:
            for partition, batch in enumerate(records):
                await producer.send_and_wait(
                    SPANS_TOPIC, encode_spans(batch), key=host.encode(), partition=partition
                )
        finally:
            await producer.stop()

        failed_before = counter("ktel_exporter_otlp_failed_exports_total", signal="spans")
        expected = sorted(s[3] for s in small + big if s[3] not in refused_alone)

        def arrived() -> list[str]:
            return sorted(s["name"] for s in col.spans() if s["resource"].get("host.id") == host)

        stop = asyncio.Event()
        exporter = asyncio.create_task(otlp.run(cfg, stop, group_id=group))
        try:
            letters = await dead_letters_of(kafka.bootstrap, run, len(refused_alone))
            await wait_for(lambda: len(arrived()) >= len(expected), "the spans the Collector takes")
        finally:
            stop.set()
            await asyncio.wait_for(exporter, 30)

    assert arrived() == expected  # each once
    assert counter("ktel_exporter_otlp_failed_exports_total", signal="spans") > failed_before  # it did refuse
    assert sorted(decode_spans(dl.payload).spans[0][3] for dl in letters) == refused_alone
    for dl in letters:
        assert (dl.stage, dl.topic) == ("otlp", SPANS_TOPIC)
        assert dl.reason == "HTTP 400: http: request body too large"


async def test_kernel_histograms_arrive_as_exponential_histograms_with_exact_buckets(kafka, collector):
    """The kernel's log2 slots are scale-0 exponential buckets: the Collector receives
    exactly the kernel's counts, in nanoseconds, slot 0 in the zero bucket."""
    run = uuid.uuid4().hex[:12]
    host = f"host-{run}"
    cfg = await otlp_config(kafka.bootstrap, "grpc", collector.grpc_endpoint)
    group = await exporter_group(kafka.bootstrap, f"test-otlp-exp-{run}")
    counts = [0] * HIST_SLOTS
    counts[0], counts[1], counts[3], counts[10], counts[20] = 3, 5, 2, 17, 1
    hist = {"count": 28, "sum": 2_000_000e-9, "bounds": log2_bounds(HIST_SLOTS, 1e-9), "counts": counts}
    ts_ms = time.time_ns() // 1_000_000 - 60_000
    series = [["syscall_latency_seconds", "histogram", {"host.id": host, "syscall.id": "0"}, hist]]
    await produce(
        kafka.bootstrap, [(METRICS_TOPIC, host.encode(), encode_snapshot(MetricSnapshot(ts_ms, series)))]
    )

    def mine() -> list[dict]:
        return [m for m in collector.metrics() if m["resource"].get("host.id") == host]

    stop = asyncio.Event()
    exporter = asyncio.create_task(otlp.run(cfg, stop, group_id=group))
    try:
        await wait_for(lambda: mine(), "the histogram at the Collector")
    finally:
        stop.set()
        await asyncio.wait_for(exporter, 30)

    [m] = mine()
    assert (m["name"], m["unit"]) == ("syscall_latency_nanoseconds", "ns")
    e = m["exponentialHistogram"]
    assert e["aggregationTemporality"] == 2  # cumulative
    [p] = e["dataPoints"]
    assert (attributes(p["attributes"]), p["timeUnixNano"]) == ({"syscall.id": "0"}, str(ts_ms * 1_000_000))
    assert (int(p["count"]), p["sum"], p.get("scale", 0)) == (28, pytest.approx(2_000_000), 0)
    # slot 0 ([0, 2) ns) in the zero bucket up to 2; slot i in bucket i, (2^i, 2^(i+1)] ns.
    assert (int(p["zeroCount"]), p["zeroThreshold"]) == (3, 2)
    positive = [int(c) for c in p["positive"]["bucketCounts"]]
    assert (p["positive"]["offset"], positive) == (1, [5, 0, 2] + [0] * 6 + [17] + [0] * 9 + [1])
    assert "negative" not in p or not p["negative"].get("bucketCounts")
