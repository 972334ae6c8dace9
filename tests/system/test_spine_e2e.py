"""End to end: `ktel up` as a user runs it, real kernel to real Prometheus and
a real OpenTelemetry Collector.

23 files created in a fresh directory must show up as exactly 23 in
file_created_total for that directory, in Prometheus (through its HTTP query
API, after remote-write), at ktel's pull endpoint and in what the Collector
received over OTLP; Ctrl-C must stop everything that `ktel up` started.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ktel.stack.otelcol import LocalCollector, attributes
from ktel.stack.proc import tail
from tests.integration.up_harness import ktel_up

pytestmark = pytest.mark.system
N = 23


def wait_for(what, fn, timeout):
    """Poll fn() until it returns a truthy value; the last value is returned either way."""
    deadline = time.monotonic() + timeout
    value = fn()
    while not value and time.monotonic() < deadline:
        time.sleep(0.5)
        value = fn()
    return value


def port_open(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def stack(tmp_path):
    with ktel_up(tmp_path) as running:
        yield running


def pids_with_arg(arg):
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if arg.encode() in cmdline.read_bytes().split(b"\0"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            pass  # gone while we looked
    return pids


def prom_value(port, directory):
    try:
        r = httpx.get(
            f"http://127.0.0.1:{port}/api/v1/query",
            params={"query": f'sum(file_created_total{{directory="{directory}"}})'},
            trust_env=False,  # loopback: never through a proxy
        )
    except httpx.TransportError:
        return None  # not listening
    r.raise_for_status()
    result = r.json()["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def pull_value(port, directory):
    try:
        resp = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False)
    except httpx.HTTPError:
        return None
    if resp.status_code == 503:
        return None  # (reading its lookback of ktel.metrics: nothing served yet)
    text = resp.text
    total = None
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "file_created_total" and s.labels.get("directory") == directory:
                total = (total or 0) + s.value
    return total


def otlp_value(collector, directory):
    """The latest file_created_total point for the directory the Collector received."""
    value = None
    for m in collector.metrics():
        if m["name"] == "file_created_total":
            for p in m["sum"]["dataPoints"]:
                if attributes(p.get("attributes", [])).get("directory") == directory:
                    value = float(p["asInt"]) if "asInt" in p else p.get("asDouble")
    return value


@pytest.mark.parametrize("stop_with", ["ctrl-c", "ktel down"])
def test_23_files_reach_prometheus_and_the_pull_endpoint_then_everything_stops(stack, stop_with):
    proc, ports, lines, env = stack
    collector = LocalCollector(Path(env["KTEL_STACK__DATA_DIR"]) / "otelcol")  # to read what it received
    target = Path(tempfile.mkdtemp(prefix="ktel-e2e-", dir="/tmp"))
    other = Path(f"{target}-other")
    other.mkdir()
    try:
        subprocess.run(["touch", *(str(target / f"f{i}") for i in range(N))], check=True)
        subprocess.run(["touch", *(str(other / f"f{i}") for i in range(5))], check=True)

        def counted_or_stopped():  # should `ktel up` stop, its output (in the assert) says why
            return proc.poll() is not None or prom_value(ports["prom"], str(target)) == N

        got = wait_for("prometheus", counted_or_stopped, 120)
        assert prom_value(ports["prom"], str(target)) == N, "".join(lines[-60:])
        logs = Path(env["KTEL_STACK__DATA_DIR"]) / "logs"
        assert wait_for("pull", lambda: pull_value(ports["pull"], str(target)) == N, 60), (
            pull_value(ports["pull"], str(target)),
            tail(logs / "pull.log"),
            tail(logs / "aggregate.log"),
        )
        assert wait_for("otlp", lambda: otlp_value(collector, str(target)) == N, 60), (
            otlp_value(collector, str(target)),
            tail(logs / "otlp.log"),
        )
        # The two directories' files may be counted a window apart.
        assert wait_for("prom other", lambda: prom_value(ports["prom"], str(other)) == 5, 60)
        # Later windows re-send the cumulative value; it must not grow by itself.
        time.sleep(3)
        assert got and prom_value(ports["prom"], str(target)) == N
        assert pull_value(ports["pull"], str(target)) == N
        assert pull_value(ports["pull"], str(other)) == 5
        assert (otlp_value(collector, str(target)), otlp_value(collector, str(other))) == (N, 5)
        # The live line shows what the Collector acknowledged (printed every 5 s without a tty).
        assert wait_for("live line", lambda: any(re.search(r"\| otlp items [1-9]", ln) for ln in lines), 30)
    finally:
        for d in (target, other):
            for f in d.iterdir():
                f.unlink()
            d.rmdir()

    if stop_with == "ctrl-c":
        proc.send_signal(signal.SIGINT)
    else:
        down = subprocess.run(
            [sys.executable, "-m", "ktel.cli", "down"], env=env, capture_output=True, text=True
        )
        assert down.returncode == 0, down.stdout + down.stderr
    assert proc.wait(timeout=180) == 0, "".join(lines[-30:])
    out = "".join(lines)
    assert "ktel up: stopped" in out
    for name, port in ports.items():
        assert not port_open(port), f"{name} still listening on {port} after Ctrl-C"


def test_a_server_that_dies_stops_ktel_up_with_the_reason(stack):
    """Prometheus killed (as the OOM killer would) under a running `ktel up`: it
    stops everything, exits 1 and names what died, rather than counting on."""
    proc, ports, lines, env = stack
    [pid] = pids_with_arg(f"--web.listen-address=127.0.0.1:{ports['prom']}")
    os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=180) == 1, "".join(lines[-30:])
    out = "".join(lines)
    assert "ktel up: stopping everything: Prometheus exited with code -9; the end of " in out
    assert "ktel up: stopped" in out
    for name, port in ports.items():
        assert not port_open(port), f"{name} still listening on {port} after Prometheus died"
