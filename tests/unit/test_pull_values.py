"""What the pull endpoint serves (exporters/pull.py LatestValues): only what makes a
valid scrape, one family per Prometheus name, and no series nothing names any more."""

from __future__ import annotations

import string
import tracemalloc

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from exporters import remote_write
from exporters.pull import SWEEP_S, LatestValues
from ktel.wire import MetricSnapshot, decode_snapshot, encode_snapshot
from tests.unit import new_host
from tests.unit.test_remote_write_encode import decode

HIST = {"count": 3, "sum": 1.5, "bounds": [1.0], "counts": [1, 2]}


def scrape(latest: LatestValues) -> dict[str, dict[tuple, float]]:
    """The endpoint's /metrics, parsed as Prometheus would, in both formats it may ask
    for: family -> {(sample name, labels): value}."""
    registry = CollectorRegistry()
    registry.register(latest)
    text = generate_latest(registry).decode()
    out = {
        fam.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}
        for fam in text_string_to_metric_families(text)
    }
    # (OpenMetrics, what Prometheus asks for first, is the stricter: it refuses the
    # whole scrape for one bad line)
    assert {fam.name for fam in parse_openmetrics(generate_openmetrics(registry).decode())} >= set(out)
    return out


@pytest.mark.parametrize(
    ("series", "why"),
    [
        (["", "gauge", {}, 1.0], "no Prometheus name"),
        (["_total", "counter", {}, 1.0], "no Prometheus name"),
        (["ok", "gauge", {"": "v"}, 1.0], "a label with an empty name"),
        (["ok", "gauge", {"host-id": "b"}, 1.0], "a label 'host-id' that names its host as host.id does"),
        (["ok", "gauge", {"__name__": "v"}, 1.0], "a label Prometheus reserves"),
        (["ok", "gauge", {"..x": "v"}, 1.0], "a label Prometheus reserves"),
        (["ok", "histogram", {"le": "1"}, HIST], "a label Prometheus reserves"),
        (["up", "gauge", {}, 1.0], "a gauge, but up is served as a counter"),
        (["up_total", "gauge", {}, 1.0], "a gauge ending in _total, as Prometheus names a counter's samples"),
        (["up_total", "histogram", {}, HIST], "a histogram ending in _total"),
        (["h_count", "gauge", {}, 1.0], "a gauge ending in _count, as Prometheus names a histogram's series"),
        (["h_bucket", "gauge", {}, 1.0], "a gauge ending in _bucket"),
        (["h.sum", "gauge", {}, 1.0], "a gauge ending in _sum"),
        (["up_created", "gauge", {}, 1.0], "its samples' names clash with those of up"),
        (["up_created", "histogram", {}, HIST], "its samples' names clash with those of up"),
        (["ok", "histogram", {}, {**HIST, "sum": -1.5}], "a histogram with a sum or a bucket bound below"),
        (
            ["ok", "histogram", {}, {**HIST, "bounds": [-1.0]}],
            "a histogram with a sum or a bucket bound below",
        ),
    ],
)
def test_a_series_the_endpoint_cannot_serve_is_refused_alone_and_every_scrape_stays_valid(series, why):
    latest = LatestValues()
    good = MetricSnapshot(1, [["up_total", "counter", {"host.id": "a"}, 1.0]])
    assert latest.split(good) == (good.series, [])
    latest.update(good, 0, 1)
    x = ["x", "gauge", {"host.id": "a"}, 2.0]
    served, [(refused, reason)] = latest.split(MetricSnapshot(2, [x, series]))
    assert (served, refused) == ([x], series) and why in reason
    latest.update(MetricSnapshot(2, served), 0, 2)
    # A stale one is refused too: it would leave what it names behind, empty.
    [(_, reason)] = latest.split(MetricSnapshot(3, [series], stale=True))[1]
    assert why in reason
    assert scrape(latest) == {
        "up": {("up_total", (("host_id", "a"),)): 1.0},
        "x": {("x", (("host_id", "a"),)): 2.0},
    }


def test_histograms_whose_sum_and_bounds_are_not_below_zero_are_served():
    rows = [
        ["only_inf", "histogram", {}, {"count": 2, "sum": 0.0, "bounds": [], "counts": [2]}],
        ["from_zero", "histogram", {}, {"count": 1, "sum": 0.0, "bounds": [0.0, 1.0], "counts": [1, 0, 0]}],
    ]
    latest = LatestValues()
    assert latest.split(MetricSnapshot(1, rows)) == (rows, [])
    latest.update(MetricSnapshot(1, rows), 0, 1)
    assert set(scrape(latest)) == {"only_inf", "from_zero"}


