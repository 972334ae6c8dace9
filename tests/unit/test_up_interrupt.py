"""`ktel up` stopped (Ctrl-C, SIGTERM from `ktel down`) while it starts: the start's
waits end there and everything started is stopped, rather than the signal waiting,
unheard, for every child to be ready (up to 300 s) or the start to fail."""

from __future__ import annotations

import io
import os
import signal
import sys
import time

from ktel import config, up


def test_a_signal_while_starting_ends_the_wait_and_stops_the_stack(tmp_path, monkeypatch):
    events: list[str] = []

    def start(_stack):
        events.append("start")

    def wait_ready(_stack, timeout: float = 300) -> None:
        # A child that never gets ready; the signal comes while this waits.
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(200):
            time.sleep(0.05)
        events.append("waited")
        raise TimeoutError("not ready")

    monkeypatch.setattr(up.Stack, "start", start)
    monkeypatch.setattr(up.Stack, "wait_ready", wait_ready)
    monkeypatch.setattr(up.Stack, "stop", lambda _stack: events.append("stop"))
    cfg = config.Config(agent=config.AgentConfig(host_id="h"), stack=config.StackConfig(data_dir=tmp_path))
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        assert up.run(cfg) == 0
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    assert events == ["start", "stop"]
    assert not up.pidfile(cfg).exists()


def test_a_closed_output_does_not_cut_the_stop_short(tmp_path, monkeypatch):
    """`ktel up | tee log`, and a Ctrl-C that ends the tee too: every line after is
    written to a pipe nobody reads, and the stack must still be stopped, in order."""
    events: list[str] = []

    def wait_ready(_stack, timeout: float = 300) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(200):
            time.sleep(0.05)

    def stop(_stack) -> None:
        for name in ("agent", "aggregate"):
            up.say(f"stopping {name}")
            events.append(name)

    monkeypatch.setattr(up.Stack, "start", lambda _stack: None)
    monkeypatch.setattr(up.Stack, "wait_ready", wait_ready)
    monkeypatch.setattr(up.Stack, "stop", stop)
    read_end, write_end = os.pipe()
    os.close(read_end)
    out = io.TextIOWrapper(io.FileIO(write_end, "w"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", out)
    cfg = config.Config(agent=config.AgentConfig(host_id="h"), stack=config.StackConfig(data_dir=tmp_path))
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        assert up.run(cfg) == 0
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
        out.close()
    assert events == ["agent", "aggregate"]
    assert not up.pidfile(cfg).exists()
