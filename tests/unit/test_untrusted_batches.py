"""What the processing chains make of batches a buggy or hostile client wrote: a
sequence jump refused with the state unchanged, two boots of one host id counted
as a conflict with both counted, a silent host's series ended and forgotten, and
a host's series, processes and containers kept within their shares of
process.max_state_bytes."""

import copy
import dataclasses
import json
import random

import pytest

from ktel import config
from ktel.config import AggregateConfig
from ktel.wire import FILE_CREATED, KTEL_METRIC, PROCESS_EXEC, PROCESS_EXIT, RawBatch
from processors import aggregate_core, changelog, enrich_core, stages
from processors.chain import Chain, build
from processors.dedupe_core import MAX_SEQUENCE_GAP

NOW = 1_700_000_000_000


def batch(seq: int, boot: str = "b", host: str = "h", n: int = 2) -> RawBatch:
    ev = [FILE_CREATED.id, 1, 2, 2, 0, "c", "/d/f", 0o101, False]
    return RawBatch(host, boot, seq, 1, [list(ev) for _ in range(n)])


def chain(**opts) -> Chain:
    return Chain([aggregate_core.Aggregate(aggregate_core.Options(**opts))])


def test_a_sequence_far_past_its_boots_highest_is_refused_and_changes_nothing():
    c, value = chain(), {}
    assert c.on_batch(value, batch(5), NOW).counts["events"] == 2
    before = copy.deepcopy(value)
    result = c.on_batch(value, batch(5 + MAX_SEQUENCE_GAP + 1), NOW)
    assert (
        result.batch is None
        and "more than" in result.refused
        and "highest its host and boot sent (5)" in result.refused
    )
    assert value == before
    # The real stream goes on, every batch counted; within the bound a gap is fine.
    assert c.on_batch(value, batch(6), NOW).counts["events"] == 2
    assert c.on_batch(value, batch(6 + MAX_SEQUENCE_GAP), NOW).refused is None
    # A boot's first batch may start anywhere: numbering goes on across restarts and boots.
    assert c.on_batch(value, batch(10**15, boot="new"), NOW).refused is None


def test_two_live_boots_of_one_host_id_are_both_counted_and_each_switch_is_a_conflict():
    c, value = chain(), {}
    conflicts = events = 0
    for seq in range(10):
        for boot in ("A", "B"):
            r = c.on_batch(value, batch(seq, boot=boot), NOW)
            conflicts += r.counts.get("host_conflicts", 0)
            events += r.counts.get("events", 0)
    assert events == 40
    assert conflicts == 18  # every batch but the first of each boot came out of turn
    # A reboot (the old boot's batches all before the new one's) is no conflict.
    c2, v2 = chain(), {}
    results = [c2.on_batch(v2, batch(s, boot="old"), NOW) for s in range(3)]
    results += [c2.on_batch(v2, batch(s, boot="new"), NOW) for s in range(3, 6)]
    assert not any(r.counts.get("host_conflicts") for r in results)
    # A re-sent batch of the old boot is a duplicate, not a conflict.
    again = c2.on_batch(v2, batch(1, boot="old"), NOW)
    assert again.counts == {"duplicates": 1}


def test_a_host_silent_past_its_ttl_gets_a_last_stale_snapshot_and_is_forgotten():
    c, table = chain(host_ttl_seconds=60), {"quiet": {}, "busy": {}}
    c.on_batch(table["quiet"], batch(0, host="quiet"), NOW)
    c.on_batch(table["busy"], batch(0, host="busy"), NOW)
    [agg] = c.timed()
    r = c.on_window(agg, table, NOW + 60_000, 1.0)  # exactly the TTL: not yet
    assert not r.forget and all(not s.stale for _h, s in r.snapshots)
    c.on_batch(table["busy"], batch(1, host="busy"), NOW + 50_000)
    r = c.on_window(agg, table, NOW + 60_001, 1.0)
    assert r.forget == ["quiet"]
    stale = {h: s.stale for h, s in r.snapshots}
    assert stale == {"quiet": True, "busy": False}
    quiet_rows = dict((h, s.series) for h, s in r.snapshots)["quiet"]
    assert quiet_rows[0][0] == "file_created_total" and quiet_rows[0][3] == 2


def test_a_host_whose_partition_the_worker_is_still_reading_is_not_forgotten_as_silent():
    """After an outage longer than the TTL every host's last batch is older than that:
    those of a partition whose backlog is still unread (``reading``) keep their series
    and their record of what was counted, so their batches read again count once."""
    c, table = chain(host_ttl_seconds=60), {"h": {}}
    c.on_batch(table["h"], batch(0, host="h"), NOW)
    [agg] = c.timed()
    r = c.on_window(agg, table, NOW + 3_600_000, 1.0, reading={"h"})
    assert not r.forget and r.snapshots and not any(s.stale for _h, s in r.snapshots)
    assert c.on_batch(table["h"], batch(0, host="h"), NOW + 3_600_000).counts == {"duplicates": 1}
    r = c.on_window(agg, table, NOW + 3_661_000, 1.0)  # read up to there: silent since
    assert r.forget == ["h"]


def _metric(name: str, i: int, mtype: str = "histogram") -> list:
    """A ktel_metric event of a series of its own (label ``i``)."""
    return [KTEL_METRIC.id, 1, 2, mtype, name, {"i": str(i)}, 5]


