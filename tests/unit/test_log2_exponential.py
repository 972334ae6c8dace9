"""The kernel's log2 histograms as exponential buckets (exporters/log2.py) and as
Prometheus native histograms on the remote-write wire (exporters/remote_write.py)."""

from __future__ import annotations

import math

import httpx
import pytest
import snappy
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from exporters import remote_write
from exporters.delivery import Transient
from exporters.log2 import ZERO_THRESHOLD, exponential
from exporters.remote_write_client import Receiver
from ktel.config import RemoteWriteConfig
from ktel.wire import HIST_SLOTS, MetricSnapshot, log2_bounds
from processors.aggregate_core import log2_slot
from tests.unit import new_host


def kernel_histogram(values_ns: list[int]) -> dict:
    """What the aggregate sends for these durations: log2 slots, in seconds."""
    counts = [0] * HIST_SLOTS
    for v in values_ns:
        counts[log2_slot(v)] += 1
    return {"count": len(values_ns), "sum": sum(values_ns) * 1e-9, "bounds": log2_bounds(HIST_SLOTS, 1e-9),
            "counts": counts}  # fmt: skip


def prom_bucket(v: float) -> int:
    """Prometheus' schema-0 bucket of v > 0: k with 2^(k-1) < v <= 2^k."""
    return math.ceil(math.log2(v))


@pytest.mark.parametrize("v", [2, 3, 4, 5, 7, 8, 1000, 1023, 1024, 1025, 2**38 + 1, 2**39 - 1])
def test_each_duration_lands_in_the_native_bucket_of_its_slot(v):
    """A whole-nanosecond value v stands for a duration in [v, v + 1): the native
    bucket holding that duration (v + 0.5 here; v itself sits on a bound when a power
    of two) is the one its slot maps to."""
    e = exponential("x_seconds", kernel_histogram([v]))
    assert e is not None and e.zero_count == 0 and e.counts == [1]
    assert e.offset + 1 == prom_bucket(v + 0.5)
    assert 2**e.offset <= v < 2 ** (e.offset + 1)  # OpenTelemetry's bucket offset: (2^o, 2^(o+1)]


def test_slot_zero_is_the_zero_bucket_and_seconds_become_nanoseconds():
    e = exponential("syscall_latency_seconds", kernel_histogram([0, 1, 1, 2, 3, 600, 700]))
    assert e is not None
    assert (e.name, e.unit, e.count, e.zero_count) == ("syscall_latency_nanoseconds", "ns", 7, 3)
    assert e.sum == pytest.approx(1307)
    assert ZERO_THRESHOLD == 2  # slot 0 is [0, 2)
    # slot 1 ([2, 4)) is bucket 1 in OpenTelemetry's numbering, then empties up to slot 9.
    assert (e.offset, e.counts) == (1, [2, 0, 0, 0, 0, 0, 0, 0, 2])


def test_unitless_log2_keeps_its_name_and_other_bounds_have_no_exponential_form():
    counts = [1, 0, 2] + [0] * (HIST_SLOTS - 3)
    e = exponential(
        "ktel_queue_depth", {"count": 3, "sum": 9.0, "bounds": log2_bounds(HIST_SLOTS), "counts": counts}
    )
    assert e is not None and (e.name, e.unit, e.offset, e.counts, e.sum) == (
        "ktel_queue_depth",
        "",
        2,
        [2],
        9.0,
    )
    explicit = {"count": 3, "sum": 1.0, "bounds": [0.001, 0.01], "counts": [1, 1, 1]}
    assert exponential("runq_latency_seconds", explicit) is None
    # log2 bounds in seconds on a name that does not say seconds: not guessed at.
    assert exponential("x_bytes", kernel_histogram([5])) is None
    empty = exponential("x_seconds", kernel_histogram([]))
    assert empty is not None and (empty.count, empty.zero_count, empty.counts) == (0, 0, [])
    # A sum of seconds that is no double in nanoseconds keeps its explicit buckets, in
    # seconds, rather than going out as +Inf.
    assert exponential("x_seconds", {**kernel_histogram([5]), "sum": 1e300}) is None


