"""What a metric snapshot a buggy or hostile writer of ktel.metrics wrote may cost the
Prometheus exporters: a classic histogram repeats its series' name and labels in each
bucket, so a record of under 1 MB could make hundreds of MB of samples. Such a snapshot
is refused as it is decoded, before any sample is made of it; the largest the aggregate
makes is not; a remote-write delivery encodes a fetch a bounded run at a time; and the
pull endpoint's series take at most pull.max_series_bytes of its memory, held and scraped,
dead-lettering the rest."""

from __future__ import annotations

import asyncio
import string
import time
import tracemalloc

import httpx
import pytest
import snappy
from opentelemetry.exporter.prometheus_remote_write.gen.remote_pb2 import WriteRequest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, make_wsgi_app

from exporters import pull, remote_write
from exporters.consume import Record
from exporters.delivery import Window
from exporters.remote_write_client import Receiver
from ktel.config import AggregateConfig, ProcessConfig, PullConfig, RemoteWriteConfig
from ktel.wire import (
    DLQ_TOPIC,
    HISTOGRAM_DELTA,
    KTEL_METRIC,
    MAX_PROMETHEUS_BYTES,
    METRICS_TOPIC,
    MetricSnapshot,
    RawBatch,
    WireError,
    decode_dead_letter,
    decode_snapshot,
    encode_snapshot,
    encoded_parts,
    prometheus_size,
)
from ktel.wire.raw import HOST_CHARS
from processors import aggregate_core
from processors.chain import Chain


