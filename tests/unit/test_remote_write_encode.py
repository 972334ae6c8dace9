import time
from typing import Any

import pytest
import snappy
from opentelemetry.exporter.prometheus_remote_write.gen.remote_pb2 import WriteRequest
from prometheus_client import CollectorRegistry, generate_latest

from exporters import remote_write
from exporters.delivery import http_answer
from exporters.prom_names import label_name, prom_labels, reserved
from ktel.retry import Permanent
from ktel.wire import MetricSnapshot


def decode(body: bytes) -> WriteRequest:
    req = WriteRequest()
    req.ParseFromString(snappy.uncompress(body))
    return req


def test_labels_sorted_sanitised_without_empty_values():
    labels = prom_labels("file_created_total", {"host.id": "h", "directory": "/tmp", "empty": "", "9x": "v"})
    assert labels == [
        ("_9x", "v"),
        ("__name__", "file_created_total"),
        ("directory", "/tmp"),
        ("host_id", "h"),
    ]
    assert label_name("otel.metric.overflow") == "otel_metric_overflow"


def test_labels_prometheus_reserves():
    """``__``-prefixed labels (sanitised: ``..x`` is ``__x``) and ``le`` on a histogram
    are Prometheus' own; ``le`` on a gauge or counter is not."""
    assert reserved("__name__", "gauge") and reserved("..x", "counter") and reserved("le", "histogram")
    assert not reserved("le", "gauge") and not reserved("le", "counter") and not reserved("_x", "gauge")


def test_samples_of_a_series_are_in_timestamp_order_and_values_exact():
    labels = {"host.id": "h", "directory": "/d"}
    snaps = [
        MetricSnapshot(3000, [["file_created_total", "counter", labels, 23]]),
        MetricSnapshot(1000, [["file_created_total", "counter", labels, 5], ["g", "gauge", {"a": "b"}, 1.5]]),
        MetricSnapshot(2000, [["file_created_total", "counter", labels, 7]]),
    ]
    [(body, n, _)] = remote_write.encode(snaps)
    assert n == 4
    req = decode(body)
    by_name = {next(lb.value for lb in ts.labels if lb.name == "__name__"): ts for ts in req.timeseries}
    fc = by_name["file_created_total"]
    assert [(lb.name, lb.value) for lb in fc.labels] == [
        ("__name__", "file_created_total"),
        ("directory", "/d"),
        ("host_id", "h"),
    ]
    assert [(s.timestamp, s.value) for s in fc.samples] == [(1000, 5.0), (2000, 7.0), (3000, 23.0)]
    assert [(s.timestamp, s.value) for s in by_name["g"].samples] == [(1000, 1.5)]


def test_large_snapshots_are_split_into_requests():
    rows = [["m", "gauge", {"i": str(i)}, i] for i in range(remote_write.MAX_SERIES_PER_REQUEST + 5)]
    reqs = list(remote_write.encode([MetricSnapshot(1, rows)]))
    assert [n for _, n, _ in reqs] == [remote_write.MAX_SERIES_PER_REQUEST, 5]
    assert sum(len(decode(b).timeseries) for b, _, _ in reqs) == len(rows)
    # Each request names its series, as series_keys names a snapshot's.
    [snap_keys] = [remote_write.series_keys(MetricSnapshot(1, rows))]
    assert [k for _, _, keys in reqs for k in keys] == snap_keys


def test_only_keeps_the_named_series_with_all_their_samples():
    hist = {"count": 3, "sum": 1.0, "bounds": [0.5], "counts": [1, 2]}
    snaps = [
        MetricSnapshot(1000, [["a", "gauge", {}, 1], ["h", "histogram", {}, hist]]),
        MetricSnapshot(2000, [["a", "gauge", {}, 2], ["b", "gauge", {}, 3]]),
    ]
    keys = remote_write.series_keys(snaps[0])
    assert len(keys) == 1 + 2 + 2  # a, h's two buckets, _sum and _count
    only = {keys[0], keys[-1]}  # a and h_count
    [(body, n, got)] = remote_write.encode(snaps, only)
    assert (n, set(got)) == (3, only)
    by_name = {
        next(lb.value for lb in ts.labels if lb.name == "__name__"): ts for ts in decode(body).timeseries
    }
    assert set(by_name) == {"a", "h_count"}
    assert [(s.timestamp, s.value) for s in by_name["a"].samples] == [(1000, 1.0), (2000, 2.0)]


def test_requests_equal_what_the_generated_types_encode():
    """ktel frames samples itself (see exporters/remote_write.py): the receiver must
    read exactly what the generated WriteRequest types would have written."""
    hist = {"count": 3, "sum": 0.5, "bounds": [0.1, 1.0], "counts": [1, 2, 0]}
    snaps = [
        MetricSnapshot(
            1_700_000_000_000,
            [
                ["c_total", "counter", {"host.id": "h"}, 0],  # 0.0: a field protobuf would leave out
                ["g", "gauge", {"host.id": "h", "x": "é"}, -2.5],
                ["g_inf", "gauge", {}, float("inf")],
                ["lat_seconds", "histogram", {"host.id": "h"}, hist],
            ],
        ),
        MetricSnapshot(5, [["c_total", "counter", {"host.id": "h"}, 7]]),  # an earlier sample
        MetricSnapshot(2**40, [["c_total", "counter", {"host.id": "h"}, 9]]),
    ]
    [(body, n, _)] = remote_write.encode(snaps)

    expected = WriteRequest()
    series: dict[tuple, list[tuple[int, float]]] = {}
    for snap in snaps:
        for name, typ, labels, value in snap.series:
            if typ == "histogram":
                rows = remote_write.histogram_series(name, labels, value)
            else:
                rows = [(tuple(prom_labels(name, labels)), float(value))]
            for key, v in rows:
                series.setdefault(key, []).append((snap.ts_ms, v))
    for key, samples in series.items():
        ts = expected.timeseries.add()
        for name, value in key:
            ts.labels.add(name=name, value=value)
        for t, v in sorted(samples):
            ts.samples.add(value=v, timestamp=t)
    assert n == sum(len(s) for s in series.values()) == 3 + 5 + 2
    assert decode(body) == expected


