"""/healthz and /readyz of the real processes: exporters, the pull endpoint and a
processing worker, each `ktel ...` as a child process against the real broker (or
none), on their metrics ports, bound where service.metrics_bind says. The agent's:
tests/integration/test_status.py."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from ktel import config, topics
from ktel.stack.proc import free_port, tail
from ktel.stack.proc import stop as stop_process
from ktel.topics import create_topics

pytestmark = pytest.mark.kafka

# The start of a line in ktel's text log format (or Faust's own).
TEXT_LOG_LINE = re.compile(r"^\[?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


class Ktel:
    """`ktel <args>` as a child process with its log in a file."""

    def __init__(self, tmp_path: Path, args: list[str], **env: str) -> None:
        self.log = tmp_path / f"{'-'.join(args)}.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ktel.cli", *args],
                env={**os.environ, "KTEL_AGENT__HOST_ID": "health", **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def get(self, port: int, path: str, timeout: float = 240) -> httpx.Response:
        """The first answer on 127.0.0.1:port/path (waits for the server to listen)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"exited:\n{tail(self.log)}"
            try:
                return httpx.get(f"http://127.0.0.1:{port}{path}", trust_env=False)
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"nothing on port {port}:\n{tail(self.log)}"
                time.sleep(0.5)

    def until_ready(self, port: int, timeout: float = 300) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while (answer := self.get(port, "/readyz")).status_code != 200:
            assert answer.status_code == 503, answer
            assert time.monotonic() < deadline, f"not ready: {answer.text}\n{tail(self.log)}"
            time.sleep(1)
        return answer

    def listens_on(self, port: int) -> set[str]:
        conns = psutil.Process(self.proc.pid).net_connections()
        return {c.laddr.ip for c in conns if c.laddr.port == port and c.status == psutil.CONN_LISTEN}

    def stop(self) -> None:
        stop_process(self.proc, 60)


@pytest.fixture
def started():
    procs: list[Ktel] = []
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture
def ktel_topics(kafka):
    cfg = config.Config(
        kafka=config.KafkaConfig(bootstrap=kafka.bootstrap), agent=config.AgentConfig(host_id="t")
    )
    asyncio.run(create_topics(kafka.bootstrap, topics.specs(cfg)))


def test_an_exporter_without_kafka_is_alive_but_not_ready(tmp_path, started):
    port, nowhere = free_port(), free_port()
    exporter = Ktel(
        tmp_path,
        ["export", "remote-write"],
        KTEL_KAFKA__BOOTSTRAP=f"127.0.0.1:{nowhere}",
        KTEL_REMOTE_WRITE__METRICS_PORT=str(port),
    )
    started.append(exporter)
    assert exporter.get(port, "/healthz").status_code == 200
    # "starting" until the exporter's Kafka loop says what ready means to it.
    deadline = time.monotonic() + 60
    while (answer := exporter.get(port, "/readyz")).text == "not ready: starting\n":
        assert time.monotonic() < deadline, tail(exporter.log)
        time.sleep(0.2)
    assert (answer.status_code, answer.text) == (
        503,
        f"not ready: not connected to Kafka at 127.0.0.1:{nowhere}\n",
    )
    assert "ktel_exporter" in exporter.get(port, "/metrics").text
    assert exporter.listens_on(port) == {"127.0.0.1"}  # service.metrics_bind's default


def test_exporters_and_pull_endpoint_become_ready(kafka, ktel_topics, tmp_path, started):
    ports = {"otlp": free_port(), "remote-write": free_port(), "pull": free_port()}
    env = {
        "KTEL_KAFKA__BOOTSTRAP": kafka.bootstrap,
        "KTEL_OTLP__METRICS_PORT": str(ports["otlp"]),
        "KTEL_OTLP__ENDPOINT": f"http://127.0.0.1:{free_port()}",  # readiness does not need the backend
        "KTEL_REMOTE_WRITE__METRICS_PORT": str(ports["remote-write"]),
        "KTEL_REMOTE_WRITE__URL": f"http://127.0.0.1:{free_port()}/api/v1/write",
        "KTEL_PULL__PORT": str(ports["pull"]),
        "KTEL_PULL__METRICS_PORT": str(self_metrics := free_port()),
        "KTEL_SERVICE__METRICS_BIND": "0.0.0.0",
    }
    procs = {name: Ktel(tmp_path, ["export", name], **env) for name in ports}
    started.extend(procs.values())
    for name, proc in procs.items():
        assert proc.get(ports[name], "/healthz").status_code == 200
        assert proc.until_ready(ports[name]).text == "ready\n"
    assert procs["otlp"].listens_on(ports["otlp"]) == {"0.0.0.0"}
    assert procs["remote-write"].listens_on(ports["remote-write"]) == {"0.0.0.0"}
    assert procs["pull"].listens_on(ports["pull"]) == {"127.0.0.1"}  # pull.host, not the self-metrics'
    # The pull endpoint's own counters, on a port of their own: not among the fleet's series.
    assert procs["pull"].listens_on(self_metrics) == {"0.0.0.0"}
    assert procs["pull"].get(self_metrics, "/readyz").status_code == 200
    assert "ktel_exporter_pull_expired_series_total" in procs["pull"].get(self_metrics, "/metrics").text
    # The fleet's series once it read its lookback of ktel.metrics (a 503 until then).
    deadline = time.monotonic() + 60
    while (fleet := procs["pull"].get(ports["pull"], "/metrics")).status_code == 503:
        assert time.monotonic() < deadline, fleet.text
        time.sleep(0.2)
    assert fleet.status_code == 200 and "ktel_exporter" not in fleet.text


def test_a_processing_worker_becomes_ready_once_assigned_and_recovered(kafka, ktel_topics, tmp_path, started):
    port = free_port()
    worker = Ktel(
        tmp_path,
        ["process", "all"],
        KTEL_KAFKA__BOOTSTRAP=kafka.bootstrap,
        KTEL_PROCESS__METRICS_PORT=str(port),
        KTEL_PROCESS__DATA_DIR=str(tmp_path / "faust"),
        KTEL_SERVICE__LOG_FORMAT="json",
    )
    started.append(worker)
    assert worker.get(port, "/healthz").status_code == 200
    assert worker.until_ready(port).text == "ready\n"
    assert "ktel_processor" in worker.get(port, "/metrics").text
    # Faust's worker logs as ktel does (it would otherwise install its own format).
    records = [json.loads(line) for line in worker.log.read_text().splitlines() if line.startswith("{")]
    assert {"faust", "ktel"} <= {r["logger"].split(".")[0] for r in records}
    assert not [line for line in worker.log.read_text().splitlines() if TEXT_LOG_LINE.match(line)]
