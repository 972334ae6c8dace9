"""One agent to a state directory (edge_agent/statelock.py): a second refuses to start,
naming the directory and the first, and touches nothing there; the lock goes with its
holder, also when the holder is SIGKILLed. ``flock`` locks an open file description,
so each holder here is a process of its own."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent import statelock
from tests.unit.test_agent_batches import file_events, make_agent, packed

ROOT = Path(__file__).resolve().parents[2]

# `ktel agent` in a process of its own, up to where it would load the probes.
KTEL_AGENT = """
from edge_agent import agent
from ktel import cli

async def started(self, stop):
    print("started")

agent.Agent.run = started
cli.main(["agent"])
"""

# A process that holds the lock until it is killed.
HOLDER = """
import pathlib, sys, time
from edge_agent import statelock

statelock.acquire(pathlib.Path(sys.argv[1]))
print("held", flush=True)
time.sleep(3600)
"""


def agent_process(state: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KTEL_")}
    env |= {
        "KTEL_AGENT__STATE_DIR": str(state),
        "KTEL_AGENT__HOST_ID": "h",
        "KTEL_AGENT__CGROUP_ROOT": str(tmp_path),
    }
    argv = [sys.executable, "-c", KTEL_AGENT]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def contents(state: Path) -> dict[str, bytes]:
    return {str(p.relative_to(state)): p.read_bytes() for p in sorted(state.rglob("*")) if p.is_file()}


def test_a_second_agent_on_a_state_directory_refuses_to_start_and_touches_nothing(tmp_path):
    state = tmp_path / "state"
    first = make_agent(state)
    try:
        first.spool_batch(packed(file_events(3)), [1.0] * 3)  # a batch number reserved, a batch spooled
        before = contents(state)
        second = agent_process(state, tmp_path)
        assert second.returncode == 2 and second.stdout == ""
        assert second.stderr.startswith(
            f"ktel: agent.state_dir = '{state}': in use by another ktel agent, "
            f"pid {os.getpid()} on {socket.gethostname()!r} ({state / statelock.LOCK_FILE} is locked): "
        )
        assert "stop that agent first" in second.stderr and "KTEL_AGENT__STATE_DIR" in second.stderr
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
        assert contents(state) == before
    finally:
        first.spool.close()
        statelock.release(first.state_lock)
    # Once the first is gone, the next one starts.
    again = agent_process(state, tmp_path)
    assert again.returncode == 0 and again.stdout == "started\n", again.stderr


def test_the_lock_goes_with_a_holder_that_is_killed(tmp_path):
    state = tmp_path / "state"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(state)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(statelock.Held) as held:
            statelock.acquire(state)
        assert held.value.holder == f"pid {holder.pid} on {socket.gethostname()!r}"
        assert (state / statelock.LOCK_FILE).stat().st_mode & 0o777 == 0o600
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()  # type: ignore[union-attr]
    # No stale lock: the kernel let it go with the process.
    fd = statelock.acquire(state)
    try:
        assert fd is not None
        assert (state / statelock.LOCK_FILE).read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    finally:
        statelock.release(fd)