def test_a_host_making_far_more_series_than_fit_stays_within_its_bytes_and_counts_every_event():
    # 20 000 histogram series at ~3 KB each would be 60 MB; the host's state must stay
    # one changelog record.
    max_state = 200_000
    c = Chain([aggregate_core.Aggregate.from_config(AggregateConfig(), max_state)])
    value: dict = {}
    counted = overflowed = dropped = 0
    for seq in range(40):
        if seq < 4:  # four histogram metrics of 500 series each
            events = [_metric(f"m{seq}", i) for i in range(500)]
        else:  # then 3600 counter names
            events = [_metric(f"c{seq}_{i}", i, "counter") for i in range(100)]
        r = c.on_batch(value, RawBatch("h", "b", seq, 1, events), NOW)
        assert r.refused is None and r.batch is not None
        counted += r.counts["events"]
        overflowed += r.counts["overflowed"]
        dropped += r.counts.get("series_dropped_room", 0)
        assert len(json.dumps(value).encode()) <= max_state // 2 + 4096  # (+ the dedupe record)
    # Every event counted, in a series or as dropped (a counter event adds its value, 5).
    assert counted + dropped == 4 * 500 + 36 * 100 * 5
    series = value["aggregate"]["series"]
    overflow = {k: v for k, v in series.items() if "otel.metric.overflow" in k}
    assert {aggregate_core.parse_key(k)[0] for k in overflow} >= {"m0", "m1", "m2", "m3"}
    assert overflowed > 0 and dropped > 0  # counter names beyond even the overflow room
    in_overflow = sum(v["count"] if isinstance(v, dict) else v for v in overflow.values())
    assert in_overflow == overflowed
    # Counts grown to their largest still fit: the bytes were reckoned for them.
    for v in series.values():
        if isinstance(v, dict):
            v.update(count=1.2345678901234567e300, sum=-1.2345678901234567e300)
            v["buckets"] = [1.2345678901234567e300] * len(v["buckets"])
    assert len(json.dumps(value["aggregate"]["series"]).encode()) <= max_state // 2


def test_one_series_sent_as_a_counter_a_gauge_and_a_histogram_keeps_one_type():
    """A sender's error (or a hostile one): one name and labels as several metric types.
    The series keeps the type it has; the other events are counted as dropped instead of
    crashing the stage or being mixed in."""
    c = chain()
    value: dict = {}
    both = [_metric("x", 1, "gauge"), _metric("x", 1, "counter"), _metric("x", 1, "histogram")]
    r = c.on_batch(value, RawBatch("h", "b", 0, 1, [*both, _metric("y", 1, "counter")]), NOW)
    assert r.refused is None
    assert r.counts["series_dropped_type"] == 5 + 1  # x's counter increment (5) and histogram observation (1)
    r = c.on_batch(value, RawBatch("h", "b", 1, 1, [_metric("y", 1, "histogram")]), NOW)
    assert r.refused is None and r.counts["series_dropped_type"] == 1
    series = {aggregate_core.parse_key(k)[0]: v for k, v in value["aggregate"]["series"].items()}
    assert (series["x"]["gauge"], series["y"]) == (5, 5)


def test_a_series_named_as_another_types_series_are_is_dropped_counted_and_never_emitted(caplog):
    """Kernel code's gauge h_count beside its histogram h: in Prometheus the gauge would
    write into h's count (a gauge c_total into a counter c's samples). Its events are
    dropped and counted by that reason, logged once, whatever came first; the rest of
    the batch is counted. A series a state from before holds under such a name is not
    emitted: every exporter would refuse it at every refresh."""
    c = chain(host_ttl_seconds=60)
    value: dict = {}
    events = [
        _metric("name_clash_h_count", 1, "gauge"),
        _metric("name_clash_h", 1, "histogram"),
        _metric("name_clash_c_total", 1, "gauge"),
        _metric("name_clash_ok", 1, "gauge"),
        _metric("name_clash_c", 1, "counter"),
    ]
    with caplog.at_level("WARNING", logger="ktel.process"):
        r = c.on_batch(value, RawBatch("h", "b", 0, 1, events), NOW)
        assert (
            r.counts["series_dropped_name"] == 2 and r.counts["events"] == 1 + 5
        )  # (h's observation, c's 5)
        r = c.on_batch(value, RawBatch("h", "b", 1, 1, events[:1]), NOW)
        assert r.counts["series_dropped_name"] == 1
    warned = [rec.getMessage() for rec in caplog.records if "name_clash_h_count" in rec.getMessage()]
    assert warned == [
        "aggregate: the events of the gauge 'name_clash_h_count' are dropped, counted in "
        'ktel_processor_series_dropped_total{reason="name"}: a gauge ending in _count, as Prometheus '
        "names a histogram's series"
    ]
    series = value["aggregate"]["series"]
    kept = {"name_clash_h", "name_clash_ok", "name_clash_c"}
    assert {aggregate_core.parse_key(k)[0] for k in series} == kept
    series[aggregate_core.series_key("name_clash_h_count", (("i", "2"),))] = {"gauge": 3, "at": [0, 0]}
    [agg] = c.timed()
    # (a new host: its counter and histogram at zero first, then every series it keeps)
    [(_, zeros), (_, snap)] = c.on_window(agg, {"h": value}, NOW + 10_000, 1.0).snapshots
    assert {row[0] for row in zeros.series} == {"name_clash_h", "name_clash_c"}
    assert {row[0] for row in snap.series} == kept
    [(_host, last)] = c.on_window(agg, {"h": value}, NOW + 61_000, 1.0).snapshots  # silent past its TTL
    assert last.stale and {row[0] for row in last.series} == kept


