"""Golden in/out files of the aggregate stage (see tests/golden/aggregate/README.md),
run through the chain `ktel process aggregate` runs: its dedupe guard, then the stage."""

import json

import pytest

from ktel.wire import MetricSnapshot, RawBatch, WireError
from processors import aggregate_core
from processors.chain import Chain
from tests.unit import golden

NOW_MS = 1_700_000_000_000


def by_host(
    snapshots: list[tuple[str, MetricSnapshot]], now_ms: int
) -> tuple[dict[str, MetricSnapshot], dict[str, MetricSnapshot]]:
    """A window's snapshots: each host's, stamped at the window's close, and the one of
    its new series at zero, stamped before and coming before it (ktel.metrics keeps a
    host's records in that order)."""
    values: dict[str, MetricSnapshot] = {}
    zeros: dict[str, MetricSnapshot] = {}
    for host_id, snap in snapshots:
        assert host_id not in values  # (nothing of a host after its snapshot at the close)
        if snap.ts_ms == now_ms:
            values[host_id] = snap
        else:
            assert host_id not in zeros and snap.ts_ms < now_ms and not snap.stale
            zeros[host_id] = snap
    assert zeros.keys() <= values.keys()  # (a zero, then its value)
    return values, zeros


def run(
    opts: aggregate_core.Options, batches: list[RawBatch]
) -> tuple[list[dict], dict[str, list], dict[str, list]]:
    """Per batch its outcome, each host's snapshot rows at the window's end, and those
    of the host's new series at zero, stamped 1 ms before."""
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
    values, zeros = by_host(chain.on_window(aggregate, table, NOW_MS, 1.0).snapshots, NOW_MS)
    for host_id, snap in values.items():
        snapshots[host_id] = sorted(snap.series, key=json.dumps)
    for snap in zeros.values():
        assert snap.ts_ms == NOW_MS - 1
    return outcomes, snapshots, {h: sorted(snap.series, key=json.dumps) for h, snap in sorted(zeros.items())}


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
        values, zeros = by_host(result.snapshots, now_ms)
        snapshots = {
            host_id: {"stale": snap.stale, "series": sorted(snap.series, key=json.dumps)}
            for host_id, snap in sorted(values.items())
        }
        unchanged = result.counts.get("unchanged_series", 0)
        out.append({"at_ms": window["at_ms"], "snapshots": snapshots, "unchanged": unchanged})
        if zeros:
            out[-1]["zeros"] = {
                host_id: {"at_ms": snap.ts_ms - NOW_MS, "series": sorted(snap.series, key=json.dumps)}
                for host_id, snap in sorted(zeros.items())
            }
    return out


def run_case(case: dict) -> dict:
    opts = aggregate_core.Options(**case["options"])
    if "windows" in case:
        return {"windows": run_windows(opts, case["windows"])}
    batches = [RawBatch(b["host"], b["boot"], b["seq"], 0, b["events"], b.get("w")) for b in case["batches"]]
    outcomes, snapshots, zeros = run(opts, batches)
    return {"outcomes": outcomes, "snapshots": snapshots, "zeros": zeros}


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
    outcomes, snapshots, _ = run(opts, batches)
    rows = snapshots["h"]
    assert len(rows) == 501
    overflow = [r for r in rows if r[2].get("otel.metric.overflow") == "true"]
    assert len(overflow) == 1 and overflow[0][3] == 100_000 - 500
    assert sum(o["overflowed"] for o in outcomes) == 100_000 - 500
    assert sum(r[3] for r in rows) == 100_000


def test_samples_per_window_follow_the_series_that_changed_plus_the_refresh():
    """100 hosts of 20 series each; each window 5 hosts change 2 series. After the first
    window (all new, each at zero too), a window emits exactly the series that changed
    and those last emitted refresh_seconds ago or more, each once."""
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

    zeros: list[int] = []

    def window(now_ms: int) -> list:
        values, started = by_host(chain.on_window(aggregate, table, now_ms, 1.0).snapshots, now_ms)
        zeros.append(sum(len(snap.series) for snap in started.values()))
        return [row for snap in values.values() for row in snap.series]

    for h in range(100):
        send(f"h{h}", list(range(20)), NOW_MS - 1)
    assert len(window(NOW_MS)) == 2000
    assert zeros == [2000]
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
    assert zeros == [2000] + [0] * 18  # (no series new after the first window)


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
        values, _ = by_host(chain.on_window(aggregate, table, now, 1.0).snapshots, now)
        return {row[0]: row[3] for snap in values.values() for row in snap.series}

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
        values, _ = by_host(chain.on_window(aggregate, table, at[0], 1.0).snapshots, at[0])
        return {row[0]: row[3] for snap in values.values() for row in snap.series}

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
    [(_, _zero), (_, snap)] = chain.on_window(aggregate, table, NOW_MS, 1.0).snapshots  # (new: at 0 first)
    [row] = snap.series
    assert row[3]["counts"][:3] == [2, 2, 2] and row[3]["count"] == 6
    assert decode_snapshot(encode_snapshot(snap)) == snap
    bad = MetricSnapshot(1, [[row[0], row[1], row[2], {**row[3], "count": 8}]])
    with pytest.raises(WireError, match="histogram count 8 is not the sum of its counts, 6"):
        decode_snapshot(encode_snapshot(bad))


