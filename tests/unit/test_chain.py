"""How processors/chain.py composes the stages of each `ktel process`, and the
window work the runner's timers do through it."""

import dataclasses
import json

import pytest

from ktel import config
from ktel.wire import FILE_CREATED, PROCESS_EXIT, RawBatch, decode_batch, encode_batch
from processors import chain, sample_core

T = 1_700_000_000_000_000_000


def file_created(pid: int, path: str) -> list:
    return [FILE_CREATED.id, T, pid, pid, 0, "touch", path, 0o101, False]


def test_each_process_runs_its_stages_and_a_counting_chain_dedupes_in_the_counts_section():
    cfg = config.Config(agent=config.AgentConfig(host_id="t"))
    runs = {name: [(s.name, s.section) for s in chain.build(name, cfg).stages] for name in chain.PROCESSES}
    assert runs == {
        "dedupe": [("dedupe", "dedupe")],
        "enrich": [("enrich", "enrich")],
        "sample": [("sample", "sample")],
        "aggregate": [("dedupe", "aggregate"), ("aggregate", "aggregate")],
        "all": [("dedupe", "aggregate"), ("enrich", "enrich"), ("sample", "sample")]
        + [("aggregate", "aggregate")],
    }


def test_in_the_fused_chain_a_resent_batch_reaches_no_stage():
    fused = chain.build("all", config.Config(agent=config.AgentConfig(host_id="t")))
    exit_ev = [PROCESS_EXIT.id, T, 10, 10, 1, 1000, 0, "make", 0, 0]
    b0 = RawBatch("h1", "b1", 0, T, [exit_ev, file_created(10, "/src/a/x.o")])
    value: dict = {}
    first = fused.on_batch(value, b0, 1000)
    seen_by_stages = (repr(value), repr(fused.memory))
    again = fused.on_batch(value, b0, 2000)
    assert first.batch is not None and first.counts["events"] == 1
    assert again.batch is None and again.counts == {"duplicates": 1} and again.changed
    assert (repr(value), repr(fused.memory)) == seen_by_stages  # enrich's exits and sample's counts too


def test_sample_windows_raise_a_spiking_host_and_forget_a_quiet_one():
    opts = sample_core.Options(window_seconds=1.0, spike_factor=3.0, min_rate=10)
    stage = sample_core.Sample(opts)
    sampled = chain.Chain([stage])
    seq = 0

    def second(t: int, **hosts: int) -> list:
        """``hosts``: events each sends in second ``t``; the commands of the window's close."""
        nonlocal seq
        for host, n in hosts.items():
            sampled.on_batch({}, RawBatch(host, "b", seq, T, [file_created(1, "/x")] * n), t * 1000)
            seq += 1
        return sampled.on_window(stage, {}, (t + 1) * 1000, 1.0).commands

    for t in range(5):
        assert second(t, steady=100, quiet=100) == []
    [raise_] = second(5, steady=1000)
    assert (raise_.target, raise_.probe, raise_.sample_every) == ("steady", "file_created", 1)
    assert set(sampled.memory["sample"]) == {"steady", "quiet"}
    for t in range(6, 6 + sample_core.IDLE_WINDOWS):
        second(t, steady=1000)
    assert set(sampled.memory["sample"]) == {"steady"}  # silent for IDLE_WINDOWS windows


def test_a_host_forgotten_leaves_no_memory_in_any_stage_and_takes_its_processes_off_the_count():
    from ktel.wire import PROCESS_EXEC

    fused = chain.build("all", config.Config(agent=config.AgentConfig(host_id="t")))
    execs = [[PROCESS_EXEC.id, T, pid, pid, 1, 0, 0, "sh", "/bin/sh"] for pid in (10, 11, 12)]
    value: dict = {}
    fused.on_heartbeat(value, "h1", {"ts": 1, "host": {"host.id": "h1", "boot.id": "b1"}})
    took = fused.on_batch(value, RawBatch("h1", "b1", 0, T, execs), 1000)
    assert took.counts["processes"] == 3
    assert fused.memory["sample"].keys() == {"h1"}
    forgot = fused.forget("h1")
    assert forgot.counts == {"processes": -3}
    assert fused.memory["sample"] == {} and fused.forget("h1").counts == {"processes": 0}


@pytest.mark.parametrize("again", [[0, 8], None], ids=["one-part", "whole"])
def test_in_split_mode_a_part_resent_whole_counts_each_of_its_events_once(again):
    # The agent split batch 0 (8 events) into parts; two of them reached the pipeline,
    # then the agent, restarted, sent it again in one part, or whole. The dedupe stage
    # and the aggregate's guard each keep their own record of which events they saw.
    cfg = config.Config(agent=config.AgentConfig(host_id="t"))
    dedupe, aggregate = chain.build("dedupe", cfg), chain.build("aggregate", cfg)
    events = [file_created(10, f"/src/d{i}/x.o") for i in range(8)]
    sends = [(0, 2, [0, 8]), (4, 6, [4, 8]), (0, 8, again)]
    deduped_value: dict = {}
    counted_value: dict = {}
    counted = 0
    for lo, hi, part in sends:
        batch = RawBatch("h1", "b1", 0, T, events[lo:hi], part=part)
        passed = dedupe.on_batch(deduped_value, batch, 1000).batch
        if passed is None:
            continue
        # (as the next stage reads it from the dedupe stage's topic)
        result = aggregate.on_batch(counted_value, decode_batch(encode_batch(passed)), 1000)
        counted += result.counts.get("events", 0)
    series = counted_value["aggregate"]["series"]
    by_dir = {json.loads(key)[1][0][1]: n for key, n in series.items() if "file_created" in key}
    assert counted == 8
    assert by_dir == {f"/src/d{i}": 1 for i in range(8)}


def test_the_sample_stage_alone_passes_parts_on_whole_and_fused_samples_them():
    # Alone, its output reaches the aggregate's guard through a topic, and the guard
    # finds a part's events by where they lie in it: sampling some out would shift the
    # rest onto other events' places.
    cfg = config.Config(agent=config.AgentConfig(host_id="t"), sample=config.SampleConfig(baseline=0.25))
    events = [file_created(10, f"/src/d{i}/x.o") for i in range(64)]
    alone, fused = chain.build("sample", cfg), chain.build("all", cfg)
    part = RawBatch("h1", "b1", 0, T, events[:32], part=[0, 64])
    whole = RawBatch("h1", "b1", 1, T, events)
    assert alone.on_batch({}, part, 1000).batch is part
    assert len(alone.on_batch({}, whole, 1000).batch.events) < len(whole.events)
    assert fused.on_batch({}, dataclasses.replace(part, seq=2), 1000).counts["sampled_out"] > 0
