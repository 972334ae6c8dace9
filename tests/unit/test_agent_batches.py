"""The agent seals batches small enough for Kafka's default 1 MiB record limit, and
its heartbeats report its counters."""

from edge_agent import agent as agent_mod
from edge_agent.agent import batch_limit
from ktel.config import AgentConfig, Config
from ktel.probes import PROBES, ktel_api
from ktel.wire import RawBatch, encode_batch


def test_the_largest_events_of_the_loaded_probes_bound_a_batch():
    mib = 1 << 20
    assert PROBES["ktel_api"].event_bytes == ktel_api.LAYOUT.size == 912
    assert batch_limit(2000, mib, ["tcp_retransmit"]) == 2000  # 56-byte records: the count binds
    assert PROBES["file_created"].event_bytes == 816
    assert batch_limit(2000, mib, ["file_created"]) == mib // 816
    assert batch_limit(2000, mib, ["tcp_retransmit", "ktel_api"]) == mib // 912
    assert batch_limit(10, mib, ["ktel_api"]) == 10
    assert batch_limit(2000, 4096, ["syscall_latency"]) == 4096 // PROBES["syscall_latency"].event_bytes


def test_a_full_batch_of_the_largest_kernel_logs_fits_in_a_mebibyte():
    full = ktel_api.LAYOUT.pack(
        1, 0, 7, 0, 0, 0, 1, 1, ktel_api.LOG, 13, 4, bytes(range(1, 17)), b"n" * 64, b"k" * 512, b"m" * 256
    )
    event = ktel_api.decode(full, 0)
    n = batch_limit(2000, 1 << 20, ["ktel_api"])
    assert len(encode_batch(RawBatch("h" * 32, "b" * 32, 1, 1, [event] * n, [1.5] * n))) <= 1 << 20


def test_a_heartbeat_reports_the_agents_counters(tmp_path):
    a = agent_mod.Agent(Config(agent=AgentConfig(host_id="h", state_dir=tmp_path, cgroup_root=tmp_path)))
    try:
        before, _ = a.heartbeat(1.0, {}, [], {})
        agent_mod.EVENTS_PUBLISHED.inc(7)
        agent_mod.DISK_DROPPED.inc(3)
        after, _ = a.heartbeat(1.0, before["counters"], [], {})
    finally:
        a.spool.close()
    assert after["counters"]["events_published"] - before["counters"]["events_published"] == 7
    assert after["counters"]["disk_dropped_events"] - before["counters"]["disk_dropped_events"] == 3
    assert after["rates"]["events_published"] == 7.0