def test_two_types_of_one_name_within_a_snapshot_are_refused():
    latest = LatestValues()
    snap = MetricSnapshot(1, [["a.b", "gauge", {}, 1.0], ["a_b", "histogram", {}, HIST]])
    [(_, why)] = latest.split(snap)[1]
    assert "a histogram, but a_b is served as a gauge" in why
    snap = MetricSnapshot(1, [["h", "histogram", {}, HIST], ["h_created", "gauge", {}, 1.0]])
    [(_, why)] = latest.split(snap)[1]
    assert "its samples' names clash with those of h" in why


def test_a_series_of_a_name_another_types_series_have_is_refused_whatever_came_first():
    """A gauge h_count would be taken for the count of a histogram h, and a gauge c_total
    for a counter c's samples: such a gauge is refused by its name, whether it comes
    before what it clashes with, after it, or alone, as the remote-write exporter and
    every other endpoint refuse it. Which of the two is served does not depend on which
    this endpoint read first."""
    rows = [
        ["h", "histogram", {"host.id": "a"}, HIST],
        ["h_count", "gauge", {"host.id": "b"}, 7.0],
        ["c", "counter", {"host.id": "a"}, 2.0],
        ["c_total", "gauge", {"host.id": "b"}, 9.0],
    ]
    for order in (rows, rows[::-1]):
        latest = LatestValues()
        refused = []
        for offset, row in enumerate(order):
            served, out = latest.split(MetricSnapshot(1, [row]))
            latest.update(MetricSnapshot(1, served), 0, offset)
            refused += [name for (name, *_), _why in out]
        assert sorted(refused) == ["c_total", "h_count"]
        host = (("host_id", "a"),)
        assert scrape(latest) == {
            "h": {
                ("h_bucket", (*host, ("le", "1.0"))): 1.0,
                ("h_bucket", (*host, ("le", "+Inf"))): 3.0,
                ("h_count", host): 3.0,
                ("h_sum", host): 1.5,
            },
            "c": {("c_total", host): 2.0},
        }


def test_a_counter_is_served_as_its_total_as_remote_write_sends_it():
    """A counter named without _total: its samples are x_total, as the text format's
    # TYPE line and OpenMetrics name them (a sample x under # TYPE x_total was another,
    untyped metric, and refused in OpenMetrics); a counter x_total is the same series."""
    latest = LatestValues()
    latest.update(MetricSnapshot(1, [["ops", "counter", {"host.id": "a"}, 3.0]]), 0, 1)
    latest.update(MetricSnapshot(2, [["ops_total", "counter", {"host.id": "b"}, 4.0]]), 0, 2)
    assert scrape(latest) == {
        "ops": {("ops_total", (("host_id", "a"),)): 3.0, ("ops_total", (("host_id", "b"),)): 4.0}
    }
    latest.update(MetricSnapshot(3, [["ops_total", "counter", {"host.id": "a"}, 5.0]]), 0, 3)
    assert scrape(latest)["ops"][("ops_total", (("host_id", "a"),))] == 5.0


def test_a_counter_named_total_total_is_typed_as_its_samples_are_named():
    """A counter x_total_total: its samples are x_total_total (as remote-write sends it),
    served under # TYPE x_total_total counter, not # TYPE x_total (prometheus_client's
    counter family took a name ending in _total for its samples' and cut it), which
    left them another, untyped metric, and OpenMetrics refused the scrape."""
    latest = LatestValues()
    latest.update(MetricSnapshot(1, [["ops_total_total", "counter", {"host.id": "a"}, 3.0]]), 0, 1)
    assert remote_write.metric_name("ops_total_total", "counter") == "ops_total_total"
    assert scrape(latest) == {"ops_total": {("ops_total_total", (("host_id", "a"),)): 3.0}}
    registry = CollectorRegistry()
    registry.register(latest)
    assert "# TYPE ops_total_total counter\nops_total_total{" in generate_latest(registry).decode()


def test_a_family_gone_frees_its_names():
    latest = LatestValues()
    latest.update(MetricSnapshot(1, [["h", "histogram", {}, HIST]]), 0, 1)
    gauge = MetricSnapshot(2, [["h_created", "gauge", {}, 1.0]])
    assert latest.split(gauge)[1] != []
    latest.update(MetricSnapshot(3, [["h", "histogram", {}, HIST]], stale=True), 0, 2)
    assert latest.split(gauge) == (gauge.series, []) and latest.claimed == {}


