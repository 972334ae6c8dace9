"""Remote-write against the real Prometheus: what ktel writes, its query API returns
with the exact values, timestamps and labels; what it must not write never gets there."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from typing import Any

import httpx
import msgpack
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY
from prometheus_client.utils import floatToGoString

from exporters import remote_write
from exporters.consume import Record
from exporters.delivery import Window
from exporters.remote_write_client import Receiver
from ktel import config, topics
from ktel.topics import create_topics
from ktel.wire import (
    DLQ_TOPIC,
    HIST_SLOTS,
    METRICS_TOPIC,
    MetricSnapshot,
    WireError,
    decode_dead_letter,
    decode_snapshot,
    encode_snapshot,
    log2_bounds,
)
from tests.integration.agent_harness import dead_letters_of, start_group_at_end

pytestmark = pytest.mark.kafka


async def exporter_for(kafka, prometheus, name: str) -> tuple[str, config.Config, str]:
    """A run id, a remote-write config for the real Prometheus, and a consumer group
    ``<name>-<run>`` that starts at the end of ktel.metrics: the test sees only its
    own snapshots, not those the session's other tests left there."""
    run = uuid.uuid4().hex[:12]
    cfg = config.Config(
        kafka=config.KafkaConfig(bootstrap=kafka.bootstrap),
        remote_write=config.RemoteWriteConfig(url=prometheus.remote_write_url, metrics_port=0),
    )
    await create_topics(kafka.bootstrap, topics.specs(cfg))
    group = f"{name}-{run}"
    await start_group_at_end(kafka.bootstrap, group, METRICS_TOPIC)
    return run, cfg, group


def latency() -> tuple[float, float]:
    """The remote-write exporter's ingestion latency histogram: (count, sum)."""
    labels = {"exporter": "remote-write"}
    return (
        REGISTRY.get_sample_value("ktel_exporter_ingestion_latency_seconds_count", labels) or 0.0,
        REGISTRY.get_sample_value("ktel_exporter_ingestion_latency_seconds_sum", labels) or 0.0,
    )


async def test_samples_arrive_with_exact_values_and_labels(kafka, prometheus):
    run, cfg, group = await exporter_for(kafka, prometheus, "test-rw")
    host = f"host-{run}"

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
    await publish(kafka.bootstrap, host, snaps)
    query = f'{{ktel_run="{run}"}}[10m]'
    latency_before = latency()
    stop = asyncio.Event()
    exporter = asyncio.create_task(remote_write.run(cfg, stop, group_id=group))
    try:
        async with asyncio.timeout(60):  # a guard against hanging, not a timing assertion
            while sum(len(r["values"]) for r in await asyncio.to_thread(prometheus.query, query)) < 7 * 3:
                await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.wait_for(exporter, 30)

    # One latency observation per acknowledged snapshot, each from its timestamp (about
    # a minute ago) to Prometheus' 2xx: positive and finite.
    count, total = (a - b for a, b in zip(latency(), latency_before, strict=True))
    assert count == 3
    assert 3 * 58 <= total < math.inf

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


