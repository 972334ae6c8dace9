"""Every probe of the library compiles, passes the verifier and attaches on this
kernel; a probe whose attach points a kernel lacks is skipped with the reason."""

import dataclasses
import os

import pytest

from edge_agent import probes
from ktel.probes import PROBES, Uprobe
from tests.conftest import need_bpf
from tests.integration.probe_harness import loaded

pytestmark = pytest.mark.bpf


# Probes on tracepoints many hosts lack: those of ktel's kernel module (kmod/), and
# module_load, which kernels built without module support do not have (this CI's).
# tests/vm loads both where they exist.
ON_MODULE = {"ktel_api"}
NEEDS_MODULES = {"module_load": "module/module_load"}


@pytest.mark.parametrize("name", sorted(set(PROBES) - ON_MODULE - set(NEEDS_MODULES)))
def test_probe_loads_and_passes_the_verifier(name):
    with loaded(name) as p:
        # Attached and reading its maps: every counter starts at zero or counts.
        counters = p.counters()
        assert set(counters) >= {"ringbuf_drops", "sampled_out"}
        assert all(v >= 0 for v in counters.values())
        if p.spec.histograms:
            assert "hist_lost" in counters
            assert isinstance(p.snapshot(), list)


@pytest.mark.parametrize("name", sorted(n for n, s in PROBES.items() if s.programs))
def test_programs_on_module_tracepoints_pass_the_verifier_on_any_kernel(name):
    """They take hand-written contexts (bpf/ktel_tracepoints.bpf.h), so they compile and
    load here even where the tracepoints are missing; only attaching needs the module."""
    from bcc import BPF

    need_bpf()
    spec = PROBES[name]
    bpf = BPF(text=probes.bpf_source(name).encode(), cflags=probes.cflags_for(spec, 1))
    try:
        fds = [bpf.load_func(fn.encode(), BPF.TRACEPOINT).fd for fn in spec.programs.values()]
    finally:
        bpf.cleanup()
    assert len(fds) == len(spec.programs) and all(fd >= 0 for fd in fds)


def test_ktel_api_is_skipped_with_the_reason_where_the_module_is_not_loaded():
    need_bpf()
    loaded_, skipped = probes.load(["ktel_api"], ringbuf_pages=1)
    for p in loaded_.values():
        p.close()
    if probes._has_tracepoint("ktel/ktel_counter"):
        assert set(loaded_) == {"ktel_api"}, skipped
    else:
        assert not loaded_
        assert "lacks tracepoint(s) ktel/ktel_counter" in skipped["ktel_api"], skipped


@pytest.mark.parametrize(("name", "tracepoint"), sorted(NEEDS_MODULES.items()))
def test_a_probe_of_a_module_kernel_loads_there_and_is_skipped_with_the_reason_elsewhere(name, tracepoint):
    need_bpf()
    loaded_, skipped = probes.load([name], ringbuf_pages=1)
    for p in loaded_.values():
        p.close()
    if probes._has_tracepoint(tracepoint):
        assert set(loaded_) == {name}, skipped
    else:
        assert not loaded_
        assert f"lacks tracepoint(s) {tracepoint}" in skipped[name], skipped


def test_the_agent_config_accepts_every_probe():
    from ktel.config import AgentConfig

    assert AgentConfig(probes=sorted(PROBES)).probes == sorted(PROBES)


def test_missing_tracepoint_field_or_library_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    base = PROBES["tcp_retransmit"]
    no_tp = dataclasses.replace(base, tracepoints=("nope/no_such_event",))
    with pytest.raises(probes.ProbeUnavailable, match="lacks tracepoint.*nope/no_such_event"):
        probes.check_available(no_tp)
    no_field = dataclasses.replace(base, required_fields=("tcp/tcp_retransmit_skb:no_such_field",))
    with pytest.raises(probes.ProbeUnavailable, match="lack field.*no_such_field"):
        probes.check_available(no_field)

    monkeypatch.setattr(probes, "TRACEFS", tmp_path)  # tracefs not mounted
    with pytest.raises(probes.ProbeUnavailable, match="tracefs is not mounted"):
        probes.check_available(base)


def test_missing_uprobe_library_is_skipped_with_the_reason(monkeypatch):
    spec = PROBES["dns_latency"]
    bad = dataclasses.replace(spec, uprobes=(Uprobe("ktel-no-such-lib", "f", "a", "b"),))
    monkeypatch.setitem(PROBES, "dns_latency", bad)
    need_bpf()
    loaded_, skipped = probes.load(["dns_latency"], ringbuf_pages=1)
    assert not loaded_
    assert "ktel-no-such-lib" in skipped["dns_latency"]


def test_a_closed_probe_reports_its_maps_as_they_were_when_it_closed():
    """The stopping agent's last heartbeat is made after its probes closed: read then,
    their maps' closed descriptors counted no entry, and every map read empty; and its
    counters are those the kernel had counted, not none."""
    with loaded("syscall_latency") as p:
        for _ in range(100):
            os.getppid()  # syscalls: the latency histogram counts them under their keys
        p.consume()
        p.set_sample_every(1 << 30)  # keeps 1 in 2^30: these 100, in all likelihood, sampled out
        for _ in range(100):
            os.getppid()
        before = p.counters()
    after = p.map_usage()
    assert after["map_entries.syscall_latency.hist"] > 0, after
    # (the node's other syscalls may be sampled out between the last read and the close)
    counted = p.counters()
    assert counted.keys() == before.keys(), counted
    assert counted["sampled_out"] >= before["sampled_out"] >= 100, (before, counted)


def test_a_closed_probe_takes_a_new_rate_without_failing():
    """A command expiring in the stopping agent's last pass sets the probe's rate after
    the probe closed: its maps gone, the write raised (KeyError), and the pass failed
    with the events it had drained. Now the kernel is left alone."""
    with loaded("file_created") as p:
        p.set_sample_every(10)
    p.set_sample_every(1)
