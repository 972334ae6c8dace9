"""Golden in/out files of the aggregate stage (see tests/golden/aggregate/README.md),
run through the chain `ktel process aggregate` runs: its dedupe guard, then the stage."""

import json

import pytest

from ktel.wire import RawBatch, WireError
from processors import aggregate_core
from processors.chain import Chain
from tests.unit import golden

NOW_MS = 1_700_000_000_000


def run(opts: aggregate_core.Options, batches: list[RawBatch]) -> tuple[list[dict], dict[str, list]]:
    """Per batch its outcome, and each host's snapshot rows at the window's end."""
    chain = Chain([aggregate_core.Aggregate(opts)])
    table: dict[str, dict] = {}
    outcomes = []
    for batch in batches:
        result = chain.on_batch(table.setdefault(batch.host_id, {}), batch, NOW_MS)
        outcomes.append(
            {
                "duplicate": result.batch is None,
                "counted": result.counts.get("events", 0),
                "overflowed": result.counts.get("overflowed", 0),
            }
        )
    [aggregate] = chain.timed()
    snapshots: dict[str, list] = {h: [] for h in sorted(table)}  # a host with nothing counted: no record
    for host_id, snap in chain.on_window(aggregate, table, NOW_MS, 1.0).snapshots:
        assert snap.ts_ms == NOW_MS
        snapshots[host_id] = sorted(snap.series, key=json.dumps)
    return outcomes, snapshots


def run_windows(opts: aggregate_core.Options, windows: list[dict]) -> list[dict]:
    """Each window's batches (stamped just before it), then the window: what it emits,
    and how many series it left out as unchanged."""
    chain = Chain([aggregate_core.Aggregate(opts)])
    [aggregate] = chain.timed()
    table: dict[str, dict] = {}
    out = []
    for window in windows:
        now_ms = NOW_MS + window["at_ms"]
        for b in window["batches"]:
            batch = RawBatch(b["host"], b["boot"], b["seq"], 0, b["events"], b.get("w"))
            chain.on_batch(table.setdefault(batch.host_id, {}), batch, now_ms - 1)
        result = chain.on_window(aggregate, table, now_ms, 1.0)
        for host_id in result.forget:
            del table[host_id]
        snapshots = {
            host_id: {"stale": snap.stale, "series": sorted(snap.series, key=json.dumps)}
            for host_id, snap in sorted(result.snapshots)
        }
        unchanged = result.counts.get("unchanged_series", 0)
        out.append({"at_ms": window["at_ms"], "snapshots": snapshots, "unchanged": unchanged})
    return out


def run_case(case: dict) -> dict:
    opts = aggregate_core.Options(**case["options"])
    if "windows" in case:
        return {"windows": run_windows(opts, case["windows"])}
    batches = [RawBatch(b["host"], b["boot"], b["seq"], 0, b["events"], b.get("w")) for b in case["batches"]]
    outcomes, snapshots = run(opts, batches)
    return {"outcomes": outcomes, "snapshots": snapshots}


@pytest.mark.parametrize("name", golden.cases("aggregate"))
def test_golden(name):
    golden.check("aggregate", name, run_case(golden.load("aggregate", name)))


def test_directory_label():
    d = aggregate_core.directory_label
    assert d("/tmp/somewhere/ktel-demo", 3) == "/tmp/somewhere"
    assert d("/a/b/c/d/e", 2) == "/a/b"
    assert d("/file-at-root", 3) == "/"
    assert d("rel/x/y", 3) == "rel"
    assert d("y", 3) == "."


def test_100_000_distinct_label_values_stay_within_the_limit_plus_overflow():
    opts = aggregate_core.Options(directory_depth=3, max_series=500)
    ev = lambda i: [1, 1, 2, 2, 0, "c", f"/d/{i}/f", 0o101, False]  # noqa: E731
    batches = [RawBatch("h", "b", seq, 0, [ev(seq * 1000 + i) for i in range(1000)]) for seq in range(100)]
    outcomes, snapshots = run(opts, batches)
    rows = snapshots["h"]
    assert len(rows) == 501
    overflow = [r for r in rows if r[2].get("otel.metric.overflow") == "true"]
    assert len(overflow) == 1 and overflow[0][3] == 100_000 - 500
    assert sum(o["overflowed"] for o in outcomes) == 100_000 - 500
    assert sum(r[3] for r in rows) == 100_000