async def test_future_old_and_malformed_snapshots_go_to_the_dlq_and_never_to_prometheus(kafka, prometheus):
    """The operator's cases, published with a plain Kafka client between good snapshots:
    a snapshot at 2^63-1 ms (Prometheus stores it, then refuses every later sample), one
    two hours old, one with a list as a label value (once a TypeError that killed the
    exporter), a histogram with count -1, and one keyed by one host that speaks for
    another. The exporter keeps going: the good samples
    arrive, exactly, and each bad snapshot is in ktel.dlq, as read, with its reason."""
    run, cfg, group = await exporter_for(kafka, prometheus, "test-rw-bad")

    now_ms = time.time_ns() // 1_000_000
    t0 = now_ms - 60_000
    labels = {"ktel.run": run}

    def snapshot(ts: int, value: Any) -> bytes:
        return encode_snapshot(MetricSnapshot(ts, [["ktel_guard", "gauge", labels, value]]))

    def raw(ts: int, series: list) -> bytes:
        return msgpack.packb({"v": 1, "ts": ts, "series": series})  # what encode_snapshot would not write

    bad = {
        "future": encode_snapshot(
            MetricSnapshot(
                2**63 - 1, [["ktel_guard", "gauge", labels, 99], ["ktel_future_only", "gauge", labels, 1]]
            )
        ),
        "old": snapshot(now_ms - 2 * 3600_000, 98),
        "list label": raw(t0 + 500, [["ktel_guard", "gauge", {**labels, "bad": ["a", "b"]}, 97]]),
        "count -1": raw(
            t0 + 500,
            [["ktel_h", "histogram", labels, {"count": -1, "sum": 0.0, "bounds": [1.0], "counts": [0, 0]}]],
        ),
        # Keyed by one host, speaking for another: it would overwrite that host's series.
        "another host": encode_snapshot(
            MetricSnapshot(t0 + 500, [["ktel_guard", "gauge", {**labels, "host.id": "victim"}, 96]])
        ),
    }
    records = [
        snapshot(t0, 1),
        bad["future"],
        bad["old"],
        bad["list label"],
        bad["count -1"],
        bad["another host"],
    ]
    records += [snapshot(t0 + 1000, 2), snapshot(t0 + 2000, 3)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()
    try:
        for value in records:  # one key: one partition, in this order
            await producer.send_and_wait(METRICS_TOPIC, value, key=run.encode())
    finally:
        await producer.stop()

    def count(name: str, *labels: str) -> float:
        return REGISTRY.get_sample_value(name, dict(zip(("exporter", "signal"), labels, strict=False))) or 0.0

    letters_before = count("ktel_exporter_dead_letters_total", "remote-write")
    latency_before = latency()
    samples_before = count("ktel_exporter_dead_lettered_items_total", "remote-write", "samples")
    query = f'ktel_guard{{ktel_run="{run}"}}[1h]'
    stop = asyncio.Event()
    exporter = asyncio.create_task(remote_write.run(cfg, stop, group_id=group))
    try:
        letters = await dead_letters_of(kafka.bootstrap, run, len(bad))
        async with asyncio.timeout(60):  # a guard against hanging, not a timing assertion
            while sum(len(r["values"]) for r in await asyncio.to_thread(prometheus.query, query)) < 3:
                assert not exporter.done(), exporter
                await asyncio.sleep(0.3)
        assert not exporter.done()  # still up after all of them
    finally:
        stop.set()
        await asyncio.wait_for(exporter, 30)

    [series] = prometheus.query(query)
    assert [(round(ts * 1000), float(v)) for ts, v in series["values"]] == [
        (t0, 1.0),
        (t0 + 1000, 2.0),
        (t0 + 2000, 3.0),
    ]
    assert prometheus.query(f'ktel_future_only{{ktel_run="{run}"}}') == []
    # Nothing from the future in Prometheus' head block: the newest sample it holds is now-ish.
    head = httpx.get(f"{prometheus.url}/api/v1/status/tsdb", trust_env=False).json()["data"]["headStats"]
    assert int(head["maxTime"]) < time.time_ns() // 1_000_000 + 600_000

    by_payload = {dl.payload: dl for dl in letters}
    assert set(by_payload) == set(bad.values())  # each bad snapshot once, as it was read
    reasons = {what: by_payload[value].reason for what, value in bad.items()}
    assert (
        "ahead of the exporter's clock (more than remote_write.max_future_seconds = 600)" in reasons["future"]
    )
    assert "s old by the exporter's clock (more than remote_write.max_age_seconds = 3600)" in reasons["old"]
    for what in ("list label", "count -1"):
        with pytest.raises(WireError) as err:
            decode_snapshot(bad[what])
        assert reasons[what] == str(err.value)
    assert reasons["another host"] == (
        "metric snapshot: its series 'ktel_guard' is of host 'victim', "
        f"but the record's key is {run.encode()!r}"
    )
    assert prometheus.query('ktel_guard{host_id="victim"}') == []
    assert {(dl.stage, dl.topic) for dl in letters} == {("remote-write", METRICS_TOPIC)}
    assert count("ktel_exporter_dead_letters_total", "remote-write") == letters_before + 5
    # Latency is observed for the three snapshots Prometheus acknowledged, not the dead letters.
    assert latency()[0] == latency_before[0] + 3
    # The samples of the two snapshots that decoded: 2 + 1.
    assert count("ktel_exporter_dead_lettered_items_total", "remote-write", "samples") == samples_before + 3


async def test_a_stale_snapshot_ends_its_series_in_prometheus_at_once(kafka, prometheus):
    """A host gone silent (processors/aggregate_core.py) gets a last snapshot marked
    stale: Prometheus must stop returning its series from then on, not five minutes later."""
    run, cfg, group = await exporter_for(kafka, prometheus, "test-rw-stale")
    host = f"host-{run}"
    t0 = (time.time_ns() // 1_000_000) - 60_000
    series = [["file_created_total", "counter", {"host.id": host, "ktel.run": run}, 23]]
    await publish(
        kafka.bootstrap, host, [MetricSnapshot(t0, series), MetricSnapshot(t0 + 10_000, series, stale=True)]
    )
    query = f'file_created_total{{ktel_run="{run}"}}'
    await export(cfg, group, 2)  # the value and the marker
    [before] = prometheus.query(query, (t0 + 5_000) / 1000)
    assert float(before["value"][1]) == 23.0
    # Without the marker, the last value would still be returned up to five minutes on.
    assert prometheus.query(query, (t0 + 20_000) / 1000) == []


async def test_series_alike_once_sanitised_still_let_the_snapshot_in(kafka, prometheus):
    """``a.b`` and ``a_b`` (an agent, or kernel code's own metric labels, may send both)
    are one Prometheus series. Sent both, this Prometheus kept the first value; a
    receiver that refuses two values at one timestamp would have the host's whole
    snapshot dead-lettered. One is sent, the last, and counted."""
    run, cfg, group = await exporter_for(kafka, prometheus, "test-rw-alike")
    host = f"host-{run}"
    t0 = (time.time_ns() // 1_000_000) - 60_000
    base = {"host.id": host, "ktel.run": run}
    series = [
        ["ktel_alike_total", "counter", {**base, "a.b": "x"}, 1],
        ["ktel_alike_total", "counter", {**base, "a_b": "x"}, 2],
        ["ktel_other", "gauge", base, 5],
    ]
    duplicates = REGISTRY.get_sample_value("ktel_exporter_duplicate_samples_total") or 0.0
    await publish(kafka.bootstrap, host, [MetricSnapshot(t0, series)])
    await export(cfg, group, 2)
    rows = prometheus.query(f'{{ktel_run="{run}"}}', (t0 + 1000) / 1000)
    assert {(r["metric"]["__name__"], float(r["value"][1])) for r in rows} == {
        ("ktel_alike_total", 2.0),  # the last given
        ("ktel_other", 5.0),
    }
    assert REGISTRY.get_sample_value("ktel_exporter_duplicate_samples_total") == duplicates + 1


def kernel_histogram(counts: dict[int, int], sum_ns: int) -> dict[str, Any]:
    """A latency histogram as the aggregate stage sends it: the kernel's log2 slots
    (slot -> count; 40 slots) counted in nanoseconds, exported in seconds."""
    slots = [counts.get(i, 0) for i in range(HIST_SLOTS)]
    return {
        "count": sum(slots),
        "sum": sum_ns * 1e-9,
        "bounds": log2_bounds(HIST_SLOTS, 1e-9),
        "counts": slots,
    }


async def publish(bootstrap: str, host: str, snaps: list[MetricSnapshot]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for snap in snaps:
            await producer.send_and_wait(METRICS_TOPIC, encode_snapshot(snap), key=host.encode())
    finally:
        await producer.stop()


async def export(cfg: config.Config, group: str, samples: int) -> None:
    """Run the exporter until Prometheus has acknowledged ``samples`` more samples."""

    def acknowledged() -> float:
        return REGISTRY.get_sample_value("ktel_exporter_samples_total", {"exporter": "remote-write"}) or 0.0

    before = acknowledged()
    stop = asyncio.Event()
    exporter = asyncio.create_task(remote_write.run(cfg, stop, group_id=group))
    try:
        async with asyncio.timeout(60):  # a guard against hanging, not a timing assertion
            while acknowledged() < before + samples:
                await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.wait_for(exporter, 30)


async def test_kernel_histograms_arrive_as_native_histograms_with_exact_buckets(kafka, prometheus):
    """The kernel's log2 slots are schema-0 native buckets: Prometheus' histogram
    functions see exactly the kernel's counts, one series per histogram, in nanoseconds;
    a stale snapshot ends the series at once."""
    run, cfg, group = await exporter_for(kafka, prometheus, "test-rw-native")
    host = f"host-{run}"
    t0 = (time.time_ns() // 1_000_000) - 60_000
    labels = {"host.id": host, "ktel.run": run}
    # slot 0 ([0, 2) ns): the zero bucket; slot i: (2^i, 2^(i+1)] ns.
    first = kernel_histogram({0: 3, 1: 5, 3: 2, 10: 7}, 9000)
    second = kernel_histogram({0: 3, 1: 5, 3: 2, 10: 17, 20: 1}, 2_000_000)
    await publish(
        kafka.bootstrap,
        host,
        [
            MetricSnapshot(t0, [["syscall_latency_seconds", "histogram", labels, first]]),
            MetricSnapshot(t0 + 10_000, [["syscall_latency_seconds", "histogram", labels, second]]),
            MetricSnapshot(
                t0 + 20_000, [["syscall_latency_seconds", "histogram", labels, second]], stale=True
            ),
        ],
    )
    sel = f'syscall_latency_nanoseconds{{ktel_run="{run}"}}'
    await export(cfg, group, 3)  # one sample a snapshot: a native histogram is one series

    def at(expr: str, ts_ms: int) -> list[dict]:
        return prometheus.query(expr, ts_ms / 1000)

    [point] = at(sel, t0 + 10_000)
    assert point["metric"] == {"__name__": "syscall_latency_nanoseconds", "host_id": host, "ktel_run": run}
    _ts, h = point["histogram"]
    assert (h["count"], float(h["sum"])) == ("28", pytest.approx(2_000_000))
    # [boundary rule (3: both closed, 0: open left), lower, upper, count]
    assert h["buckets"] == [
        [3, "-2", "2", "3"],
        [0, "2", "4", "5"],
        [0, "8", "16", "2"],
        [0, "1024", "2048", "17"],
        [0, "1048576", "2097152", "1"],
    ]
    [count] = at(f"histogram_count({sel})", t0)
    assert float(count["value"][1]) == 17.0
    [count] = at(f"histogram_count({sel})", t0 + 10_000)
    assert float(count["value"][1]) == 28.0
    # The median, the 14th of 28, is in (1024, 2048] (3 + 5 + 2 below it, 17 in it); where
    # in that bucket is the version's interpolation.
    [median] = at(f"histogram_quantile(0.5, {sel})", t0 + 10_000)
    assert 1024 < float(median["value"][1]) <= 2048
    # The longest, in slot 20 = (2^20, 2^21] ns.
    [top] = at(f"histogram_quantile(1, {sel})", t0 + 10_000)
    assert 2**20 < float(top["value"][1]) <= 2**21
    # One series, not one per bucket; and it ends at the stale marker.
    assert [r["metric"]["__name__"] for r in at(f'{{ktel_run="{run}"}}', t0 + 10_000)] == [
        "syscall_latency_nanoseconds"
    ]
    assert at(sel, t0 + 25_000) == []


async def test_what_prometheus_would_take_wrongly_or_leave_out_is_kept_or_dead_lettered(kafka, prometheus):
    """Values the wire takes but remote-write cannot carry as they are. A histogram
    counting 2^63 in one bucket: as a native histogram its bucket differences wrap
    past int64 into a negative bucket, which Prometheus refuses with a 500, retried
    for ever (nothing after it delivered); it goes out as classic buckets instead. A
    series with an empty name or an empty label name: Prometheus leaves it out and
    answers 204, so it would be counted delivered; its snapshot is dead-lettered."""
    run, cfg, group = await exporter_for(kafka, prometheus, "test-rw-edge")
    host = f"host-{run}"
    t0 = (time.time_ns() // 1_000_000) - 60_000
    labels = {"host.id": host, "ktel.run": run}
    huge = kernel_histogram({5: 2**63, 10: 3}, 0)
    unnamed = {
        "empty name": MetricSnapshot(t0, [["ktel_guard", "gauge", labels, 1], ["", "gauge", labels, 2]]),
        "empty label": MetricSnapshot(t0, [["ktel_guard", "gauge", {**labels, "": "x"}, 3]]),
    }
    letters_before = (
        REGISTRY.get_sample_value("ktel_exporter_dead_letters_total", {"exporter": "remote-write"}) or 0.0
    )
    await publish(
        kafka.bootstrap,
        host,
        [
            *unnamed.values(),
            MetricSnapshot(t0 + 1000, [["syscall_latency_seconds", "histogram", labels, huge]]),
        ],
    )
    await export(cfg, group, HIST_SLOTS + 2)  # classic: a bucket series per slot, _sum and _count
    letters = await dead_letters_of(kafka.bootstrap, run, 2)

    def at(expr: str) -> list[dict]:
        return prometheus.query(expr, (t0 + 1000) / 1000)

    [count] = at(f'syscall_latency_seconds_count{{ktel_run="{run}"}}')
    assert float(count["value"][1]) == float(2**63 + 3)
    by_le = {
        r["metric"]["le"]: float(r["value"][1])
        for r in at(f'syscall_latency_seconds_bucket{{ktel_run="{run}"}}')
    }
    assert by_le["+Inf"] == float(2**63 + 3) and by_le[floatToGoString(2**6 * 1e-9)] == float(2**63)
    assert at(f'syscall_latency_nanoseconds{{ktel_run="{run}"}}') == []
    assert at(f'ktel_guard{{ktel_run="{run}"}}') == []  # nothing of either unnamed snapshot

    reasons = {dl.payload: dl.reason for dl in letters}
    assert reasons == {
        encode_snapshot(unnamed["empty name"]): "series '': no Prometheus name (an empty name)",
        encode_snapshot(unnamed["empty label"]): "series 'ktel_guard': a label with an empty name",
    }
    assert (
        REGISTRY.get_sample_value("ktel_exporter_dead_letters_total", {"exporter": "remote-write"})
        == letters_before + 2
    )


async def test_classic_histograms_stay_available(kafka, prometheus):
    """``remote_write.histograms = "classic"``: the same histogram as _bucket/_sum/_count
    series in seconds, for receivers without native histograms."""
    run, cfg, group = await exporter_for(kafka, prometheus, "test-rw-classic")
    cfg = cfg.model_copy(
        update={"remote_write": cfg.remote_write.model_copy(update={"histograms": "classic"})}
    )
    host = f"host-{run}"
    t0 = (time.time_ns() // 1_000_000) - 60_000
    hist = kernel_histogram({0: 3, 1: 5, 3: 2, 10: 7}, 9000)
    labels = {"host.id": host, "ktel.run": run}
    await publish(
        kafka.bootstrap, host, [MetricSnapshot(t0, [["syscall_latency_seconds", "histogram", labels, hist]])]
    )
    sel = f'syscall_latency_seconds_bucket{{ktel_run="{run}"}}'
    await export(cfg, group, HIST_SLOTS + 2)
    got = {r["metric"]["le"]: float(r["value"][1]) for r in prometheus.query(sel, t0 / 1000)}
    assert (got["2e-09"], got["4e-09"], got["1.6e-08"], got["2.048e-06"], got["+Inf"]) == (3, 8, 10, 17, 17)
    [count] = prometheus.query(f'syscall_latency_seconds_count{{ktel_run="{run}"}}', t0 / 1000)
    assert float(count["value"][1]) == 17.0


class Producer:
    """ktel.dlq, as the exporter's producer writes it."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send_and_wait(self, topic, value, key=None):
        self.sent.append(value)


def as_read(snaps: list[MetricSnapshot], key: bytes, first_offset: int = 0) -> list[Record]:
    """``snaps`` as the exporter reads them: one partition, from ``first_offset`` on."""
    return [
        Record(decode_snapshot(value), METRICS_TOPIC, 0, first_offset + i, key, value, DLQ_TOPIC)
        for i, value in enumerate(encode_snapshot(snap) for snap in snaps)
    ]


async def deliver(prometheus, recs: list[Record], producer: Producer, histograms: str = "native") -> None:
    """The exporter's own delivery of ``recs`` to the real Prometheus, without Kafka."""
    cfg = config.RemoteWriteConfig(url=prometheus.remote_write_url, histograms=histograms)
    async with Receiver(cfg) as receiver:
        window = Window(cfg.max_age_seconds, cfg.max_future_seconds, "remote_write")
        await asyncio.wait_for(remote_write.deliver(receiver, recs, producer, window, cfg.histograms), 60)


async def test_a_series_named_as_another_types_series_never_reaches_the_other_metric(prometheus):
    """Classic: a gauge h_count beside a histogram h would write into h's count, a gauge
    c_total into a counter c's samples. What the real Prometheus holds is the histogram's
    count and the counter (as c_total) only; the two gauges went to ktel.dlq. (The
    exporter's own delivery, without Kafka: the records as it reads them.)"""
    run = uuid.uuid4().hex[:12]
    t0 = (time.time_ns() // 1_000_000) - 60_000
    labels = {"host.id": f"host-{run}", "ktel.run": run}
    hist = {"count": 3, "sum": 1.5, "bounds": [1.0], "counts": [1, 2]}
    snap = MetricSnapshot(
        t0,
        [
            ["h", "histogram", labels, hist],
            ["h_count", "gauge", labels, 7.0],
            ["c", "counter", labels, 2],
            ["c_total", "gauge", labels, 9.0],
        ],
    )
    producer = Producer()
    await deliver(prometheus, as_read([snap], labels["host.id"].encode(), 1), producer, "classic")

    got = {
        (r["metric"]["__name__"], r["metric"].get("le")): float(r["value"][1])
        for r in prometheus.query(f'{{ktel_run="{run}"}}', t0 / 1000)
    }
    assert got == {
        ("h_bucket", "1.0"): 1.0,
        ("h_bucket", "+Inf"): 3.0,
        ("h_sum", None): 1.5,
        ("h_count", None): 3.0,
        ("c_total", None): 2.0,
    }
    [letter] = [decode_dead_letter(v) for v in producer.sent]
    assert [row[0] for row in decode_snapshot(letter.payload).series] == ["h_count", "c_total"]


def held_already(reason: str) -> float:
    return REGISTRY.get_sample_value("ktel_exporter_already_stored_samples_total", {"reason": reason}) or 0.0


def stored(prometheus, run: str) -> dict[str, list[tuple[int, float]]]:
    """Each series of the run by its name: its samples' (ms, value), a native
    histogram's value its count."""
    return {
        r["metric"]["__name__"]: [(round(float(t) * 1000), float(v)) for t, v in r.get("values", [])]
        + [(round(float(t) * 1000), float(h["count"])) for t, h in r.get("histograms", [])]
        for r in prometheus.query(f'{{ktel_run="{run}"}}[10m]')
    }


async def test_snapshots_prometheus_holds_already_are_counted_not_dead_lettered(prometheus):
    """An exporter stopped before it committed (a SIGKILL) leaves its records to the
    next, which sends them again: Prometheus holds snapshots 0 and 1 of a host's
    counter, gauge and native histogram, and gets 0, 1 and a new 2 in one request. It
    refuses it whole ("out of order sample": 0 is older than 1), and 0 alone the same
    way; 1, the newest it holds, with the same values, it takes again. Nothing goes to
    ktel.dlq, 0's three samples are counted as held already, and 2 is stored."""
    run = uuid.uuid4().hex[:12]
    host = f"host-{run}"
    t0 = (time.time_ns() // 1_000_000) - 60_000
    labels = {"host.id": host, "ktel.run": run}
    snaps = [
        MetricSnapshot(
            t0 + 10_000 * i,
            [
                ["file_created", "counter", labels, 10 + i],
                ["ktel_ratio", "gauge", labels, 0.5 * i],
                ["syscall_latency_seconds", "histogram", labels, kernel_histogram({3: 1 + i}, 8)],
            ],
        )
        for i in range(3)
    ]
    first, again = Producer(), Producer()
    await deliver(prometheus, as_read(snaps[:2], host.encode()), first)
    before = held_already("out_of_order")
    await deliver(prometheus, as_read(snaps, host.encode()), again)

    assert first.sent == again.sent == []
    assert held_already("out_of_order") == before + 3
    ts = [t0, t0 + 10_000, t0 + 20_000]
    assert stored(prometheus, run) == {
        "file_created_total": list(zip(ts, [10.0, 11.0, 12.0], strict=True)),
        "ktel_ratio": list(zip(ts, [0.0, 0.5, 1.0], strict=True)),
        "syscall_latency_nanoseconds": list(zip(ts, [1.0, 2.0, 3.0], strict=True)),
    }


async def test_the_samples_prometheus_lacks_of_snapshots_it_holds_in_part_are_stored(prometheus):
    """The first exporter's request of a host's series a and b, at t0 and t0 + 10 s, was
    taken, and it was killed before the one of its series c. The next sends the two
    snapshots (a, b and c) again, b at t0 + 10 s with another value (a writer of
    ktel.metrics sending one twice), then a third. Prometheus rolls back any request
    holding a or b at t0 ("out of order sample") or b's other value ("duplicate sample
    for timestamp"), and keeps none of it: c's samples, which it lacks, are stored only
    once sent without them. They are: nothing goes to ktel.dlq, a and b at t0 and b's
    other value are counted as held already, and Prometheus has c at each timestamp."""
    run = uuid.uuid4().hex[:12]
    host = f"host-{run}"
    t0 = (time.time_ns() // 1_000_000) - 60_000
    labels = {"host.id": host, "ktel.run": run}

    def snapshot(i: int, **values: float) -> MetricSnapshot:
        return MetricSnapshot(t0 + 10_000 * i, [[name, "gauge", labels, v] for name, v in values.items()])

    first, again = Producer(), Producer()
    await deliver(prometheus, as_read([snapshot(0, a=1, b=5), snapshot(1, a=2, b=6)], host.encode()), first)
    before = {reason: held_already(reason) for reason in ("out_of_order", "duplicate_timestamp")}
    read_again = [snapshot(0, a=1, b=5, c=7), snapshot(1, a=2, b=60, c=8), snapshot(2, a=3, b=7, c=9)]
    await deliver(prometheus, as_read(read_again, host.encode()), again)

    assert first.sent == again.sent == []
    assert held_already("out_of_order") == before["out_of_order"] + 2
    assert held_already("duplicate_timestamp") == before["duplicate_timestamp"] + 1
    ts = [t0, t0 + 10_000, t0 + 20_000]
    assert stored(prometheus, run) == {
        "a": list(zip(ts, [1.0, 2.0, 3.0], strict=True)),
        "b": list(zip(ts, [5.0, 6.0, 7.0], strict=True)),  # the value it held first
        "c": list(zip(ts, [7.0, 8.0, 9.0], strict=True)),
    }


async def test_a_value_left_out_for_a_later_snapshots_at_its_timestamp_is_not_stored_when_sent_again(
    prometheus,
):
    """Two snapshots of a host give x the values 1 and 2 at one timestamp: the request
    carries the last (2). Prometheus holds a newer sample of the host's y (sent before a
    restart) and refuses the request whole ("out of order sample"), which is sent again
    by snapshot: Prometheus holds x = 2, as had it taken the request, and x is not
    counted as held already (its value left out, stored first, made it so)."""
    run = uuid.uuid4().hex[:12]
    host = f"host-{run}"
    t0 = (time.time_ns() // 1_000_000) - 60_000
    labels = {"host.id": host, "ktel.run": run}
    first, again = Producer(), Producer()
    await deliver(
        prometheus, as_read([MetricSnapshot(t0 + 10_000, [["y", "gauge", labels, 4.0]])], b"h"), first
    )
    snaps = [
        MetricSnapshot(t0, [["x", "gauge", labels, 1.0]]),
        MetricSnapshot(t0, [["x", "gauge", labels, 2.0]]),
        MetricSnapshot(t0, [["y", "gauge", labels, 3.0]]),
    ]
    before = {reason: held_already(reason) for reason in ("out_of_order", "duplicate_timestamp")}
    await deliver(prometheus, as_read(snaps, host.encode()), again)

    assert first.sent == again.sent == []
    assert held_already("out_of_order") == before["out_of_order"] + 1
    assert held_already("duplicate_timestamp") == before["duplicate_timestamp"]
    assert stored(prometheus, run) == {"x": [(t0, 2.0)], "y": [(t0 + 10_000, 4.0)]}
