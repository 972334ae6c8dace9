"""Drops are data: a probe with a one-page ring buffer, flooded by a workload
whose event count is known, delivers some events and counts the rest in its
per-CPU drop counter; delivered + counted drops == events generated."""

import time

import pytest

from ktel.probes.decode import Run, count
from tests.integration.probe_harness import histogram_total, loaded, python_workload

pytestmark = pytest.mark.bpf

# 2003 (a prime) slow-lookup events of 304 bytes (+ 8 of ring-buffer header)
# into one 4 KiB page: 13 fit, the rest must be counted as dropped.
N = 2003

FLOOD = f"""
import socket
for _ in range({N}):
    socket.getaddrinfo("localhost", 80)
"""


def test_delivered_plus_counted_drops_equal_events_generated():
    w = python_workload(FLOOD)
    try:
        # Every getaddrinfo is a slow lookup (threshold 0); the uprobes are on
        # this one process only, so no one else's lookups are counted; nothing
        # drains the ring buffer while the flood runs.
        with loaded(
            "dns_latency", ringbuf_pages=1, defines={"KTEL_DNS_SLOW_NS": 0}, uprobe_pid=w.pid, drain=False
        ) as probe:
            assert w.go() == "done"
            probe.consume()
            delivered = probe.decode(probe.take())
            counters = probe.counters()
            snap = probe.snapshot()
    finally:
        w.finish()
    assert {e[2] for e in delivered} == {w.pid}
    assert counters["ringbuf_drops"] > 0 and len(delivered) > 0
    assert len(delivered) + counters["ringbuf_drops"] == N
    assert counters["sampled_out"] == 0
    # The histogram lives in a map, not the ring buffer: it lost nothing.
    assert histogram_total(snap, "dns_latency", **{"process.pid": w.pid})[0] == N


def test_the_books_balance_while_the_drain_thread_runs():
    """The same flood with the drain thread running: however many it keeps up
    with, the sum stays exact."""
    w = python_workload(FLOOD)
    try:
        with loaded(
            "dns_latency", ringbuf_pages=1, defines={"KTEL_DNS_SLOW_NS": 0}, uprobe_pid=w.pid
        ) as probe:
            assert w.go() == "done"
            delivered: list[Run] = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                delivered += probe.take()
                if count(delivered) + probe.counters()["ringbuf_drops"] >= N:
                    break
                time.sleep(0.05)
            time.sleep(0.2)  # anything beyond N would show up now
            delivered += probe.take()
            drops = probe.counters()["ringbuf_drops"]
    finally:
        w.finish()
    assert count(delivered) + drops == N
    assert len(probe.decode(delivered)) == count(delivered)