def test_a_host_execing_far_more_processes_than_fit_keeps_every_event_counted_within_its_bound():
    # 10 000 processes with long paths, in the fused chain: ~2 MB of process table.
    limit = 65_536
    cfg = config.Config(
        agent=config.AgentConfig(host_id="t"),
        process=config.ProcessConfig(max_state_bytes=limit),
        aggregate=config.AggregateConfig(directory_depth=1),
    )
    c, value = build("all", cfg), {}

    def file_created(pid: int) -> list:
        return [FILE_CREATED.id, 1, pid, pid, 0, "p", f"/d/{pid}", 0o101, False]

    counted = evicted = 0
    for seq in range(50):
        pids = range(seq * 200, seq * 200 + 200)
        events = [[PROCESS_EXEC.id, 1, p, p, 1, 0, 7, "p", "/opt/" + "x" * 150 + str(p)] for p in pids]
        events += [file_created(p) for p in pids]
        # The last batch's last 50 exit (their entries wait out their grace).
        events += [
            [PROCESS_EXIT.id, 1, p, p, 1, 0, 7, "p", 0, 0] for p in range(max(0, seq * 200 - 50), seq * 200)
        ]
        r = c.on_batch(value, RawBatch("h", "b", seq, 1 + seq, events), NOW)
        assert r.refused is None and r.batch is not None
        counted += r.counts["events"]
        evicted += r.counts["evicted_processes"]
        enrich = dict(value["enrich"])
        # What the section takes, kept without encoding it every batch, is never less than it takes.
        assert limit * enrich_core.TABLE_SHARE >= enrich.pop("bytes") >= enrich_core.encoded_size(enrich)
        assert len(json.dumps(value, separators=(",", ":"))) <= limit
    # The first process was evicted long ago: its event is counted, without its attributes.
    r = c.on_batch(value, RawBatch("h", "b", 50, 51, [file_created(0), file_created(9999)]), NOW)
    counted += r.counts["events"]
    assert r.batch is not None and list(r.batch.processes) == ["9999"]
    assert counted == 50 * 400 + 2  # (exits are no metric)
    assert value["aggregate"]["series"] == {
        '["process_execs_total", []]': 10_000,
        '["file_created_total", [["directory", "/d"]]]': 10_002,
    }
    assert evicted == 10_000 - enrich_core.known_processes(value["enrich"]) > 9000


def test_the_enrich_sections_kept_size_never_falls_below_what_it_takes(monkeypatch):
    """Random execs, exits and reused pids over three boots, with the size encoded only
    when a batch may have grown the section past its bound."""
    opts = enrich_core.Options(max_processes=4096, exit_grace_seconds=0.5, max_table_bytes=25_000)
    encodes = 0
    real = enrich_core.encoded_size

    def counted(value):
        nonlocal encodes
        encodes += value is state  # the whole section, not an entry
        return real(value)

    monkeypatch.setattr(enrich_core, "encoded_size", counted)
    rng, state, evicted = random.Random(7), {}, 0
    for seq in range(600):
        boot = f"boot-{seq // 200}"
        events = []
        for _ in range(rng.randrange(0, 12)):
            pid = rng.randrange(1, 150)
            if rng.random() < 0.6:
                exe = "/usr/bin/" + "y" * rng.randrange(1, 120)
                events.append([PROCESS_EXEC.id, 1, pid, pid, 1, 0, 7, "p", exe])
            else:
                events.append([PROCESS_EXIT.id, 1, pid, pid, 1, 0, 7, "p", 0, 0])
        batch = RawBatch("h", boot, seq, seq * 100_000_000, events)
        evicted += enrich_core.enrich(state, batch, {}, opts).evicted.processes
        rest = {k: v for k, v in state.items() if k != "bytes"}
        assert real(rest) <= state.get("bytes", 0) and real(rest) <= opts.max_table_bytes
    assert evicted > 0  # (the later boots' processes pushed the earlier boots' out)
    assert 0 < encodes < 300  # mostly known without encoding the section


def _execs(pids) -> list:
    return [[PROCESS_EXEC.id, 1, p, p, 1, 0, 7, "p", "/opt/" + "x" * 100 + str(p)] for p in pids]


def _exit(pid: int) -> list:
    return [PROCESS_EXIT.id, 1, pid, pid, 1, 0, 7, "p", 0, 0]


def _file(pid: int) -> list:
    return [FILE_CREATED.id, 1, pid, pid, 0, "p", "/d/f", 0o101, False]


SECOND = 1_000_000_000


