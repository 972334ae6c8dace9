"""`ktel up` stopped (Ctrl-C, SIGTERM from `ktel down`) while it starts: the start's
waits end there and everything started is stopped, rather than the signal waiting,
unheard, for every child to be ready (up to 300 s) or the start to fail."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import pytest

from ktel import up
from ktel.stack import kafka, proc
from tests.unit.up_fake import fake_stack, run_up, stack_config


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

    fake_stack(monkeypatch, start=start, wait_ready=wait_ready, stop=lambda _stack: events.append("stop"))
    cfg = stack_config(tmp_path)
    assert run_up(cfg) == 0
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

    fake_stack(monkeypatch, start=lambda _stack: None, wait_ready=wait_ready, stop=stop)
    read_end, write_end = os.pipe()
    os.close(read_end)
    out = io.TextIOWrapper(io.FileIO(write_end, "w"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", out)
    cfg = stack_config(tmp_path)
    try:
        assert run_up(cfg) == 0
    finally:
        out.close()
    assert events == ["agent", "aggregate"]
    assert not up.pidfile(cfg).exists()


def test_a_signal_while_a_tool_of_the_start_runs_stops_all_it_started(tmp_path, monkeypatch):
    """`ktel up` stopped (by `ktel down`'s SIGTERM, which reaches it alone) while a tool of
    its start runs (the Collector's build, Kafka's storage format) stops the tool and all
    the tool started: it killed the tool alone, and the Collector's builder's `go build`
    compiled on for minutes after `ktel up` had exited."""
    pid, heard = tmp_path / "pid", tmp_path / "heard"
    # A tool that starts a process of its own and waits for it, as the builder does `go
    # build`; that one deaf to SIGINT. Once it runs, `ktel down`'s SIGTERM.
    script = f"""
        trap 'echo INT > {heard}; exit 130' INT
        (trap '' INT; exec sleep 300) &
        echo $! > {pid}
        kill -TERM $PPID
        wait
    """
    # Time enough to end on SIGINT, whatever the load: the tool ends as soon as it hears it.
    monkeypatch.setattr(proc, "TOOL_STOP_SECONDS", 300)
    fake_stack(monkeypatch, start=lambda _stack: proc.run(["sh", "-c", script]), stop=lambda _stack: None)
    assert run_up(stack_config(tmp_path)) == 0
    gone = exited(int(pid.read_text()))
    assert heard.read_text() == "INT\n"  # asked first, as Ctrl-C at a terminal asks
    assert gone


def exited(pid: int) -> bool:
    """Whether process ``pid`` exits (if not already gone) within a minute: it was killed,
    and a SIGKILL sent is not yet one taken."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        waiter = select.poll()
        waiter.register(fd, select.POLLIN)
        return bool(waiter.poll(60_000))
    finally:
        with contextlib.suppress(ProcessLookupError):  # (a test that fails leaves nothing behind)
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        os.close(fd)


def test_a_stop_while_tools_run_in_a_pool_stops_them_and_starts_no_more(tmp_path, monkeypatch):
    """`ktel cluster` stopped (Ctrl-C's KeyboardInterrupt in its main thread) while its
    ACLs are set, kafka-acls JVMs run four at a time by a thread pool's threads, stops
    the ones in flight and all they started, and starts none of the rest: the pool
    waited for each to its end (up to its timeout, the broker away), out of a Ctrl-C's
    reach in sessions of their own."""
    started, heard = tmp_path / "started", tmp_path / "heard"
    started.mkdir()
    # Each kafka-acls: says it started, with the process it started (deaf to SIGINT, as
    # in the test above), and waits for it; the last of the four in flight stops ktel.
    java = tmp_path / "java"
    java.write_text(f"""#!/bin/sh
        trap 'echo INT >> {heard}; exit 130' INT
        (trap '' INT; exec sleep 300) &
        echo $! > {started}/$$
        set -- {started}/*
        [ $# -eq 4 ] && mkdir {tmp_path}/stopping 2>/dev/null && kill -TERM $PPID
        wait
    """)
    java.chmod(0o755)
    monkeypatch.setattr(kafka, "_java", lambda: str(java))
    monkeypatch.setattr(kafka, "ensure_kafka", lambda: tmp_path)
    # Their timeout well short of apply_acls' own: one that passed was not stopped by the
    # stop, but waited for.
    timed_out: list[Sequence[str]] = []
    run = proc.run

    def run_timed(argv: Sequence[str], timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return run(argv, timeout=60)
        except subprocess.TimeoutExpired:
            timed_out.append(argv)
            raise

    monkeypatch.setattr(proc, "run", run_timed)
    commands = [["kafka-acls.sh", "--bootstrap-server", "b:9092", "--add", str(n)] for n in range(8)]
    broker = kafka.LocalKafka(tmp_path / "kafka")

    class Stop(Exception):
        pass

    def stop(*_: object) -> None:
        raise Stop

    handler = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Stop):
            broker.apply_acls(commands)
    finally:
        signal.signal(signal.SIGTERM, handler)
    tools = {int(p.name): int(p.read_text()) for p in started.iterdir()}
    gone = [exited(pid) for pid in (*tools, *tools.values())]
    assert not timed_out
    assert len(tools) == 4  # none of the rest started
    assert heard.read_text() == "INT\n" * 4  # asked first, as Ctrl-C at a terminal asks
    assert all(gone)


def test_no_tool_starts_while_tools_are_stopped(tmp_path):
    """A pool's thread that took its next command just as its caller was stopped, the
    rest cancelled, starts no tool while the caller waits for the pool to end: that
    one would run to its end."""
    ran = tmp_path / "ran"
    with (
        proc.tools_stopped(),
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        pytest.raises(proc.ToolsStopped),
    ):
        pool.submit(proc.run, ["sh", "-c", f"touch {ran}"]).result()
    assert not ran.exists()
    assert proc.run(["sh", "-c", f"touch {ran}"]).returncode == 0  # and once it is over, they start
    assert ran.exists()