def test_a_clashing_series_keeps_no_other_hosts_series_off_the_endpoint():
    """One writer's series of a known family under another type (here a gauge named as a
    host's counter) is refused alone: every host's snapshot naming that family is still
    served, and it too, but for the clashing series."""
    latest = LatestValues()
    latest.update(MetricSnapshot(1, [["tcp_retransmits", "gauge", {"host.id": "x"}, 1.0]]), 0, 1)
    counter = ["tcp_retransmits_total", "counter", {"host.id": "b"}, 5.0]
    cpus = ["ktel_node_cpus", "gauge", {"host.id": "b"}, 4.0]
    served, refused = latest.split(MetricSnapshot(2, [counter, cpus]))
    assert served == [cpus] and [row for row, _ in refused] == [counter]


def test_names_alike_once_sanitised_are_one_family_as_they_are_one_series_in_prometheus():
    latest = LatestValues()
    latest.update(MetricSnapshot(1, [["net.rx", "gauge", {"host.id": "a"}, 1.0]]), 0, 1)
    latest.update(MetricSnapshot(2, [["net_rx", "gauge", {"host.id": "b"}, 2.0]]), 0, 2)
    latest.update(MetricSnapshot(3, [["net_rx", "gauge", {"host.id": "a"}, 3.0]]), 0, 3)
    assert scrape(latest) == {
        "net_rx": {("net_rx", (("host_id", "a"),)): 3.0, ("net_rx", (("host_id", "b"),)): 2.0}
    }


def test_names_alike_in_one_snapshot_are_served_at_the_value_remote_write_sends():
    """Two series of one snapshot that are one Prometheus series (``a.b`` and ``a_b``, a
    counter's ``x`` and ``x_total``): the endpoint serves the last, as the remote-write
    exporter sends the last (both outputs serve the same values)."""
    rows = [
        ["net.rx", "gauge", {"host.id": "a"}, 1.0],
        ["net_rx", "gauge", {"host.id": "a"}, 2.0],
        ["ops", "counter", {"host.id": "a"}, 3.0],
        ["ops_total", "counter", {"host.id": "a"}, 4.0],
    ]
    snap = MetricSnapshot(1, rows)
    sent = {
        next(lb.value for lb in ts.labels if lb.name == "__name__"): ts.samples[0].value
        for body, _n, _keys in remote_write.encode([snap])
        for ts in decode(body).timeseries
    }
    latest = LatestValues()
    latest.update(snap, 0, 1)
    host = (("host_id", "a"),)
    assert scrape(latest) == {
        "net_rx": {("net_rx", host): sent["net_rx"]},
        "ops": {("ops_total", host): sent["ops_total"]},
    }
    assert sent == {"net_rx": 2.0, "ops_total": 4.0}


def test_series_no_snapshot_named_for_5_minutes_are_no_longer_served():
    now = [1000.0]
    latest = LatestValues(clock=lambda: now[0], wall=lambda: 0.0)  # (each read as it is made)
    latest.update(MetricSnapshot(1, [["g", "gauge", {"host.id": "gone"}, 1.0]]), 0, 1)
    latest.update(MetricSnapshot(1, [["g", "gauge", {"host.id": "live"}, 1.0]]), 0, 2)
    latest.update(MetricSnapshot(1, [["h_seconds", "histogram", {"host.id": "gone"}, HIST]]), 0, 3)
    now[0] += 200
    latest.update(MetricSnapshot(2, [["g", "gauge", {"host.id": "live"}, 2.0]]), 0, 4)  # refreshed
    assert latest.expire() == 0
    now[0] += 101
    assert latest.expire() == 2
    assert scrape(latest) == {"g": {("g", (("host_id", "live"),)): 2.0}}
    assert set(latest.families) == {"g"}


def test_a_series_read_late_expires_5_minutes_after_its_snapshot_was_made():
    """The workers down, the endpoint restarted: the last snapshot, 140 s old when its
    lookback is read, is not served as fresh for 5 minutes more, but for 160 s."""
    now = [1000.0]
    made_s = 1_700_000_000.0
    latest = LatestValues(clock=lambda: now[0], wall=lambda: made_s + 140 + (now[0] - 1000))
    latest.update(MetricSnapshot(int(made_s * 1000), [["g", "gauge", {"host.id": "a"}, 1.0]]), 0, 1)
    now[0] += 159
    assert latest.expire() == 0
    now[0] += SWEEP_S + 2  # (past 300 s after it was made)
    assert latest.expire() == 1


