"""Benchmark: events/s through every processing stage in one worker process, against a
naive one-event-per-record Faust agent measured in the same run, on the same broker.

  ktel   `ktel process all` (the fused worker: dedupe, sample, aggregate and whatever
         stages processors/stages.py runs in fused mode), its own process, configured
         through KTEL_* like any deployment, reading ktel.raw pre-filled with agent-shaped
         batches (several hosts, 1000-2000 events a batch, compressed as the agent sends them)
  naive  a minimal Faust agent (this file, `--naive-worker`, its own process and
         consumer group) reading the same events one per Kafka record: msgpack-decode
         each record, count it into a dict by (host, directory) -- the per-event shape
         docs/design.md ("Measured figures") puts at about 10 k records/s

Both are measured the same way, from outside: their /metrics endpoint is polled, and the
clock (wall and the process's CPU seconds, utime + stime from /proc/<pid>/stat) starts at
the first poll that sees an event counted -- Faust's start-up, the rebalance and table
recovery are behind it -- and stops when the count reaches what was produced. ktel's
count is ktel_processor_events_total (weighted: a histogram delta counts its values);
its events are taken from ktel_processor_batches_total times the mean batch size.

The naive topic holds the first --naive-events events of the same stream (at ~10 k/s
the whole stream would take minutes). Every run starts its own broker, so consumer
groups and tables start empty. The broker and the two workers share the machine's
cores; the CPU-second rate is what one core sustains, and is less disturbed by
other load than the wall rate.

`--profile` also runs the worker's per-record code (the stages' pure cores, the wire
decode and the table's changelog value) in this process under cProfile over a sample
of the same records, to name where the time goes.

Run: PYTHONPATH=. .venv/bin/python bench/processing_throughput.py [--runs 3] [--profile] [--write]
`--write` puts the table into bench/RESULTS.md (section "Processing stages").
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import io
import json
import logging
import os
import platform
import pstats
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402

from ktel import config, topics  # noqa: E402
from ktel.kafka_client import agent_kafka_codec  # noqa: E402
from ktel.stack import proc as proc_mod  # noqa: E402
from ktel.stack.kafka import LocalKafka, ensure_kafka  # noqa: E402
from ktel.stack.proc import free_port  # noqa: E402
from ktel.topics import TopicSpec, create_topics  # noqa: E402
from ktel.wire import (  # noqa: E402
    FILE_CREATED,
    HISTOGRAM_DELTA,
    RAW_TOPIC,
    TCP_RETRANSMIT,
    RawBatch,
    decode_batch,
    encode_batch,
)
from ktel.wire.codec import compress  # noqa: E402
from processors import aggregate_core, chain  # noqa: E402

NAIVE_TOPIC = "ktel.bench.naive"
# The codec the agent publishes with by default (agent.compression); the benches
# that simulate agents produce with it: the Kafka codec AGENT_KAFKA_CODEC, each batch
# as agent_record makes it (with "zstd", compressed by the agent, no Kafka codec).
AGENT_CODEC = config.AgentConfig.model_fields["compression"].default
AGENT_KAFKA_CODEC = agent_kafka_codec(AGENT_CODEC)


def agent_record(batch: RawBatch) -> bytes:
    """``batch`` as the agent sends it with its default codec (Agent.for_kafka)."""
    plain = encode_batch(batch)
    return compress(plain) if AGENT_CODEC == "zstd" else plain


AIMS = {"rate": 300_000, "ratio": 30}
POLL_S = 0.2  # each poll is a /metrics scrape the worker serves
RESULTS = HERE / "RESULTS.md"
SECTION = "## Processing stages (`bench/processing_throughput.py`)"

# ------------------------------------------------------------------ traffic

# Where files get created on a typical node; the directory label keeps 3 components.
DIRS = [
    "/var/lib/docker/overlay2/{h:x}/diff/tmp",
    "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/{n}/fs",
    "/var/log/pods/ns_pod-{n}/app",
    "/var/lib/kubelet/pods/{h:x}/volumes",
    "/tmp",
    "/tmp/build-{n}/obj",
    "/run/user/1000",
    "/home/svc/.cache/pip/http/{h:x}",
    "/srv/data/{n}/shard-{m}",
    "/srv/data/{n}/wal",
    "/var/spool/postfix/incoming",
    "/var/tmp/systemd-private-{h:x}",
    "/proc/self/fd",
    "/etc/ssl/certs",
]
COMMS = ["containerd-shim", "java", "python3", "postgres", "nginx", "kubelet", "cc1", "ld", "bash", "rsync"]
TCP_STATES = ["ESTABLISHED", "SYN_SENT", "FIN_WAIT1", "CLOSE_WAIT"]


def make_batches(n_batches: int, hosts: int = 12, seed: int = 1) -> Iterator[RawBatch]:
    """Agent-shaped traffic: hosts take turns sealing batches of 1000-2000 events, each
    host numbering its own (seq from 0); ~98 % file_created in many directories, ~2 %
    tcp_retransmit, and every 8th batch of a host carries its syscall-latency histogram
    deltas (the agent's periodic read of the BPF map: one per active syscall, 40 log2
    buckets)."""
    rng = random.Random(seed)
    t0 = time.time_ns()
    host_dirs, host_syscalls = [], []
    for _ in range(hosts):
        dirs = [
            d.format(h=rng.getrandbits(48), n=rng.randrange(40), m=rng.randrange(8))
            for d in DIRS
            for _ in range(rng.randrange(1, 6))
        ]
        host_dirs.append(dirs)
        host_syscalls.append(rng.sample(range(0, 300), 24))
    for i in range(n_batches):
        h = i % hosts
        seq = i // hosts
        ts = t0 + i * 1_000_000
        dirs = host_dirs[h]
        events: list[list[Any]] = []
        for j in range(rng.randrange(1000, 2001)):
            r = rng.random()
            if r < 0.02:
                events.append(
                    [TCP_RETRANSMIT.id, ts + j, "ipv4", f"10.0.0.{h}", 40000 + j % 2000,
                     f"10.1.{j % 7}.{j % 250}", 443, rng.choice(TCP_STATES), 0]
                )  # fmt: skip
            else:
                pid = 1000 + rng.randrange(400)
                path = f"{rng.choice(dirs)}/f{rng.getrandbits(32):08x}.tmp"
                events.append([FILE_CREATED.id, ts + j, pid, pid, 0, rng.choice(COMMS), path, 0o101, r < 0.5])
        if seq % 8 == 0:
            for syscall in host_syscalls[h]:
                buckets = [0] * 40
                for _ in range(20):
                    buckets[rng.randrange(8, 24)] += rng.randrange(1, 500)
                count = sum(buckets)
                events.append(
                    [HISTOGRAM_DELTA.id, ts, ts - 1_000_000_000, "syscall_latency", "ns",
                     {"syscall.id": syscall}, count, count * 3000, buckets, 1]
                )  # fmt: skip
        yield RawBatch(f"node-{h:03d}.bench", "boot-0", seq, ts, events)


def naive_records(batch: RawBatch) -> Iterator[bytes]:
    for ev in batch.events:
        yield msgpack.packb(ev, use_bin_type=True)


# ---------------------------------------------------- the worker's code, in process


def default_config(bootstrap: str = "127.0.0.1:9", tmp: Path | None = None, metrics_port: int = 0) -> Any:
    return config.Config(
        kafka=config.KafkaConfig(bootstrap=bootstrap),
        agent=config.AgentConfig(host_id="bench"),
        process=config.ProcessConfig(metrics_port=metrics_port, data_dir=tmp or Path("/nonexistent")),
    )


class Cores:
    """What the fused worker does per record, minus Faust: used for the expected count
    and for the profile. It runs the worker's chain (processors/chain.py, with the
    worker's config); the measured figure always comes from the real worker."""

    def __init__(self, cfg: Any) -> None:
        self.chain = chain.build("all", cfg)
        self.hosts: dict[str, dict[str, Any]] = {}
        self.counted = 0.0

    def process(self, record: bytes) -> None:
        batch = decode_batch(record)
        value = self.hosts.setdefault(batch.host_id, {})
        self.counted += self.chain.on_batch(value, batch, time.time_ns() // 1_000_000).counts.get("events", 0)
        json.dumps(value)  # the table's changelog value (Faust's json serializer)


# ------------------------------------------------------------------- measuring


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def scrape(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


@dataclasses.dataclass
class Measured:
    events: float
    wall: float
    cpu: float
    startup: float  # wall seconds from process start to the first counted event

    @property
    def rate(self) -> float:
        return self.events / self.wall

    @property
    def per_cpu(self) -> float:
        return self.events / self.cpu


def measure(proc: subprocess.Popen, progress: Any, timeout: float) -> Measured:
    """Poll ``progress()`` -> (events so far or None, done) until done; the clock starts
    at the first poll that sees an event counted."""
    started = time.monotonic()
    deadline = started + timeout
    first = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode} (see its log)")
        t, cpu = time.monotonic(), proc_cpu(proc.pid)
        events, done = progress()
        if events and first is None:
            first = (t, cpu, events, t - started)
        if done:
            t1, cpu1 = time.monotonic(), proc_cpu(proc.pid)
            assert first is not None
            return Measured(events - first[2], t1 - first[0], cpu1 - first[1], first[3])
        time.sleep(POLL_S)
    raise RuntimeError(f"the worker did not finish within {timeout:.0f} s")


# --------------------------------------------------------------------- the runs


async def prefill(bootstrap: str, n_batches: int, hosts: int, naive_events: int) -> dict[str, Any]:
    from aiokafka import AIOKafkaProducer

    # As the agent produces (edge_agent/agent.py): its default codec, acks=all.
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        compression_type=AGENT_KAFKA_CODEC,
        linger_ms=5,
        max_request_size=4 * 1024 * 1024,
        acks="all",
    )
    await producer.start()
    info: dict[str, Any] = {"batches": 0, "events": 0, "bytes": 0, "naive": 0, "naive_keys": 0}
    sample: list[bytes] = []
    try:
        for batch in make_batches(n_batches, hosts):
            record = agent_record(batch)
            info["batches"] += 1
            info["events"] += len(batch.events)
            info["bytes"] += len(record)
            if len(sample) < 300:
                sample.append(record)
            await producer.send(RAW_TOPIC, record, key=batch.key)
            if info["naive"] < naive_events:
                for value in naive_records(batch):
                    await producer.send(NAIVE_TOPIC, value, key=batch.key)
                    info["naive"] += 1
                    if info["naive"] >= naive_events:
                        break
        await producer.flush()
    finally:
        await producer.stop()
    info["sample"] = sample
    return info


