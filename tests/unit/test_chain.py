"""How processors/chain.py composes the stages of each `ktel process`, and the
window work the runner's timers do through it."""

from ktel import config
from ktel.wire import FILE_CREATED, PROCESS_EXIT, RawBatch
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