def test_one_exit_sent_many_times_in_a_batch_is_queued_once_and_evicts_no_live_process():
    """10,000 copies of one exit (or one pid exec'd and exited over and over) in one
    batch queued 10,000 exits, past max_processes until the next batch, and their bytes
    evicted the host's live processes."""
    opts = enrich_core.Options(max_processes=100, max_table_bytes=20_000)
    for storm in ([_exit(1)] * 10_000, (_execs([1]) + [_exit(1)]) * 5_000):
        state: dict = {}
        enrich_core.enrich(state, RawBatch("h", "b", 0, SECOND, _execs(range(1, 101))), {}, opts)
        out = enrich_core.enrich(state, RawBatch("h", "b", 1, 2 * SECOND, storm), {}, opts)
        assert out.evicted.processes == 0 and enrich_core.known_processes(state) == 100
        assert state["exits"] == [["b", "1", 2 * SECOND]] and list(out.batch.processes) == ["1"]
        # Its grace is still kept: a batch sealed within it sees the process, one after does not.
        within = enrich_core.enrich(state, RawBatch("h", "b", 2, 6 * SECOND, [_file(1)]), {}, opts)
        assert list(within.batch.processes) == ["1"]
        after = enrich_core.enrich(state, RawBatch("h", "b", 3, 8 * SECOND, [_file(1)]), {}, opts)
        assert after.batch.processes == {} and enrich_core.known_processes(state) == 99
    # Within the bytes bound too, the queue holds one exit, not one a copy.
    state = {}
    enrich_core.enrich(state, RawBatch("h", "b", 0, SECOND, [_exit(1)] * 10_000), {}, enrich_core.Options())
    assert state["exits"] == [["b", "1", SECOND]]


def test_exits_a_process_no_longer_awaits_give_way_before_any_live_process():
    """A host sending one pid's exit again in every batch (each a new time) left every
    earlier one queued, waiting out its grace with nothing to remove, and their bytes
    pushed the host's live processes out."""
    opts = enrich_core.Options(max_processes=2048, max_table_bytes=20_000)
    state: dict = {}
    enrich_core.enrich(state, RawBatch("h", "b", 0, SECOND, _execs(range(1, 101))), {}, opts)
    evicted = 0
    for seq in range(1, 1001):
        batch = RawBatch("h", "b", seq, SECOND + seq * 1_000_000, [_exit(1)])
        evicted += enrich_core.enrich(state, batch, {}, opts).evicted.processes
    assert evicted == 0 and enrich_core.known_processes(state) == 100
    assert len(state["exits"]) < 1000
    rest = {k: v for k, v in state.items() if k != "bytes"}
    assert enrich_core.encoded_size(rest) <= state["bytes"] <= opts.max_table_bytes


def test_exits_a_process_no_longer_awaits_do_not_count_toward_max_processes():
    """Past max_processes the oldest queued exits go before their grace. Exits with
    nothing left to remove (one pid's exit sent again in every batch, each a new time)
    filled the queue, and a live exit still in its grace went early for them."""
    opts = enrich_core.Options(max_processes=100, max_table_bytes=10**9)
    state: dict = {}
    enrich_core.enrich(state, RawBatch("h", "b", 0, SECOND, _execs([1, 2])), {}, opts)
    enrich_core.enrich(state, RawBatch("h", "b", 1, 2 * SECOND, [_exit(2)]), {}, opts)
    for seq in range(2, 300):  # 298 batches 1 ms apart, each pid 1's exit again
        enrich_core.enrich(state, RawBatch("h", "b", seq, 2 * SECOND + seq * 1_000_000, [_exit(1)]), {}, opts)
    # Within pid 2's grace (5 s from its exit): still known.
    within = enrich_core.enrich(state, RawBatch("h", "b", 300, 4 * SECOND, [_file(2)]), {}, opts)
    assert list(within.batch.processes) == ["2"]


def test_an_exit_stamped_far_in_the_future_holds_no_other_exit_past_its_grace():
    """An exit in a batch whose ``sent`` is 2**63-1 (a forged or broken clock) held every
    exit queued after it: expiry walks the queue oldest first and stopped at it."""
    opts = enrich_core.Options(exit_grace_seconds=5)
    state: dict = {}
    enrich_core.enrich(state, RawBatch("h", "b", 0, SECOND, _execs(range(1, 11))), {}, opts)
    enrich_core.enrich(state, RawBatch("h", "b", 1, (1 << 63) - 1, [_exit(1)]), {}, opts)
    for seq, pid in enumerate(range(2, 6), 2):
        enrich_core.enrich(state, RawBatch("h", "b", seq, seq * SECOND, [_exit(pid)]), {}, opts)
    out = enrich_core.enrich(
        state, RawBatch("h", "b", 9, 100 * SECOND, [_file(p) for p in range(1, 11)]), {}, opts
    )
    # 2 to 5 are gone after their grace; the one stamped in the future waits for its own.
    assert sorted(out.batch.processes, key=int) == ["1", "6", "7", "8", "9", "10"]
    assert state["exits"] == [["b", "1", (1 << 63) - 1]]


def _saved_in_arrival_order(opts: enrich_core.Options) -> dict:
    """A host's enrich section as a ktel that queued exits as their batches came saved
    it: pid 1's exit, stamped 2**63-1, in front of pids 2 to 5's, sent at 2 to 5 s."""
    section: dict = {}
    enrich_core.enrich(section, RawBatch("h", "b", 0, SECOND, _execs(range(1, 11))), {}, opts)
    sent = {1: (1 << 63) - 1} | {pid: pid * SECOND for pid in range(2, 6)}
    for seq, (pid, at) in enumerate(sent.items(), 1):
        enrich_core.enrich(section, RawBatch("h", "b", seq, at, [_exit(pid)]), {}, opts)
    section["exits"] = [["b", str(pid), at] for pid, at in sent.items()]
    return json.loads(json.dumps(section))  # (as decoded from the changelog)