def test_samples_per_window_follow_the_series_that_changed_plus_the_refresh():
    """100 hosts of 20 series each; each window 5 hosts change 2 series. After the first
    window (all new), a window emits exactly the series that changed and those last
    emitted refresh_seconds ago or more, each once."""
    opts = aggregate_core.Options(
        directory_depth=1, window_seconds=10, refresh_seconds=60, host_ttl_seconds=3600
    )
    chain = Chain([aggregate_core.Aggregate(opts)])
    [aggregate] = chain.timed()
    table: dict[str, dict] = {}
    ev = lambda d: [1, 1, 2, 2, 0, "c", f"/d{d}/f", 0o101, False]  # noqa: E731
    seq: dict[str, int] = {}

    def send(host: str, dirs: list[int], now_ms: int) -> None:
        seq[host] = seq.get(host, -1) + 1
        chain.on_batch(
            table.setdefault(host, {}), RawBatch(host, "b", seq[host], 0, [ev(d) for d in dirs]), now_ms
        )

    def window(now_ms: int) -> list[list]:
        return [
            row for _, snap in chain.on_window(aggregate, table, now_ms, 1.0).snapshots for row in snap.series
        ]

    for h in range(100):
        send(f"h{h}", list(range(20)), NOW_MS - 1)
    assert len(window(NOW_MS)) == 2000
    last_emitted = {(f"h{h}", f"/d{d}"): NOW_MS for h in range(100) for d in range(20)}
    emitted = []
    for w in range(1, 19):
        now = NOW_MS + w * 10_000
        changed = {(f"h{(w * 5 + i) % 100}", f"/d{(w + j) % 20}") for i in range(5) for j in range(2)}
        for host in {h for h, _ in changed}:
            send(host, [int(d[2:]) for h, d in changed if h == host], now - 1)
        rows = window(now)
        due = {k for k, t in last_emitted.items() if now - t >= 60_000} - changed
        got = [(r[2]["host.id"], r[2]["directory"]) for r in rows]
        assert sorted(got) == sorted(changed | due)  # each once
        for k in got:
            last_emitted[k] = now
        emitted.append(len(rows))
    # No series here changes twice within a refresh period, so each is emitted once per
    # period (a change stands in for its refresh): 2000 per 6 windows, not 2000 a window.
    assert sum(emitted) == 2000 * 18 // 6


def test_a_histogram_or_gauge_is_emitted_again_only_when_what_it_shows_changed():
    """A window compares what each series shows (a histogram's count, sum and buckets; a
    gauge's value) with what it last emitted: the same again is left out, any change,
    even a bucket moved with the count and sum kept, is emitted whole."""
    from ktel.wire import HISTOGRAM_DELTA, KTEL_METRIC

    chain = Chain([aggregate_core.Aggregate(aggregate_core.Options(refresh_seconds=3600))])
    [aggregate] = chain.timed()
    table: dict[str, dict] = {}

    def hist(buckets: list[int], total: int) -> list:
        return [
            HISTOGRAM_DELTA.id,
            1,
            0,
            "syscall_latency",
            "ns",
            {"syscall.id": 1},
            sum(buckets),
            total,
            buckets,
            1,
        ]

    def gauge(value: float) -> list:
        return [KTEL_METRIC.id, 1, 2, "gauge", "ktel_demo_queue_depth", {}, value]

    def window(seq: int, events: list[list]) -> dict[str, object]:
        now = NOW_MS + seq * 10_000
        chain.on_batch(table.setdefault("h", {}), RawBatch("h", "b", seq, 0, events), now - 1)
        return {
            row[0]: row[3]
            for _, snap in chain.on_window(aggregate, table, now, 1.0).snapshots
            for row in snap.series
        }

    first = window(0, [hist([0, 2, 1], 300), gauge(5.0)])
    assert first["ktel_demo_queue_depth"] == 5.0
    assert first["syscall_latency_seconds"]["counts"][:3] == [0, 2, 1]
    assert window(1, [hist([0, 0, 0], 0), gauge(5.0)]) == {}  # nothing it shows changed
    moved = window(2, [hist([1, -1, 0], 0)])  # (a forged delta: count and sum as they were)
    assert moved["syscall_latency_seconds"]["counts"][:3] == [1, 1, 1]
    assert window(3, [gauge(7.0)]) == {"ktel_demo_queue_depth": 7.0}


