"""Benchmark: ktel at fleet scale. N simulated hosts (100, 1 000, 10 000) publish
agent-shaped raw batches to a local Kafka at a fixed fleet-wide rate, through the
processing worker(s) and the remote-write exporter into a real Prometheus.

Each host has its own boot id and sequence, keyed by host id as the agent keys them,
and sends one batch every --batch-seconds (an agent seals a batch by count, size or
age; a quiet host's batches are small), or with --batch-events N a batch of N events at
every fleet size, so that only the number of hosts differs: file creations under a few directories of
its own (bench/processing_throughput.py's paths), process exec/exit pairs, a kernel-API
counter, a syscall-latency histogram delta every 5th batch, and a heartbeat at start and
every --heartbeat-seconds (10, the agent's default agent.heartbeat_seconds), each host's
spread over the period as its batches are (0: only the one at start, as the bench sent
them before 2026-12-05).

Measured, per fleet size, each on a fresh broker and Prometheus:

  cpu/event    worker CPU seconds (psutil, user + system, summed over the stage
               processes) per event, over the second half of the steady phase
  rss/host     worker RSS at the end of the steady phase, divided by the hosts
  samples/win  samples the exporter had acknowledged (ktel_exporter_samples_total)
               per aggregate window
  e2e p50/p99  from the bench side, over the batches sent in the steady phase: every
               POLL_S the bench reads sum(file_created_total) from Prometheus as of
               the query's issue (the API's time=); a batch's latency is from when
               the bench sealed it (each batch stamped as it is sent, as an agent
               seals it, so producing it to Kafka counts) to the first reading that
               counts its file creations. What error remains: up to POLL_S late (the
               readings' spacing), and a sample (stamped with its window's close,
               before the issue) that Prometheus takes between the query's issue and
               its evaluation is counted as if there at the issue, which can make a
               latency shorter by at most the query's round trip (the longest: query
               max); the bench, the workers and Prometheus share one clock
  window delay how late the aggregate's windows closed (mean, and the bucket bound
               holding the p99 of the worker's ktel_processor_window_delay_seconds)
  input age    how old the raw batches were when the (first) worker took them: the
               bucket bound holding the p99 of ktel_processor_input_age_seconds
  acked ≤ 1 s  from the exporter's side: the share of the snapshots it delivered that
               Prometheus acknowledged within 1 s of their window's close (the
               exporter's ktel_exporter_ingestion_latency_seconds), so within the
               window plus 1 s of every event they count
  exact        after the traffic stops, Prometheus' sum equals what was generated
  recovery     a worker SIGKILLed while the traffic goes on; from its replacement's
               start to its first counted batch. Mode all: the worker, with
               process.table_store rocksdict (the same data directory) and then memory
               (a fresh one); mode split: each stage's worker in turn, rocksdict

Run: PYTHONPATH=. .venv/bin/python bench/fleet.py [--quick] [--hosts 100,10000]
     [--rate 20000] [--seconds 60] [--batch-seconds 5 | --batch-events N] [--mode all|split]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import dataclasses
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import psutil  # noqa: E402
from aiokafka import AIOKafkaProducer  # noqa: E402
from processing_throughput import AGENT_KAFKA_CODEC, COMMS, DIRS, agent_record, machine, scrape  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from ktel import config, topics  # noqa: E402
from ktel.stack import proc as proc_mod  # noqa: E402
from ktel.stack.kafka import LocalKafka, ensure_kafka  # noqa: E402
from ktel.stack.proc import free_port  # noqa: E402
from ktel.stack.prometheus import LocalPrometheus  # noqa: E402
from ktel.topics import create_topics  # noqa: E402
from ktel.wire import (  # noqa: E402
    FILE_CREATED,
    HEARTBEATS_TOPIC,
    HISTOGRAM_DELTA,
    KTEL_METRIC,
    PROCESS_EXEC,
    PROCESS_EXIT,
    RAW_TOPIC,
    RawBatch,
    encode_heartbeat,
)

STAGES = {"all": ["all"], "split": ["dedupe", "enrich", "sample", "aggregate"]}
POLL_S = 0.05  # how often the bench reads Prometheus (the readings' density, not their error)
ACKED = "ktel_exporter_ingestion_latency_seconds"  # (exporters/consume.py)
WINDOW_DELAY = "ktel_processor_window_delay_seconds"  # (processors/stages.py)
INPUT_AGE = "ktel_processor_input_age_seconds"  # (processors/stages.py)
# What a heartbeat of the bench lists, as an agent with the default probes lists them.
PROBES = ("file_created", "ktel_api")
HEARTBEAT_COUNTERS = (
    "events_read", "events_published", "batches_published", "publish_retries", "decode_errors",
    "spool_dropped_events", "spool_corrupt_bytes", "spool_unreadable_bytes", "disk_dropped_events",
    "too_large_dropped_events",
    "batches_split", *(f"{c}.{p}" for p in PROBES for c in ("ringbuf_drops", "sampled_out", "inflight_lost")),
)  # fmt: skip
# A heartbeat's node readings (edge_agent/node_stats.py) as a one-disk node running every
# probe ktel ships reports them: the processing worker bounds and exports them per host
# (processors/fleet_metrics.py).
BPF_MAPS = (
    "block_latency.start", "block_latency.hist", "dns_latency.start", "dns_latency.hist",
    "file_created.pending", "process.parents", "process.statuses", "runq_latency.start",
    "syscall_latency.start", "syscall_latency.hist",
)  # fmt: skip
SUM = -1.0  # a histogram's sum, as Pipeline.histogram keys it among its bounds

# ------------------------------------------------------------------ traffic


class Host:
    def __init__(self, i: int, rng: random.Random) -> None:
        self.id = f"node-{i:05d}.fleet"
        self.boot = f"{rng.getrandbits(128):032x}"
        self.seq = 0
        self.dirs = [
            d.format(h=rng.getrandbits(48), n=rng.randrange(40), m=rng.randrange(8))
            for d in rng.sample(DIRS, 3)
        ]
        self.syscall = rng.randrange(300)
        self.pid = 1000 + rng.randrange(30000)


def make_batch(host: Host, n: int, rng: random.Random) -> tuple[RawBatch, int]:
    """One sealed batch of ``n`` events from ``host``; returns it and its file creations."""
    ts = time.time_ns()
    events: list[list[Any]] = []
    files = 0
    while len(events) < n:
        r = rng.random()
        if r < 0.02:
            host.pid += 1
            pid, comm = host.pid, rng.choice(COMMS)
            events.append([PROCESS_EXEC.id, ts, pid, pid, 1, 0, 0, comm, f"/usr/bin/{comm}"])
            events.append([PROCESS_EXIT.id, ts, pid, pid, 1, 0, 0, comm, 0, 0])
        elif r < 0.03:
            events.append([KTEL_METRIC.id, ts, host.pid, "counter", "ktel_demo_requests_total", {}, 1])
        else:
            path = f"{rng.choice(host.dirs)}/f{rng.getrandbits(32):08x}.tmp"
            events.append(
                [FILE_CREATED.id, ts, host.pid, host.pid, 0, rng.choice(COMMS), path, 0o101, r < 0.5]
            )
            files += 1
    if host.seq % 5 == 0:
        buckets = [0] * 40
        for _ in range(10):
            buckets[rng.randrange(8, 20)] += rng.randrange(1, 50)
        count = sum(buckets)
        events.append(
            [HISTOGRAM_DELTA.id, ts, ts - 1_000_000_000, "syscall_latency", "ns",
             {"syscall.id": host.syscall}, count, count * 3000, buckets, 1]
        )  # fmt: skip
    batch = RawBatch(host.id, host.boot, host.seq, ts, events)
    host.seq += 1
    return batch, files


def heartbeat(h: Host, events: int, interval_s: float) -> dict[str, Any]:
    """A heartbeat of ``h`` shaped as the agent's (edge_agent/agent.py ``heartbeat``)."""
    attrs = {
        "host.id": h.id,
        "host.name": h.id,
        "host.arch": "x86_64",
        "os.type": "linux",
        "boot.id": h.boot,
    }
    counters = dict.fromkeys(HEARTBEAT_COUNTERS, 0) | {"events_read": events}
    return {
        "ts": time.time_ns() // 1_000_000,
        "host": attrs,
        "interval_s": interval_s,
        "probes": {p: {"loaded": True, "reason": "", "sample_every": 1, "command": None} for p in PROBES},
        "counters": counters,
        "rates": dict.fromkeys(counters, 0.0),
        "spool": {"depth_bytes": 0},
        "send_latency_ms": {"p50": 2.0, "max": 5.0},
        "acked_commands": [],
        "refused_commands": [],
        "containers": [],
        "node": {
            "cpu_steal_ms": 0,
            "cpus": 2,
            "context_switches": events,
            "disk_in_flight.vda": 0,
            **{f"map_entries.{m}": 1 for m in BPF_MAPS},
            **{f"map_max_entries.{m}": 10240 for m in BPF_MAPS},
        },
    }