def _recovered(section: dict, as_delta: bool) -> dict:
    """``section`` as the enrich section of a host's value recovered from the changelog:
    saved whole (a snapshot), or as the head of a delta on an earlier snapshot."""
    data: dict = {}
    if as_delta:
        changelog.fold(data, "h", {"enrich": {}})
        changelog.fold(data, ["h", 1], {"v": 1, "head": {"v": 1, "enrich": section}, "set": [], "del": []})
    else:
        changelog.fold(data, "h", {"enrich": section})
    return data["h"]["enrich"]


def test_an_exit_queue_saved_in_arrival_order_holds_no_other_exit_past_its_grace_once_recovered():
    """A ktel that queued exits as their batches came saved queues out of time order;
    expiry walks the queue in order and stops at the first exit not due, so one stamped
    2**63-1 at its front held every exit behind it until max_processes took it."""
    opts = enrich_core.Options(exit_grace_seconds=5)
    for as_delta in (False, True):
        state = _recovered(_saved_in_arrival_order(opts), as_delta)
        out = enrich_core.enrich(
            state, RawBatch("h", "b", 9, 100 * SECOND, [_file(p) for p in range(1, 11)]), {}, opts
        )
        # 2 to 5 are gone after their grace; the one stamped in the future waits for its own.
        assert sorted(out.batch.processes, key=int) == ["1", "6", "7", "8", "9", "10"], as_delta
        assert state["exits"] == [["b", "1", (1 << 63) - 1]]


def test_entries_of_a_saved_exit_queue_not_of_the_shape_ktel_queues_are_left_out_when_recovered():
    """Recovery must not fail on them, and the stage would (a time it cannot add its grace
    to) on every batch of the host after, or stop at it for good (a NaN never falls due)."""
    opts = enrich_core.Options(exit_grace_seconds=5)
    wrong = [
        ["b", "6", "9"],
        ["b", "6", float("nan")],
        ["b", "6", True],
        ["b", 6, SECOND],
        ["b", "6"],
        "b",
        None,
    ]
    for as_delta in (False, True):
        saved = _saved_in_arrival_order(opts)
        saved["exits"][1:1] = copy.deepcopy(wrong)
        state = _recovered(saved, as_delta)
        in_time_order = [["b", str(pid), pid * SECOND] for pid in range(2, 6)] + [["b", "1", (1 << 63) - 1]]
        assert state["exits"] == in_time_order, as_delta
        out = enrich_core.enrich(
            state, RawBatch("h", "b", 9, 100 * SECOND, [_file(p) for p in range(1, 11)]), {}, opts
        )
        assert sorted(out.batch.processes, key=int) == ["1", "6", "7", "8", "9", "10"], as_delta
    # A queue that is not a list at all holds nothing ktel queued either.
    for junk in ("exits", {"b": 1}, 7):
        assert _recovered({"exits": junk}, as_delta=False)["exits"] == []


def test_a_stream_that_goes_on_past_a_refused_jump_is_taken_up_there_not_refused_for_good():
    """An agent's full spool dropped more than MAX_SEQUENCE_GAP batches during a long
    outage: every batch after is as far past the highest. The first is refused; the
    next, following it, re-anchors the stream (counted), and the rest are taken."""
    c, value = chain(), {}
    for seq in range(10):
        c.on_batch(value, batch(seq), NOW)
    jump = 9 + MAX_SEQUENCE_GAP + 1000
    before = copy.deepcopy(value)
    assert c.on_batch(value, batch(jump), NOW).refused is not None and value == before
    result = c.on_batch(value, batch(jump + 1), NOW)
    assert result.refused is None and result.counts["sequence_reanchors"] == 1
    assert result.counts["events"] == 2
    for seq in range(jump + 2, jump + 5):
        r = c.on_batch(value, batch(seq), NOW)
        assert r.refused is None and r.counts["events"] == 2 and "sequence_reanchors" not in r.counts
    assert c.on_batch(value, batch(jump + 3), NOW).counts == {"duplicates": 1}
    assert c.on_batch(value, batch(5), NOW).counts == {"duplicates": 1}  # the old numbers stay seen


def test_a_lone_far_number_still_re_anchors_nothing():
    """What takes a stream up past its highest is two batches that follow each other:
    one forged number, or one of another boot, or one before it, changes nothing."""
    c, value = chain(), {}
    c.on_batch(value, batch(5), NOW)
    far = 5 + MAX_SEQUENCE_GAP + 10
    assert c.on_batch(value, batch(far), NOW).refused is not None
    assert c.on_batch(value, batch(far - 1), NOW).refused is not None  # not after it
    assert (
        c.on_batch(value, batch(far - 1 + MAX_SEQUENCE_GAP + 1), NOW).refused is not None
    )  # too far past it
    c.on_batch(value, batch(0, boot="other"), NOW)
    c.on_batch(value, batch(far, boot="other"), NOW)  # the other boot's first batch: taken
    before = copy.deepcopy(value)
    assert c.on_batch(value, batch(far + MAX_SEQUENCE_GAP + 1, boot="other"), NOW).refused is not None
    assert c.on_batch(value, batch(far + 1), NOW).refused is not None  # "b" after another boot's refusal
    assert value == before
    # A host forgotten by the worker, or a record the runner refused after all, forgets the refusal.
    c.forget("h")
    assert c.on_batch(value, batch(far + 2), NOW).refused is not None
    taken = c.on_batch(value, batch(far + 3), NOW)
    assert taken.counts.get("sequence_reanchors") == 1
    taken.revert()
    assert c.on_batch(copy.deepcopy(before), batch(far + 4), NOW).counts.get("sequence_reanchors") == 1