def test_a_stale_snapshot_sends_prometheus_stale_marker_for_each_of_its_series():
    import struct

    h = {"count": 2, "sum": 1.0, "bounds": [0.5], "counts": [1, 1]}
    snap = MetricSnapshot(
        7, [["c_total", "counter", {"host.id": "h"}, 3], ["l_seconds", "histogram", {}, h]], True
    )
    [(body, n, _keys)] = remote_write.encode([snap])
    req = WriteRequest()
    req.ParseFromString(snappy.decompress(body))
    bits = {struct.unpack("<Q", struct.pack("<d", s.value))[0] for ts in req.timeseries for s in ts.samples}
    assert n == 5 and bits == {remote_write.STALE_NAN_BITS}
    assert {s.timestamp for ts in req.timeseries for s in ts.samples} == {7}


def test_the_pull_endpoint_drops_the_series_of_a_stale_snapshot_and_only_those():
    from exporters.pull import LatestValues

    latest = LatestValues()
    a, b = ["c_total", "counter", {"host.id": "a"}, 1], ["c_total", "counter", {"host.id": "b"}, 2]
    latest.update(MetricSnapshot(5, [a, b]), partition=0, offset=10)
    latest.update(MetricSnapshot(9, [a], stale=True), partition=0, offset=9)  # earlier in the stream: ignored
    assert len(latest.families["c"].series) == 2
    latest.update(MetricSnapshot(1, [a], stale=True), partition=0, offset=11)  # later, whatever its clock
    assert list(latest.families["c"].series) == [("c_total", (("host_id", "b"),))]
    latest.update(MetricSnapshot(1, [b], stale=True), partition=0, offset=12)
    assert latest.families == {}  # (no family left behind empty)


def test_the_pull_endpoint_orders_a_hosts_snapshots_by_their_offsets_not_their_clocks():
    from exporters.pull import LatestValues

    def value(latest):
        [(_p, _o, v, _read)] = latest.families["c"].series.values()
        return v

    latest = LatestValues()
    # A worker whose clock runs an hour ahead, then the partition's new owner, on time.
    latest.update(
        MetricSnapshot(1_700_000_000_000 + 3_600_000, [["c_total", "counter", {"host.id": "a"}, 10]]), 3, 100
    )
    latest.update(MetricSnapshot(1_700_000_000_000, [["c_total", "counter", {"host.id": "a"}, 12]]), 3, 101)
    assert value(latest) == 12
    # Read again from further back (the endpoint restarted and looks back): the later value stays.
    latest.update(
        MetricSnapshot(1_700_000_000_000 + 3_600_000, [["c_total", "counter", {"host.id": "a"}, 10]]), 3, 100
    )
    assert value(latest) == 12
    latest.update(
        MetricSnapshot(1_700_000_000_000 - 60_000, [["c_total", "counter", {"host.id": "a"}, 15]]), 3, 102
    )
    assert value(latest) == 15
    registry = CollectorRegistry()
    registry.register(latest)
    text = generate_latest(registry).decode()
    assert 'c_total{host_id="a"} 15.0' in text


def test_the_series_cache_is_bounded_in_bytes(monkeypatch):
    """A writer of ktel.metrics sending new series with long labels (the wire takes 64
    labels of 4 KB) must not grow the exporter without bound: the cache of serialised
    labels starts over past its byte bound, and what it serialises is still right."""
    monkeypatch.setattr(remote_write, "_CACHE_MAX_BYTES", 1 << 20)
    remote_write._SERIES.clear()
    long_labels = {f"l{j}": "v" * 4000 for j in range(16)}  # about 64 KB a series
    snaps = [MetricSnapshot(1000, [[f"m{i}", "gauge", long_labels, i]]) for i in range(100)]
    [(body, n, _)] = remote_write.encode(snaps)
    assert n == 100
    assert sorted(ts.samples[0].value for ts in decode(body).timeseries) == list(range(100))
    held = sum(len(v) for v in remote_write._SERIES.values())
    assert held <= (1 << 20) // 2 + 70_000 and len(remote_write._SERIES) < 100