class Traffic:
    """The fleet: each host sends a batch every ``period`` seconds, the hosts spread
    evenly over the period, ``rate`` events/s over all of them."""

    def __init__(
        self, n_hosts: int, rate: float, period: float, seed: int = 1, heartbeat_s: float | None = None
    ) -> None:
        self.rng = random.Random(seed)
        self.hosts = [Host(i, self.rng) for i in range(n_hosts)]
        self.per_batch = max(1, round(rate * period / n_hosts))
        self.period = period
        self.heartbeat_s = heartbeat_s
        self.files = 0  # file creations generated so far
        self.events = 0
        self.history: list[tuple[int, float]] = []  # (files produced, when), for latencies
        self.producer: AIOKafkaProducer | None = None

    async def start(self, bootstrap: str) -> None:
        # As the agent produces (edge_agent/agent.py): its default codec, acks=all.
        self.producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, compression_type=AGENT_KAFKA_CODEC, linger_ms=5, acks="all"
        )
        await self.producer.start()
        for h in self.hosts:
            await self.send_heartbeat(h)
        await self.producer.flush()

    async def send_heartbeat(self, h: Host) -> asyncio.Future:
        assert self.producer is not None
        hb = heartbeat(h, self.events, self.heartbeat_s or 0.0)
        return await self.producer.send(HEARTBEATS_TOPIC, encode_heartbeat(hb), key=h.id.encode())  # type: ignore[arg-type]

    async def run(self, seconds: float, stop: asyncio.Event | None = None) -> None:
        """Send at the fixed rate for ``seconds`` (or until ``stop``), acknowledged."""
        assert self.producer is not None
        tick = 0.1
        per_tick = len(self.hosts) * tick / self.period
        beats_per_tick = len(self.hosts) * tick / self.heartbeat_s if self.heartbeat_s else 0.0
        start = time.monotonic()
        sent = beats = 0.0
        i = j = 0
        while time.monotonic() - start < seconds and not (stop and stop.is_set()):
            sent += per_tick
            beats += beats_per_tick
            futures = []
            while j < int(beats):
                futures.append(await self.send_heartbeat(self.hosts[j % len(self.hosts)]))
                j += 1
            while i < int(sent):
                host = self.hosts[i % len(self.hosts)]
                batch, files = make_batch(host, self.per_batch, self.rng)
                futures.append(await self.producer.send(RAW_TOPIC, agent_record(batch), key=batch.key))
                self.files += files
                # Stamped as the agent seals it, just before the send: its events' latency
                # includes the produce, as an agent's do.
                self.history.append((self.files, batch.sent_ns / 1e9))
                self.events += len(batch.events)
                i += 1
            await asyncio.gather(*futures)
            await asyncio.sleep(max(0.0, start + (i / per_tick) * tick - time.monotonic()))

    def latencies(self, readings: list[tuple[float, float]], after: int) -> list[float]:
        """Each batch sent once ``after`` file creations were: from when it was sealed to
        the first of ``readings`` (when, files counted then) that counts it."""
        out: list[float] = []
        k = bisect.bisect_right(self.history, (after, float("inf")))  # the first batch past ``after``
        for when, files in sorted(readings):
            while k < len(self.history) and self.history[k][0] <= files:
                out.append(when - self.history[k][1])
                k += 1
        return out

    async def stop(self) -> None:
        if self.producer:
            await self.producer.stop()