def test_a_gauge_keeps_the_value_of_its_streams_latest_batch_whatever_the_order_they_come_in():
    """A batch refused and re-driven later (ktel dlq --redrive) is counted after newer
    ones of its host: its counters add up as ever, but its gauge value is older than the
    one held and must not replace it. A new boot's batch sets it, whatever its number."""
    from ktel.wire import KTEL_METRIC

    chain = Chain([aggregate_core.Aggregate(aggregate_core.Options(refresh_seconds=3600))])
    [aggregate] = chain.timed()
    table: dict[str, dict] = {}
    at = [NOW_MS]

    def shown(boot: str, seq: int, depth: float) -> dict[str, object]:
        events = [
            [KTEL_METRIC.id, 1, 2, "gauge", "ktel_demo_queue_depth", {}, depth],
            [KTEL_METRIC.id, 1, 2, "counter", "ktel_demo_ops_total", {}, 1],
        ]
        chain.on_batch(table.setdefault("h", {}), RawBatch("h", boot, seq, 0, events), at[0])
        at[0] += 10_000
        snaps = chain.on_window(aggregate, table, at[0], 1.0).snapshots
        return {row[0]: row[3] for _, snap in snaps for row in snap.series}

    assert shown("b1", 5, 7.0) == {"ktel_demo_queue_depth": 7.0, "ktel_demo_ops_total": 1}
    # An older batch of the boot, re-driven: counted, its gauge value left out.
    assert shown("b1", 3, 2.0) == {"ktel_demo_ops_total": 2}
    assert shown("b1", 6, 4.0) == {"ktel_demo_queue_depth": 4.0, "ktel_demo_ops_total": 3}
    # The host rebooted: its new numbering starts at 0.
    assert shown("b2", 0, 9.0) == {"ktel_demo_queue_depth": 9.0, "ktel_demo_ops_total": 4}
    # A gauge stored before the batch that set it was kept takes any batch's value.
    [key] = [k for k, v in table["h"]["aggregate"]["series"].items() if isinstance(v, dict)]
    table["h"]["aggregate"]["series"][key] = {"gauge": 1.0}
    assert shown("b2", 1, 8.0)["ktel_demo_queue_depth"] == 8.0


def test_a_histograms_count_is_what_its_rounded_buckets_add_up_to():
    """Sampled events weigh fractions, so a histogram's count and its buckets are each
    rounded; a count its buckets do not add up to is one the wire refuses (and
    Prometheus 2 answers with a 500 a remote-write sender retries for ever). So is a
    forged delta's count."""
    from ktel.wire import HISTOGRAM_DELTA, MetricSnapshot, decode_snapshot, encode_snapshot

    chain = Chain([aggregate_core.Aggregate(aggregate_core.Options())])
    [aggregate] = chain.timed()
    table: dict[str, dict] = {}

    def hist(buckets: list[int], count: int) -> list:
        return [HISTOGRAM_DELTA.id, 1, 0, "syscall_latency", "ns", {"syscall.id": 1}, count, 100, buckets, 1]

    events = [hist([1, 0, 0], 1), hist([0, 1, 0], 1), hist([0, 0, 1], 1), hist([0, 0, 0], 5)]
    batch = RawBatch("h", "b", 0, 0, events, [2.5, 2.5, 2.5, 1.0])
    chain.on_batch(table.setdefault("h", {}), batch, NOW_MS - 1)
    [(_, snap)] = chain.on_window(aggregate, table, NOW_MS, 1.0).snapshots
    [row] = snap.series
    assert row[3]["counts"][:3] == [2, 2, 2] and row[3]["count"] == 6
    assert decode_snapshot(encode_snapshot(snap)) == snap
    bad = MetricSnapshot(1, [[row[0], row[1], row[2], {**row[3], "count": 8}]])
    with pytest.raises(WireError, match="histogram count 8 is not the sum of its counts, 6"):
        decode_snapshot(encode_snapshot(bad))


def file_event(directory: str) -> list:
    return [1, 1, 2, 2, 0, "c", f"/{directory}/f", 0o101, False]


def one_host_emitted(refresh_seconds: float) -> tuple[Chain, aggregate_core.Aggregate, dict[str, dict]]:
    """An aggregate chain whose one host "h" counted two series (/a and /b), emitted by a
    first window at NOW_MS."""
    chain = Chain([aggregate_core.Aggregate(aggregate_core.Options(refresh_seconds=refresh_seconds))])
    [aggregate] = chain.timed()
    table: dict[str, dict] = {}
    batch = RawBatch("h", "b", 0, 0, [file_event("a"), file_event("b")])
    chain.on_batch(table.setdefault("h", {}), batch, NOW_MS - 1)
    assert len(chain.on_window(aggregate, table, NOW_MS, 1.0).snapshots[0][1].series) == 2
    return chain, aggregate, table


def test_a_host_back_from_another_worker_is_emitted_whole():
    """A host whose partition went to another worker and came back (or a restarted
    worker): this worker no longer knows what was emitted, so it emits every series."""
    chain, aggregate, table = one_host_emitted(refresh_seconds=120)
    assert chain.on_window(aggregate, table, NOW_MS + 10_000, 1.0).snapshots == []
    assert chain.on_window(aggregate, {}, NOW_MS + 20_000, 0.0).snapshots == []  # the partition moved away
    [(host, snap)] = chain.on_window(aggregate, table, NOW_MS + 30_000, 1.0).snapshots  # and back
    assert (host, len(snap.series), snap.stale) == ("h", 2, False)