class Producer:
    """ktel.dlq, as the exporter's producer writes it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None]] = []

    async def send_and_wait(self, topic, value, key=None):
        self.sent.append((topic, value, key))


async def test_a_series_named_as_another_types_series_are_is_dead_lettered_and_the_rest_sent():
    """Classic histograms: a histogram h is h_bucket, h_sum and h_count, and a gauge
    h_count would write its values into h's count (the last of two at one timestamp
    kept, or a series of h_count Prometheus takes for h's); a gauge c_total into a
    counter c's samples. Such a series (which the aggregate never writes) is refused
    by its name, whatever else the snapshot holds, and dead-lettered alone with the
    reason; the rest of its snapshot is sent, a counter under its _total name."""
    import dataclasses

    from prometheus_client import REGISTRY

    from exporters.consume import Record
    from ktel.wire import DLQ_TOPIC, METRICS_TOPIC, decode_dead_letter, decode_snapshot, encode_snapshot

    now_ms = time.time_ns() // 1_000_000
    hist = {"count": 3, "sum": 1.5, "bounds": [1.0], "counts": [1, 2]}
    host = {"host.id": "h"}
    kept = [["h", "histogram", host, hist], ["c", "counter", host, 2], ["g", "gauge", host, 4.0]]
    clashing = [["h_count", "gauge", host, 7.0], ["c_total", "gauge", host, 9.0]]
    snap = MetricSnapshot(now_ms, [kept[0], clashing[0], kept[1], clashing[1], kept[2]])
    value = encode_snapshot(snap)
    rec = Record(decode_snapshot(value), METRICS_TOPIC, 2, 40, b"h", value, DLQ_TOPIC)
    producer = Producer()
    dead = REGISTRY.get_sample_value(
        "ktel_exporter_dead_lettered_items_total", {"exporter": "remote-write", "signal": "samples"}
    )
    sent = await deliver_taken([rec], producer, "classic")
    h = (("host_id", "h"),)
    assert sent == {
        ("h_bucket", (*h, ("le", "1.0"))): [1.0],
        ("h_bucket", (*h, ("le", "+Inf"))): [3.0],
        ("h_sum", h): [1.5],
        ("h_count", h): [3.0],
        ("c_total", h): [2.0],
        ("g", h): [4.0],
    }
    [(topic, letter, key)] = producer.sent
    dl = decode_dead_letter(letter)
    assert (topic, key, dl.stage, dl.topic, dl.partition, dl.offset) == (
        DLQ_TOPIC,
        b"h",
        "remote-write",
        METRICS_TOPIC,
        2,
        40,
    )
    assert dl.reason == (
        "series 'h_count': a gauge ending in _count, as Prometheus names a histogram's series"
        " (and 1 more series of this snapshot)"
    )
    assert decode_snapshot(dl.payload) == dataclasses.replace(snap, series=clashing)
    after = REGISTRY.get_sample_value(
        "ktel_exporter_dead_lettered_items_total", {"exporter": "remote-write", "signal": "samples"}
    )
    assert after == (dead or 0.0) + 2


@pytest.mark.parametrize("histograms", ["classic", "native"])
async def test_a_histogram_with_a_label_le_is_dead_lettered_and_the_rest_sent(histograms):
    """Prometheus names a classic histogram's buckets by their bound in label le: a
    histogram's own le would be replaced in its buckets and kept on its _sum and _count,
    and two histograms differing only in le would be one in their buckets (one of each
    bucket left out as a duplicate). Such a series (which the aggregate never writes:
    processors/aggregate_core.py ``_kept``) is refused, as the pull endpoint refuses it,
    whatever form it would go in (a native histogram too), and dead-lettered alone with
    the reason; the rest of its snapshot is sent."""
    from prometheus_client import REGISTRY

    from exporters.consume import Record
    from ktel.wire import (
        DLQ_TOPIC,
        METRICS_TOPIC,
        decode_dead_letter,
        decode_snapshot,
        encode_snapshot,
        log2_bounds,
    )

    def hist(n: int, bounds: list[float]) -> dict[str, Any]:
        return {"count": n, "sum": 1.5 * n, "bounds": bounds, "counts": [0] * len(bounds) + [n]}

    host = {"host.id": "h"}
    kept = [["h", "histogram", host, hist(3, [1.0])], ["g", "gauge", {**host, "le": "a"}, 4.0]]
    with_le = [
        ["h", "histogram", {**host, "le": "a"}, hist(5, [1.0])],
        ["h", "histogram", {**host, "le": "b"}, hist(7, [1.0])],
        ["n", "histogram", {**host, "le": "a"}, hist(2, log2_bounds(4))],  # native in native mode
    ]
    snap = MetricSnapshot(time.time_ns() // 1_000_000, [with_le[0], kept[0], *with_le[1:], kept[1]])
    value = encode_snapshot(snap)
    rec = Record(decode_snapshot(value), METRICS_TOPIC, 2, 40, b"h", value, DLQ_TOPIC)
    producer = Producer()
    duplicates = REGISTRY.get_sample_value("ktel_exporter_duplicate_samples_total") or 0.0
    sent = await deliver_taken([rec], producer, histograms)
    h = (("host_id", "h"),)
    assert sent == {
        ("h_bucket", (*h, ("le", "1.0"))): [0.0],
        ("h_bucket", (*h, ("le", "+Inf"))): [3.0],
        ("h_sum", h): [4.5],
        ("h_count", h): [3.0],
        ("g", (*h, ("le", "a"))): [4.0],  # (a gauge's le is its own)
    }
    assert (REGISTRY.get_sample_value("ktel_exporter_duplicate_samples_total") or 0.0) == duplicates
    [(_topic, letter, _key)] = producer.sent
    dl = decode_dead_letter(letter)
    assert dl.reason == (
        "series 'h': a histogram with a label 'le', as Prometheus names its buckets' bounds"
        " (and 2 more series of this snapshot)"
    )
    assert decode_snapshot(dl.payload).series == with_le


def test_the_series_cache_bound_counts_the_labels_it_keeps_not_only_their_serialised_form(monkeypatch):
    """The cache is keyed by the wire's name and labels. A label with an empty value is
    left out of the serialised form, and names alike once sanitised are one label
    there, so a writer of ktel.metrics can send series whose labels take 16 KB on the
    wire and a few bytes serialised: the byte bound must count what the keys hold."""
    monkeypatch.setattr(remote_write, "_CACHE_MAX_BYTES", 1 << 20)
    monkeypatch.setattr(remote_write, "_cached_bytes", 0)
    remote_write._SERIES.clear()
    empty = {f"l{j:02d}" + "k" * 250: "" for j in range(32)}  # about 8 KB, none serialised
    alike = {f"a{c}": "v" * 250 for c in ".,;:-+*/=!?@#%^&~|<>()[]{}'` $"}  # one label serialised
    snaps = [MetricSnapshot(1000, [[f"m{i}", "gauge", {**empty, **alike}, i]]) for i in range(200)]
    [(body, n, _)] = remote_write.encode(snaps)
    assert n == 200
    held = sum(
        len(s)
        for key in remote_write._SERIES
        for part in key
        for s in ([part] if isinstance(part, str) else part)
    )
    assert held <= (1 << 20) + 20_000


async def test_a_label_alike_host_id_once_sanitised_dead_letters_its_snapshot():
    """A snapshot keyed by one host whose series names another in a label Prometheus
    takes as host.id's (``host-id``, ``host_id``): check_keyed looks at ``host.id``
    only, so it would be the other host's series in Prometheus, its values replaced,
    or ended by a stale snapshot. It is dead-lettered; the host's own series go."""
    import httpx

    from exporters.consume import Record
    from exporters.delivery import Window
    from exporters.remote_write_client import Receiver
    from ktel import wire
    from ktel.config import RemoteWriteConfig

    requests: list[WriteRequest] = []

    def receive(request: httpx.Request) -> httpx.Response:
        requests.append(decode(request.content))
        return httpx.Response(204)

    now_ms = time.time_ns() // 1_000_000
    forged = [
        MetricSnapshot(now_ms, [["up", "gauge", {label: "b"}, 0.0], ["own", "gauge", {"host.id": "a"}, 1.0]])
        for label in ("host_id", "host-id", "host:id")
    ]
    own = MetricSnapshot(now_ms, [["up", "gauge", {"host.id": "a"}, 1.0]])
    records = [
        Record(snap, wire.METRICS_TOPIC, 0, i, b"a", wire.encode_snapshot(snap), wire.DLQ_TOPIC)
        for i, snap in enumerate([*forged, own])
    ]
    producer = Producer()
    async with Receiver(RemoteWriteConfig(url="http://receiver.test/api/v1/write")) as receiver:
        receiver.client = httpx.AsyncClient(transport=httpx.MockTransport(receive))
        await remote_write.deliver(receiver, records, producer, Window(3600, 600, "remote_write"))

    [request] = requests
    assert [{lb.name: lb.value for lb in ts.labels} for ts in request.timeseries] == [
        {"__name__": "up", "host_id": "a"}
    ]
    letters = [wire.decode_dead_letter(v) for _t, v, _k in producer.sent]
    assert [dl.offset for dl in letters] == [0, 1, 2]
    assert letters[1].reason == "series 'up': a label 'host-id' that names its host as host.id does"


