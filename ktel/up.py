"""``ktel up``: the whole pipeline on this host, with live counters.

Starts, in order: a local Kafka (KRaft) and ktel's topics, a local Prometheus
with its remote-write receiver, a local OpenTelemetry Collector that writes
what it receives to ``<stack.data_dir>/otelcol/out.json``, then the ktel
processes (agent, the fused processing worker, remote-write exporter, pull
endpoint, OTLP exporter), each a child process with its own log under
``<stack.data_dir>/logs``. It says "ktel is up" once every one of them is ready
(its ``/readyz`` answers 200), naming while it waits each that is not and why.
Ctrl-C (or SIGTERM) stops them in the reverse order of the data flow's start: the
agent first, so what it drained is flushed to Kafka, then the processor and
exporters, then the Collector, Prometheus and Kafka. If anything it started exits
on its own, everything is stopped and the exit code says so.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ktel import topics
from ktel.config import Config, OtlpConfig, RemoteWriteConfig
from ktel.stack import proc
from ktel.stack.kafka import LocalKafka, ensure_kafka
from ktel.stack.otelcol import LocalCollector, ensure_collector
from ktel.stack.prometheus import LocalPrometheus

# (column title, process, self-metric name summed over its labels)
COUNTERS = [
    ("read", "agent", "ktel_agent_events_read_total"),
    ("published", "agent", "ktel_agent_events_published_total"),
    ("batches", "agent", "ktel_agent_batches_published_total"),
    ("processed", "aggregate", "ktel_processor_events_total"),
    ("samples", "remote-write", "ktel_exporter_samples_total"),
    ("otlp items", "otlp", "ktel_exporter_otlp_items_total"),
    ("rb drops", "agent", "ktel_agent_ringbuf_drops_total"),
    ("sampled out", "agent", "ktel_agent_sampled_out_total"),
    ("dup batches", "aggregate", "ktel_processor_duplicate_batches_total"),
    ("dead letters", "aggregate", "ktel_processor_dead_letters_total"),
]
READY_LINE = "ktel is up"

# ktel's own processes in the order they start: name, `ktel` arguments, and the
# setting of the port each serves /metrics and /readyz on (ktel/selfmetrics.py). The
# agent comes last, so what it publishes finds the worker and the exporters running.
CHILDREN = [
    ("aggregate", ["process", "all"], "process.metrics_port"),
    ("remote-write", ["export", "remote-write"], "remote_write.metrics_port"),
    ("pull", ["export", "pull"], "pull.port"),
    ("otlp", ["export", "otlp"], "otlp.metrics_port"),
    ("agent", ["agent"], "agent.metrics_port"),
]
# Where each of them serves its own counters: the pull endpoint on a port of its own.
SELF_METRICS = [port for _, _, port in CHILDREN if port != "pull.port"] + ["pull.metrics_port"]
# What Stack.stop stops, in order, and the seconds each is given to stop before it is
# killed: ktel's processes on SIGINT, the agent first (what it drained is flushed to
# Kafka), then the worker and the exporters; then the servers on SIGTERM, Kafka last.
STOP_ORDER: list[tuple[str, float]] = [
    ("agent", 30),
    ("aggregate", 30),
    ("remote-write", 30),
    ("pull", 30),
    ("otlp", 30),
    ("the OpenTelemetry Collector", 30),
    ("Prometheus", 30),
    ("Kafka", 30),
]
# Besides those: `ktel up` getting to its stop (a refresh of its counters under way, up
# to 2 s per process), and waiting for each process it had to kill.
STOP_SLACK_SECONDS = 30.0
SERVER_PORTS = [
    "stack.kafka_port",
    "stack.kafka_controller_port",
    "stack.prometheus_port",
    "stack.collector_grpc_port",
    "stack.collector_http_port",
]


def setting(cfg: Config, name: str) -> int:
    """The value of a port setting such as ``pull.port``."""
    section, field = name.split(".")
    value: int = getattr(getattr(cfg, section), field)
    return value


class Stack:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        data = cfg.stack.data_dir
        self.logs = data / "logs"
        self.kafka = LocalKafka(data / "kafka", cfg.stack.kafka_port, cfg.stack.kafka_controller_port)
        # It scrapes the self-metrics of ktel's processes (not the pull endpoint's
        # fleet series: those are what remote-write sends) for the SLIs of ktel's
        # dashboards and rules.
        self_metrics = [f"127.0.0.1:{setting(cfg, port)}" for port in SELF_METRICS if setting(cfg, port)]
        self.prometheus = LocalPrometheus(data / "prometheus", cfg.stack.prometheus_port, scrape=self_metrics)
        self.collector = LocalCollector(
            data / "otelcol",
            cfg.stack.collector_grpc_port,
            cfg.stack.collector_http_port,
            rotate_mb=100,
            binary=cfg.stack.collector_binary,
        )
        self.servers: dict[str, proc.Server] = {
            "Kafka": self.kafka,
            "Prometheus": self.prometheus,
            "the OpenTelemetry Collector": self.collector,
        }
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.child_ports = {name: setting(cfg, port) for name, _, port in CHILDREN}
        self.child_hosts = {
            name: proc.reachable(cfg.pull.host if port == "pull.port" else cfg.service.metrics_bind)
            for name, _, port in CHILDREN
        }

    def child_env(self) -> dict[str, str]:
        # The OTLP exporter talks to the local Collector only: settings meant for
        # another backend (TLS, compression, headers and token files) must not apply.
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_EXPORTER_OTLP_")}
        env["KTEL_KAFKA__BOOTSTRAP"] = self.kafka.bootstrap
        env["KTEL_REMOTE_WRITE__URL"] = self.prometheus.remote_write_url
        # So does the remote-write exporter, to the local Prometheus: a production url's
        # credentials are not for it, and its TLS settings refused the plain http:// url.
        for name in (*RemoteWriteConfig.FILES, "basic_auth_username", "basic_auth_password"):
            env[f"KTEL_REMOTE_WRITE__{name.upper()}"] = "null"
        # Nor its headers (a tenant's X-Scope-OrgID, a token): a map, which cannot be
        # null, replaced by none (a map in the environment replaces the file's: ktel/config.py).
        env["KTEL_REMOTE_WRITE__HEADERS"] = "{}"
        env["KTEL_REMOTE_WRITE__TLS_CHECK_HOSTNAME"] = "true"
        env["KTEL_OTLP__ENDPOINT"] = self.collector.grpc_endpoint
        env["KTEL_OTLP__PROTOCOL"] = "grpc"
        env["KTEL_OTLP__INSECURE"] = "true"
        env["KTEL_OTLP__COMPRESSION"] = "none"
        # (null: unset, so that the SDK's OTEL_EXPORTER_OTLP_HEADERS would apply, and
        # those are left out above.)
        env["KTEL_OTLP__HEADERS"] = "null"
        for name in OtlpConfig.FILES:  # (null unsets: ktel/config.py)
            env[f"KTEL_OTLP__{name.upper()}"] = "null"
        # The worker's on-disk table copies belong with this stack's Kafka, whose
        # changelogs they copy: another stack's would not match them.
        env["KTEL_PROCESS__DATA_DIR"] = str(self.cfg.stack.data_dir / "processor")
        return env  # the rest comes from the same KTEL_CONFIG file and KTEL_* variables

    def ports(self) -> dict[str, int]:
        """Every port `ktel up` serves, by its setting; 0 is a server turned off."""
        return {
            name: setting(self.cfg, name)
            for name in SERVER_PORTS + [p for _, _, p in CHILDREN] + ["pull.metrics_port"]
        }

    def check_ports(self) -> None:
        """Before anything starts: a port given to two servers, or taken already (4317
        and 4318 often are, by another OTLP agent), is named with its settings."""

        def named(name: str) -> str:
            return f"{name}, KTEL_{name.upper().replace('.', '__')}"

        def host(name: str) -> str:
            # Where each server binds: ktel's processes serve their metrics ports on
            # service.metrics_bind (one on ::1 was looked for on 127.0.0.1), the local
            # Kafka, Prometheus and Collector on 127.0.0.1.
            if name == "pull.port":
                return self.cfg.pull.host
            return "127.0.0.1" if name in SERVER_PORTS else self.cfg.service.metrics_bind

        settings: dict[int, list[str]] = {}
        for name, port in self.ports().items():
            if port:
                settings.setdefault(port, []).append(name)
        shared = [f"{port} ({'; '.join(map(named, s))})" for port, s in settings.items() if len(s) > 1]
        if shared:
            raise RuntimeError(f"one port for two servers: {', '.join(shared)}; give each its own port")
        busy = [
            f"{host(name)}:{port} ({named(name)})"
            for port, (name,) in settings.items()
            if proc.port_in_use(port, host(name))
        ]
        if busy:
            raise RuntimeError(f"already in use: {', '.join(busy)}; set free ports in the config")

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.check_ports()
        say("fetching Kafka (cached after the first run)")
        ensure_kafka()
        if self.collector.binary:
            say(f"using the OpenTelemetry Collector at {self.collector.binary}")
        else:
            say("building the OpenTelemetry Collector (cached after the first run)")
            ensure_collector()
        say(f"starting Kafka on {self.kafka.bootstrap}")
        self.kafka.start()
        asyncio.run(topics.create_topics(self.kafka.bootstrap, topics.specs(self.cfg)))
        say(f"starting Prometheus on {self.prometheus.url}")
        self.prometheus.start()
        say(f"starting the OpenTelemetry Collector on {self.collector.grpc_endpoint}")
        self.collector.start()
        env = self.child_env()
        for name, argv, _ in CHILDREN:
            say(f"starting {name} (log: {self.logs / name}.log)")
            with proc.stop_signals_held():  # a stop meanwhile finds the child kept
                self.children[name] = proc.spawn(
                    [sys.executable, "-m", "ktel.cli", *argv],
                    self.logs / f"{name}.log",
                    Path.cwd(),
                    env,
                )

    def url(self, name: str, path: str) -> str:
        host, port = self.child_hosts[name], self.child_ports[name]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"

    def not_ready(self, client: httpx.Client, name: str) -> str | None:
        """Why child ``name`` is not ready, None once its /readyz answers 200. Only
        once the child itself listens on its port: another process answering there
        would make a child that cannot listen look ready."""
        port = self.child_ports[name]
        if not proc.listening(self.children[name].pid, port):
            return f"not listening on port {port} yet"
        try:
            r = client.get(self.url(name, "/readyz"))
        except httpx.HTTPError as err:
            return f"/readyz gave no answer ({type(err).__name__}: {err})"
        return None if r.status_code == 200 else r.text.strip() or f"/readyz answered {r.status_code}"

    def wait_ready(self, timeout: float = 300) -> None:
        """Wait until every child's /readyz answers 200 (ktel/selfmetrics.py says what
        ready means to each: the agent, its probes attached and Kafka reached, so
        after this a file created on the host is counted). While waiting, each child
        not ready is named with its reason, again whenever the reason changes; a
        child or server that exits ends the wait with its exit code and log."""
        deadline = time.monotonic() + timeout
        said: dict[str, str] = {}
        with httpx.Client(timeout=5, trust_env=False) as client:
            while True:
                if dead := self.dead():
                    raise RuntimeError(dead)
                waiting = {
                    name: why
                    for name, port in self.child_ports.items()
                    if port and (why := self.not_ready(client, name)) is not None
                }
                if not waiting:
                    return
                for name, why in waiting.items():
                    if said.get(name) != why:
                        say(f"waiting for {name}: {why}")
                said = waiting
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"not ready within {timeout:.0f}s: "
                        + "; ".join(f"{name} ({why})" for name, why in waiting.items())
                        + f"; their logs are in {self.logs}"
                    )
                time.sleep(0.5)

    def stop(self) -> None:
        for name, timeout in STOP_ORDER:
            if name in self.children:
                say(f"stopping {name}")
                proc.stop(self.children[name], timeout=timeout, sig=signal.SIGINT)
            elif name in self.servers and self.servers[name].running:
                say(f"stopping {name}")
                self.servers[name].stop(timeout)

    def dead(self) -> str | None:
        """What has exited, of all `ktel up` started, with the tail of its log; None if
        everything runs. A server is watched like a child: without Prometheus or
        the Collector the counters would go nowhere while the live line looked fine."""
        # Servers first: a child whose server has died soon exits too, and the
        # server is the one to name.
        watched = [(name, s.exit_code, s.log_path) for name, s in self.servers.items()]
        watched += [(name, p.poll(), self.logs / f"{name}.log") for name, p in self.children.items()]
        for name, code, log in watched:
            if code is not None:
                return f"{name} exited with code {code}; the end of {log}:\n{proc.tail(log)}"
        return None

    def read_counters(self, client: httpx.Client) -> dict[str, float | None]:
        scraped: dict[str, dict[str, float]] = {}
        for name in {process for _, process, _ in COUNTERS}:
            if not self.child_ports[name]:
                continue
            try:
                text = client.get(self.url(name, "/metrics")).text
            except httpx.HTTPError:
                continue
            sums: dict[str, float] = {}
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    sums[s.name] = sums.get(s.name, 0.0) + s.value
            scraped[name] = sums
        return {title: scraped.get(p, {}).get(m) for title, p, m in COUNTERS}


def say(msg: str) -> None:
    _out(f"ktel up: {msg}")


def _out(text: str, end: str = "\n") -> None:
    try:
        print(text, end=end, flush=True)
    except BrokenPipeError:
        # What read the output has gone (`ktel up | tee log`, the tee ended by the same
        # Ctrl-C): the stack goes on, or on stopping, in order; its lines go nowhere now.
        # (Unheld, the error ended the stop midway, every process left to be killed.)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def render(counters: dict[str, float | None], elapsed: float) -> str:
    cells = [f"{t} {'-' if v is None else int(v)}" for t, v in counters.items()]
    return f"[{elapsed:6.0f}s] " + " | ".join(cells)


def pidfile(cfg: Config) -> Path:
    return cfg.stack.data_dir / "ktel-up.pid"


def stop_seconds() -> float:
    """The longest `ktel up` takes to stop once signalled: what `ktel down` waits."""
    return sum(timeout for _, timeout in STOP_ORDER) + STOP_SLACK_SECONDS


def down(cfg: Config, timeout: float | None = None) -> int:
    """Stop the `ktel up` of this data dir (from another terminal) and wait for it, by
    default as long as its stop can take (``stop_seconds``): given up on sooner, a stop
    still under way was reported as one that failed.

    The pid file may be stale (a `ktel up` killed with SIGKILL, a reboot) and its pid
    reused by any other process: only a `ktel up` is signalled (``is_ktel_up``), through
    a pidfd, so the pid cannot change hands between the check and the signal.
    """
    path = pidfile(cfg)
    try:
        pid = int(path.read_text())
    except (FileNotFoundError, ValueError):
        say(f"no ktel up is running for {cfg.stack.data_dir}")
        return 1
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        say(f"ktel up (pid {pid}) is not running; removing its stale pid file")
        path.unlink(missing_ok=True)
        return 1
    try:
        if not is_ktel_up(pid):
            say(
                f"{path} names pid {pid}, which is not ktel up ({' '.join(_args(pid)) or 'exited'}): "
                "signalling nothing; removing the stale pid file"
            )
            path.unlink(missing_ok=True)
            return 1
        signal.pidfd_send_signal(fd, signal.SIGTERM)
    except ProcessLookupError:
        say(f"ktel up (pid {pid}) is not running; removing its stale pid file")
        path.unlink(missing_ok=True)
        return 1
    finally:
        os.close(fd)
    if timeout is None:
        timeout = stop_seconds()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # `ktel up` removes its pid file once everything it started has stopped.
        if not path.exists() or not _alive(pid):
            say(f"ktel up (pid {pid}) stopped")
            return 0
        time.sleep(0.2)
    say(f"ktel up (pid {pid}) still running after {timeout:.0f}s")
    return 1


def _args(pid: int) -> list[str]:
    """The process's arguments (none once it has exited)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_ktel_up(pid: int) -> bool:
    return runs_ktel_up(_args(pid))