def test_a_host_value_recovered_between_two_windows_is_compared_whole():
    """Between two windows a host's value can be replaced by one recovered from the
    changelog (its partition away and back, counted meanwhile by another worker) with
    no batch counted here: the window must still emit what changed in it, not only
    the series this worker's batches touched."""
    chain, aggregate, table = one_host_emitted(refresh_seconds=3600)
    recovered = json.loads(json.dumps(table["h"]))  # (as the changelog gives it back)
    [key_b] = [k for k in recovered["aggregate"]["series"] if "/b" in k]
    recovered["aggregate"]["series"][key_b] += 5  # what the other worker counted
    table["h"] = recovered
    chain.on_batch(table["h"], RawBatch("h", "b", 9, 0, [file_event("a")]), NOW_MS + 9_000)
    rows = chain.on_window(aggregate, table, NOW_MS + 10_000, 1.0).snapshots[0][1].series
    assert sorted((r[2]["directory"], r[3]) for r in rows) == [("/a", 2), ("/b", 6)]


def test_a_host_whose_first_window_found_no_series_has_them_refreshed_once_it_has():
    """A host's first batch may make no series (a kernel log alone): its first window
    emits nothing and finds nothing due for a refresh. A series it counts later must
    still be emitted again every refresh_seconds, or Prometheus ends it after 5 minutes
    without a change."""
    from ktel.wire import KTEL_LOG

    chain = Chain([aggregate_core.Aggregate(aggregate_core.Options(refresh_seconds=30))])
    [aggregate] = chain.timed()
    table: dict[str, dict] = {}
    log = [KTEL_LOG.id, 1, 2, 2, 9, "hello", {}, b"", b""]
    chain.on_batch(table.setdefault("h", {}), RawBatch("h", "b", 0, 0, [log]), NOW_MS - 1)
    assert chain.on_window(aggregate, table, NOW_MS, 1.0).snapshots == []
    chain.on_batch(table["h"], RawBatch("h", "b", 1, 0, [file_event("a")]), NOW_MS + 9_999)
    emitted = [
        w
        for w in range(1, 8)
        for _, snap in chain.on_window(aggregate, table, NOW_MS + w * 10_000, 1.0).snapshots
        if snap.series
    ]
    assert emitted == [1, 4, 7]  # first counted, then every 30 s


def test_kernel_metric_values_their_type_cannot_take_are_dropped_and_counted():
    """A counter only goes up and a histogram's buckets start at 0: a negative increment
    or observation (a bug in the kernel code, or any client writing the topic) would make
    the cumulative counter fall (a restart to Prometheus) or fill a wrong bucket. A gauge
    sent under a counter's name and labels is dropped too, and counted like the others
    (under its own reason)."""
    from ktel.wire import KTEL_METRIC, decode_batch, encode_batch

    def metric(kind: str, name: str, value: int) -> list:
        return [KTEL_METRIC.id, 1, 2, kind, name, {}, value]

    def batch(seq: int, events: list[list]) -> RawBatch:  # (as the wire takes it from the topic)
        return decode_batch(encode_batch(RawBatch("h", "b", seq, 0, events, [2.0] * len(events))))

    chain = Chain([aggregate_core.Aggregate(aggregate_core.Options())])
    value: dict = {}
    first = chain.on_batch(
        value,
        batch(
            0,
            [
                metric("counter", "ktel_demo_ops_total", 5),
                metric("counter", "ktel_demo_ops_total", -3),
                metric("histogram", "ktel_demo_wait_ns", 1000),
                metric("histogram", "ktel_demo_wait_ns", -1000),
            ],
        ),
        NOW_MS,
    )
    assert first.counts["series_dropped_value"] == 2 + 2  # (weighted)
    gauges = [metric("gauge", "ktel_demo_ops_total", 7), metric("gauge", "ktel_demo_ops_total", 8)]
    second = chain.on_batch(value, batch(1, gauges), NOW_MS)
    # (a gauge's value is no count: one each; a gauge's name never ends in _total)
    assert second.counts["series_dropped_name"] == 2
    stored = {aggregate_core.parse_key(k)[0]: v for k, v in value["aggregate"]["series"].items()}
    assert stored["ktel_demo_ops_total"] == 10
    wait = stored["ktel_demo_wait_seconds"]
    assert (wait["count"], wait["sum"], sum(wait["buckets"])) == (2, 2000, 2)