async def test_a_request_that_got_no_answer_is_counted_as_failed():
    """A receiver that is down (connection refused, a timeout) fails every request as a
    503 does, and they are retried the same way: ktel_exporter_failed_requests_total
    counts them too, under status "none", or a receiver down for an hour shows none."""
    import httpx
    from prometheus_client import REGISTRY

    from exporters.consume import Record
    from exporters.delivery import Window
    from exporters.remote_write_client import Receiver
    from ktel import wire
    from ktel.config import RemoteWriteConfig

    answers: list[int] = []

    def receive(request: httpx.Request) -> httpx.Response:
        if len(answers) < 2:
            answers.append(0)
            raise httpx.ConnectError("connection refused", request=request)
        answers.append(204)
        return httpx.Response(204)

    def failed(status: str) -> float:
        labels = {"exporter": "remote-write", "status": status}
        return REGISTRY.get_sample_value("ktel_exporter_failed_requests_total", labels) or 0.0

    snap = MetricSnapshot(time.time_ns() // 1_000_000, [["up", "gauge", {"host.id": "a"}, 1.0]])
    rec = Record(snap, wire.METRICS_TOPIC, 0, 1, b"a", wire.encode_snapshot(snap), wire.DLQ_TOPIC)
    before = failed("none")
    async with Receiver(RemoteWriteConfig(url="http://receiver.test/api/v1/write")) as receiver:
        receiver.client = httpx.AsyncClient(transport=httpx.MockTransport(receive))
        await remote_write.deliver(receiver, [rec], Producer(), Window(3600, 600, "remote_write"))

    assert answers == [0, 0, 204]
    assert failed("none") == before + 2


async def test_a_duplicate_sample_is_counted_once_when_its_request_is_refused_and_sent_again():
    """Two wire series that are one Prometheus series at one timestamp: one sample is left
    out, counted in ktel_exporter_duplicate_samples_total. A request the receiver refuses
    is encoded again, by snapshot: the sample left out is the same one, counted once."""
    import httpx
    from prometheus_client import REGISTRY

    from exporters.consume import Record
    from exporters.delivery import Window
    from exporters.remote_write_client import Receiver
    from ktel import wire
    from ktel.config import RemoteWriteConfig

    def receive(request: httpx.Request) -> httpx.Response:
        names = {lb.value for ts in decode(request.content).timeseries for lb in ts.labels}
        return httpx.Response(400 if "bad" in names else 204)

    now_ms = time.time_ns() // 1_000_000
    alike = MetricSnapshot(
        now_ms, [["net.rx", "gauge", {"host.id": "a"}, 1.0], ["net_rx", "gauge", {"host.id": "a"}, 2.0]]
    )
    bad = MetricSnapshot(now_ms, [["bad", "gauge", {"host.id": "a"}, 1.0]])
    records = [
        Record(snap, wire.METRICS_TOPIC, 0, i, b"a", wire.encode_snapshot(snap), wire.DLQ_TOPIC)
        for i, snap in enumerate([alike, bad])
    ]
    before = REGISTRY.get_sample_value("ktel_exporter_duplicate_samples_total") or 0.0
    producer = Producer()
    async with Receiver(RemoteWriteConfig(url="http://receiver.test/api/v1/write")) as receiver:
        receiver.client = httpx.AsyncClient(transport=httpx.MockTransport(receive))
        await remote_write.deliver(receiver, records, producer, Window(3600, 600, "remote_write"))

    assert [wire.decode_dead_letter(v).offset for _t, v, _k in producer.sent] == [1]
    assert REGISTRY.get_sample_value("ktel_exporter_duplicate_samples_total") == before + 1


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        # Prometheus' bodies, each the error's text and a newline (2.42 to 3.x).
        (400, "out of order sample\n", "out_of_order"),
        (400, "duplicate sample for timestamp\n", "duplicate_timestamp"),
        (
            400,
            "duplicate sample for timestamp 1700000000000; overrides not allowed: existing 1, new value 2\n",
            "duplicate_timestamp",
        ),  # 2.53 on
        # Older than its head block takes, held or not: a sample that may be lost.
        (400, "out of bounds\n", None),
        (400, "too old sample\n", None),
        (400, "snappy: corrupt input\n", None),
        (400, "series {a=1}: out of order sample\n", None),  # not Prometheus' answer
        (409, "out of order sample\n", None),
        (413, "out of order sample\n", None),
    ],
)
def test_prometheus_refusals_of_samples_it_holds_already_are_told_from_the_others(status, body, reason):
    with pytest.raises(Permanent) as refused:
        http_answer(status, body)
    assert remote_write.already_stored(str(refused.value)) == reason