def test_a_histogram_at_the_u64_limit_takes_no_more_and_no_buckets_count_falls():
    """A histogram's count, what its buckets add up to, holds at most 2^64 - 1 (hostile
    counts near the limit). Its buckets' counts are cumulative, and must never fall
    (Prometheus and OTLP read a fall as a reset): a delta that would take it past the
    limit is not added, its events counted in ktel_processor_series_dropped_total{reason=
    "full"}, and the histogram stays as it was, taking later deltas that fit."""
    from ktel.schema import U64
    from ktel.wire import HISTOGRAM_DELTA

    chain = Chain([aggregate_core.Aggregate(aggregate_core.Options(refresh_seconds=3600))])
    [aggregate] = chain.timed()
    table: dict[str, dict] = {}

    def hist(buckets: list[int], name: str = "syscall_latency") -> list:
        return [HISTOGRAM_DELTA.id, 1, 0, name, "ns", {}, sum(buckets), 100, buckets, 1]

    emitted: list[list[int]] = []

    def window(seq: int, events: list[list]) -> dict[str, float]:
        now = NOW_MS + seq * 10_000
        took = chain.on_batch(table.setdefault("h", {}), RawBatch("h", "b", seq, 0, events), now - 1)
        values, _ = by_host(chain.on_window(aggregate, table, now, 1.0).snapshots, now)
        for snap in values.values():
            for row in snap.series:
                assert row[3]["count"] == sum(row[3]["counts"]) <= U64
                emitted.append(row[3]["counts"][:3])
        return took.counts

    assert window(0, [hist([2**63, 2**62, 0])])["events"] == 3 * 2**62
    # 2^62 more would make it 2^64: capped, its second bucket's count would fall by 1.
    assert window(1, [hist([2**62, 0, 0])])["series_dropped_full"] == 2**62
    assert window(2, [hist([0, 0, 5])])["events"] == 5  # (what fits is still taken)
    assert emitted == [[2**63, 2**62, 0], [2**63, 2**62, 5]]
    # At the limit exactly (both buckets' counts exact as floats), then one past it.
    emitted.clear()
    window(3, [hist([2**64 - 2**11, 2**11 - 1], name="at_limit")])
    assert window(4, [hist([0, 1], name="at_limit")])["series_dropped_full"] == 1
    assert emitted == [[2**64 - 2**11, 2**11 - 1]]  # (then unchanged: not emitted again)
    # A delta past the limit alone makes no series at all.
    counts = window(5, [hist([U64, U64, 0], name="forged")])
    assert counts["series_dropped_full"] == float(2 * U64) and len(table["h"]["aggregate"]["series"]) == 2


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
    values, _ = by_host(chain.on_window(aggregate, table, NOW_MS, 1.0).snapshots, NOW_MS)
    assert len(values["h"].series) == 2
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
        if snap.ts_ms == NOW_MS + w * 10_000  # (not the new series at zero before it)
    ]
    assert emitted == [1, 4, 7]  # first counted, then every 30 s


OOM = [3, 1, 42, "hog", 0, 1, 1, 1, 1, 1, 0, 42, "hog"]  # an oom_kill event (ktel/probes/oom_kill.py)


def kernel_metric(mtype: str, name: str, value: float, labels: dict | None = None) -> list:
    from ktel.wire import KTEL_METRIC

    return [KTEL_METRIC.id, 1, 2, mtype, name, labels or {}, value]