def test_a_host_id_label_given_by_kernel_code_does_not_make_the_hosts_snapshots_another_hosts():
    """host.id is the host whose batch it is. A ktel_metric label naming another host
    would label the series with it, and every exporter refuses a snapshot that speaks for
    a host other than its key's (check_keyed): all of the host's series would go to the
    dead-letter topic, every window. The label is dropped, and the series is the host's."""
    from ktel.wire import KTEL_LOG, check_keyed

    c = chain(refresh_seconds=3600)
    [aggregate] = c.timed()
    value: dict = {}
    given = {"host.id": "other-host", "q": "a"}
    events = [
        [KTEL_METRIC.id, 1, 2, "gauge", "queue_depth", given, 3],
        [KTEL_METRIC.id, 1, 2, "counter", "requests_total", {"host.id": "x"}, 5],
        [KTEL_LOG.id, 1, 2, 2, 9, "hello", {}, b"", b""],
    ]
    result = c.on_batch(value, RawBatch("h", "b", 0, 1, events), NOW)
    [(_, zero), (_, snap)] = c.on_window(aggregate, {"h": value}, NOW + 10_000, 1.0).snapshots
    assert sorted((row[0], row[2]) for row in snap.series) == [
        ("queue_depth", {"host.id": "h", "q": "a"}),
        ("requests_total", {"host.id": "h"}),
    ]
    check_keyed(snap, b"h")
    assert [(row[0], row[2]) for row in zero.series] == [("requests_total", {"host.id": "h"})]  # (new, at 0)
    check_keyed(zero, b"h")
    [logs] = result.logs
    assert logs.resource["host.id"] == "h"
    check_keyed(logs, b"h")


def test_labels_prometheus_keeps_for_itself_are_dropped_from_kernel_code_metrics():
    """A ktel_metric label named ``__name__`` (or anything starting with ``__`` once
    sanitised), or ``le`` on a histogram, is one the pull endpoint cannot serve, and one
    named ``host_id`` once sanitised (``host-id``) would make the series one Prometheus
    series with the host's own label. Such labels are dropped, also from series the
    host's state kept from before; ``le`` on a counter is an ordinary label, and stays."""
    from exporters.pull import LatestValues
    from ktel.wire import MetricSnapshot

    c = chain(refresh_seconds=3600)
    [aggregate] = c.timed()
    # A series a state from before holds with such a label (its key as _labels made it then).
    old = aggregate_core.series_key("old_total", (("__x", "1"), ("q", "c")))
    value: dict = {"aggregate": {"series": {old: 2}}}
    events = [
        [KTEL_METRIC.id, 1, 2, "gauge", "queue_depth", {"__name__": "other", "q": "a"}, 3],
        [KTEL_METRIC.id, 1, 2, "histogram", "wait_ns", {"le": "0.5", "..x": "y", "q": "b"}, 7],
        [KTEL_METRIC.id, 1, 2, "counter", "requests_total", {"le": "1", "host-id": "other"}, 5],
    ]
    c.on_batch(value, RawBatch("h", "b", 0, 1, events), NOW)
    [(_, snap)] = c.on_window(aggregate, {"h": value}, NOW + 10_000, 1.0).snapshots  # (recovered: no zeros)
    assert sorted((row[0], row[2]) for row in snap.series) == [
        ("old_total", {"host.id": "h", "q": "c"}),
        ("queue_depth", {"host.id": "h", "q": "a"}),
        ("requests_total", {"host.id": "h", "le": "1"}),
        ("wait_seconds", {"host.id": "h", "q": "b"}),
    ]
    snap = MetricSnapshot(snap.ts_ms, snap.series)
    assert LatestValues().split(snap) == (snap.series, [])  # the pull endpoint serves them all


def test_kernel_code_metrics_of_no_name_or_with_a_label_of_no_name_make_no_series_an_exporter_refuses():
    """The remote-write exporter dead-letters a whole snapshot holding a series of an empty
    name or a label of an empty name (Prometheus' receiver would leave it out and answer
    2xx), so one such ktel_metric event sent every one of its host's series to the
    dead-letter topic at every window that emitted it, refreshes included. A metric of no
    name is dropped and counted, a label of no name left out, also from a state from before."""
    from exporters.prom_names import unnamed

    c = chain(refresh_seconds=3600)
    [aggregate] = c.timed()
    old = aggregate_core.series_key("old_total", (("", "1"), ("q", "c")))
    value: dict = {"aggregate": {"series": {old: 2, aggregate_core.series_key("", ()): 4}}}
    events = [
        [KTEL_METRIC.id, 1, 2, "gauge", "queue_depth", {"": "x", "q": "a"}, 3],
        [KTEL_METRIC.id, 1, 2, "counter", "", {"q": "b"}, 5],
        [KTEL_METRIC.id, 1, 2, "histogram", "", {}, 5],
    ]
    result = c.on_batch(value, RawBatch("h", "b", 0, 1, events), NOW)
    assert result.counts["series_dropped_name"] == 5 + 1  # (the counter's increment, one observation)
    [(_, snap)] = c.on_window(aggregate, {"h": value}, NOW + 10_000, 1.0).snapshots  # (recovered: no zeros)
    assert sorted((row[0], row[2]) for row in snap.series) == [
        ("old_total", {"host.id": "h", "q": "c"}),
        ("queue_depth", {"host.id": "h", "q": "a"}),
    ]
    assert unnamed(snap.series) is None