# What receivers other than Prometheus answer, each HTTP body as their sources write it
# (http.Error adds the newline). Mimir: pkg/distributor/distributor.go ("send data to
# ingesters"), pkg/distributor/errors.go ("failed pushing to ingester <id>"),
# pkg/ingester/errors.go (the sample's error), pkg/util/globalerror/errors.go (its id).
# Cortex: pkg/ingester/ingester.go (wrappedTSDBIngestErr, errTSDBIngest*),
# pkg/ingester/errors.go (wrapWithUser). Thanos Receive: pkg/receive/writer_errors.go
# ("add <n> samples: ..."), pkg/receive/handler.go (409 Conflict, "forwarding request to
# endpoint", "writing locally", the errorSet's "<n> errors: ...; ..."),
# pkg/receive/config.go (an endpoint's words).
_MIMIR = "send data to ingesters: failed pushing to ingester ingester-zone-a-1: user=anonymous: "
_MIMIR_SERIES = (
    ' The affected sample has timestamp 2024-05-01T10:00:00Z and is from series {__name__="node_load1"}\n'
)
_MIMIR_OUT_OF_ORDER = (
    "the sample has been rejected because another sample with a more recent timestamp has already been "
    "ingested and out-of-order samples are not allowed (err-mimir-sample-out-of-order)."
)
_MIMIR_DUPLICATE = (
    "the sample has been rejected because another sample with the same timestamp, but a different value, "
    "has already been ingested (err-mimir-sample-duplicate-timestamp)."
)
_THANOS_HOST = (
    "thanos-receive-ingestor-default-2.thanos-receive-ingestor-default.monitoring.svc.cluster.local"
)
_THANOS_ENDPOINT = f"addr: {_THANOS_HOST}:10901, capnp_addr: {_THANOS_HOST}:19391, az: eu-west-1a"
_THANOS_LOCAL = "forwarding request to endpoint addr: 127.0.0.1:10901, capnp_addr: , az: : writing locally: "
# A router's answer holding the ingester's, past the 500 characters a refusal keeps.
_THANOS_ROUTED = (
    f"forwarding request to endpoint {_THANOS_ENDPOINT}: rpc error: code = AlreadyExists desc = "
    f"forwarding request to endpoint {_THANOS_ENDPOINT}: writing locally: "
)


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        # Grafana Mimir, HTTP 400
        (
            400,
            _MIMIR + _MIMIR_OUT_OF_ORDER + _MIMIR_SERIES,
            "out_of_order",
        ),
        (  # older, the ingester unnamed
            400,
            "failed pushing to ingester: user=275106: " + _MIMIR_OUT_OF_ORDER + _MIMIR_SERIES,
            "out_of_order",
        ),
        (
            400,
            _MIMIR + _MIMIR_DUPLICATE + _MIMIR_SERIES,
            "duplicate_timestamp",
        ),
        (  # Prometheus' "out of bounds": held or not
            400,
            _MIMIR + "the sample has been rejected because its timestamp is too old "
            "(err-mimir-sample-timestamp-too-old)." + _MIMIR_SERIES,
            None,
        ),
        (  # Prometheus' "too old sample": held or not
            400,
            _MIMIR + "the sample has been rejected because another sample with a more recent timestamp has "
            "already been ingested and this sample is beyond the out-of-order time window of 30m "
            "(err-mimir-sample-timestamp-too-old)." + _MIMIR_SERIES,
            None,
        ),
        (
            400,
            _MIMIR
            + "per-user series limit of 150000 exceeded (err-mimir-max-series-per-user). To adjust the "
            "related per-tenant limit, configure -ingester.max-global-series-per-user, or contact your "
            "service administrator.\n",
            None,
        ),
        # Cortex, HTTP 400
        (
            400,
            "user=fake: err: out of order sample. timestamp=1970-01-01T00:00:00.009Z, "
            'series={__name__="test"}\n',
            "out_of_order",
        ),
        (
            400,
            "user=fake: err: duplicate sample for timestamp 1575043969; overrides not allowed: existing 2, "
            'new value 1. series={__name__="test"}\n',
            "duplicate_timestamp",
        ),
        (
            400,
            "user=fake: err: out of bounds. timestamp=1970-01-19T05:30:43.969Z, "
            'tsdbHeadMaxTimestamp=1970-01-19T05:31:43.969Z, series={__name__="test"}\n',
            None,
        ),
        (
            400,
            "user=fake: err: too old sample. timestamp=1970-01-19T05:30:43.969Z, "
            'tsdbHeadMaxTimestamp=1970-01-19T05:31:43.969Z, series={__name__="test"}\n',
            None,
        ),
        (
            400,
            "user=fake: err: out of order exemplar. timestamp=1970-01-01T00:00:00.009Z, "
            'series={__name__="test"}, exemplar={trace_id="x"}\n',
            None,
        ),
        # Thanos Receive, HTTP 409 Conflict
        (409, _THANOS_LOCAL + "add 1 samples: out of order sample\n", "out_of_order"),
        (409, _THANOS_ROUTED + "add 1 samples: out of order sample\n", "out_of_order"),
        (409, _THANOS_LOCAL + "add 1 samples: duplicate sample for timestamp\n", "duplicate_timestamp"),
        (409, _THANOS_ROUTED + "add 1 samples: duplicate sample for timestamp\n", "duplicate_timestamp"),
        (  # a request whose series it refuses for both: sent again by series, each is told
            409,
            _THANOS_LOCAL + "2 errors: add 1 samples: out of bounds; add 2 samples: out of order sample\n",
            "out_of_order",
        ),
        (409, _THANOS_LOCAL + "add 1 samples: out of bounds\n", None),
        (409, _THANOS_LOCAL + "add 1 samples: too old sample\n", None),
        # Each receiver's words under another's status are not its answer.
        (409, "user=fake: err: out of order sample. timestamp=1970-01-01T00:00:00.009Z, series={}\n", None),
        (400, _THANOS_LOCAL + "add 1 samples: out of order sample\n", None),
        (409, _MIMIR + "... (err-mimir-sample-out-of-order)." + _MIMIR_SERIES, None),
    ],
)
async def test_other_receivers_refusals_of_samples_they_hold_already_are_told_from_the_others(
    status, body, reason
):
    import httpx

    from exporters.remote_write_client import Receiver
    from ktel.config import RemoteWriteConfig

    assert len(_THANOS_ROUTED) > 500  # (what a refusal keeps of another answer)
    async with Receiver(RemoteWriteConfig(url="http://receiver.test/api/v1/write")) as receiver:
        receiver.client = httpx.AsyncClient(
            transport=httpx.MockTransport(lambda _r: httpx.Response(status, text=body))
        )
        with pytest.raises(Permanent) as refused:
            await remote_write.post(receiver, b"")
    assert remote_write.already_stored(str(refused.value)) == reason


# Answers whose body httpx cannot make text of: a Content-Encoding the body is not in (the
# client reads the body as it says), a charset whose codec fails on any byte it cannot
# decode, or makes no text at all.
UNDECODABLE = {
    "gzip": ({"Content-Encoding": "gzip"}, b"out of order sample\n"),
    "idna": ({"Content-Type": "text/plain; charset=idna"}, b"out of order sample \xff\n"),
    "hex": ({"Content-Type": "text/plain; charset=hex"}, b"out of order sample\n"),
}


@pytest.mark.parametrize("answer", sorted(UNDECODABLE))
@pytest.mark.parametrize(
    ("status", "outcome"), [(200, None), (204, None), (400, "HTTP 400: "), (503, "HTTP 503: ")]
)
async def test_an_answer_whose_body_does_not_decode_is_classified_by_its_status(answer, status, outcome):
    """A 2xx is a success whatever its body holds (the receiver took the samples: were
    the attempt failed, the request would be sent again for ever); any other answer is
    what its status says, with what text the body gives."""
    import httpx

    from exporters.remote_write_client import Receiver
    from ktel.config import RemoteWriteConfig
    from ktel.retry import Transient

    headers, body = UNDECODABLE[answer]

    def receive(_request: httpx.Request) -> httpx.Response:
        # (a stream, as a connection gives it: a Response made of content decodes it at once)
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(body))

    async with Receiver(RemoteWriteConfig(url="http://receiver.test/api/v1/write")) as receiver:
        receiver.client = httpx.AsyncClient(transport=httpx.MockTransport(receive))
        if outcome is None:
            await remote_write.post(receiver, b"")
            return
        with pytest.raises(Permanent if status == 400 else Transient) as failed:
            await remote_write.post(receiver, b"")
    assert str(failed.value).startswith(outcome)


