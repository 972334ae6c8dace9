"""The skb_drop probe against the real kernel: 23 UDP datagrams to a closed port,
in a network namespace the test creates, are 23 drops with reason NO_SOCKET."""

import os
import sys

import pytest

from tests.integration.probe_harness import drain_until, loaded, netns, python_workload

pytestmark = pytest.mark.bpf

N = 23
ETH_P_IP = 0x0800
CPU = 1

SEND = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range({N}):
    s.sendto(b"ktel", ("127.0.0.1", 9))  # the discard port: closed in a fresh namespace
s.close()
"""


def test_23_datagrams_to_a_closed_port_are_23_no_socket_drops():
    with netns() as ns, loaded("skb_drop") as probe:
        sender = python_workload(SEND, prefix=("ip", "netns", "exec", ns, "taskset", "-c", str(CPU)))
        assert sender.go() == "done"
        assert sender.finish() == 0

        def ours(evs):
            return [e for e in evs if e["pid"] == sender.pid]

        events = drain_until(probe, lambda evs: len(ours(evs)) >= N, timeout=5)
    # Loopback delivery runs in the sender's softirq context, so the drops are
    # the sender's, unless the CPU's ksoftirqd had taken the softirqs over.
    mine = ours(events)
    deferred = [e for e in events if e["comm"] == f"ksoftirqd/{CPU}" and e["reason_name"] == "NO_SOCKET"]
    assert len(mine) <= N <= len(mine) + len(deferred)
    comm = os.path.basename(sys.executable)[:15]
    assert {(e["reason_name"], e["protocol"], e["comm"]) for e in mine} == {("NO_SOCKET", ETH_P_IP, comm)}
    assert len({e["location"] for e in mine}) == 1  # one place in the UDP receive path
    assert all(e["reason"] == mine[0]["reason"] for e in mine)