class Producer:
    """ktel.dlq, as an exporter's producer writes it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None]] = []

    async def send_and_wait(self, topic, value, key=None):
        self.sent.append((topic, value, key))


def _record(snap: MetricSnapshot, offset: int = 0, key: bytes = b"h") -> Record:
    value = encode_snapshot(snap)
    return Record(decode_snapshot(value), METRICS_TOPIC, 0, offset, key, value, DLQ_TOPIC)


def _peak(work) -> int:
    """The most memory ``work()`` held at once, in bytes (Python's allocations)."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_snapshot_whose_histograms_make_hundreds_of_mb_of_samples_is_refused_as_it_is_decoded():
    """3 histograms of 257 buckets with 64 labels of 4,000 characters: 771 KB on the
    wire, about 200 MB of classic series, which took remote-write 600 MB to encode (and
    the pull endpoint as much for every scrape). Killed for it, the exporter read the
    record again on every start. It is refused by the decode every exporter reads
    ktel.metrics with, naming why, before anything the size of its samples is made."""
    labels = {f"l{j:02d}": "v" * 4000 for j in range(64)}
    hist = {"count": 0, "sum": 0.0, "bounds": [float(b) for b in range(256)], "counts": [0] * 257}
    series = [[f"h{i}", "histogram", labels, hist] for i in range(3)]
    data = encode_snapshot(MetricSnapshot(1, series))
    assert 700_000 < len(data) < 800_000
    failed: list[str] = []

    def read() -> None:
        try:
            snap = decode_snapshot(data)
            list(remote_write.encode([snap]))  # what remote-write makes of it (not log2: classic)
        except WireError as err:
            failed.append(str(err))

    peak = _peak(read)
    assert peak < 8 * len(data)  # the record unpacked, not its samples (about 600 MB)
    size = prometheus_size(series, len(data))
    assert size > 190_000_000
    assert failed == [
        f"metric snapshot: its series make about {size:,} bytes of Prometheus samples (a histogram's name "
        f"and labels in each of its buckets), more than {MAX_PROMETHEUS_BYTES:,}"
    ]


def _largest_snapshots(kind: str) -> list[bytes]:
    """The records of the largest snapshot the aggregate makes of one host: its series at
    the most process.max_state_bytes allows, all histograms, with the longest host id
    and the longest names and labels a probe's histograms (16 labels of 256 characters
    each side) or kernel code's (4 labels) may have."""
    max_state = ProcessConfig.model_fields["max_state_bytes"].metadata
    most = next(m.le for m in max_state if hasattr(m, "le"))
    chain = Chain([aggregate_core.Aggregate.from_config(AggregateConfig(), most)])
    [aggregate] = chain.timed()
    host, value, now = "h" * HOST_CHARS, {}, 1_700_000_000_000
    for seq in range(10):
        events = []
        for i in range(seq * 60, seq * 60 + 60):
            long = {f"{i:05d}{j:02d}".ljust(256, "k"): "v" * 256 for j in range(16)}
            if kind == "probe":
                ev = [HISTOGRAM_DELTA.id, 1, 1, "m" * 64, "ns", long, 1, 1, [1] + [0] * 39, 1]
                assert HISTOGRAM_DELTA.valid(ev)
            else:
                ev = [KTEL_METRIC.id, 1, 2, "histogram", "m" * 256, dict(list(long.items())[:4]), 5]
                assert KTEL_METRIC.valid(ev)
            events.append(ev)
        chain.on_batch(value, RawBatch(host, "b", seq, 1, events), now)
    # (a new host: its histograms at zero first, then their values, the same size)
    [(_, zeros), (_, snap)] = chain.on_window(aggregate, {host: value}, now + 10_000, 1.0).snapshots
    assert len(zeros.series) == len(snap.series)
    assert len(snap.series) > 40 and all(typ == "histogram" for _, typ, _, _ in snap.series)
    return encoded_parts(snap, host.encode())


@pytest.mark.parametrize("kind", ["probe", "kernel code"])
def test_the_largest_snapshot_the_aggregate_makes_is_taken_and_served(kind):
    """The bound is above everything the aggregate writes: at the highest
    process.max_state_bytes, a host's series are at most 500,000 bytes of state, which
    its histograms' 42 samples each make at most about 22 MB of (MAX_PROMETHEUS_BYTES)."""
    largest = 0
    latest = pull.LatestValues(max_bytes=PullConfig().max_series_bytes)
    for offset, data in enumerate(_largest_snapshots(kind)):
        snap = decode_snapshot(data)  # (raises WireError if refused)
        largest = max(largest, prometheus_size(snap.series, len(data)))
        assert latest.split(snap) == (snap.series, [])
        assert latest.update(snap, 0, offset) == []
    # Near enough to the bound for a bound below what the aggregate makes to fail here.
    assert MAX_PROMETHEUS_BYTES // 3 < largest < MAX_PROMETHEUS_BYTES


def test_the_largest_snapshot_the_wire_takes_fits_an_empty_pull_endpoint_at_its_least():
    """The largest snapshot the wire takes, whoever wrote it, fits an empty pull endpoint
    at the least pull.max_series_bytes, and nearly fills it: the least is what such a
    snapshot may take. Largest by what the endpoint counts, not by the wire's measure:
    histograms of 5 buckets (the wire counts a histogram's bounds and counts as bytes
    of its record, the endpoint each bucket as a sample) with 63 labels of one character
    (each of which a scrape writes as 6 or 7 in each of their samples' lines, ``x="\\""``,
    and holds in a dict entry), and a character outside the BMP in each, which takes
    every line, and the scrape's whole text, to 4 bytes a character."""
    [least] = [m.ge for m in PullConfig.model_fields["max_series_bytes"].metadata if hasattr(m, "ge")]
    hist = {"count": 0, "sum": 0.0, "bounds": [1.0, 2.0, 4.0, 8.0], "counts": [0] * 5}
    labels = dict.fromkeys([c for c in string.ascii_letters + string.digits + "_" if c != "a"], '"')

    def snapshot(n: int) -> tuple[list, bytes, int]:
        series = [["h", "histogram", {**labels, "a": f"{i:05d}\U0001d11e"}, hist] for i in range(n)]
        data = encode_snapshot(MetricSnapshot(1, series))
        return series, data, prometheus_size(series, len(data))

    each = snapshot(2)[2] - snapshot(1)[2]
    n = (MAX_PROMETHEUS_BYTES - snapshot(0)[2]) // each
    series, data, size = snapshot(n)
    assert size <= MAX_PROMETHEUS_BYTES < snapshot(n + 1)[2]  # (one more series would be refused)
    snap = decode_snapshot(data)
    latest = pull.LatestValues(max_bytes=least)
    assert latest.split(snap) == (snap.series, [])
    assert latest.update(snap, 0, 0) == []
    assert 0.95 * least < latest.held_bytes <= least


async def test_a_remote_write_delivery_encodes_and_sends_a_bounded_run_of_snapshots_at_a_time(monkeypatch):
    """A fetch holds up to 500 records, each up to the bound: encoded at once, a fetch of
    large ones took several GB. Each run of at most MAX_PROMETHEUS_BYTES is encoded and
    sent before the next is encoded, and every sample still arrives."""
    bound = 2 << 20
    monkeypatch.setattr(remote_write, "MAX_PROMETHEUS_BYTES", bound)
    now_ms = time.time_ns() // 1_000_000
    labels = {f"l{j:02d}": "v" * 1500 for j in range(16)}  # a classic histogram of ~1 MB of samples
    hist = {"count": 40, "sum": 1.0, "bounds": [float(b) for b in range(39)], "counts": [1] * 40}
    records = [
        _record(MetricSnapshot(now_ms, [[f"h{i}", "histogram", labels, hist]]), offset=i) for i in range(30)
    ]
    sizes = [prometheus_size(rec.item.series, len(rec.value)) for rec in records]
    assert bound // 3 < min(sizes) and max(sizes) < bound // 2
    samples: list[int] = []

    def receive(request: httpx.Request) -> httpx.Response:
        samples.append(len(WriteRequest.FromString(snappy.uncompress(request.content)).timeseries))
        return httpx.Response(204)

    async with Receiver(RemoteWriteConfig(url="http://receiver.test/api/v1/write")) as receiver:
        receiver.client = httpx.AsyncClient(transport=httpx.MockTransport(receive))
        window = Window(3600, 600, "remote_write")
        tracemalloc.start()
        try:
            await remote_write.deliver(receiver, records, Producer(), window, "native")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 8 * bound  # (all 30 at once: about 30 MB of samples, 90 MB of memory)
    assert sum(samples) == 30 * 42 and len(samples) == 15  # two snapshots a run


def _dead_series() -> float:
    return (
        REGISTRY.get_sample_value(
            "ktel_exporter_dead_lettered_items_total", {"exporter": "pull", "signal": "series"}
        )
        or 0.0
    )


async def test_the_pull_endpoint_holds_at_most_max_series_bytes_and_dead_letters_the_series_past_it():
    """Anything that writes ktel.metrics adds series to the pull endpoint, each kept 5
    minutes and written by every scrape: without a bound, its memory and every scrape
    grew with the write rate. New series past pull.max_series_bytes go to ktel.dlq
    alone, counted; the series held keep taking values; a series that ends or expires
    makes room again."""
    now = [0.0]
    bound = 200_000
    latest = pull.LatestValues(clock=lambda: now[0], max_bytes=bound)
    window = Window(float("inf"), 600, "pull")
    producer = Producer()
    now_ms = time.time_ns() // 1_000_000
    label = "v" * 1000
    dead = _dead_series()
    # A writer of ever new series: 20 snapshots of 10 gauges of about 1 KB each.
    records = [
        _record(
            MetricSnapshot(
                now_ms, [["g", "gauge", {"i": f"{s:02d}.{i}", "x": label}, 1.0] for i in range(10)]
            ),
            s,
        )
        for s in range(20)
    ]
    await pull.deliver(latest, window, records, producer)
    size = pull.series_cost(("g", (("i", "00.0"), ("x", label))), "gauge", 1.0).bytes
    family = pull.family_cost("g", "g").bytes
    held = sum(len(f.series) for f in latest.families.values())
    assert held == (bound - family) // size and latest.held_bytes == family + held * size
    assert REGISTRY.get_sample_value("ktel_exporter_pull_series_bytes") == latest.held_bytes
    assert _dead_series() == dead + 200 - held
    letters = [decode_dead_letter(value) for _topic, value, _key in producer.sent]
    assert sum(len(decode_snapshot(dl.payload).series) for dl in letters) == 200 - held
    assert {dl.stage for dl in letters} == {"pull"}
    assert letters[0].reason.startswith(
        f"series 'g': the pull endpoint's series take {latest.held_bytes:,} bytes of its memory, "
    )
    assert f"past pull.max_series_bytes ({bound:,})" in letters[0].reason
    # What a scrape writes is bounded, however much was written: the bound counts it too.
    registry = CollectorRegistry()
    registry.register(latest)
    assert 3 * len(generate_latest(registry)) < bound

    # A series held takes new values, however full the endpoint.
    name, typ, labels, _ = records[0].item.series[0]
    sent = len(producer.sent)
    await pull.deliver(
        latest, window, [_record(MetricSnapshot(now_ms, [[name, typ, labels, 2.0]]), 100)], producer
    )
    assert len(producer.sent) == sent and 2.0 in scrape_values(registry)

    # Series that end (a stale snapshot) or expire make room for others.
    stale = MetricSnapshot(now_ms, records[0].item.series, stale=True)
    await pull.deliver(latest, window, [_record(stale, 200)], producer)
    assert latest.held_bytes == family + (held - 10) * size
    now[0] += 3600
    await pull.deliver(latest, window, [], producer)
    assert latest.held_bytes == 0 and latest.families == {}
    await pull.deliver(latest, window, records[-1:], producer)
    assert len(producer.sent) == sent and latest.held_bytes == family + 10 * size


def scrape_values(registry: CollectorRegistry) -> list[float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(registry).decode()
    return [sample.value for fam in text_string_to_metric_families(text) for sample in fam.samples]


def test_a_histogram_the_pull_endpoint_holds_grown_past_its_room_keeps_its_value():
    """A series' size changes only with a histogram's buckets: one given 200 more
    buckets than it had takes 200 times the room, and is refused so, not taken."""
    small = {"count": 1, "sum": 1.0, "bounds": [1.0], "counts": [0, 1]}
    grown = {"count": 1, "sum": 1.0, "bounds": [float(b) for b in range(200)], "counts": [0] * 200 + [1]}
    cost = pull.series_cost(("h", ()), "histogram", small).bytes + pull.family_cost("h", "h").bytes
    latest = pull.LatestValues(max_bytes=2 * cost)
    assert latest.update(MetricSnapshot(1, [["h", "histogram", {}, small]]), 0, 1) == []
    [(row, why)] = latest.update(MetricSnapshot(2, [["h", "histogram", {}, grown]]), 0, 2)
    assert row[3] is grown and "past pull.max_series_bytes" in why
    [(_p, offset, value, _r)] = latest.families["h"].series.values()
    assert (offset, value, latest.held_bytes) == (1, small, cost)
    assert latest.update(MetricSnapshot(3, [["h", "histogram", {}, {**small, "sum": 2.0}]]), 0, 3) == []


H40 = {"count": 40, "sum": 1.5, "bounds": [2.0**i * 1e-9 for i in range(39)], "counts": [1] * 40}
SHORT = dict.fromkeys([c for c in string.ascii_letters + string.digits + "_" if c != "a"], '"')
HOSTILE = {
    "100 characters of labels": lambda i: ["g", "gauge", {"a": f"{i:099d}"}, 1.0],
    "gauges of a short label": lambda i: ["g", "gauge", {"a": str(i)}, 1.0],
    "a family a series": lambda i: [f"g{i}", "gauge", {}, 1.0],
    "histograms of 40 buckets": lambda i: ["h", "histogram", {"a": str(i)}, H40],
    "63 short labels, wide": lambda i: ["h", "histogram", {**SHORT, "a": f"{i}\U0001d11e"}, H40],
    "one wide among long labels": lambda i: [
        "g",
        "gauge",
        {"a": f"{i:01000d}" + ("\U0001d11e" if i == 0 else "")},
        1.0,
    ],
}


@pytest.mark.parametrize("shape", HOSTILE)
def test_a_full_pull_endpoint_and_a_scrape_of_it_take_at_most_max_series_bytes(shape):
    """Counted by their names and labels and 32 bytes a sample, the series a full
    endpoint held, and what a scrape made of them, took 10 to 25 times
    pull.max_series_bytes: at the 64 MiB it had by default, 1.3 to 1.8 GB for a writer
    of such series, past the Helm chart's 1 GiB. The endpoint counts what its memory
    takes for each series and family (series_cost, family_cost) and refuses the series
    that would take the count past the bound; what Python allocates for the series it
    then holds, held and at the peak of a scrape as Prometheus asks for one (OpenMetrics,
    gzip), is within the bound, and not far below it."""
    bound = 8 << 20
    make = HOSTILE[shape]
    latest = pull.LatestValues(max_bytes=bound)
    registry = CollectorRegistry()
    registry.register(latest)
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/metrics",
        "QUERY_STRING": "",
        "HTTP_ACCEPT": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        "HTTP_ACCEPT_ENCODING": "gzip",
    }
    tracemalloc.start()
    try:
        offset, refused = 0, []
        while not refused:
            rows = [make(i) for i in range(offset * 100, (offset + 1) * 100)]
            refused = latest.update(decode_snapshot(encode_snapshot(MetricSnapshot(1, rows))), 0, offset)
            offset += 1
        name, typ, labels, value = refused[0][0]
        del rows, refused
        tracemalloc.reset_peak()
        make_wsgi_app(registry)(environ, lambda *_: None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # It holds as many series as the counts allow: the first refused would take them past.
    held = sum(
        (
            pull.series_cost(key, f.type, v[2])
            for f in latest.families.values()
            for key, v in f.series.items()
        ),
        sum((pull.family_cost(fam, f.name) for fam, f in latest.families.items()), pull.Cost()),
    )
    assert held.bytes == latest.held_bytes <= bound
    nxt = pull.series_cost(pull.series_key(name, typ, labels), typ, value)
    if pull.family_name(name, typ) not in latest.families:
        nxt += pull.family_cost(pull.family_name(name, typ), name)
    assert (held + nxt).bytes > bound
    assert bound // 2 < peak <= bound


async def test_series_that_expired_make_room_for_the_batch_after_them():
    """A full endpoint whose series all expired takes the next batch's new series: the
    sweep comes before the batch, not after it, which dead-lettered them."""
    now = [0.0]
    row = ["g", "gauge", {"i": "0"}, 1.0]
    size = pull.series_cost(("g", (("i", "0"),)), "gauge", 1.0).bytes
    latest = pull.LatestValues(clock=lambda: now[0], max_bytes=pull.family_cost("g", "g").bytes + 10 * size)
    window = Window(float("inf"), 600, "pull")
    producer = Producer()
    now_ms = time.time_ns() // 1_000_000
    old = MetricSnapshot(now_ms, [[*row[:2], {"i": str(i)}, 1.0] for i in range(10)])
    await pull.deliver(latest, window, [_record(old, 1)], producer)
    assert latest.held_bytes == latest.max_bytes
    now[0] += 3600
    new = MetricSnapshot(now_ms, [["h", "gauge", {"i": str(i)}, 2.0] for i in range(10)])
    await pull.deliver(latest, window, [_record(new, 2)], producer)
    assert producer.sent == [] and set(latest.families) == {"h"}


async def test_with_no_snapshot_coming_the_endpoint_still_lets_expired_series_go(monkeypatch):
    """ktel.metrics silent (the workers down): the last values are not served for ever,
    which Prometheus would draw on as fresh at every scrape instead of a gap."""
    now = [0.0]
    latest = pull.LatestValues(clock=lambda: now[0])
    latest.update(MetricSnapshot(1, [["g", "gauge", {"host.id": "a"}, 1.0]]), 0, 1)
    monkeypatch.setattr(pull, "SWEEP_S", 0.001)
    sweeper = asyncio.create_task(pull.sweeping(latest))
    try:
        now[0] += 3600
        for _ in range(5000):  # (until the sweeper has run; no time is asserted)
            if not latest.families:
                break
            await asyncio.sleep(0.001)
        assert latest.families == {} and latest.held_bytes == 0
    finally:
        sweeper.cancel()


def test_entries_a_histogram_value_carries_past_its_four_are_not_held_by_the_pull_endpoint():
    import gc

    import msgpack

    def record(i: int) -> bytes:
        # (three bytes of msgpack a two-character string, 59 of memory once decoded)
        hist = {"count": 1, "sum": 1.0, "bounds": [1.0], "counts": [1, 0], "x": ["ab"] * 50_000}
        series = [[f"h{i}", "histogram", {"host.id": "h"}, hist]]
        return msgpack.packb({"v": 1, "ts": 1_700_000_000_000, "series": series})

    latest = pull.LatestValues(max_bytes=10 << 20, wall=lambda: 1_700_000_000.0)
    records = [record(i) for i in range(5)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for offset, data in enumerate(records):
            snap = decode_snapshot(data)
            assert snap.series[0][3] == {"count": 1, "sum": 1.0, "bounds": [1.0], "counts": [1, 0]}
            assert latest.split(snap)[1] == [] and latest.update(snap, 0, offset) == []
            del snap
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # (kept whole: 5 x 50,000 x 59 bytes, about 15 MB)
    assert held <= 2 * latest.held_bytes + (1 << 20)