def test_a_series_name_or_label_longer_than_a_snapshot_takes_is_dropped_not_emitted():
    """A snapshot takes names of at most 256 characters and label values of at most 4096,
    and every exporter refuses a whole snapshot with one longer: a file_created path whose
    directories passed 4096 characters (the wire takes paths of 16384), or kernel code's
    histogram of a 256-character name ending in _ns (made _seconds), sent every series of
    the host to ktel.dlq at each window that emitted it, refreshes included. Any client
    writing ktel.raw could do so to any host. Such events are dropped and counted, and a
    state from before holding such a series no longer emits it."""
    from ktel.wire import decode_snapshot, encode_snapshot

    c = chain(refresh_seconds=3600)
    [aggregate] = c.timed()
    old = aggregate_core.series_key(FILE_CREATED.metric.name, (("directory", "/" + "o" * 5000),))
    value: dict = {"aggregate": {"series": {old: 2.0}}}
    ev = [FILE_CREATED.id, 1, 2, 2, 0, "c", "/tmp/x", 0o101, False]
    events = [
        ev,
        [*ev[:6], "/" + "d" * 5000 + "/f", *ev[7:]],
        [*ev[:6], "r" * 5000 + "/f", *ev[7:]],
        [KTEL_METRIC.id, 1, 2, "histogram", "a" * 253 + "_ns", {}, 5],
    ]
    result = c.on_batch(value, RawBatch("h", "b", 0, 1, events), NOW)
    assert result.counts["series_dropped_name"] == 3
    [(_, snap)] = c.on_window(aggregate, {"h": value}, NOW + 10_000, 1.0).snapshots  # (recovered: no zeros)
    assert [(row[0], row[2], row[3]) for row in decode_snapshot(encode_snapshot(snap)).series] == [
        (FILE_CREATED.metric.name, {"directory": "/tmp", "host.id": "h"}, 1.0)
    ]


def test_a_batch_whose_resource_alone_fills_half_a_record_is_passed_on_whole_not_per_event():
    """A batch too large for one record is passed on in parts, each carrying the batch's
    resource: one of megabytes (random, so it does not compress) would be copied into
    one part per event or so. It stays whole, for too_large to name."""
    rng = random.Random(1)
    alphabet = [chr(c) for c in range(0x100, 0x800)]  # (two bytes each, 11 bits of chance)
    res = {f"a{i}": "".join(rng.choices(alphabet, k=100_000)) for i in range(10)}
    events = [[FILE_CREATED.id, 1, 2, 2, 0, "c", f"/d/{i}", 0o101, False] for i in range(64)]
    big = RawBatch("h", "b", 0, 1, events, resource=res)
    [whole] = stages.passed_on(big, b"h")
    assert stages.too_large([("ktel.enriched", whole)], b"h") is not None
    # A small resource: parts as before, each fitting a record.
    many = [
        [*ev[:6], f"/d/{i}/" + "".join(rng.choices("xyz0123456789", k=4000)), *ev[7:]]
        for i, ev in enumerate(events * 8)
    ]
    parts = stages.passed_on(RawBatch("h", "b", 0, 1, many, resource={"host.name": "n"}), b"h")
    assert len(parts) > 1 and stages.too_large([("ktel.enriched", p) for p in parts], b"h") is None


def test_series_dropped_for_their_length_leave_nothing_in_the_worker_caches():
    """The series-key caches (16,384 keys each, shared by every host of the worker) keep
    no long key: a directory label of 16,300 astral characters took about 340 KB in
    them, 5.5 GB at their bound, from about 140 records of 1.2 KB of zstd; one of 5,000
    (dropped too, past 4,096) about 100 KB."""
    chain = build("all", config.Config(agent=config.AgentConfig(host_id="t")))
    events = [
        [FILE_CREATED.id, 1, 2, 2, 0, "c", "/" + "\U0001f600" * 5000 + f"{i}/f", 0o101, False]
        for i in range(50)
    ]
    before = (
        aggregate_core._series_key.cache_info().currsize,
        aggregate_core._parsed_key.cache_info().currsize,
    )
    result = chain.on_batch({}, RawBatch("h", "b", 0, 1, events), NOW)
    assert result.counts["series_dropped_name"] == 50
    after = aggregate_core._series_key.cache_info().currsize, aggregate_core._parsed_key.cache_info().currsize
    assert after == before


def test_a_histogram_delta_whose_count_is_not_the_sum_of_its_buckets_is_refused():
    """The aggregate counts a delta's count (its events, and the drops of a full
    histogram) and adds its buckets: a count of 0 with buckets of 2^64 - 1 made that
    many observations dropped uncounted, and one of 5 with buckets of 0 counted five
    that are not there."""
    from ktel.probes import HIST_SLOTS, HISTOGRAM_DELTA
    from ktel.schema import U64
    from ktel.wire import WireError, decode_batch, encode_batch

    def delta(count: int, buckets: list[int]) -> list:
        return [HISTOGRAM_DELTA.id, NOW * 1_000_000, 0, "m", "ns", {}, count, 0, buckets, 1]

    for count, first in ((0, U64), (5, 0)):
        data = encode_batch(RawBatch("h", "b", 0, 1, [delta(count, [first] + [0] * (HIST_SLOTS - 1))]))
        with pytest.raises(
            WireError, match=f"a histogram_delta of {count} values whose buckets hold {first}"
        ):
            decode_batch(data)
    fine = encode_batch(RawBatch("h", "b", 0, 1, [delta(U64, [U64] + [0] * (HIST_SLOTS - 1))]))
    assert decode_batch(fine).events[0][6] == U64