class RollingBack:
    """A receiver that takes a request whole or not at all, as Prometheus' remote-write
    receiver does (tests/integration/test_remote_write_prometheus.py has the real one),
    answering for the first sample it cannot take: one older than its series' newest
    ("out of order sample"), another value at that timestamp ("duplicate sample for
    timestamp"), or one of a series named in ``bad`` ("label value too long")."""

    def __init__(self, held: dict[str, tuple[int, float]], bad: set[str]) -> None:
        self.newest = dict(held)  # series name -> the newest sample it holds
        self.bad = bad
        self.stored: dict[str, list[tuple[int, float]]] = {}  # what it took

    def receive(self, request):
        import httpx

        newest = dict(self.newest)
        taken = []
        for ts in decode(request.content).timeseries:
            [name] = [lb.value for lb in ts.labels if lb.name == "__name__"]
            if name in self.bad:
                return httpx.Response(400, text="label value too long\n")
            for sample in ts.samples:
                held = newest.get(name)
                if held is not None and sample.timestamp < held[0]:
                    return httpx.Response(400, text="out of order sample\n")
                if held == (sample.timestamp, sample.value):
                    continue  # the same sample again: taken, without a word
                if held is not None and sample.timestamp == held[0]:
                    return httpx.Response(400, text="duplicate sample for timestamp\n")
                newest[name] = (sample.timestamp, sample.value)
                taken.append((name, sample.timestamp, sample.value))
        self.newest = newest
        for name, t, v in taken:
            self.stored.setdefault(name, []).append((t, v))
        return httpx.Response(204)


async def test_a_series_refused_for_anything_else_among_samples_held_already_is_dead_lettered_alone():
    """A snapshot refused because the receiver holds a newer sample of one of its series
    (a, sent again after a restart) is sent again series by series: a is counted as held
    already, c (which the receiver lacks) is stored, and b, which it refuses for another
    reason, goes to ktel.dlq alone, with that answer. A snapshot refused alone for that
    other reason first goes to ktel.dlq whole, as it was read, as before."""
    import httpx
    from prometheus_client import REGISTRY

    from exporters.consume import Record
    from exporters.delivery import Window
    from exporters.remote_write_client import Receiver
    from ktel import wire
    from ktel.config import RemoteWriteConfig

    t0 = time.time_ns() // 1_000_000 - 60_000
    host = {"host.id": "h"}

    def snapshot(ts: int, **values: float) -> MetricSnapshot:
        return MetricSnapshot(ts, [[name, "gauge", host, v] for name, v in values.items()])

    snaps = [snapshot(t0, a=1, b=5, c=7), snapshot(t0 + 10_000, a=2, b=6, c=8)]
    records = [
        Record(snap, wire.METRICS_TOPIC, 0, i, b"h", wire.encode_snapshot(snap), wire.DLQ_TOPIC)
        for i, snap in enumerate(snaps)
    ]
    backend = RollingBack(held={"a": (t0 + 10_000, 2.0)}, bad={"b"})

    def count(name: str, labels: dict[str, str]) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    held = ("ktel_exporter_already_stored_samples_total", {"reason": "out_of_order"})
    dead = ("ktel_exporter_dead_lettered_items_total", {"exporter": "remote-write", "signal": "samples"})
    before = [count(*held), count(*dead)]
    producer = Producer()
    async with Receiver(RemoteWriteConfig(url="http://receiver.test/api/v1/write")) as receiver:
        receiver.client = httpx.AsyncClient(transport=httpx.MockTransport(backend.receive))
        await remote_write.deliver(receiver, records, producer, Window(3600, 600, "remote_write"))

    assert backend.stored == {"c": [(t0, 7.0)]}
    letters = [wire.decode_dead_letter(v) for _t, v, _k in producer.sent]
    assert [(dl.offset, dl.reason) for dl in letters] == [
        (0, "HTTP 400: label value too long"),
        (1, "HTTP 400: label value too long"),
    ]
    assert wire.decode_snapshot(letters[0].payload) == snapshot(t0, b=5)  # b alone
    assert letters[1].payload == records[1].value  # the record as it was read
    assert [count(*held), count(*dead)] == [before[0] + 1, before[1] + 1 + 3]


async def test_a_sample_left_out_for_a_later_snapshots_at_its_timestamp_stays_out_when_sent_again():
    """Two snapshots of a host give series x a value at the same timestamp: the request
    carries the last given (2), the other is counted in ktel_exporter_duplicate_samples_total.
    The receiver refuses the request for another snapshot's series, and it is sent again
    by snapshot: x goes as it went, with the last value, not the one left out first
    (stored, it would take the timestamp, and x's value sent would be refused as another
    value at it, the one sample counted twice)."""
    import httpx
    from prometheus_client import REGISTRY

    from exporters.consume import Record
    from exporters.delivery import Window
    from exporters.remote_write_client import Receiver
    from ktel import wire
    from ktel.config import RemoteWriteConfig

    t0 = time.time_ns() // 1_000_000 - 60_000
    host = {"host.id": "h"}
    snaps = [
        MetricSnapshot(t0, [["x", "gauge", host, 1.0]]),
        MetricSnapshot(t0, [["x", "gauge", host, 2.0]]),
        MetricSnapshot(t0, [["y", "gauge", host, 3.0]]),
    ]
    records = [
        Record(snap, wire.METRICS_TOPIC, 0, i, b"h", wire.encode_snapshot(snap), wire.DLQ_TOPIC)
        for i, snap in enumerate(snaps)
    ]
    backend = RollingBack(held={}, bad={"y"})

    def count(name: str, labels: dict[str, str] | None = None) -> float:
        return REGISTRY.get_sample_value(name, labels or {}) or 0.0

    duplicates = ("ktel_exporter_duplicate_samples_total", None)
    held = ("ktel_exporter_already_stored_samples_total", {"reason": "duplicate_timestamp"})
    before = [count(*duplicates), count(*held)]
    producer = Producer()
    async with Receiver(RemoteWriteConfig(url="http://receiver.test/api/v1/write")) as receiver:
        receiver.client = httpx.AsyncClient(transport=httpx.MockTransport(backend.receive))
        await remote_write.deliver(receiver, records, producer, Window(3600, 600, "remote_write"))

    assert backend.stored == {"x": [(t0, 2.0)]}
    assert [wire.decode_dead_letter(v).offset for _t, v, _k in producer.sent] == [2]
    assert [count(*duplicates), count(*held)] == [before[0] + 1, before[1]]


