"""The tcp_retransmit probe against the real kernel: a TCP connection between two
network namespaces the test creates, over a veth pair, retransmits while the
far end's address is removed for a moment (its packets arrive and are dropped,
no ACK comes back); every retransmission is an event with the connection's
addresses, ports and state, and the data arrives once the address is back.

(Taking the link down instead does not work: the carrier loss flushes the
neighbour table, the segment waits in the ARP queue, and the kernel does not
retransmit an skb still in a host queue: -EBUSY, the tracepoint's err.)"""

import random
import sys
import time

import pytest

from ktel.stack.proc import free_port
from tests.integration.probe_harness import Workload, drain_until, loaded, netns, run

pytestmark = pytest.mark.bpf

SERVER = """
import socket, sys
srv = socket.socket()
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen()
print("ready", flush=True)
conn, _ = srv.accept()
total = 0
while total < int(sys.argv[3]):
    total += len(conn.recv(65536))
print(total, flush=True)
"""

CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print(c.getsockname()[1], flush=True)
for line in sys.stdin:
    c.sendall(b"k" * int(line))
    print("sent", flush=True)
c.close()
"""


def test_retransmissions_while_the_peer_address_is_gone_are_events():
    net = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
    a_ip, b_ip, port = f"{net}.1", f"{net}.2", free_port()
    with netns() as a, netns() as b, loaded("tcp_retransmit") as probe:
        run("ip", "-n", a, "link", "add", "ktel-a", "type", "veth", "peer", "name", "ktel-b", "netns", b)
        run("ip", "-n", a, "addr", "add", f"{a_ip}/24", "dev", "ktel-a")
        run("ip", "-n", b, "addr", "add", f"{b_ip}/24", "dev", "ktel-b")
        run("ip", "-n", a, "link", "set", "ktel-a", "up")
        run("ip", "-n", b, "link", "set", "ktel-b", "up")
        server = Workload(["ip", "netns", "exec", b, sys.executable, "-c", SERVER, b_ip, str(port), "6000"])
        client = Workload(["ip", "netns", "exec", a, sys.executable, "-c", CLIENT, b_ip, str(port)])
        try:
            sport = int(client.hello)
            assert client.go("1000") == "sent"  # delivered while the link is up
            run("ip", "-n", b, "addr", "del", f"{b_ip}/24", "dev", "ktel-b")
            assert client.go("5000") == "sent"  # into the send buffer; every transmission is lost
            time.sleep(1.5)  # RTOs of about 0.2, 0.4 and 0.8 s
            run("ip", "-n", b, "addr", "add", f"{b_ip}/24", "dev", "ktel-b")
            assert server.readline() == "6000"  # a retransmission got through
            assert client.finish() == 0
            assert server.proc.wait(timeout=10) == 0
        finally:
            client.kill()
            server.kill()

        def ours(evs):
            conn = (a_ip, sport, b_ip, port)
            return [e for e in evs if (e["saddr"], e["sport"], e["daddr"], e["dport"]) == conn]

        events = drain_until(probe, lambda evs: len(ours(evs)) >= 3, timeout=2)
        assert probe.counters()["ringbuf_drops"] == 0
    mine = ours(events)
    assert len(mine) >= 3
    assert {(e["family"], e["state"]) for e in mine} == {("ipv4", "ESTABLISHED")}
    # Sent and lost on the wire: the retransmissions themselves succeeded (err 0,
    # on a kernel whose tracepoint has err; None on one without).
    assert {e["err"] for e in mine} <= {0, None}
    assert len({e["err"] is None for e in mine}) == 1
    # The RTO retransmissions of the first lost segment back off exponentially
    # from the 200 ms floor (0.2, 0.4, 0.8 s ...); once it is acknowledged, the
    # other lost segments follow at once.
    gaps = [b["ts_ns"] - a["ts_ns"] for a, b in zip(mine, mine[1:], strict=False)]
    assert 150e6 < gaps[0] < 400e6
    assert 1.5 * gaps[0] < gaps[1] < 2.5 * gaps[0]
