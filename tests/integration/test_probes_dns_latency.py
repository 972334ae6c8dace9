"""The dns_latency probe against the real kernel: a process resolving "localhost"
23 times is 23 in its getaddrinfo histogram, and, with the slow-lookup
threshold at 0, 23 slow-lookup events naming the host."""

import os
import shutil
import socket
import sys
import time

import pytest

from tests.integration.probe_harness import (
    Workload,
    drain_until,
    histogram_total,
    loaded,
    python_workload,
    threads_in_open,
)

pytestmark = pytest.mark.bpf

N = 23

RESOLVE = f"""
import socket
for _ in range({N}):
    socket.getaddrinfo("localhost", 80)
"""


def test_23_lookups_are_23_in_the_process_histogram():
    with loaded("dns_latency") as probe:
        w = python_workload(RESOLVE)
        try:
            assert w.go() == "done"
            snap = probe.snapshot()
            events = drain_until(probe, lambda evs: False, timeout=0.3)
        finally:
            w.finish()
    count, buckets = histogram_total(snap, "dns_latency", **{"process.pid": w.pid})
    assert count == N
    [ev] = [e for e in snap if e[5].get("process.pid") == w.pid]
    assert ev[5] == {
        "process.pid": w.pid,
        "process.executable.name": os.path.basename(sys.executable)[:15],
        "status": "ok",
    }
    # Resolving localhost (/etc/hosts) takes more than a microsecond and less than a second.
    assert sum(buckets[:10]) == 0 and sum(buckets[30:]) == 0
    # Under the default threshold (100 ms) none of these is a slow lookup.
    assert not [e for e in events if e["pid"] == w.pid]


# A lookup that fails without leaving the host: AI_NUMERICHOST forbids a DNS query.
FAIL = """
try:
    socket.getaddrinfo("ktel-not-numeric", 80, flags=socket.AI_NUMERICHOST)
except socket.gaierror:
    pass
"""


def test_with_threshold_0_every_lookup_is_a_slow_lookup_event():
    with loaded("dns_latency", defines={"KTEL_DNS_SLOW_NS": 0}) as probe:
        w = python_workload(RESOLVE + FAIL)
        try:
            assert w.go() == "done"
            events = drain_until(probe, lambda evs: sum(e["pid"] == w.pid for e in evs) >= N + 1)
            snap = probe.snapshot()
        finally:
            w.finish()
    mine = [e for e in events if e["pid"] == w.pid]
    assert len(mine) == N + 1
    assert {(e["kind"], e["host"], e["ret"], e["tid"]) for e in mine[:N]} == {
        ("dns_slow", "localhost", 0, w.pid)
    }
    assert (mine[N]["host"], mine[N]["ret"]) == ("ktel-not-numeric", socket.EAI_NONAME)
    assert all(0 < e["latency_ns"] < 10**9 for e in mine)
    assert histogram_total(snap, "dns_latency", **{"process.pid": w.pid, "status": "ok"})[0] == N
    assert histogram_total(snap, "dns_latency", **{"process.pid": w.pid, "status": "error"})[0] == 1


def test_the_sampling_knob_keeps_1_in_n_lookups_in_the_kernel():
    with loaded("dns_latency", defines={"KTEL_DNS_SLOW_NS": 0}) as probe:
        probe.set_sample_every(1 << 30)  # keeps 1 in 2^30: none of these 23, in all likelihood
        w = python_workload(RESOLVE)
        try:
            assert w.go() == "done"
            snap = probe.snapshot()
            events = drain_until(probe, lambda evs: False, timeout=0.3)
            counters = probe.counters()
        finally:
            w.finish()
    assert histogram_total(snap, "dns_latency", **{"process.pid": w.pid})[0] == 0
    assert not [e for e in events if e["pid"] == w.pid]
    assert counters["sampled_out"] >= N  # counted as dropped on purpose, not lost


M = 41  # lookups in flight at once: a prime, against a map of KTEL_DNS_INFLIGHT_MAX = 8

# In its own mount and network namespaces, M threads resolve a name at once. /etc/hosts
# is a FIFO there: nss_files' open of it sleeps until the test opens it for writing,
# which holds every lookup inside getaddrinfo; at its EOF the lookup goes on to DNS,
# which fails at once (a nameserver on the namespace's loopback, which is down).
HELD = f"""
import socket, subprocess, sys, threading
subprocess.run(["mount", "--bind", sys.argv[1], "/etc/hosts"], check=True)
subprocess.run(["mount", "--bind", sys.argv[2], "/etc/resolv.conf"], check=True)

def look():
    try:
        socket.getaddrinfo("ktel-test-host", 80)
    except socket.gaierror:
        pass

print("ready", flush=True)
sys.stdin.readline()
ts = [threading.Thread(target=look) for _ in range({M})]
[t.start() for t in ts]
[t.join() for t in ts]
print("done", flush=True)
"""


def test_lookups_evicted_from_a_full_map_of_calls_in_flight_are_counted(tmp_path):
    """More lookups in flight than the map of calls in flight holds: each one is in
    the histogram or counted in inflight_lost, none lost uncounted."""
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) is not installed")
    hosts, resolv = tmp_path / "hosts", tmp_path / "resolv.conf"
    os.mkfifo(hosts)
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    w = Workload(["unshare", "--mount", "--net", sys.executable, "-c", HELD, str(hosts), str(resolv)])
    try:
        with loaded("dns_latency", defines={"KTEL_DNS_INFLIGHT_MAX": 8}, uprobe_pid=w.pid) as probe:
            w.send()
            deadline = time.monotonic() + 30
            while threads_in_open(w.pid) < M and time.monotonic() < deadline:
                time.sleep(0.02)
            assert threads_in_open(w.pid) == M, "the lookups did not all block in open"
            os.close(os.open(hosts, os.O_WRONLY))  # every reader sees EOF
            assert w.readline() == "done"
            snap = probe.snapshot()
            lost = probe.counters()["inflight_lost"]
    finally:
        w.finish()
    count, _ = histogram_total(snap, "dns_latency", **{"process.pid": w.pid})
    assert count < M  # the map of 8 could not hold them all...
    assert count + lost == M  # ...and each one it did not hold is counted