def test_logs_of_thousands_of_processes_take_a_record_each_for_the_first_256_only():
    """One log or span record per process, each with the host's resource: a batch of logs
    of 100,000 pids (363 KB of zstd) made 100,000 records of up to 32 KB of host
    attributes each, 3.9 GB held at once. Past MAX_PROCESS_RECORDS processes, their rows
    go in the host's record, each naming its process; every row is kept."""
    from ktel.wire import KTEL_LOG, KTEL_SPAN, decode_batch, encode_batch, encoded_parts
    from processors.aggregate_core import MAX_PROCESS_RECORDS

    # The split aggregate stage, given the batch as enrich passes it on: the host's
    # resource (30 attributes of 1 KB, as a heartbeat may give) and what it knew of a process.
    chain, value = build("aggregate", config.Config(agent=config.AgentConfig(host_id="t"))), {}
    host = {"host.id": "h"} | {f"a{i:02d}" + "k" * 250: "v" * 1024 for i in range(30)}
    events = [[KTEL_LOG.id, NOW * 1_000_000, pid, pid, 9, f"m{pid}", {}, b"", b""] for pid in range(1, 2001)]
    known = {"1999": {"container.id": "c1999"}}
    batch = dataclasses.replace(RawBatch("h", "b", 0, 1, events), resource=host, processes=known)
    result = chain.on_batch(value, decode_batch(encode_batch(batch)), NOW)
    assert len(result.logs) == MAX_PROCESS_RECORDS + 1
    [folded] = [lb for lb in result.logs if "process.pid" not in lb.resource]
    assert [row[4]["process.pid"] for row in folded.logs] == list(range(MAX_PROCESS_RECORDS + 1, 2001))
    assert [row[4].get("container.id") for row in folded.logs if row[4]["process.pid"] == 1999] == ["c1999"]
    assert sorted(row[3] for lb in result.logs for row in lb.logs) == sorted(
        f"m{pid}" for pid in range(1, 2001)
    )
    encoded = sum(len(d) for lb in result.logs for d in encoded_parts(lb, b"h"))
    assert encoded < 16 << 20  # (2,000 records of the resource: 77 MB)
    # Spans alike.
    t = NOW * 1_000_000
    spans = [
        [KTEL_SPAN.id, t, pid, pid, b"\x01" * 16, pid.to_bytes(8, "big"), b"", "op", t, t + 1, 0, {}]
        for pid in range(1, 301)
    ]
    batch = dataclasses.replace(RawBatch("h", "b", 1, 1, spans), resource=host)
    result = chain.on_batch(value, decode_batch(encode_batch(batch)), NOW)
    assert len(result.spans) == MAX_PROCESS_RECORDS + 1
    [folded] = [sb for sb in result.spans if "process.pid" not in sb.resource]
    assert [row[8]["process.pid"] for row in folded.spans] == list(range(MAX_PROCESS_RECORDS + 1, 301))


def test_a_batch_taken_between_stages_makes_span_and_log_records_their_reader_takes():
    """Any client may write ktel.sampled: a batch whose resource or processes hold more
    attributes than enrich gives (the wire took 256 each) made log and span resources of
    up to 513, which the OTLP exporter refused (128 at most), after the batch was counted."""
    from ktel import wire
    from ktel.wire import KTEL_LOG, KTEL_SPAN, raw, signals
    from ktel.wire.control import HEARTBEAT_SHAPE, HOST_ATTRS

    # Enrich gives no more than the wire takes, and the two together fit a resource.
    containers = next(k for k in HEARTBEAT_SHAPE.keys if k.name == "containers").type.item
    told = containers.fields[1].type.max_items
    assert HOST_ATTRS.max_items + 1 <= raw.RESOURCE_ATTRS
    assert 6 + told + enrich_core.FEED_MAX_ATTRS <= raw.PROCESS_ATTRS
    assert signals.ATTRS.max_items >= raw.RESOURCE_ATTRS + 1 + raw.PROCESS_ATTRS

    t = 1_700_000_000_000_000_000
    log = [KTEL_LOG.id, t, 10, 10, 9, "m", {}, b"", b""]
    span = [KTEL_SPAN.id, t, 10, 10, b"t" * 16, b"s" * 8, b"", "n", t - 1, t, 0, {}]
    full = RawBatch(
        "h",
        "b",
        0,
        t,
        [log, span],
        resource={f"r{i}": "x" for i in range(raw.RESOURCE_ATTRS)},
        processes={"10": {f"p{i}": "x" for i in range(raw.PROCESS_ATTRS)}},
    )
    result = build("aggregate", config.Config(agent=config.AgentConfig(host_id="t"))).on_batch(
        {}, wire.decode_batch(wire.encode_batch(full)), t // 10**6
    )
    assert [len(wire.decode_logs(wire.encode_logs(b)).logs) for b in result.logs] == [1]
    assert [len(wire.decode_spans(wire.encode_spans(b)).spans) for b in result.spans] == [1]
    for more in (
        dataclasses.replace(full, resource={**full.resource, "one": "more"}),
        dataclasses.replace(full, processes={"10": {**full.processes["10"], "one": "more"}}),
    ):
        with pytest.raises(wire.WireError, match="at most"):
            wire.decode_batch(wire.encode_batch(more))