# ------------------------------------------------------------------ processes


@dataclasses.dataclass
class Pipeline:
    tmp: Path
    kafka: LocalKafka
    prom: LocalPrometheus
    mode: str
    window: float
    workers: dict[str, subprocess.Popen] = dataclasses.field(default_factory=dict)
    ports: dict[str, int] = dataclasses.field(default_factory=dict)
    exporter: subprocess.Popen | None = None
    exporter_port: int = 0

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(
            os.environ,
            PYTHONPATH=str(ROOT),
            KTEL_KAFKA__BOOTSTRAP=self.kafka.bootstrap,
            KTEL_AGENT__HOST_ID="bench",
            KTEL_AGGREGATE__WINDOW_SECONDS=str(self.window),
            KTEL_PROCESS__SESSION_TIMEOUT_SECONDS="10",
            KTEL_REMOTE_WRITE__URL=self.prom.remote_write_url,
            **extra,
        )
        env.pop("KTEL_CONFIG", None)
        return env

    def spawn(self, args: list[str], log: str, env: dict[str, str]) -> subprocess.Popen:
        with open(self.tmp / log, "ab") as f:
            return subprocess.Popen(
                [sys.executable, "-m", "ktel.cli", *args], env=env, stdout=f, stderr=f, cwd=ROOT
            )

    def start_worker(self, stage: str, store: str, data: str) -> None:
        self.ports[stage] = port = free_port()
        env = self.env(
            KTEL_PROCESS__METRICS_PORT=str(port),
            KTEL_PROCESS__DATA_DIR=str(self.tmp / data),
            KTEL_PROCESS__TABLE_STORE=store,
        )
        self.workers[stage] = self.spawn(["process", stage], f"{stage}.log", env)

    def start(self) -> None:
        for stage in STAGES[self.mode]:
            self.start_worker(stage, "rocksdict", f"data-{stage}")
        self.exporter_port = free_port()
        env = self.env(KTEL_REMOTE_WRITE__METRICS_PORT=str(self.exporter_port))
        self.exporter = self.spawn(["export", "remote-write"], "exporter.log", env)

    def last_stage(self) -> str:
        return STAGES[self.mode][-1]

    def counted(self) -> float:
        return scrape(self.ports[self.last_stage()], "ktel_processor_events_total") or 0.0

    def batches(self, stage: str) -> float:
        """The batches ``stage``'s worker has processed (duplicates it dropped left out)."""
        return scrape(self.ports[stage], "ktel_processor_batches_total") or 0.0

    def cpu(self) -> float:
        return sum(sum(psutil.Process(p.pid).cpu_times()[:2]) for p in self.workers.values())

    def rss(self) -> int:
        return sum(psutil.Process(p.pid).memory_info().rss for p in self.workers.values())

    def samples(self) -> float:
        return scrape(self.exporter_port, "ktel_exporter_samples_total") or 0.0

    def histogram(self, port: int, name: str, **labels: str) -> dict[float, float]:
        """A histogram of a process' self-metrics, summed over its series with ``labels``:
        the observations within each bound (s), cumulative, and under ``SUM`` their sum."""
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[float, float] = {}
        for family in text_string_to_metric_families(text):
            if family.name != name:
                continue
            for sample in family.samples:
                if any(sample.labels.get(k) != v for k, v in labels.items()):
                    continue
                if sample.name.endswith("_bucket"):
                    le = float(sample.labels["le"])
                    out[le] = out.get(le, 0.0) + sample.value
                elif sample.name.endswith("_sum"):
                    out[SUM] = out.get(SUM, 0.0) + sample.value
        return out

    def stop(self) -> None:
        for p in [*self.workers.values(), self.exporter]:
            if p is not None:
                proc_mod.stop(p, 30)


