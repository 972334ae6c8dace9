"""Every probe of the library compiles, passes the verifier and attaches on this
kernel; a probe whose attach points a kernel lacks is skipped with the reason."""

import dataclasses

import pytest

from edge_agent import probes
from tests.integration.probe_harness import loaded

pytestmark = pytest.mark.bpf


@pytest.mark.parametrize("name", sorted(probes.SPECS))
def test_probe_loads_and_passes_the_verifier(name):
    with loaded(name) as p:
        # Attached and reading its maps: every counter starts at zero or counts.
        counters = p.counters()
        assert set(counters) >= {"ringbuf_drops", "sampled_out"}
        assert all(v >= 0 for v in counters.values())
        if p.spec.histograms:
            assert "hist_lost" in counters
            assert isinstance(p.snapshot(), list)


def test_the_agent_config_accepts_every_probe():
    from ktel.config import AgentConfig

    assert AgentConfig(probes=sorted(probes.SPECS)).probes == sorted(probes.SPECS)


def test_missing_tracepoint_field_or_library_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    base = probes.SPECS["tcp_retransmit"]
    no_tp = dataclasses.replace(base, required_tracepoints=("nope/no_such_event",))
    with pytest.raises(probes.ProbeUnavailable, match="lacks tracepoint.*nope/no_such_event"):
        probes.check_available(no_tp)
    no_field = dataclasses.replace(base, required_fields=("tcp/tcp_retransmit_skb:no_such_field",))
    with pytest.raises(probes.ProbeUnavailable, match="lack field.*no_such_field"):
        probes.check_available(no_field)

    monkeypatch.setattr(probes, "TRACEFS", tmp_path)  # tracefs not mounted
    with pytest.raises(probes.ProbeUnavailable, match="tracefs is not mounted"):
        probes.check_available(base)


def test_missing_uprobe_library_is_skipped_with_the_reason(monkeypatch):
    spec = probes.SPECS["dns_latency"]
    bad = dataclasses.replace(spec, uprobes=(probes.Uprobe("ktel-no-such-lib", "f", "a", "b"),))
    monkeypatch.setitem(probes.SPECS, "dns_latency", bad)
    from tests.conftest import need_bpf

    need_bpf()
    loaded_, skipped = probes.load(["dns_latency"], ringbuf_pages=1)
    assert not loaded_
    assert "ktel-no-such-lib" in skipped["dns_latency"]
