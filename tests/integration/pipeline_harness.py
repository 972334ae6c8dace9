"""The whole pipeline as child processes on one Kafka (the real agent with its
file-creation probe, the fused processing worker, the remote-write exporter into a
real Prometheus, the pull endpoint), and a broker SIGKILLed under it mid-stream."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ktel.stack.kafka import LocalKafka
from ktel.stack.proc import free_port
from ktel.stack.proc import stop as stop_process
from ktel.stack.prometheus import LocalPrometheus
from tests.integration.agent_harness import AgentProcess
from tests.integration.test_agent_delivery import create_files
from tests.integration.test_processing_stages import Worker

ONLY_FILES = '["file_created"]'


class Exporter:
    """``ktel export <kind>`` as a child process."""

    def __init__(self, tmp_path: Path, kind: str, env: dict[str, str]):
        self.kind = kind
        self.log = tmp_path / f"export-{kind}.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Exporter:
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ktel.cli", "export", self.kind], env=self.env, stdout=f, stderr=f
            )
        return self

    def stop(self) -> None:
        stop_process(self.proc, 60)


class Pipeline:
    """Agent, worker and exporters on one Kafka; ``kafka_env(role)``: the environment
    that gives the role's principal (agent, processor, exporter) its Kafka settings,
    KTEL_KAFKA__BOOTSTRAP at least; ``remote_write_env``: more of the remote-write
    exporter's settings (how it passes a Prometheus that asks for TLS and a password)."""

    def __init__(
        self,
        tmp_path: Path,
        prometheus: LocalPrometheus,
        kafka_env: Callable[[str], dict[str, str]],
        host: str,
        remote_write_env: dict[str, str] | None = None,
    ):
        self.tmp_path, self.prometheus, self.host = tmp_path, prometheus, host
        self.kafka_env = kafka_env
        processor = dict(kafka_env("processor"))
        self.worker = Worker(tmp_path, processor.pop("KTEL_KAFKA__BOOTSTRAP"), "worker", **processor)
        exporter = dict(os.environ, **kafka_env("exporter"))
        # Self-metrics off: their default port may be taken on a shared machine.
        remote_write = {
            "KTEL_REMOTE_WRITE__URL": prometheus.remote_write_url,
            "KTEL_REMOTE_WRITE__METRICS_PORT": "0",
            **(remote_write_env or {}),
        }
        self.remote_write = Exporter(tmp_path, "remote-write", dict(exporter, **remote_write))
        self.pull_port = free_port()
        pull_env = dict(exporter, KTEL_PULL__PORT=str(self.pull_port), KTEL_PULL__METRICS_PORT="0")
        self.pull = Exporter(tmp_path, "pull", pull_env)
        self.agent: AgentProcess | None = None

    def start(self) -> Pipeline:
        self.worker.start()
        self.remote_write.start()
        self.pull.start()
        agent_env = self.kafka_env("agent")
        self.agent = AgentProcess(
            self.tmp_path,
            agent_env["KTEL_KAFKA__BOOTSTRAP"],
            host_id=self.host,
            probes=ONLY_FILES,
            # 16 MiB, not 1: room for what other processes create while the machine is busy.
            ringbuf_pages="4096",
        )
        self.agent.env.update(agent_env)
        self.agent.start()
        # Everything flows once a file is counted in Prometheus. A file a second: the
        # probe sees every file the host creates, and a burst elsewhere can overflow
        # its ring buffer (which the agent counts, and the crash test rules out).
        warm = new_directory("ktel-warmup-")
        created = 0

        def flowing() -> bool:
            nonlocal created
            (warm / f"f{created}").touch()
            created += 1
            return bool(self.prometheus_count(warm))

        try:
            self.wait_for("a warm-up file in Prometheus", flowing)
        finally:
            shutil.rmtree(warm)
        return self

    def processes(self) -> dict[str, subprocess.Popen]:
        assert self.agent is not None
        procs = {"agent": self.agent.proc, "worker": self.worker.proc}
        procs |= {"remote-write": self.remote_write.proc, "pull": self.pull.proc}
        return procs  # type: ignore[return-value]

    def logs(self) -> str:
        """The tail of each process's log, and the agent's ring buffer drops."""
        assert self.agent is not None
        logs = {"agent": self.agent.log_path, "worker": self.worker.log}
        logs |= {"remote-write": self.remote_write.log, "pull": self.pull.log}
        tails = [f"--- {name}:\n{path.read_text(errors='replace')[-3000:]}" for name, path in logs.items()]
        with contextlib.suppress(httpx.HTTPError):
            drops = self.agent.metric("ktel_agent_ringbuf_drops_total", probe="file_created")
            tails.append(f"--- the agent's ring buffer dropped {drops} events (all the host's)")
        return "\n".join(tails)

    def wait_for(self, what: str, condition: Callable[[], bool], timeout: float = 600) -> None:
        """A generous guard against waiting forever, not a measure; fails as soon as
        a process of the pipeline has exited."""
        deadline = time.monotonic() + timeout
        while not condition():
            for name, p in self.processes().items():
                assert p.poll() is None, (
                    f"{name} exited (status {p.returncode}) waiting for {what}\n{self.logs()}"
                )
            assert time.monotonic() < deadline, f"no {what} after {timeout} s\n{self.logs()}"
            time.sleep(1)

    def prometheus_count(self, directory: Path) -> float | None:
        query = f'sum(file_created_total{{host_id="{self.host}",directory="{directory}"}})'
        result = self.prometheus.query(query)
        return float(result[0]["value"][1]) if result else None

    def pull_count(self, directory: Path) -> float | None:
        try:
            resp = httpx.get(f"http://127.0.0.1:{self.pull_port}/metrics", trust_env=False)
        except httpx.TransportError:
            return None
        if resp.status_code == 503:
            return None  # (reading its lookback of ktel.metrics: nothing served yet)
        text = resp.text
        values = [
            s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == "file_created_total"
            and s.labels.get("directory") == str(directory)
            and s.labels.get("host_id") == self.host
        ]
        return sum(values) if values else None

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        for p in (self.pull, self.remote_write):
            p.stop()
        self.worker.stop()