def kills(mode: str) -> list[tuple[str, str, str, str]]:
    """The SIGKILLs of the recovery phase, in order: (the report's name for it, the stage
    whose worker is killed, the replacement's table store, its data directory)."""
    if mode == "all":
        return [
            (store, "all", store, f"data-{name}")
            for store, name in (("rocksdict", "all"), ("memory", "memory"))
        ]
    return [(stage, stage, "rocksdict", f"data-{stage}") for stage in STAGES[mode]]


def prom_files(prom: LocalPrometheus, at_s: float | None = None) -> float:
    """sum(file_created_total) as Prometheus has it at ``at_s`` (default: now)."""
    try:
        result = prom.query("sum(file_created_total)", at_s)
    except Exception:  # noqa: BLE001  # not up yet, or no series yet: no reading
        return 0.0
    return float(result[0]["value"][1]) if result else 0.0


def reading(prom: LocalPrometheus) -> tuple[float, float, float]:
    """sum(file_created_total) evaluated at the query's issue: when it was issued, the
    sum, and the query's round trip (timed in the thread that makes it, so the bench's
    busy event loop does not stretch it)."""
    issued = time.time()
    files = prom_files(prom, issued)
    return issued, files, time.time() - issued


async def caught_up(prom: LocalPrometheus, traffic: Traffic, timeout: float) -> float:
    """Seconds until Prometheus counts every file creation sent so far (no more checked here)."""
    start = time.monotonic()
    while (got := await asyncio.to_thread(prom_files, prom)) < traffic.files:
        if time.monotonic() - start > timeout:
            raise RuntimeError(
                f"Prometheus has {got:,.0f} of {traffic.files:,} file creations after {timeout:.0f} s"
            )
        await asyncio.sleep(0.5)
    return time.monotonic() - start


