import dataclasses

from ktel.wire import FILE_CREATED, KTEL_LOG, KTEL_SPAN, RawBatch, decode_batch, encode_batch
from ktel.wire.raw import MAX_WEIGHT
from processors.sample_core import Options, Sample, Sampler, observe_host


def stream(batches: int, per_batch: int, flags=0o101, host="h"):
    ev = [FILE_CREATED.id, 1, 2, 2, 0, "c", "/d/f", flags, False]
    return [RawBatch(host, "b", s, 1, [list(ev) for _ in range(per_batch)]) for s in range(batches)]


def weighted(batches) -> float:
    return sum(sum(b.weights) if b.weights else len(b.events) for b in batches)


def test_baseline_sampling_keeps_a_tenth_and_weighted_count_is_within_2_percent():
    s = Sampler(Options(baseline=0.1))
    out = [s.sample(b) for b in stream(100, 1000)]
    kept = sum(len(b.events) for b in out)
    assert 9_000 < kept < 11_000
    assert abs(weighted(out) - 100_000) / 100_000 < 0.02
    assert s.sampled_out == 100_000 - kept


def test_incoming_weights_are_honoured():
    s = Sampler(Options(baseline=0.5))
    src = [dataclasses.replace(b, weights=[10.0] * len(b.events)) for b in stream(50, 1000)]
    assert abs(weighted([s.sample(b) for b in src]) - 500_000) / 500_000 < 0.02


def test_rare_kinds_and_slow_events_are_always_kept_with_their_weight():
    s = Sampler(Options(baseline=0.01, keep_kinds=frozenset({"file_created"})))
    out = [s.sample(b) for b in stream(10, 100)]
    assert sum(len(b.events) for b in out) == 1000 and all(b.weights is None for b in out)
    slow = Sampler(Options(baseline=0.01, keep_slow={"file_created": ("flags", 0o200)}))
    out = [slow.sample(b) for b in stream(10, 100, flags=0o301)]  # O_EXCL set: "slow"
    assert sum(len(b.events) for b in out) == 1000


def test_sampling_is_deterministic_per_batch():
    b = stream(1, 1000)[0]
    assert Sampler(Options(baseline=0.3)).sample(b) == Sampler(Options(baseline=0.3)).sample(b)


def test_budget_lowers_a_kinds_rate_and_keeps_counts_unbiased():
    opts = Options(budget_per_s={"file_created": 100.0}, window_seconds=10.0)
    s = Sampler(opts)
    first = [s.sample(b) for b in stream(10, 1000)]  # 10 000 events in a 10 s window: 1000/s
    s.end_window()
    second = [s.sample(b) for b in stream(10, 1000, host="h2")]
    assert weighted(first) == 10_000
    kept = sum(len(b.events) for b in second)
    assert 800 < kept < 1200  # budget 100/s over 10 s
    assert abs(weighted(second) - 10_000) / 10_000 < 0.1  # unbiased (fewer samples: wider bound)
    s.end_window(share=0.5)  # half the partitions: half the budget; input still 1000/s
    assert abs(s.kind_p[FILE_CREATED.id] - 0.05) < 1e-9


def test_one_event_claiming_a_huge_weight_samples_no_other_hosts_events_down():
    # Any client can write the topics: one event of weight 2**53 is one event arriving.
    opts = Options(budget_per_s={"file_created": 100.0}, window_seconds=10.0)
    s = Sampler(opts)
    [forged] = stream(1, 1, host="forger")
    s.sample(dataclasses.replace(forged, weights=[MAX_WEIGHT]))
    s.sample(stream(1, 500)[0])  # 50/s: under the budget
    s.end_window()
    assert s.kind_p == {}
    after = s.sample(stream(1, 500, host="h2")[0])
    assert len(after.events) == 500 and after.weights is None