# What remote-write counts of the samples it reads (``deliver_counting``).
SAMPLE_COUNTERS = [
    ("ktel_exporter_samples_total", {"exporter": "remote-write"}),
    ("ktel_exporter_dead_lettered_items_total", {"exporter": "remote-write", "signal": "samples"}),
    ("ktel_exporter_duplicate_samples_total", {}),
    ("ktel_exporter_already_stored_samples_total", {"reason": "out_of_order"}),
]


async def deliver_taken(
    records: list[Any], producer: Producer, histograms: str
) -> dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]:
    """``records`` delivered, ``histograms`` as the setting says, to a receiver that takes
    every request: the values sent, by series (its name, its other labels sorted)."""
    import asyncio

    import httpx

    from exporters.delivery import Window
    from exporters.remote_write_client import Receiver
    from ktel.config import RemoteWriteConfig

    requests: list[WriteRequest] = []

    def receive(request: httpx.Request) -> httpx.Response:
        requests.append(decode(request.content))
        return httpx.Response(204)

    async with Receiver(RemoteWriteConfig(url="http://receiver.test/api/v1/write")) as receiver:
        receiver.client = httpx.AsyncClient(transport=httpx.MockTransport(receive))
        window = Window(3600, 600, "remote_write")
        await asyncio.wait_for(remote_write.deliver(receiver, records, producer, window, histograms), 30)
    return {
        (labels.pop("__name__"), tuple(sorted(labels.items()))): [s.value for s in ts.samples]
        for req in requests
        for ts in req.timeseries
        for labels in [{lb.name: lb.value for lb in ts.labels}]
    }


async def deliver_counting(backend: Any, records: list[Any]) -> tuple[Producer, list[float]]:
    """``records`` delivered to a fake receiver (``backend.receive``): the producer the
    dead letters went to, and how much each of SAMPLE_COUNTERS grew meanwhile."""
    import httpx
    from prometheus_client import REGISTRY

    from exporters.delivery import Window
    from exporters.remote_write_client import Receiver
    from ktel.config import RemoteWriteConfig

    def counts() -> list[float]:
        return [REGISTRY.get_sample_value(name, labels) or 0.0 for name, labels in SAMPLE_COUNTERS]

    before = counts()
    producer = Producer()
    async with Receiver(RemoteWriteConfig(url="http://receiver.test/api/v1/write")) as receiver:
        receiver.client = httpx.AsyncClient(transport=httpx.MockTransport(backend.receive))
        await remote_write.deliver(receiver, records, producer, Window(3600, 600, "remote_write"))
    return producer, [after - b for after, b in zip(counts(), before, strict=True)]


@pytest.mark.parametrize("held", [{}, {"a": 1}], ids=["refused", "held-then-refused"])
async def test_a_sample_left_out_as_a_duplicate_is_not_also_counted_dead_lettered(held):
    """Two wire series alike once sanitised (b.x, b_x) are one sample in the request,
    the other counted in ktel_exporter_duplicate_samples_total. Refused alone (the
    snapshot, or, once sent again series by series because the receiver holds a newer
    sample of a, the series), the dead letter counts the one sample the receiver
    refused: every sample read is counted once, as delivered, dead-lettered, held
    already or left out."""

    from exporters.consume import Record
    from ktel import wire

    t0 = time.time_ns() // 1_000_000 - 60_000
    host = {"host.id": "h"}
    snap = MetricSnapshot(
        t0, [["a", "gauge", host, 1.0], ["b.x", "gauge", host, 5.0], ["b_x", "gauge", host, 6.0]]
    )
    rec = Record(snap, wire.METRICS_TOPIC, 0, 0, b"h", wire.encode_snapshot(snap), wire.DLQ_TOPIC)
    backend = RollingBack(held={name: (t0 + ms, 0.0) for name, ms in held.items()}, bad={"b_x"})

    producer, grew = await deliver_counting(backend, [rec])
    delivered, dead, duplicates, stored = grew
    assert [wire.decode_dead_letter(v).offset for _t, v, _k in producer.sent] == [0]
    assert (delivered, dead, duplicates, stored) == ((0, 1, 1, 1) if held else (0, 2, 1, 0))
    assert delivered + dead + duplicates + stored == len(snap.series)


@pytest.mark.parametrize("after", ["a request taken", "a series dead-lettered apart"])
async def test_a_snapshot_refused_alone_dead_letters_the_series_the_refused_request_carried(after):
    """A snapshot of more series than a request takes, the receiver taking the first
    request and refusing the second; or one whose series named as another type's went to
    ktel.dlq apart (``split``) before the rest was refused: its dead letter holds the
    refused request's series alone, not those the receiver took or the other dead letter
    holds (a re-drive would send them again), and is a part of the record as
    ``ktel dlq --redrive`` checks it. Every sample read is counted once."""

    from exporters.consume import Record
    from ktel import wire

    t0 = time.time_ns() // 1_000_000 - 60_000
    host = {"host.id": "h"}
    if after == "a request taken":
        rows = [[f"g{i}", "gauge", host, float(i)] for i in range(remote_write.MAX_SERIES_PER_REQUEST + 1)]
        bad, apart, refused, counted = {rows[-1][0]}, [], rows[-1:], (len(rows) - 1, 1, 0, 0)
    else:
        rows = [["a", "gauge", host, 1.0], ["x_count", "gauge", host, 2.0], ["b", "gauge", host, 3.0]]
        bad, apart, refused, counted = {"b"}, [rows[1:2]], [rows[0], rows[2]], (0, 3, 0, 0)
    snap = MetricSnapshot(t0, rows)
    rec = Record(snap, wire.METRICS_TOPIC, 0, 0, b"h", wire.encode_snapshot(snap), wire.DLQ_TOPIC)

    producer, grew = await deliver_counting(RollingBack(held={}, bad=bad), [rec])
    parts = [wire.decode_snapshot(wire.decode_dead_letter(v).payload) for _t, v, _k in producer.sent]
    assert [part.series for part in parts] == [*apart, refused]
    assert [wire.not_part_of(part, snap) for part in parts] == [None] * len(parts)
    assert tuple(grew) == counted
    assert sum(grew) == len(rows)