def since(before: dict[float, float], after: dict[float, float]) -> dict[float, float]:
    """A histogram's observations between two readings of it (``Pipeline.histogram``)."""
    return {le: n - before.get(le, 0.0) for le, n in after.items()}


def quantile_bound(hist: dict[float, float], q: float) -> float:
    """The least bucket bound holding the ``q`` quantile of a histogram's observations."""
    total = hist.get(float("inf"), 0.0)
    return next(
        (le for le, n in sorted((le, n) for le, n in hist.items() if le != SUM) if total and n >= q * total),
        float("nan"),
    )


def wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.5)


# ------------------------------------------------------------------ one size


@dataclasses.dataclass
class Result:
    hosts: int
    rate: float  # events/s the bench sent (all kinds)
    per_batch: int
    cpu_per_event_us: float
    rss_mib: float
    rss_per_host_kib: float
    samples_per_window: float
    p50: float
    p99: float
    exact: bool
    generated: int
    in_prometheus: float
    recovery: dict[str, float]
    lag: float  # seconds from the end of the steady phase until Prometheus had it all
    # Of the snapshots the exporter delivered in the steady phase, the share Prometheus
    # acknowledged within 1 s of their window's close (so within window + 1 s of every
    # event they count) by the exporter's own histogram.
    acked_within_1s: float
    # How late the aggregate's windows closed in the steady phase (the worker's
    # ktel_processor_window_delay_seconds): their mean, and the bucket bound holding the p99.
    window_delay_mean: float
    window_delay_p99: float
    # The bucket bound holding the p99 of the raw batches' age as the worker took them.
    input_age_p99: float
    # The longest Prometheus query of the readings, from its issue (its evaluation
    # time) to its answer: a reading may count samples that arrived within it.
    query_max: float