def _prompb():
    """prompb's WriteRequest with native histograms (prometheus/prompb/types.proto), built
    here: the generated types ktel uses predate native histograms."""
    f = descriptor_pb2.FileDescriptorProto(name="ktel_test_prompb.proto", package="prompb", syntax="proto3")
    T = descriptor_pb2.FieldDescriptorProto

    def msg(name, *fields):
        m = f.message_type.add(name=name)
        for fname, num, typ, label, type_name in fields:
            field = m.field.add(name=fname, number=num, type=typ, label=label)
            if type_name:
                field.type_name = type_name

    opt, rep = T.LABEL_OPTIONAL, T.LABEL_REPEATED
    msg("Label", ("name", 1, T.TYPE_STRING, opt, ""), ("value", 2, T.TYPE_STRING, opt, ""))
    msg("Sample", ("value", 1, T.TYPE_DOUBLE, opt, ""), ("timestamp", 2, T.TYPE_INT64, opt, ""))
    msg("BucketSpan", ("offset", 1, T.TYPE_SINT32, opt, ""), ("length", 2, T.TYPE_UINT32, opt, ""))
    msg(
        "Histogram",
        ("count_int", 1, T.TYPE_UINT64, opt, ""),
        ("sum", 3, T.TYPE_DOUBLE, opt, ""),
        ("schema", 4, T.TYPE_SINT32, opt, ""),
        ("zero_threshold", 5, T.TYPE_DOUBLE, opt, ""),
        ("zero_count_int", 6, T.TYPE_UINT64, opt, ""),
        ("positive_spans", 11, T.TYPE_MESSAGE, rep, ".prompb.BucketSpan"),
        ("positive_deltas", 12, T.TYPE_SINT64, rep, ""),
        ("timestamp", 15, T.TYPE_INT64, opt, ""),
    )
    msg(
        "TimeSeries",
        ("labels", 1, T.TYPE_MESSAGE, rep, ".prompb.Label"),
        ("samples", 2, T.TYPE_MESSAGE, rep, ".prompb.Sample"),
        ("histograms", 4, T.TYPE_MESSAGE, rep, ".prompb.Histogram"),
    )
    msg("WriteRequest", ("timeseries", 1, T.TYPE_MESSAGE, rep, ".prompb.TimeSeries"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("prompb.WriteRequest"))


def test_native_histograms_on_the_wire_are_prompb_histograms():
    hist = kernel_histogram([0, 1, 2, 3, 600, 700, 2**20 + 5])
    labels = {"host.id": "h"}
    snaps = [
        MetricSnapshot(2000, [["syscall_latency_seconds", "histogram", labels, hist]], stale=True),
        MetricSnapshot(1000, [["syscall_latency_seconds", "histogram", labels, hist]]),
    ]
    [(body, n, keys)] = remote_write.encode(snaps)
    assert n == 2 and keys == remote_write.series_keys(snaps[0])
    req = _prompb()()
    req.ParseFromString(snappy.uncompress(body))
    [ts] = req.timeseries
    assert [(lb.name, lb.value) for lb in ts.labels] == [
        ("__name__", "syscall_latency_nanoseconds"),
        ("host_id", "h"),
    ]
    assert not ts.samples
    h, marker = ts.histograms  # in timestamp order
    assert (h.timestamp, h.count_int, h.schema, h.zero_threshold, h.zero_count_int) == (1000, 7, 0, 2.0, 2)
    assert h.sum == pytest.approx(2**20 + 1311)
    # Buckets (2,4], (256,512], (512,1024], ... (2^20, 2^21]: one span from bucket 2, deltas.
    [span] = h.positive_spans
    assert (span.offset, span.length) == (2, 20)
    counts, c = [], 0
    for d in h.positive_deltas:
        c += d
        counts.append(c)
    assert counts == [2] + [0] * 7 + [2] + [0] * 10 + [1]
    # The stale marker: a histogram whose sum is Prometheus' stale NaN.
    assert marker.timestamp == 2000
    assert math.isnan(marker.sum) and remote_write._DOUBLE(marker.sum) == remote_write._DOUBLE(
        remote_write.STALE_NAN
    )


def test_classic_setting_sends_bucket_series_in_seconds():
    hist = kernel_histogram([3, 600])
    [(body, n, _)] = remote_write.encode(
        [MetricSnapshot(1000, [["x_seconds", "histogram", {}, hist]])], histograms="classic"
    )
    assert n == HIST_SLOTS + 2
    req = _prompb()()
    req.ParseFromString(snappy.uncompress(body))
    names = {next(lb.value for lb in ts.labels if lb.name == "__name__") for ts in req.timeseries}
    assert names == {"x_seconds_bucket", "x_seconds_sum", "x_seconds_count"}
    assert not any(ts.histograms for ts in req.timeseries)


@pytest.mark.parametrize("histograms", ["native", "classic"])
def test_a_new_series_reaches_remote_write_at_zero_then_at_its_value(histograms):
    """The aggregate's first window of a new host: each counter and histogram at 0, 1 ms
    before the window's close, then at its value (the gauge at its value alone), each
    series' samples in time order in one request Prometheus takes: an empty native
    histogram (no buckets), or classic series each starting at 0."""
    zero, snap = new_host.first_window()
    [(body, n, _)] = remote_write.encode([zero, snap], histograms=histograms)
    req = _prompb()()
    req.ParseFromString(snappy.uncompress(body))
    series = {tuple((lb.name, lb.value) for lb in ts.labels): ts for ts in req.timeseries}
    named: dict[str, list] = {}
    for key, ts in series.items():
        named.setdefault(dict(key)["__name__"], []).append(ts)
    t0, t1 = zero.ts_ms, snap.ts_ms
    [files] = named.pop("file_created_total")
    assert [(s.timestamp, s.value) for s in files.samples] == [(t0, 0.0), (t1, 1.0)]
    [depth] = named.pop("queue_depth")
    assert [(s.timestamp, s.value) for s in depth.samples] == [(t1, 3.0)]
    if histograms == "native":
        assert sorted(named) == ["request_size_bytes", "syscall_latency_nanoseconds"]
        for name, count in (("syscall_latency_nanoseconds", 3), ("request_size_bytes", 1)):
            [ts] = named[name]
            h0, h1 = ts.histograms
            assert (h0.timestamp, h0.count_int, h0.sum, h0.schema, h0.zero_threshold, h0.zero_count_int) == (
                t0, 0, 0.0, 0, ZERO_THRESHOLD, 0
            )  # fmt: skip
            assert not h0.positive_spans and not h0.positive_deltas
            assert (h1.timestamp, h1.count_int) == (t1, count) and h1.positive_spans
        assert n == 2 + 1 + 2 * 2
    else:
        assert not any(ts.histograms for ts in req.timeseries)
        per_histogram = HIST_SLOTS + 2  # its _bucket series, _sum and _count
        assert sum(len(v) for v in named.values()) == 2 * per_histogram
        for ts in (ts for v in named.values() for ts in v):
            first, last = ts.samples
            assert (first.timestamp, first.value, last.timestamp) == (t0, 0.0, t1)
        assert n == 2 + 1 + 2 * 2 * per_histogram


@pytest.mark.parametrize("native_last", [False, True])
def test_a_gauge_and_a_native_histogram_of_one_series_at_one_timestamp_send_one_sample(native_last):
    """A gauge h and a log2 histogram h of the same labels are one Prometheus series
    natively (and a gauge x_nanoseconds one with a histogram x_seconds), which would hold
    a float and a histogram at one timestamp: Prometheus keeps one sample of a series at
    a timestamp (one sent later is refused as another value at it). The request carries
    one, the last given, as of two wire series whose
    labels are alike once sanitised, and the other is counted a duplicate: every sample
    read counted once. (In classic form the histogram is h_bucket, h_sum and h_count,
    another series.)"""
    from prometheus_client import REGISTRY

    labels = {"host.id": "h"}
    gauge = ["h", "gauge", labels, 5.0]
    histogram = ["h", "histogram", labels, {**kernel_histogram([3]), "bounds": log2_bounds(HIST_SLOTS)}]
    rows = [gauge, histogram] if native_last else [histogram, gauge]
    duplicates = REGISTRY.get_sample_value("ktel_exporter_duplicate_samples_total") or 0.0
    [(body, n, _)] = remote_write.encode([MetricSnapshot(1000, rows)])
    req = _prompb()()
    req.ParseFromString(snappy.uncompress(body))
    [ts] = req.timeseries
    assert [(lb.name, lb.value) for lb in ts.labels] == [("__name__", "h"), ("host_id", "h")]
    if native_last:
        assert not ts.samples and [(h.timestamp, h.count_int) for h in ts.histograms] == [(1000, 1)]
    else:
        assert not ts.histograms and [(s.timestamp, s.value) for s in ts.samples] == [(1000, 5.0)]
    assert n == 1
    assert REGISTRY.get_sample_value("ktel_exporter_duplicate_samples_total") == duplicates + 1


async def test_a_receiver_without_native_histograms_is_retried_with_what_to_change():
    """Prometheus 2.x started without the feature answers 500: transient (retried, nothing
    lost), and the error says which flag or setting fixes it."""
    answer = httpx.Response(500, text="native histograms are disabled\n")
    async with Receiver(RemoteWriteConfig(url="http://prometheus/api/v1/write")) as receiver:
        receiver.client = httpx.AsyncClient(transport=httpx.MockTransport(lambda _req: answer))
        with pytest.raises(
            Transient, match="enable-feature=native-histograms.*KTEL_REMOTE_WRITE__HISTOGRAMS"
        ):
            await remote_write.post(receiver, b"")