def test_a_new_hosts_first_window_starts_its_counters_and_histograms_at_zero():
    """Prometheus' increase() counts from a series' second sample: a host's first OOM
    kill, sent as oom_kills_total 1, was never counted. Each new counter and histogram is
    first emitted at 0, 1 ms before the window's close, in a snapshot of its own before
    the host's; a gauge is no count and has none. A histogram's zero has its buckets,
    each empty, and is one the wire takes."""
    from ktel.wire import decode_snapshot, encode_snapshot

    chain = Chain([aggregate_core.Aggregate(aggregate_core.Options(window_seconds=10))])
    [aggregate] = chain.timed()
    table: dict[str, dict] = {}
    events = [
        OOM,
        kernel_metric("histogram", "wait_ns", 1000),
        kernel_metric("gauge", "queue_depth", 3),
        kernel_metric("counter", "errors_total", 2),
    ]
    chain.on_batch(table.setdefault("h", {}), RawBatch("h", "b", 0, 0, events), NOW_MS - 1)
    [(h1, zero), (h2, snap)] = chain.on_window(aggregate, table, NOW_MS, 1.0).snapshots
    assert (h1, h2, zero.ts_ms, snap.ts_ms, zero.stale) == ("h", "h", NOW_MS - 1, NOW_MS, False)
    values = {row[0]: row for row in snap.series}
    assert sorted(values) == ["errors_total", "oom_kills_total", "queue_depth", "wait_seconds"]
    zeros = {row[0]: row for row in zero.series}
    assert sorted(zeros) == ["errors_total", "oom_kills_total", "wait_seconds"]  # (no gauge)
    for name in ("errors_total", "oom_kills_total"):
        assert zeros[name] == [name, "counter", values[name][2], 0] and values[name][3] > 0
    hist = values["wait_seconds"][3]
    assert hist["count"] == 1
    assert zeros["wait_seconds"] == [
        "wait_seconds",
        "histogram",
        {"host.id": "h"},
        {"count": 0, "sum": 0.0, "bounds": hist["bounds"], "counts": [0] * len(hist["counts"])},
    ]
    assert decode_snapshot(encode_snapshot(zero)) == zero
    # The next window has nothing new: no zeros.
    chain.on_batch(table["h"], RawBatch("h", "b", 1, 0, [OOM]), NOW_MS + 9_999)
    [(_, snap)] = chain.on_window(aggregate, table, NOW_MS + 10_000, 1.0).snapshots
    assert [(row[0], row[3]) for row in snap.series] == [("oom_kills_total", 2.0)]


@pytest.mark.parametrize("refresh_seconds", [3600, 10])  # (no refresh due; one due: the whole host)
def test_a_new_series_of_a_host_held_starts_at_zero(refresh_seconds):
    """A series made since this worker last emitted its host (a new directory, a module's
    error counter with a new label value, a new histogram) is new: 0 first, then its
    value; the series it had are emitted as ever, without a zero."""
    chain, aggregate, table = one_host_emitted(refresh_seconds)
    events = [
        file_event("a"),
        file_event("c"),
        kernel_metric("counter", "errors_total", 1, {"code": "EIO"}),
        kernel_metric("histogram", "wait_ns", 1000),
        kernel_metric("gauge", "queue_depth", 3),
    ]
    chain.on_batch(table["h"], RawBatch("h", "b", 1, 0, events), NOW_MS + 9_999)
    [(_, zero), (_, snap)] = chain.on_window(aggregate, table, NOW_MS + 10_000, 1.0).snapshots
    assert zero.ts_ms == NOW_MS + 9_999  # (1 ms before the close)
    shown = lambda rows: sorted((r[0], r[2].get("directory") or r[2].get("code"), r[3]) for r in rows)  # noqa: E731
    hist = next(r[3] for r in snap.series if r[0] == "wait_seconds")
    empty = {"count": 0, "sum": 0.0, "bounds": hist["bounds"], "counts": [0] * len(hist["counts"])}
    assert shown(zero.series) == [
        ("errors_total", "EIO", 0),
        ("file_created_total", "/c", 0.0),
        ("wait_seconds", None, empty),
    ]
    unchanged = [("file_created_total", "/b", 1.0)] if refresh_seconds == 10 else []  # (refreshed)
    assert shown(snap.series) == sorted(
        [
            ("errors_total", "EIO", 1),
            ("file_created_total", "/a", 2.0),
            ("file_created_total", "/c", 1.0),
            ("queue_depth", None, 3),
            ("wait_seconds", None, hist),
            *unchanged,
        ]
    )