async def size_run(args: argparse.Namespace, n_hosts: int) -> Result:
    with tempfile.TemporaryDirectory(prefix="ktel-bench-fleet-") as d:
        tmp = Path(d)
        with (
            LocalKafka(tmp / "kafka", free_port(), free_port()) as kafka,
            LocalPrometheus(tmp / "prom", free_port()) as prom,
        ):
            cfg = config.Config(
                kafka=config.KafkaConfig(bootstrap=kafka.bootstrap), agent=config.AgentConfig(host_id="b")
            )
            await create_topics(kafka.bootstrap, topics.specs(cfg))
            traffic = Traffic(n_hosts, args.rate, period(args, n_hosts), heartbeat_s=args.heartbeat_seconds)
            await traffic.start(kafka.bootstrap)
            pipe = Pipeline(tmp, kafka, prom, args.mode, args.window)
            pipe.start()
            try:
                # Warm-up: the workers join, recover and count the first batches; then
                # the bench waits for them to catch up, so the steady phase starts level.
                warm = asyncio.Event()
                warm_from = time.monotonic()
                sender = asyncio.create_task(traffic.run(3600, warm))
                await asyncio.to_thread(wait, lambda: pipe.counted() > 0, 300, "the worker counting")
                # ... and every host has sent a batch: a host's first window emits all its
                # series, and its new series at zero first, which a steady fleet does not.
                await asyncio.sleep(max(0.0, warm_from + traffic.period + 1 - time.monotonic()))
                warm.set()
                await sender
                await caught_up(prom, traffic, 300)
                # Steady phase: measured.
                steady = asyncio.create_task(traffic.run(args.seconds))
                readings: list[tuple[float, float]] = []  # (when, files in Prometheus then)
                steady_files = traffic.files  # (what was sent before is not measured)
                round_trips: list[float] = []
                t0, cpu0, ev0, s0 = time.monotonic(), pipe.cpu(), traffic.events, pipe.samples()
                acked0 = pipe.histogram(pipe.exporter_port, ACKED)
                delay0 = pipe.histogram(pipe.ports[pipe.last_stage()], WINDOW_DELAY, window="aggregate")
                first = STAGES[args.mode][0]
                age0 = pipe.histogram(pipe.ports[first], INPUT_AGE, stage=first)

                async def read() -> None:
                    issued, files, round_trip = await asyncio.to_thread(reading, prom)
                    readings.append((issued, files))
                    round_trips.append(round_trip)
                    await asyncio.sleep(POLL_S)

                while not steady.done():
                    await read()
                await steady
                acked = since(acked0, pipe.histogram(pipe.exporter_port, ACKED))
                delay = since(
                    delay0, pipe.histogram(pipe.ports[pipe.last_stage()], WINDOW_DELAY, window="aggregate")
                )
                age = since(age0, pipe.histogram(pipe.ports[first], INPUT_AGE, stage=first))
                rss = pipe.rss()
                # Read on until Prometheus counts every batch sent, so that the last ones
                # have their latencies too: the drain.
                drain0 = time.monotonic()
                while not readings or readings[-1][1] < traffic.files:
                    if time.monotonic() - drain0 > 300:
                        raise RuntimeError(
                            f"Prometheus has {readings[-1][1]:,.0f} of {traffic.files:,} after 300 s"
                        )
                    await read()
                lag = time.monotonic() - drain0
                # Everything sent in the steady phase processed: its CPU per event sent.
                cpu_per_event = (pipe.cpu() - cpu0) / (traffic.events - ev0)
                samples_per_window = (pipe.samples() - s0) / ((time.monotonic() - t0) / args.window)
                exact_steady = prom_files(prom) == traffic.files
                # Recovery: each worker in turn SIGKILLed while the traffic goes on.
                recovery: dict[str, float] = {}
                if not args.no_kill:
                    background = asyncio.Event()
                    sender = asyncio.create_task(traffic.run(3600, background))
                    for name, stage, store, data in kills(args.mode):
                        await asyncio.sleep(2 * args.window)  # the tables' latest in their changelogs
                        pipe.workers[stage].send_signal(signal.SIGKILL)
                        pipe.workers[stage].wait()
                        started = time.monotonic()
                        pipe.start_worker(stage, store, data)
                        await asyncio.to_thread(
                            wait,
                            lambda stage=stage: pipe.batches(stage) > 0,
                            600,
                            f"the {name} replacement counting",
                        )
                        recovery[name] = time.monotonic() - started
                    background.set()
                    await sender
                    await caught_up(prom, traffic, 300)
                # Exact: everything generated reaches Prometheus, no more.
                await asyncio.sleep(2 * args.window)  # a count that would pass the total
                got = prom_files(prom)
            finally:
                pipe.stop()
                await traffic.stop()
    lat = traffic.latencies(readings, steady_files)
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    return Result(
        n_hosts, args.rate, traffic.per_batch, cpu_per_event * 1e6, rss / 2**20, rss / 1024 / n_hosts,
        samples_per_window, q[49], q[98], exact_steady and got == traffic.files, traffic.files, got, recovery,
        lag, acked[1.0] / acked[float("inf")] if acked.get(float("inf")) else float("nan"),
        delay.get(SUM, 0.0) / delay[float("inf")] if delay.get(float("inf")) else float("nan"),
        quantile_bound(delay, 0.99), quantile_bound(age, 0.99), max(round_trips, default=float("nan")),
    )  # fmt: skip


# ----------------------------------------------------------------------- main


def period(args: argparse.Namespace, n_hosts: int) -> float:
    """How often each of ``n_hosts`` sends a batch."""
    if args.batch_events is None:
        return float(args.batch_seconds)
    return float(args.batch_events * n_hosts / args.rate)


