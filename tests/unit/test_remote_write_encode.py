import snappy
from opentelemetry.exporter.prometheus_remote_write.gen.remote_pb2 import WriteRequest

from exporters import remote_write
from exporters.prom_names import label_name, prom_labels
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


def test_samples_of_a_series_are_in_timestamp_order_and_values_exact():
    labels = {"host.id": "h", "directory": "/d"}
    snaps = [
        MetricSnapshot(3000, [["file_created_total", "counter", labels, 23]]),
        MetricSnapshot(1000, [["file_created_total", "counter", labels, 5], ["g", "gauge", {"a": "b"}, 1.5]]),
        MetricSnapshot(2000, [["file_created_total", "counter", labels, 7]]),
    ]
    [(body, n)] = remote_write.encode(snaps)
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
    reqs = remote_write.encode([MetricSnapshot(1, rows)])
    assert [n for _, n in reqs] == [remote_write.MAX_SERIES_PER_REQUEST, 5]
    assert sum(len(decode(b).timeseries) for b, _ in reqs) == len(rows)
