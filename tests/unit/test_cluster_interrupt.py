"""`ktel cluster` stopped (Ctrl-C, a SIGTERM) at any point, its start too (a minute or two:
certificates, brokers, ACLs), stops all it started and exits 0: its handler was set
once the start had returned, and a SIGTERM before ended the process at once, its
brokers killed uncleanly with it and the kafka-acls JVMs in flight left running."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from ktel.stack import certs, cluster


class Killed(BaseException):
    """The signal's action when no handler of ktel's takes it: the process ended."""


def pair(d: Path, name: str, cert: str) -> certs.Pair:
    """What openssl makes, without openssl."""
    d.mkdir(parents=True, exist_ok=True)
    p = certs.Pair(d / f"{name}.{cert}", d / f"{name}.key")
    p.cert.write_text(f"{name} certificate\n")
    certs.write_private(p.key, f"{name} key\n")
    return p


def to_main_thread(sig: int) -> None:
    """The signal, to the main thread, where Python runs handlers (one to the process
    could be taken by another thread of the test runner)."""
    main = threading.main_thread().ident
    assert main is not None
    signal.pthread_kill(main, sig)


def stopped_here(sig: int) -> None:
    """The signal, and a wait as long as a start's (a broker's readiness, a kafka-acls
    JVM) that it must end."""
    to_main_thread(sig)
    for _ in range(200):
        time.sleep(0.05)


class Cluster:
    """`ktel cluster`'s brokers: what of them runs, and the signal that lands where."""

    def __init__(self, events: list[str], sig: int, at: str) -> None:
        self.events, self.sig, self.at = events, sig, at
        self.nodes = [self]
        self.sasl_ssl_bootstrap = self.mtls_bootstrap = self.bootstrap = "127.0.0.1:1"
        self.running = False

    def start(self) -> None:
        self.events.append("start")
        self.running = True  # launched: to be stopped from here on
        if self.at == "start":
            stopped_here(self.sig)
        self.events.append("started")

    def apply_acls(self, _commands: list[list[str]]) -> None:
        self.events.append("acls")
        if self.at == "acls":
            stopped_here(self.sig)
        elif self.at == "running":  # once the start is over, while it waits for the signal
            threading.Timer(0.2, to_main_thread, (self.sig,)).start()

    def stop(self) -> None:
        if not self.running:
            return
        self.events.append("stop")
        # A second signal meanwhile (Ctrl-C pressed again): the stop goes on to its end.
        to_main_thread(self.sig)
        time.sleep(0.2)
        self.running = False
        self.events.append("stopped")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize(
    ("at", "events"),
    [
        ("certificates", []),
        ("start", ["start", "stop", "stopped"]),
        ("acls", ["start", "started", "acls", "stop", "stopped"]),
        ("running", ["start", "started", "acls", "stop", "stopped"]),
    ],
)
def test_a_signal_at_any_point_stops_all_ktel_cluster_started(tmp_path, monkeypatch, capsys, sig, at, events):
    seen: list[str] = []
    made: list[Cluster] = []

    def make_ca(d: Path, name: str = "ca") -> certs.Pair:
        if at == "certificates":
            stopped_here(sig)
        return pair(d, name, "pem")

    def new_cluster(*_args: object, **_kwargs: object) -> Cluster:
        made.append(Cluster(seen, sig, at))
        return made[-1]

    monkeypatch.setattr(certs, "make_ca", make_ca)
    monkeypatch.setattr(certs, "issue", lambda _ca, d, name: pair(d, name, "crt"))
    monkeypatch.setattr(cluster, "LocalKafkaCluster", new_cluster)

    def killed(*_: object) -> None:
        raise Killed

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, killed)
    signal.signal(signal.SIGTERM, killed)
    try:
        assert cluster.run(tmp_path, 3, ()) == 0
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    assert seen == events
    assert not any(c.running for c in made)
    interrupted = "interrupted while starting" in capsys.readouterr().err
    assert interrupted == (at != "running")