def report(args: argparse.Namespace, results: list[Result]) -> str:
    killed = kills(args.mode)
    batches = (
        f"every {args.batch_seconds:g} s"
        if args.batch_events is None
        else f"of {args.batch_events} events (every {args.batch_events:g} x hosts / rate s)"
    )
    beats = (
        f"a heartbeat every {args.heartbeat_seconds:g} s"
        if args.heartbeat_seconds
        else "one heartbeat at start"
    )
    lines = [
        f"{time.strftime('%Y-%m-%d')}, commit {git_commit()}, {machine()}, load average at the start "
        f"{args.load:.1f}. Mode `{args.mode}`, {args.rate:,.0f} events/s fleet-wide, one batch per host "
        f"{batches}, {beats}, aggregate window {args.window:g} s, {args.seconds:g} s measured.",
        "",
        "| hosts | events a batch | CPU µs/event | worker RSS MiB | RSS KiB/host | samples/window "
        "| e2e p50 s | e2e p99 s | drained s | exact in Prometheus | "
        + "".join(f"recovery {name} s | " for name, *_ in killed)
        + "snapshots acked ≤ 1 s after their window | window delay mean / p99 ≤ s "
        "| input age p99 ≤ s | query max s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | "
        + "---: | " * len(killed)
        + "---: | ---: | ---: | ---: |",
    ]
    for r in results:
        rec = [f"{r.recovery[name]:.1f}" if name in r.recovery else "-" for name, *_ in killed]
        exact = "yes" if r.exact else f"no: {r.in_prometheus:,.0f} of {r.generated:,}"
        lines.append(
            f"| {r.hosts:,} | {r.per_batch} | {r.cpu_per_event_us:.1f} | {r.rss_mib:.0f} "
            f"| {r.rss_per_host_kib:.1f} | {r.samples_per_window:,.0f} | {r.p50:.2f} | {r.p99:.2f} "
            f"| {r.lag:.1f} | {exact} | {''.join(f'{x} | ' for x in rec)}{100 * r.acked_within_1s:.1f} % "
            f"| {r.window_delay_mean:.3f} / {r.window_delay_p99:g} | {r.input_age_p99:g} "
            f"| {r.query_max:.3f} |"
        )
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        per_host = (hi.rss_mib - lo.rss_mib) * 1024 / (hi.hosts - lo.hosts)
        lines += [
            "",
            f"{hi.hosts:,} hosts against {lo.hosts:,}: CPU per event "
            f"x{hi.cpu_per_event_us / lo.cpu_per_event_us:.2f} (aim at most 1.5), e2e p99 "
            f"x{hi.p99 / lo.p99:.2f}, worker RSS x{hi.rss_mib / lo.rss_mib:.2f}, "
            f"{per_host:.1f} KiB for each host more (aim at most 50).",
        ]
    return "\n".join(lines)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", default="100,10000", help="fleet sizes, comma-separated")
    ap.add_argument("--rate", type=float, default=20_000, help="events/s fleet-wide")
    ap.add_argument("--batch-seconds", type=float, default=5.0, help="how often each host sends a batch")
    ap.add_argument(
        "--batch-events",
        type=int,
        help="instead: each host sends a batch of this many events (every N x hosts / rate s), the "
        "same records at every fleet size, which tells the cost of hosts from that of small records",
    )
    ap.add_argument(
        "--heartbeat-seconds",
        type=float,
        default=10.0,
        help="each host also sends a heartbeat this often, as agents do (agent.heartbeat_seconds); "
        "0: only one at start",
    )
    ap.add_argument("--seconds", type=float, default=60, help="measured steady phase per size")
    ap.add_argument("--window", type=float, default=2.0, help="aggregate.window_seconds")
    ap.add_argument(
        "--mode", choices=list(STAGES), default="all", help="all: one worker; split: one per stage"
    )
    ap.add_argument("--no-kill", action="store_true", help="leave out the SIGKILL recovery")
    ap.add_argument("--quick", action="store_true", help="100 and 1 000 hosts, 20 s each")
    args = ap.parse_args()
    if args.quick:
        args.hosts, args.seconds = "100,1000", 20
    args.load = os.getloadavg()[0]
    ensure_kafka()
    results = []
    for n in (int(h) for h in args.hosts.split(",")):
        r = asyncio.run(size_run(args, n))
        print(r, flush=True)
        results.append(r)
    print()
    print(report(args, results))


if __name__ == "__main__":
    main()
