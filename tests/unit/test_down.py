"""`ktel down` signals only a `ktel up`: a stale pid file naming another process is
reported and removed, and that process is left alone. Real processes throughout."""

from __future__ import annotations

import inspect
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ktel import up
from ktel.stack import proc
from tests.unit.up_fake import fake_stack, run_up, stack_config


@pytest.fixture
def cfg(tmp_path):
    return stack_config(tmp_path)


@pytest.fixture
def procs():
    running: list[subprocess.Popen] = []
    yield running
    for p in running:
        with p:  # waits for it, and closes its pipes
            if p.poll() is None:
                p.kill()


READY = "import time\nprint('ready', flush=True)\ntime.sleep(600)\n"


def started(procs: list[subprocess.Popen], *args: str) -> subprocess.Popen:
    """Python run with ``args``, past its start: the program says so once it runs its code
    (``READY``)."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE)
    procs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def ktel_script(tmp_path: Path, code: str = READY) -> str:
    """A stand-in for the `ktel` script, which SIGTERM ends (with ``READY``)."""
    script = tmp_path / "bin" / "ktel"
    script.parent.mkdir()
    script.write_text(code)
    return str(script)


def test_a_stale_pid_file_naming_another_process_signals_nothing(cfg, procs, capsys):
    # Another Python program.
    code = "import time; print('ready', flush=True); time.sleep(600)"
    other = started(procs, "-c", code)
    up.pidfile(cfg).write_text(str(other.pid))
    assert up.down(cfg, timeout=5) == 1
    assert other.poll() is None  # not signalled
    assert not up.pidfile(cfg).exists()
    said = f"names pid {other.pid}, which is not ktel up ({sys.executable} -c {code}): signalling nothing"
    assert said in capsys.readouterr().out


def test_a_ktel_up_is_stopped(cfg, procs, tmp_path):
    # A stand-in with the command line of the `ktel` script running `up` (python, the
    # script, then the arguments), which SIGTERM ends.
    fake = started(procs, ktel_script(tmp_path), "--log-level", "info", "up")
    up.pidfile(cfg).write_text(str(fake.pid))
    assert up.is_ktel_up(fake.pid)
    assert up.down(cfg, timeout=30) == 0
    assert fake.wait() == -signal.SIGTERM


@pytest.mark.parametrize(
    ("args", "is_up"),
    [
        (["/venv/bin/python", "/venv/bin/ktel", "up"], True),
        (["python3", "-m", "ktel.cli", "--config", "k.toml", "up"], True),
        (["python3", "-m", "ktel.cli", "down"], False),
        (["python3", "-c", "...", "ktel.cli", "up"], False),  # not run as -m ktel.cli
        (["sleep", "600"], False),
        ([], False),  # exited
    ],
)
def test_which_command_lines_run_ktel_up(args, is_up):
    assert up.runs_ktel_up(args) is is_up


def test_a_pid_that_is_gone_is_a_stale_pid_file(cfg, procs):
    gone = subprocess.Popen(["true"])
    gone.wait()
    up.pidfile(cfg).write_text(str(gone.pid))
    assert up.down(cfg, timeout=5) == 1
    assert not up.pidfile(cfg).exists()


def test_a_second_ktel_up_of_a_data_dir_leaves_the_first_and_its_pid_file_alone(
    cfg, procs, tmp_path, monkeypatch, capsys
):
    first = started(procs, ktel_script(tmp_path), "up")
    up.pidfile(cfg).write_text(str(first.pid))

    def start(_stack):
        raise AssertionError("the second ktel up started a stack")

    fake_stack(monkeypatch, start=start, stop=lambda _stack: None)
    assert run_up(cfg) == 1
    assert up.pidfile(cfg).read_text() == str(first.pid)  # `ktel down` still finds it
    assert first.poll() is None
    assert f"ktel up (pid {first.pid}) is already running" in capsys.readouterr().out


# What a server's stop waits when given no time of its own.
_SERVER_STOP_DEFAULT = inspect.signature(proc.Server.stop).parameters["timeout"].default


class _Stopped:
    """A process or server of the stack: records the wait it is given to stop in."""

    running = True

    def __init__(self, name: str, waits: dict[str, float]):
        self.name, self.waits = name, waits

    def stop(self, timeout: float = _SERVER_STOP_DEFAULT) -> None:
        self.waits[self.name] = timeout


def test_ktel_down_waits_as_long_as_ktel_ups_stop_can_take(cfg, procs, tmp_path, monkeypatch):
    """`ktel up`'s stop gives each process and server its own time before killing it;
    `ktel down` waits at least all of them, or it reported a stop still under way, in
    order, as failed."""
    stack = up.Stack(cfg)
    everything = [name for name, _, _ in up.CHILDREN] + list(stack.servers)
    waits: dict[str, float] = {}
    stack.children = {name: _Stopped(name, waits) for name, _, _ in up.CHILDREN}
    stack.servers = {name: _Stopped(name, waits) for name in stack.servers}
    monkeypatch.setattr(up.proc, "stop", lambda p, timeout, sig: p.stop(timeout))
    stack.stop()
    assert sorted(waits) == sorted(everything)
    # A `ktel up` whose stop never ends: SIGTERM is ignored.
    ignoring = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + READY
    stuck = started(procs, ktel_script(tmp_path, ignoring), "up")
    up.pidfile(cfg).write_text(str(stuck.pid))
    clock = [0.0]
    monkeypatch.setattr(up.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(up.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    assert up.down(cfg) == 1
    assert clock[0] >= sum(waits.values())