def runs_ktel_up(args: list[str]) -> bool:
    """Whether a command line runs `ktel up`: the `ktel` script or `python -m ktel.cli`,
    with the `up` command among the arguments that follow."""
    for i, arg in enumerate(args):
        if os.path.basename(arg) == "ktel" or (arg == "ktel.cli" and i > 0 and args[i - 1] == "-m"):
            return "up" in args[i + 1 :]
    return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; its parent has not collected it yet


def running(cfg: Config) -> int | None:
    """The pid of the `ktel up` of this data dir that runs now, if one does."""
    try:
        pid = int(pidfile(cfg).read_text())
    except (FileNotFoundError, ValueError):
        return None
    # (a stale file's pid may be anyone's now, this process's too)
    return pid if pid != os.getpid() and _alive(pid) and is_ktel_up(pid) else None


def run(cfg: Config) -> int:
    # A second `ktel up` of one data dir would fail on the first's ports, and, as it
    # stopped, remove the first's pid file, which `ktel down` stops it by.
    if (pid := running(cfg)) is not None:
        say(f"ktel up (pid {pid}) is already running for {cfg.stack.data_dir}; `ktel down` stops it")
        return 1
    stack = Stack(cfg)
    stopping = False
    starting = True
    cfg.stack.data_dir.mkdir(parents=True, exist_ok=True)
    pidfile(cfg).write_text(str(os.getpid()))

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stopping, starting
        stopping = True
        if starting:
            # The start's waits (a download, each server's and child's readiness: minutes
            # all told) watch no flag: the signal ends the wait where it is (each server
            # stops itself if its wait is cut short), once.
            starting = False
            raise proc.Interrupted

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        stack.start()
        stack.wait_ready()
        starting = False
        say(
            f"{READY_LINE}: pull endpoint http://{cfg.pull.host}:{cfg.pull.port}/metrics, "
            f"Prometheus {stack.prometheus.url}, "
            f"OTLP as the Collector received it {stack.collector.out_path}; "
            "try `touch /tmp/somewhere/ktel-demo`; Ctrl-C stops"
        )
        interactive = sys.stdout.isatty()
        started = time.monotonic()
        last_line = 0.0
        with httpx.Client(timeout=2, trust_env=False) as client:
            while not stopping:
                dead = stack.dead()
                if dead:
                    say(f"stopping everything: {dead}")
                    code = 1
                    break
                now = time.monotonic()
                if interactive or now - last_line >= 5:
                    line = render(stack.read_counters(client), now - started)
                    _out(("\r\033[K" + line) if interactive else line, end="" if interactive else "\n")
                    last_line = now
                time.sleep(1)
        if interactive:
            _out("")
    except proc.Interrupted:
        say("interrupted while starting")
    except Exception as err:
        say(f"failed: {err}")
        code = 1
    finally:
        starting = False
        # A second Ctrl-C during shutdown must not leave half the stack running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.stop()
        pidfile(cfg).unlink(missing_ok=True)
        say("stopped")
    return code
