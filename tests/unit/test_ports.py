"""The local stack's port helpers, against this machine's real sockets."""

import socket
from pathlib import Path

from ktel.stack import proc
from ktel.stack.proc import free_port, port_in_use


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    if low > 2048:  # else there is no room below it, and the kernel picks
        assert all(p < low for p in ports)  # where connect() never picks a local port
    for p in ports[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_port_in_use_sees_a_listener_and_nothing_else() -> None:
    port = free_port()
    assert not port_in_use(port)
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", port))
        assert not port_in_use(port)  # bound is not listening
        bound.listen()
        assert port_in_use(port)
        assert port_in_use(port, "0.0.0.0")  # a wildcard is probed on loopback


def test_a_connection_to_itself_is_no_listener(monkeypatch) -> None:
    """connect() can be given the very port it connects to as its own; with nobody
    listening, the socket then connects to itself, and that must not count."""
    port = free_port()
    plain = socket.socket

    def given_that_port(*args, **kwargs):
        s = plain(*args, **kwargs)
        s.bind(("127.0.0.1", port))
        return s

    monkeypatch.setattr(proc.socket, "socket", given_that_port)
    assert not port_in_use(port)


def test_ktel_up_names_a_metrics_port_taken_on_the_address_its_processes_bind(tmp_path) -> None:
    """ktel's processes serve their metrics on service.metrics_bind: a port taken there
    is named before anything starts, not left to a child that cannot listen."""
    import pytest

    from ktel import config
    from ktel.up import Stack

    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = config.Config(
            agent=config.AgentConfig(host_id="h", metrics_port=port),
            stack=config.StackConfig(data_dir=tmp_path),
            service=config.ServiceConfig(metrics_bind="::1"),
        )
        with pytest.raises(RuntimeError, match=rf"already in use: .*::1:{port} \(agent\.metrics_port"):
            Stack(cfg).check_ports()
