"""`ktel up` as a user runs it: a child process whose output a thread collects line
by line, on free ports, until it says it is up."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from ktel.stack.proc import free_port
from ktel.up import READY_LINE
from tests.conftest import need_bpf

# Every port `ktel up` serves, by a short name, and its setting.
PORTS = {
    "kafka": "KTEL_STACK__KAFKA_PORT",
    "ctrl": "KTEL_STACK__KAFKA_CONTROLLER_PORT",
    "prom": "KTEL_STACK__PROMETHEUS_PORT",
    "otelcol-grpc": "KTEL_STACK__COLLECTOR_GRPC_PORT",
    "otelcol-http": "KTEL_STACK__COLLECTOR_HTTP_PORT",
    "pull": "KTEL_PULL__PORT",
    "pull-metrics": "KTEL_PULL__METRICS_PORT",
    "agent": "KTEL_AGENT__METRICS_PORT",
    "agg": "KTEL_PROCESS__METRICS_PORT",
    "rw": "KTEL_REMOTE_WRITE__METRICS_PORT",
    "otlp": "KTEL_OTLP__METRICS_PORT",
}
# The ports of ktel's own processes, each serving /readyz.
CHILD_PORTS = ("agg", "rw", "pull", "otlp", "agent")


def free_ports() -> tuple[dict[str, int], dict[str, str]]:
    """A free port for each of ``PORTS``: by short name, and as KTEL_* variables."""
    ports = {name: free_port() for name in PORTS}
    return ports, {PORTS[name]: str(port) for name, port in ports.items()}


class KtelUp:
    """``argv`` (a `ktel up` command line) started with ``env``; ``lines``: its output
    (stdout and stderr) so far, read by a thread so that the pipe never fills."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        out = self.proc.stdout
        assert out is not None
        threading.Thread(target=lambda: self.lines.extend(iter(out.readline, "")), daemon=True).start()

    def output(self, last: int | None = None) -> str:
        return "".join(self.lines[-last:] if last else self.lines)

    def wait_up(self, timeout: float) -> bool:
        """Wait until it says it is up, exits, or ``timeout`` passes (a generous bound
        on a busy machine, not a timing assertion); whether it is up and running."""
        deadline = time.monotonic() + timeout
        while not self.said_up() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        return self.said_up() and self.proc.poll() is None

    def said_up(self) -> bool:
        return any(READY_LINE in ln for ln in self.lines)


def readyz(port: int) -> tuple[int, str]:
    """The status and body of /readyz on 127.0.0.1:``port``."""
    r = httpx.get(f"http://127.0.0.1:{port}/readyz", trust_env=False, timeout=10)
    return r.status_code, r.text.strip()


@contextlib.contextmanager
def ktel_up(
    tmp_path: Path, wrap: Callable[[list[str]], list[str]] = lambda argv: argv, **settings: str
) -> Iterator[tuple[subprocess.Popen[str], dict[str, int], list[str], dict[str, str]]]:
    """`ktel up` on free ports, a 1 s aggregation window and ``settings`` (KTEL_* variables
    and any other environment), its command line through ``wrap``, until it is up:
    (process, ports by short name, its output lines, its environment). Killed at the
    end if still running."""
    need_bpf()
    ports, port_env = free_ports()
    env = dict(
        os.environ,
        **port_env,
        KTEL_STACK__DATA_DIR=str(tmp_path / "stack"),
        KTEL_AGENT__STATE_DIR=str(tmp_path / "agent-state"),
        KTEL_AGGREGATE__WINDOW_SECONDS="1",
        **settings,
    )
    up = KtelUp(wrap([sys.executable, "-m", "ktel.cli", "up"]), env)
    try:
        assert up.wait_up(300), "ktel up did not come up:\n" + up.output()
        # "ktel is up" means every process of ktel's is ready, not only listening.
        assert {name: readyz(ports[name]) for name in CHILD_PORTS} == {
            name: (200, "ready") for name in CHILD_PORTS
        }, up.output()
        yield up.proc, ports, up.lines, env
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