def test_a_live_series_read_late_is_served_until_its_next_refresh_is_read():
    """Read 200 s behind its worker (a lagging endpoint, or a clock ahead of the worker's),
    a live series sent again every 120 s must not expire between two of its snapshots."""
    now = [1000.0]
    made_s = 1_700_000_000.0
    latest = LatestValues(clock=lambda: now[0], wall=lambda: made_s + 200 + (now[0] - 1000))
    latest.update(MetricSnapshot(int(made_s * 1000), [["g", "gauge", {"host.id": "a"}, 1.0]]), 0, 1)
    now[0] += 119  # (its next snapshot, 120 s later, is read 200 s late too)
    assert latest.expire() == 0 and latest.families


def test_the_series_are_swept_at_most_every_sweep_s():
    """(a sweep walks every series: not at each of the many fetches a second)"""
    now = [0.0]
    latest = LatestValues(clock=lambda: now[0], wall=lambda: 0.0)
    latest.update(MetricSnapshot(1, [["g", "gauge", {"host.id": "a"}, 1.0]]), 0, 1)
    now[0] = 296.0
    assert latest.expire() == 0  # (swept: not 5 minutes old yet)
    now[0] = 296.0 + SWEEP_S - 1
    assert latest.expire() == 0 and latest.families  # 5 minutes old, but swept just now
    now[0] = 296.0 + SWEEP_S
    assert latest.expire() == 1


def test_a_new_series_is_served_at_zero_then_at_its_value():
    """The aggregate's first window of a new host: its counters and histograms at 0, then
    every series at its value, the two snapshots one after the other in the host's
    partition. A scrape between the two serves the zeros (a valid scrape, an empty
    histogram's buckets at 0), one after them the values."""
    zero, snap = new_host.first_window()
    latest = LatestValues()
    latest.update(zero, 0, 1)
    served = scrape(latest)
    assert set(served) == {"file_created", "syscall_latency_seconds", "request_size_bytes"}
    assert {
        v for fam in served.values() for (name, _), v in fam.items() if not name.endswith("_created")
    } == {0.0}
    latest.update(snap, 0, 2)
    served = scrape(latest)
    assert served["file_created"][("file_created_total", (("directory", "/tmp"), ("host_id", "h")))] == 1.0
    assert served["syscall_latency_seconds"][("syscall_latency_seconds_count", (("host_id", "h"),))] == 3.0
    assert served["request_size_bytes"][("request_size_bytes_count", (("host_id", "h"),))] == 1.0
    assert served["queue_depth"] == {("queue_depth", (("host_id", "h"),)): 3.0}


@pytest.mark.parametrize("typ", ["gauge", "histogram"])
def test_a_scrape_reads_its_samples_labels_in_place(typ):
    """A scrape holds every sample of a family at once, each with its labels: with a dict
    of its own each, series of 52 labels took 7 times their text at the peak of a scrape
    (about 3 KB a sample). Each sample now reads its series' labels in place: the scrape
    takes about its text three times over (each line, the text joined, the bytes), and
    serves the same."""
    labels = {c: "vv" for c in string.ascii_letters if c != "a"}
    rows = [["m", typ, {**labels, "a": str(i)}, 1.0 if typ == "gauge" else HIST] for i in range(1000)]
    latest = LatestValues()
    latest.update(decode_snapshot(encode_snapshot(MetricSnapshot(1, rows))), 0, 1)
    registry = CollectorRegistry()
    registry.register(latest)
    tracemalloc.start()
    try:
        text = generate_latest(registry)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(text)
    served = scrape(latest)["m"]
    seven = tuple(sorted({**labels, "a": "7"}.items()))
    if typ == "gauge":
        assert len(served) == 1000 and served[("m", seven)] == 1.0
    else:
        assert len(served) == 4000
        assert served[("m_bucket", tuple(sorted({**labels, "a": "7", "le": "1.0"}.items())))] == 1.0
        assert served[("m_bucket", tuple(sorted({**labels, "a": "7", "le": "+Inf"}.items())))] == 3.0
        assert served[("m_sum", seven)] == 1.5 and served[("m_count", seven)] == 3.0
