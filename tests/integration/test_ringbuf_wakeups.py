"""The probes wake their reader only when their ring buffer is filling
(bpf/ktel_common.bpf.h, ktel_submit): records below the share are read on the
drain thread's timer, a buffer past it is read at once, and nothing is lost.

The dns_latency probe with its uprobes on one workload process: no other
process on the host puts records in its ring buffer."""

import mmap
import threading
import time

import pytest

from edge_agent import probes, ringbuf
from edge_agent.ticks import until_tick
from ktel.probes.decode import count
from tests.integration.probe_harness import drain_until, loaded, python_workload

pytestmark = pytest.mark.bpf

PAGES = 64
# A slow-lookup record takes 304 bytes + 8 of header in the ring buffer.
RECORD_BYTES = 312
FEW = 7  # well below the wake-up share
MANY = probes.wakeup_bytes(PAGES) // RECORD_BYTES + 11  # past it, far below the buffer's size

LOOKUPS = """
import socket
for _i in range(int(_)):
    socket.getaddrinfo("localhost", 80)
"""


def test_few_records_wake_no_reader_and_a_filling_buffer_does():
    assert MANY * RECORD_BYTES < PAGES * mmap.PAGESIZE // 2
    w = python_workload(LOOKUPS)
    try:
        with loaded(
            "dns_latency", PAGES, defines={"KTEL_DNS_SLOW_NS": 0}, uprobe_pid=w.pid, drain=False
        ) as probe:
            reader = probe._reader
            assert reader is not None
            assert w.go(str(FEW)) == "done"
            # The records are there, and the kernel did not wake the reader for them.
            assert not reader.wait(0)
            probe.consume()
            few = probe.take()
            assert count(few) == FEW

            assert w.go(str(MANY)) == "done"
            # The buffer passed the share: the kernel wakes the reader (its wake-up
            # runs from irq_work, soon after the record that passed it).
            assert reader.wait(60)
            probe.consume()
            many = probe.take()
            counters = probe.counters()
    finally:
        w.finish()
    assert count(many) == MANY
    assert counters["ringbuf_drops"] == 0
    assert {e[2] for e in probe.decode(few + many)} == {w.pid}


def test_the_drain_thread_reads_what_woke_no_one_on_its_ticks(monkeypatch):
    periods = []  # the drain thread's waits go to the shared ticks (edge_agent/ticks.py)
    monkeypatch.setattr(
        probes, "until_tick", lambda period, now: periods.append(period) or until_tick(period, now)
    )
    w = python_workload(LOOKUPS)
    try:
        with loaded(
            "dns_latency", PAGES, defines={"KTEL_DNS_SLOW_NS": 0}, uprobe_pid=w.pid, read_interval_s=0.2
        ) as probe:
            assert w.go(str(FEW)) == "done"
            events = drain_until(probe, lambda evs: len(evs) >= FEW, timeout=60)
    finally:
        w.finish()
    assert [e["pid"] for e in events] == [w.pid] * FEW
    assert periods and set(periods) == {0.2}


def test_a_probe_asks_for_a_wake_up_at_a_quarter_of_its_buffer():
    assert probes.wakeup_bytes(PAGES) == PAGES * mmap.PAGESIZE // 4
    spec = probes.PROBES["file_created"]
    assert f"-DKTEL_WAKEUP_BYTES={256 * mmap.PAGESIZE // 4}" in probes.cflags_for(spec, 256)


@pytest.mark.skipif(not ringbuf.BULK_READ, reason="BCC's callback reader (off x86-64) cannot be woken")
def test_closing_wakes_a_drain_thread_asleep_until_its_next_tick():
    # Days between reads: close() must not wait for the next one, and must still take
    # the records that woke no one.
    interval = 1e6
    assert until_tick(interval, time.monotonic()) > 600, "the next tick is too near for this test"
    w = python_workload(LOOKUPS)
    try:
        with loaded(
            "dns_latency", PAGES, defines={"KTEL_DNS_SLOW_NS": 0}, uprobe_pid=w.pid, read_interval_s=interval
        ) as probe:
            assert w.go(str(FEW)) == "done"
            closing = threading.Thread(target=probe.close)
            closing.start()
            closing.join(120)
            hung = closing.is_alive()
            if hung:  # wake it here, so that the test ends rather than waits for the tick
                probe._reader.wake()
                closing.join()
            assert not hung, "close() waited for the drain thread's next tick"
            events = probe.decode(probe.take())
    finally:
        w.finish()
    assert [e[2] for e in events] == [w.pid] * FEW