def expected_count(n_batches: int, hosts: int, cfg: Any) -> float:
    cores = Cores(cfg)
    for batch in make_batches(n_batches, hosts):
        cores.process(encode_batch(batch))
    return cores.counted


def start_worker(tmp: Path, bootstrap: str, log_path: Path) -> tuple[subprocess.Popen, int]:
    """`ktel process all` on ``bootstrap`` with ktel's defaults (no KTEL_CONFIG), its data
    under ``tmp`` and its output in ``log_path``; and the port of its metrics."""
    port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        KTEL_KAFKA__BOOTSTRAP=bootstrap,
        KTEL_AGENT__HOST_ID="bench",
        KTEL_PROCESS__METRICS_PORT=str(port),
        KTEL_PROCESS__DATA_DIR=str(tmp / "ktel-data"),
    )
    env.pop("KTEL_CONFIG", None)
    with open(log_path, "ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "ktel.cli", "process", "all"], env=env, stdout=log, stderr=log, cwd=ROOT
        )
    return worker, port


def run_ktel(
    tmp: Path, bootstrap: str, info: dict[str, Any], expected: float, timeout: float, spy: str | None
) -> tuple[Measured, str]:
    per_batch = info["events"] / info["batches"]
    proc, port = start_worker(tmp, bootstrap, tmp / "ktel-worker.log")

    def progress() -> tuple[float | None, bool]:
        counted = scrape(port, "ktel_processor_events_total")
        if counted is not None and counted >= expected * (1 - 1e-9):
            return info["events"], True
        batches = scrape(port, "ktel_processor_batches_total")
        return (batches * per_batch if batches else None), False

    sampler = None
    if spy:
        raw = tmp / "py-spy.txt"
        cmd = [spy, "record", "--nonblocking", "--rate", "250", "--format", "raw", "-o", str(raw)]
        sampler = subprocess.Popen(
            [*cmd, "--pid", str(proc.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    try:
        m = measure(proc, progress, timeout)
    finally:
        if sampler:
            sampler.send_signal(signal.SIGINT)
            sampler.wait(30)
        proc_mod.stop(proc, 30)
    return m, (spy_summary(raw.read_text()) if sampler and raw.exists() else "")


def spy_summary(collapsed: str, top: int = 14) -> str:
    """Where the worker's samples were: own time per function, and time under a few frames."""
    own: dict[str, int] = {}
    under: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        count = int(n)
        total += count
        leaf = re.sub(r" \((.*/)?(site-packages/)?", " (", frames[-1])
        own[leaf] = own.get(leaf, 0) + count
        for name in {re.sub(r" \(.*", "", f) for f in frames}:
            under[name] = under.get(name, 0) + count
    lines = [f"{total} samples; own time:"]
    for name, samples in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * samples / total:5.1f} %  {name}")
    lines.append("time under:")
    for name in (
        "make_app.<locals>.process", "decode_batch", "first_time", "enrich", "Sampler.sample", "add",
        "count_events", "signals", "series_key", "Table.__setitem__", "dumps", "Fetcher._fetch_task",
    ):  # fmt: skip
        if name in under:
            lines.append(f"  {100 * under[name] / total:5.1f} %  {name}")
    return "\n".join(lines)


def run_naive(tmp: Path, bootstrap: str, n: int, timeout: float) -> Measured:
    port = free_port()
    with open(tmp / "naive-worker.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--naive-worker", bootstrap, str(port), str(tmp / "naive-data")],
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stdout=log,
            stderr=log,
            cwd=ROOT,
        )
    try:

        def progress() -> tuple[float | None, bool]:
            counted = scrape(port, "bench_naive_events_total")
            return counted, counted is not None and counted >= n

        return measure(proc, progress, timeout)
    finally:
        proc_mod.stop(proc, 30)


# ------------------------------------------------------------ the naive agent


def naive_worker(bootstrap: str, port: int, datadir: str) -> None:
    """A minimal per-event Faust agent: decode each record, count it by (host, directory)."""
    import faust
    from prometheus_client import REGISTRY
    from prometheus_client.core import CounterMetricFamily

    from ktel import selfmetrics

    counts: dict[tuple[str, str], int] = {}
    total = [0]

    class Total:
        def collect(self) -> Iterator[CounterMetricFamily]:
            yield CounterMetricFamily("bench_naive_events", "events counted", value=total[0])

    REGISTRY.register(Total())  # read at scrape time: no per-event metric cost
    app = faust.App(
        "ktel-bench-naive",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=datadir,
        web_enabled=False,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
    )
    topic = app.topic(
        NAIVE_TOPIC, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    depth = config.AggregateConfig().directory_depth
    directory_label = aggregate_core.directory_label
    fc = FILE_CREATED.id

    @app.agent(topic)
    async def count(stream: Any) -> None:
        async for event in stream.events():
            ev = msgpack.unpackb(event.value, raw=False)
            host = event.key.decode()
            label = directory_label(ev[6], depth) if ev[0] == fc else str(ev[0])
            counts[host, label] = counts.get((host, label), 0) + 1
            total[0] += 1

    @app.task
    async def serve() -> None:
        selfmetrics.serve(port, "127.0.0.1", "process.metrics_port")

    faust.Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()


# ------------------------------------------------------------------- profile


def profile(sample: list[bytes], cfg: Any) -> tuple[float, str]:
    cores = Cores(cfg)
    for r in sample[:20]:
        Cores(cfg).process(r)  # warm imports and caches
    prof = cProfile.Profile()
    t = time.process_time()
    prof.enable()
    for r in sample:
        cores.process(r)
    prof.disable()
    cpu = time.process_time() - t
    n = sum(len(decode_batch(r).events) for r in sample)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    return n / cpu, out.getvalue()


# ----------------------------------------------------------------------- main


def one_run(args: argparse.Namespace, expected: float) -> tuple[Measured, Measured, dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="ktel-bench-proc-") as d:
        tmp = Path(d)
        with LocalKafka(tmp / "kafka", free_port(), free_port()) as kafka:
            cfg = default_config(kafka.bootstrap, tmp)
            specs = topics.specs(cfg) + [TopicSpec(NAIVE_TOPIC, cfg.kafka.raw_partitions)]
            asyncio.run(create_topics(kafka.bootstrap, specs))
            t = time.monotonic()
            info = asyncio.run(prefill(kafka.bootstrap, args.batches, args.hosts, args.naive_events))
            info["prefill_s"] = time.monotonic() - t
            ktel, spied = run_ktel(tmp, kafka.bootstrap, info, expected, args.timeout, args.py_spy)
            if spied:
                print(spied)
            naive = run_naive(tmp, kafka.bootstrap, info["naive"], args.timeout)
    return ktel, naive, info


def machine() -> str:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return (
        f"{os.cpu_count()} cores ({model}), kernel {platform.release()}, Python {platform.python_version()}"
    )


def report(args: argparse.Namespace, info: dict[str, Any], runs: list[tuple[Measured, Measured]]) -> str:
    def spread(values: list[float]) -> str:
        return f"{min(values):,.0f}-{max(values):,.0f}" if len(values) > 1 else "-"

    rows = []
    for what, pick in (("ktel `process all`", 0), ("naive Faust agent", 1)):
        ms = [r[pick] for r in runs]
        wall, cpu = [m.rate for m in ms], [m.per_cpu for m in ms]
        rows.append(f"| {what} | {max(wall):,.0f} | {spread(wall)} | {max(cpu):,.0f} | {spread(cpu)} |")
    ratio_wall = [k.rate / n.rate for k, n in runs]
    ratio_cpu = [k.per_cpu / n.per_cpu for k, n in runs]
    best_k = max(k.rate for k, _ in runs), max(k.per_cpu for k, _ in runs)
    best_n = max(n.rate for _, n in runs), max(n.per_cpu for _, n in runs)
    lines = [
        f"{time.strftime('%Y-%m-%d')}, {machine()}, load average at the start {args.load:.1f}.",
        f"{info['batches']:,} raw batches from {args.hosts} hosts, {info['events']:,} events "
        f"({info['events'] / info['batches']:,.0f} a batch, "
        f"{info['bytes'] / info['batches'] / 1024:,.1f} KiB as the agent sends it, "
        f"{AGENT_CODEC}); the naive topic holds the first {info['naive']:,} "
        f"of them one per record. {len(runs)} run(s), each on a fresh broker; best and range.",
        "",
        "| worker | events/s (wall) | range | events per CPU-second | range |",
        "| --- | ---: | --- | ---: | --- |",
        *rows,
        f"| **ktel / naive** | **{best_k[0] / best_n[0]:.1f}** | "
        f"{min(ratio_wall):.1f}-{max(ratio_wall):.1f} | **{best_k[1] / best_n[1]:.1f}** | "
        f"{min(ratio_cpu):.1f}-{max(ratio_cpu):.1f} |",
        "",
        f"Aims: {AIMS['rate']:,} events/s per worker and {AIMS['ratio']} times the naive agent. "
        f"ktel's start-up (process start to first counted event): "
        f"{', '.join(f'{k.startup:.1f}' for k, _ in runs)} s (not timed).",
    ]
    return "\n".join(lines)


BEGIN, END = "<!-- written by bench/processing_throughput.py --write -->", "<!-- end of what it writes -->"


def write_results(body: str) -> None:
    """Replace the measured part of the section (the text around it is kept), or add the section."""
    text = RESULTS.read_text()
    if SECTION in text and BEGIN in text and END in text:
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        text = f"{text[:start]}\n{body}\n{text[end:]}"
    else:
        text = f"{text.rstrip()}\n\n{SECTION}\n\n{BEGIN}\n{body}\n{END}\n"
    RESULTS.write_text(text)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--naive-worker":
        naive_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=1200, help="raw batches of 1000-2000 events")
    ap.add_argument("--hosts", type=int, default=12)
    ap.add_argument("--naive-events", type=int, default=60_000)
    ap.add_argument("--runs", type=int, default=1, help="each on a fresh broker")
    ap.add_argument("--timeout", type=float, default=120, help="per worker, seconds")
    ap.add_argument("--profile", action="store_true", help="cProfile the worker's per-record code in process")
    ap.add_argument("--py-spy", metavar="PATH", help="sample the ktel worker with this py-spy binary")
    ap.add_argument("--write", action="store_true", help="record the results in bench/RESULTS.md")
    args = ap.parse_args()
    args.load = os.getloadavg()[0]
    logging.getLogger("aiokafka").setLevel(logging.ERROR)  # leader elections of new topics
    ensure_kafka()
    expected = expected_count(args.batches, args.hosts, default_config())
    runs = []
    for i in range(args.runs):
        ktel, naive, info = one_run(args, expected)
        runs.append((ktel, naive))
        print(
            f"run {i + 1}: ktel {ktel.rate:,.0f} events/s, {ktel.per_cpu:,.0f}/CPU-s "
            f"(start-up {ktel.startup:.1f} s); naive {naive.rate:,.0f} events/s, {naive.per_cpu:,.0f}/CPU-s; "
            f"ratio {ktel.rate / naive.rate:.1f} (wall), {ktel.per_cpu / naive.per_cpu:.1f} (CPU); "
            f"prefill {info['prefill_s']:.0f} s",
            flush=True,
        )
    body = report(args, info, runs)
    if args.profile:
        rate, text = profile(info["sample"], default_config())
        print(f"\nper-record code in process under cProfile: {rate:,.0f} events per CPU-second\n{text}")
    print()
    print(body)
    if args.write:
        write_results(body)
        print(f"\nwritten to {RESULTS.relative_to(ROOT)}; add what limits ktel by hand")


if __name__ == "__main__":
    main()