def new_directory(prefix: str) -> Path:
    """A fresh directory right under /tmp: file_created's directory label (its first
    three path components) is then this directory alone."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def broker_crash_mid_stream(
    pipeline: Pipeline, victim: Callable[[], LocalKafka], n: int = 20_000, rate: float = 1000.0
) -> None:
    """Create ``n`` files at ``rate``/s; 5 s in, SIGKILL the broker ``victim()`` names,
    and start it again 20 s later. Every file must be counted exactly once, in
    Prometheus and at the pull endpoint, by the very processes that ran before the
    crash. The rate achieved is printed, with what dedupe dropped."""
    before = {name: p.pid for name, p in pipeline.processes().items()}
    target = new_directory("ktel-crash-")
    try:
        rate_box: list[float] = []

        def workload() -> None:
            t0 = time.monotonic()
            create_files(target, n, rate)
            rate_box.append(n / (time.monotonic() - t0))

        writer = threading.Thread(target=workload)
        writer.start()
        time.sleep(5)
        broker = victim()
        broker.kill()
        time.sleep(20)
        broker.start(timeout=300)
        writer.join()

        def counted() -> bool:
            got = pipeline.prometheus_count(target)
            assert got is None or got <= n, f"{got} files counted in Prometheus for {n} created"
            return got == n

        pipeline.wait_for(f"{n} files in Prometheus", counted)
        pipeline.wait_for(f"{n} files at the pull endpoint", lambda: pipeline.pull_count(target) == n)
        # Later windows re-send the cumulative count: nothing may come twice after the fact.
        time.sleep(5)
        assert pipeline.prometheus_count(target) == n
        assert pipeline.pull_count(target) == n
        after = {name: p.pid for name, p in pipeline.processes().items() if p.poll() is None}
        assert after == before, f"processes restarted or gone: {before} -> {after}\n{pipeline.logs()}"
        print(
            f"{n} files created at {rate_box[0]:.0f}/s; batches the worker dropped as re-sent: "
            f"{pipeline.worker.metric('ktel_processor_duplicate_batches_total'):.0f}"
        )
    finally:
        shutil.rmtree(target, ignore_errors=True)