def test_an_event_whose_weight_would_pass_the_wires_bound_is_kept_as_it_is():
    s = Sampler(Options(baseline=0.5))
    [b] = stream(1, 200)
    heavy = dataclasses.replace(b, weights=[MAX_WEIGHT / 1.5] * 100 + [1.0] * 100)
    out = s.sample(heavy)
    assert out.weights[:100] == [MAX_WEIGHT / 1.5] * 100  # kept, weight unchanged
    assert 100 < len(out.events) < 200 and max(out.weights) <= MAX_WEIGHT
    decode_batch(encode_batch(out))  # (the next stage takes it)


def test_a_spike_raises_the_hosts_fidelity_and_its_end_restores_it():
    opts = Options(
        window_seconds=1.0, spike_factor=3.0, min_rate=10, raised_sample_every=1, normal_sample_every=10
    )
    st: dict = {}
    cmds = []
    # The first window is the host's partial one: only from its first batch on.
    for window, rate in enumerate([30, 100, 110, 90, 100, 1000, 1200, 100, 100]):
        st["count"] = float(rate)
        cmds.append(observe_host(st, "h1", ["file_created"], 1000 * window, opts))
    assert [len(c) for c in cmds] == [0, 0, 0, 0, 0, 1, 0, 1, 0]
    raise_, restore = cmds[5][0], cmds[7][0]
    assert (raise_.target, raise_.probe, raise_.sample_every) == ("h1", "file_created", 1)
    # A duration for the agent's clock, and the deadline on this one's for older agents.
    assert (raise_.ttl_ms, raise_.until_ms) == (300_000, 5000 + 300_000)
    assert (restore.target, restore.sample_every) == ("h1", 10)
    assert 95 < st["ewma"] < 105  # the spike did not leak into the baseline
    # The restore ends the raise (the agent's configured rate comes back); an agent that
    # predates restores reads the normal rate for a TTL instead.
    assert restore.restore and not raise_.restore
    assert (restore.ttl_ms, restore.until_ms) == (300_000, 7000 + 300_000)


def test_by_default_kernel_error_spans_and_kernel_logs_are_all_kept():
    def span(status: int) -> list:
        return [KTEL_SPAN.id, 1, 2, 2, bytes(16), bytes(8), b"", "op", 0, 1, status, {}]

    log = [KTEL_LOG.id, 1, 2, 2, 13, "slow", {}, b"", b""]
    events = [span(2)] * 300 + [span(1)] * 3000 + [log] * 200
    s = Sampler(Options(baseline=0.1))
    out = [s.sample(RawBatch("h", "b", seq, 1, events)) for seq in range(10)]
    kept = [ev for b in out for ev in b.events]
    assert sum(1 for ev in kept if ev[0] == KTEL_SPAN.id and ev[10] == 2) == 3000
    assert sum(1 for ev in kept if ev[0] == KTEL_LOG.id) == 2000
    ok = [
        w
        for b in out
        for ev, w in zip(b.events, b.weights, strict=True)
        if ev[0] == KTEL_SPAN.id and ev[10] == 1
    ]
    assert 0 < len(ok) < 30_000 * 0.2 and abs(sum(ok) - 30_000) / 30_000 < 0.05


def test_a_hosts_first_partial_window_is_no_baseline():
    """A host first seen late in a window (or again after a restart or a rebalance)
    shows few events in it; the steady rate after that is no spike."""
    opts = Options(window_seconds=1.0, spike_factor=3.0, min_rate=10)
    st: dict = {}
    for window, rate in enumerate([5, 100, 100, 100]):
        st["count"] = float(rate)
        assert observe_host(st, "h1", ["file_created"], 1000 * window, opts) == []
    assert st["ewma"] == 100


def closes(opts, windows, st=None):
    """observe_host over (seconds since start, events since the last close) pairs;
    the commands as (window index, sample_every)."""
    st = {} if st is None else st
    out = []
    for i, (t, count) in enumerate(windows):
        st["count"] = float(count)
        out += [(i, c.sample_every) for c in observe_host(st, "h1", ["file_created"], int(t * 1000), opts)]
    return out


