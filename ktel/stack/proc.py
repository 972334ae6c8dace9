"""Child processes of ktel's local stack: started in their own session, tied to
the parent's life, stopped gently then firmly, their logs tailed on failure."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def spawn(
    argv: list[str], log_path: Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a server with stdout+stderr appended to log_path, in its own session."""
    log = open(log_path, "ab")  # noqa: SIM115 - the child keeps writing after we return
    log.write(f"\n===== ktel: starting {argv[0]} at {time.ctime()} =====\n".encode())
    log.flush()
    try:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Own session: a Ctrl-C meant for pytest doesn't reach the server half-way
            # through a test; we stop it ourselves.
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
    finally:
        log.close()  # the child has its own copy of the fd


def _die_with_parent() -> Callable[[], None] | None:
    # PR_SET_PDEATHSIG fires when the *thread* that forked exits, not the process, so
    # only ask for it from the main thread; a server started from a worker thread
    # (asyncio.to_thread) would otherwise be killed when that thread is retired.
    if threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def stop(proc: subprocess.Popen[bytes] | None, timeout: float, sig: int = signal.SIGTERM) -> None:
    """Ask with ``sig``, SIGKILL after ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            data = f.read().decode(errors="replace")
    except OSError:
        return f"({path} not readable)"
    return "\n".join(data.splitlines()[-lines:])


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