@pytest.mark.parametrize("how", ["held", "restarted", "rebalanced"])
def test_a_host_recovered_from_the_changelog_starts_no_series_at_zero(how):
    """After a restart or a rebalance the worker cannot tell which series a backend
    already has (another worker, or itself before, may have emitted them): a zero after a
    value would read as a counter reset, or be refused as out of order. So a recovered
    host's series, even one made since, start at their value, as they did before zeros;
    only a host this worker kept all along (held) has its new series at zero."""
    chain, aggregate, table = one_host_emitted(refresh_seconds=3600)
    if how == "restarted":  # a new worker, its memory empty, the host's value from the changelog
        chain = Chain([aggregate_core.Aggregate(aggregate_core.Options(refresh_seconds=3600))])
        [aggregate] = chain.timed()
    if how != "held":
        table["h"] = json.loads(json.dumps(table["h"]))  # (as the changelog gives it back)
    chain.on_batch(table["h"], RawBatch("h", "b", 1, 0, [file_event("c")]), NOW_MS + 9_999)
    snaps = chain.on_window(aggregate, table, NOW_MS + 10_000, 1.0).snapshots
    if how == "held":
        [(_, zero), (_, snap)] = snaps
        assert [(r[2]["directory"], r[3]) for r in zero.series] == [("/c", 0.0)]
        assert [(r[2]["directory"], r[3]) for r in snap.series] == [("/c", 1.0)]
    else:
        [(_, snap)] = snaps  # the new series at its value (restarted: every series, memory gone)
        whole = [("/a", 1.0), ("/b", 1.0)] if how == "restarted" else []
        assert sorted((r[2]["directory"], r[3]) for r in snap.series) == [*whole, ("/c", 1.0)]


@pytest.mark.parametrize("late_ms", [0, 300, 9_998])
def test_the_zeros_are_stamped_1_ms_before_their_values(late_ms):
    """A backend needs a new series' 0 before its first value, and nothing more: the
    zeros are stamped 1 ms before the window's close that made them, which is their
    values' time, however late the close ran (its time is when it ran): a new host's
    series, and a new series of a host already emitted."""
    chain, aggregate, table = one_host_emitted(refresh_seconds=3600)
    chain.on_batch(table.setdefault("h2", {}), RawBatch("h2", "b", 0, 0, [file_event("a")]), NOW_MS + 1)
    chain.on_batch(table["h"], RawBatch("h", "b", 1, 0, [file_event("c")]), NOW_MS + 1)
    close = NOW_MS + 10_000 + late_ms
    snaps = chain.on_window(aggregate, table, close, 1.0).snapshots
    assert [(h, s.ts_ms, [r[3] for r in s.series]) for h, s in snaps] == [
        ("h", close - 1, [0.0]),
        ("h", close, [1.0]),
        ("h2", close - 1, [0.0]),
        ("h2", close, [1.0]),
    ]


@pytest.mark.parametrize("late_ms", [0, 300, 9_998])  # (how late the close that forgot it ran)
@pytest.mark.parametrize("by", ["this worker", "another worker"])
def test_a_host_back_after_being_forgotten_starts_again_at_zero_after_its_stale_marker(by, late_ms):
    """A host silent past host_ttl_seconds gets a last snapshot marked stale, which ends
    its series, and is forgotten. Back, its series start again from nothing: at 0 again,
    but after the stale marker (a backend refuses a sample at or before the one it has),
    also when it is back right after the marker, at the next window, and that window
    closes on time after one that closed late; and also when the worker that forgot it
    is not the one that has it back (its partition moved): windows are due on the same
    instants on every worker."""
    opts = aggregate_core.Options(window_seconds=10, host_ttl_seconds=60)
    chain = Chain([aggregate_core.Aggregate(opts)])
    [aggregate] = chain.timed()
    table: dict[str, dict] = {}
    chain.on_batch(table.setdefault("h", {}), RawBatch("h", "b", 0, 0, [file_event("a")]), NOW_MS - 1)
    assert len(chain.on_window(aggregate, table, NOW_MS, 1.0).snapshots) == 2  # (at 0, then 1)
    forgot = NOW_MS + 60_000 + late_ms  # (the window due at +60 s)
    result = chain.on_window(aggregate, table, forgot, 1.0)
    [(_, ended)] = result.snapshots
    assert (result.forget, ended.stale, ended.ts_ms) == (["h"], True, forgot)
    del table["h"]  # (what the runner does with a host forgotten)
    if by == "another worker":
        chain = Chain([aggregate_core.Aggregate(opts)])
        [aggregate] = chain.timed()
    chain.on_batch(table.setdefault("h", {}), RawBatch("h", "b2", 0, 0, [file_event("a")]), forgot + 1)
    [(_, zero), (_, snap)] = chain.on_window(aggregate, table, NOW_MS + 70_000, 1.0).snapshots
    assert ended.ts_ms < zero.ts_ms == snap.ts_ms - 1 and [r[3] for r in zero.series] == [0.0]
    assert snap.ts_ms == NOW_MS + 70_000 and [r[3] for r in snap.series] == [1.0]


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