def test_a_pause_does_not_lower_the_baseline_and_the_return_is_no_spike():
    opts = Options(window_seconds=1.0, spike_factor=3.0, min_rate=10)
    steady = [(t, 100) for t in range(10)]
    paused = [(t, 0) for t in range(10, 20)]  # the agent away, or the partition elsewhere
    back = [(t, 100) for t in range(20, 30)]
    st: dict = {}
    assert closes(opts, steady + paused + back, st) == []
    assert st["ewma"] == 100


def test_a_late_window_close_is_no_spike():
    """A busy worker's timer fires 3 s late: 4 s of a steady 100/s in one window."""
    opts = Options(window_seconds=1.0, spike_factor=3.0, min_rate=10)
    assert closes(opts, [(t, 100) for t in range(10)] + [(13, 400), (14, 100), (15, 100)]) == []


def test_a_spike_that_lasts_as_long_as_the_raise_becomes_the_baseline():
    opts = Options(
        window_seconds=1.0, spike_factor=3.0, min_rate=10, command_ttl_seconds=30, normal_sample_every=10
    )
    st: dict = {}
    cmds = closes(opts, [(t, 100) for t in range(10)] + [(t, 1000) for t in range(10, 100)], st)
    # Raised when it began; restored, and learnt, when the raise was about to end.
    assert cmds == [(10, 1), (38, 10)]
    assert st["ewma"] == 1000 and not st["anomalous"]


def test_options_from_config_take_every_field_of_the_section_by_its_name():
    from ktel.config import SampleConfig

    section = SampleConfig(keep_kinds=["oom_kill"], window_seconds=2, command_ttl_seconds=7, baseline=0.5)
    opts = Options.from_config(section)
    assert (opts.keep_kinds, opts.window_seconds, opts.command_ttl_seconds) == (frozenset({"oom_kill"}), 2, 7)
    assert opts.baseline == 0.5 and opts.keep_slow == Options().keep_slow  # no config sets keep_slow


def test_the_stage_counts_emitted_and_kept_events_per_kind():
    stage = Sample(Options(baseline=0.1))
    [batch] = stream(1, 1000)
    result = stage.on_batch({}, batch, 0)
    kept = len(result.batch.events)
    assert 0 < kept < 1000
    assert result.kind_counts == {
        "sampler_emitted": {"file_created": 1000},
        "sampler_kept": {"file_created": kept},
    }


def test_a_window_closed_holding_no_partition_makes_no_batch_fail():
    # Mid-rebalance a worker's window may close holding no partition (share 0): its
    # budget share is 0, which made the kind's keep probability 0 and the next batch
    # of the kind, once partitions came back, fail on it (a division by 0).
    s = Sampler(Options(budget_per_s={"file_created": 100.0}, window_seconds=10.0))
    s.sample(stream(1, 2000)[0])
    s.end_window(share=0.0)
    out = s.sample(stream(1, 100, host="h2")[0])
    assert len(out.events) == 100 and out.weights is None
    decode_batch(encode_batch(out))


def test_kernel_codes_gauge_readings_are_always_kept():
    """A gauge's value is its last reading, which no weight stands in for: one sampled out
    left its series at the reading before, for good when it was the last (a queue back to
    0 after a burst). Its counters and histograms are sampled, their weights counting."""
    from ktel.wire import KTEL_METRIC

    gauges = [[KTEL_METRIC.id, 1, 2, "gauge", "queue_depth", {"q": str(i)}, i] for i in range(200)]
    counters = [[KTEL_METRIC.id, 1, 2, "counter", "requests_total", {}, 1] for _ in range(200)]
    s = Sampler(Options(baseline=0.1))
    out = s.sample(RawBatch("h", "b", 0, 1, gauges + counters))
    kept_gauges = [(ev, w) for ev, w in zip(out.events, out.weights, strict=True) if ev[3] == "gauge"]
    assert [ev for ev, _ in kept_gauges] == gauges and all(w == 1.0 for _, w in kept_gauges)
    assert 200 < len(out.events) < 300  # (the counters sampled)
