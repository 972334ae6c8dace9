"""A stop signal (Ctrl-C, `ktel down`'s SIGTERM) landing while `ktel up` starts a
process, once the child is forked but before it is kept, must leave the child kept, to
be stopped with the rest: its handler raises, and raised inside subprocess.Popen the
exception lost the child, left running and never stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ktel import config, up
from ktel.stack import kafka, proc
from ktel.stack.otelcol import LocalCollector
from ktel.stack.prometheus import LocalPrometheus


class Stop(BaseException):
    """What the stop signal's handler raises, as `ktel up`'s does while it starts."""


class _Forked:
    """subprocess.Popen, the stop signal landing once the child is forked."""

    def __init__(self, *_args, **_kwargs):
        # To the main thread, where Python runs handlers (a signal to the process could
        # be taken by another thread of the test runner, and its handler run anywhere).
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        self.pid = 1 << 22  # Python runs the handler from here on, unless it is held
        self.returncode = None

    def poll(self):
        return None


@pytest.fixture
def forked(monkeypatch):
    def stop(_sig, _frame):
        raise Stop

    monkeypatch.setattr(subprocess, "Popen", _Forked)
    previous = signal.signal(signal.SIGTERM, stop)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_stop_signal_while_a_child_starts_finds_it_kept(tmp_path, monkeypatch, forked):
    cfg = config.Config(agent=config.AgentConfig(host_id="h"), stack=config.StackConfig(data_dir=tmp_path))
    stack = up.Stack(cfg)

    async def create_topics(*_args):
        pass

    monkeypatch.setattr(up.Stack, "check_ports", lambda _stack: None)
    monkeypatch.setattr(up, "ensure_kafka", lambda: None)
    monkeypatch.setattr(up, "ensure_collector", lambda: None)
    monkeypatch.setattr(up.topics, "create_topics", create_topics)
    for server in stack.servers.values():
        monkeypatch.setattr(server, "start", lambda: None)
    with pytest.raises(Stop):
        stack.start()
    first = up.CHILDREN[0][0]
    assert isinstance(stack.children.get(first), _Forked)


@pytest.mark.parametrize("server", ["Kafka", "Prometheus", "the OpenTelemetry Collector"])
def test_a_stop_signal_while_a_server_starts_finds_it_kept(tmp_path, monkeypatch, forked, server):
    monkeypatch.setattr(kafka, "ensure_kafka", lambda: tmp_path)
    monkeypatch.setattr(kafka, "_java", lambda: "java")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "meta.properties").touch()  # formatted already
    s: proc.Server = {
        "Kafka": lambda: kafka.LocalKafka(tmp_path, proc.free_port(), proc.free_port()),
        "Prometheus": lambda: LocalPrometheus(tmp_path, proc.free_port()),
        "the OpenTelemetry Collector": lambda: LocalCollector(
            tmp_path, proc.free_port(), proc.free_port(), binary=Path(sys.executable)
        ),
    }[server]()
    with pytest.raises(Stop):
        s.start()
    assert isinstance(s._proc, _Forked)


def test_a_process_started_while_stop_signals_are_held_hears_them(tmp_path):
    log = tmp_path / "status.log"
    with proc.stop_signals_held():
        child = proc.spawn(["grep", "^SigBlk:", "/proc/self/status"], log, tmp_path)
    assert child.wait() == 0
    blocked = int(log.read_text().split("SigBlk:")[1].split()[0], 16)
    assert [s for s in proc.STOP_SIGNALS if blocked & (1 << (s - 1))] == []


def test_a_stop_signal_another_thread_takes_is_held_too():
    """Sent to the process, a stop signal goes to a thread that does not block it: with
    the main thread's blocked, another's (a test runner's, a library's). Python then ran
    the handler in the main thread within the block all the same; now it runs at its end."""
    ran: list[str] = []

    def stop(_sig, _frame):
        ran.append("handler")
        raise Stop

    other = threading.Event()
    idle = threading.Thread(target=other.wait)  # a thread that blocks no signal
    idle.start()
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Stop), proc.stop_signals_held():
            os.kill(os.getpid(), signal.SIGTERM)  # the main thread blocks it: the other takes it
            for _ in range(100):  # Python work, where it would run the handler
                time.sleep(0.001)
            ran.append("block's end")
        assert ran == ["block's end", "handler"]
    finally:
        signal.signal(signal.SIGTERM, previous)
        other.set()
        idle.join()