class StoringTheRest(RollingBack):
    """A receiver that stores every sample of a request it can and answers for the
    first it cannot, as Mimir, Cortex and Thanos Receive do (``status``, and ``said``:
    its answer for each reason)."""

    def __init__(self, held, bad, status, said) -> None:
        super().__init__(held, bad)
        self.status = status
        self.said = said

    def receive(self, request):
        import httpx

        refused = None
        for ts in decode(request.content).timeseries:
            [name] = [lb.value for lb in ts.labels if lb.name == "__name__"]
            for sample in ts.samples:
                held = self.newest.get(name)
                if held is not None and sample.timestamp < held[0]:
                    refused = refused or self.said["out_of_order"]
                elif held == (sample.timestamp, sample.value):
                    pass  # the same sample again: taken, without a word
                elif held is not None and sample.timestamp == held[0]:
                    refused = refused or self.said["duplicate_timestamp"]
                else:
                    self.newest[name] = (sample.timestamp, sample.value)
                    self.stored.setdefault(name, []).append((sample.timestamp, sample.value))
        return httpx.Response(self.status, text=refused) if refused else httpx.Response(204)


_STORING_THE_REST = {  # receiver -> its status, and its answer for each reason
    "mimir": (
        400,
        {
            "out_of_order": _MIMIR + _MIMIR_OUT_OF_ORDER + _MIMIR_SERIES,
            "duplicate_timestamp": _MIMIR + _MIMIR_DUPLICATE + _MIMIR_SERIES,
        },
    ),
    "cortex": (
        400,
        {
            "out_of_order": "user=fake: err: out of order sample. timestamp=1970-01-01T00:00:00.009Z, "
            'series={__name__="a"}\n',
            "duplicate_timestamp": "user=fake: err: duplicate sample for timestamp 9; overrides not allowed: "
            'existing 1, new value 2. series={__name__="a"}\n',
        },
    ),
    "thanos": (
        409,
        {
            "out_of_order": _THANOS_ROUTED + "add 1 samples: out of order sample\n",
            "duplicate_timestamp": _THANOS_ROUTED + "add 1 samples: duplicate sample for timestamp\n",
        },
    ),
}


@pytest.mark.parametrize("receiver_name", sorted(_STORING_THE_REST))
async def test_samples_held_already_by_a_receiver_that_stores_the_rest_are_each_counted_once(receiver_name):
    """Records read again after a restart, one of whose samples (a at t0) the receiver
    holds a newer sample of, go to a receiver that stores the rest of a request it
    refuses: nothing is dead-lettered, and every sample read is counted once, delivered
    or held already. Sent again by snapshot, what it stored at the first attempt is taken
    again without a word (the newest of each series), or refused as held (c at t0, whose
    newer sample it stored with it), as a is."""

    from exporters.consume import Record
    from ktel import wire

    t0 = time.time_ns() // 1_000_000 - 60_000
    host = {"host.id": "h"}

    def snapshot(ts: int, **values: float) -> MetricSnapshot:
        return MetricSnapshot(ts, [[name, "gauge", host, v] for name, v in values.items()])

    snaps = [snapshot(t0, a=1, c=7), snapshot(t0 + 10_000, a=2, c=8)]
    records = [
        Record(snap, wire.METRICS_TOPIC, 0, i, b"h", wire.encode_snapshot(snap), wire.DLQ_TOPIC)
        for i, snap in enumerate(snaps)
    ]
    status, said = _STORING_THE_REST[receiver_name]
    backend = StoringTheRest(held={"a": (t0 + 10_000, 2.0)}, bad=set(), status=status, said=said)

    producer, (delivered, dead, duplicates, held) = await deliver_counting(backend, records)

    assert backend.stored == {"c": [(t0, 7.0), (t0 + 10_000, 8.0)]}  # each once
    assert producer.sent == []
    assert (delivered, dead, duplicates, held) == (2, 0, 0, 2)  # a and c at t0 + 10 s; a and c at t0


async def test_a_500_saying_too_old_sample_is_a_refusal_not_retried(monkeypatch):
    """Prometheus 2.39 to 2.48 with an out-of-order window answer 500 "too old sample" for
    a sample older than it: the same request never succeeds, and retried as a 500 it held
    the exporter's every partition for good. A refusal, as a 400 saying so is; a 500
    saying anything else is still retried."""
    import httpx

    import ktel.retry as retry_mod
    from exporters.consume import Record
    from exporters.delivery import Window
    from exporters.remote_write_client import Receiver
    from ktel import wire
    from ktel.config import RemoteWriteConfig

    waits: list[float] = []

    async def sleep(delay: float) -> None:
        waits.append(delay)
        assert len(waits) < 50, "still sending the request again"

    monkeypatch.setattr(retry_mod, "_sleep", sleep)
    answers = {"old": ["too old sample\n"], "busy": ["busy", "ok"]}

    def receive(request: httpx.Request) -> httpx.Response:
        [ts] = decode(request.content).timeseries
        name = {lb.name: lb.value for lb in ts.labels}["__name__"]
        said = answers[name].pop(0) if len(answers[name]) > 1 else answers[name][0]
        return httpx.Response(204) if said == "ok" else httpx.Response(500, text=said)

    now_ms = time.time_ns() // 1_000_000
    records = [
        Record(snap, wire.METRICS_TOPIC, 0, i, b"a", wire.encode_snapshot(snap), wire.DLQ_TOPIC)
        for i, snap in enumerate(
            MetricSnapshot(now_ms, [[n, "gauge", {"host.id": "a"}, 1.0]]) for n in answers
        )
    ]
    producer = Producer()
    async with Receiver(RemoteWriteConfig(url="http://receiver.test/api/v1/write")) as receiver:
        receiver.client = httpx.AsyncClient(transport=httpx.MockTransport(receive))
        for rec in records:
            await remote_write.deliver(receiver, [rec], producer, Window(3600, 600, "remote_write"))
    [letter] = [wire.decode_dead_letter(v) for _t, v, _k in producer.sent]
    assert (letter.offset, letter.reason) == (0, "HTTP 500: too old sample")
    assert len(waits) == 1  # (the busy one's, sent again once)
