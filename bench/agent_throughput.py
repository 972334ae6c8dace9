"""Benchmark: events/s the agent drains, encodes, spools and publishes, against
the bare BCC drain loop, measured in the same run on the same probe and load.

Load: bench/create_loop.c opens an existing file with O_CREAT in a tight loop
(every open is a file_created event of the stable-tracepoint probe), pinned to
CPU 1. Every consumer is pinned to CPU 0, so "one core" is literal:

  bare BCC     BCC's ring_buffer_poll with a Python callback that copies each record,
               the probe submitting with the kernel's wake-ups (flags 0) as BCC programs
               do (what any BCC program pays; ~0.87 M/s in docs/design.md, "Measured
               figures"): the baseline
  bare bulk    the agent's ring-buffer reader (edge_agent/ringbuf.py) with the drain
               thread's pacing (its read interval and the probe's wake-ups when the
               buffer fills), counting records and nothing else
  bulk+decode  the same, plus decoding every record into its wire event
  agent        `ktel agent` publishing to a local Kafka: events acknowledged by Kafka
               per second (ktel_agent_events_published_total); its RSS sampled
               while the load runs (max), after it, and its lifetime peak (VmHWM,
               which includes compiling the probe at start)

The load generator tops out near 200 k opens/s on these machines, below what
either consumer can take, so wall-clock rates only show that both keep up.
Capacity is therefore measured as events per CPU-second of the consumer
(user + system time of its process while it drains): what one core sustains.

With ``--security``, only the agent, publishing to one broker over PLAINTEXT and over
SASL_SSL (SCRAM-SHA-512 over TLS), the two interleaved round by round: the cost of
an encrypted, authenticated connection in events per CPU-second of the agent.

Run as root: .venv/bin/python bench/agent_throughput.py [--seconds 10] [--rounds 3] [--security]
Results go to bench/RESULTS.md by hand, with the date and the machine.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from edge_agent import probes, ringbuf  # noqa: E402
from ktel.probes import file_created  # noqa: E402
from ktel.probes.decode import count  # noqa: E402
from ktel.stack.kafka import LocalKafka, Security, ensure_kafka  # noqa: E402
from ktel.stack.proc import free_port  # noqa: E402
from ktel.topics import create_topics  # noqa: E402
from tests.integration.agent_harness import AgentProcess  # noqa: E402

RINGBUF_PAGES = 4096  # 16 MiB, the size of the drop figure in docs/design.md, "Measured figures"
# The agent's start-up, left out of what bench/agent_cost.py measures: probes loaded,
# Kafka connected, the control topic read back, the first heartbeat sent.
SETTLE_S = 12


def build_load(tmp: Path) -> Path:
    exe = tmp / "create_loop"
    subprocess.run(["gcc", "-O2", "-o", exe, HERE / "create_loop.c"], check=True)
    return exe


def start_load(exe: Path, target: Path, seconds: float, rate: float = 0) -> subprocess.Popen:
    """rate: opens a second (0: as fast as it goes)."""
    return subprocess.Popen(
        ["taskset", "-c", "1", exe, target, str(seconds), str(rate)], stdout=subprocess.PIPE, text=True
    )


def bare(exe: Path, target: Path, seconds: float, how: str, rate: float = 0) -> dict:
    """how: "bcc" (BCC's callback), "bulk" (ringbuf.RingReader) or "decode" (bulk + decode)."""
    os.sched_setaffinity(0, {0})
    from bcc import BPF

    # The same program the agent loads; for BCC's loop, with the kernel's wake-ups
    # (flags 0), as a BCC program submits, since ring_buffer_poll reads only when woken.
    wakeup = 0 if how == "bcc" else probes.wakeup_bytes(RINGBUF_PAGES)
    bpf = BPF(
        text=probes.bpf_source("file_created").encode(),
        cflags=[
            f"-I{probes.BPF_DIR}",
            f"-DKTEL_RINGBUF_PAGES={RINGBUF_PAGES}",
            f"-DKTEL_WAKEUP_BYTES={wakeup}",
        ],
    )
    n = 0

    def cb(_ctx, data, size):
        nonlocal n
        ctypes.string_at(data, size)
        n += 1

    table = bpf[b"events"]
    reader = None
    if how == "bcc":
        table.open_ring_buffer(cb)
    else:
        reader = ringbuf.RingReader(table.map_fd, table.max_entries)
    offset = time.time_ns() - time.monotonic_ns()

    def read() -> int:
        # As the agent's drain thread (edge_agent/probes.py, LoadedProbe._drain) reads.
        nonlocal n
        assert reader is not None
        runs = reader.read()
        n += count(runs)
        if how == "decode":
            for size, data in runs:
                file_created.decode_run(size, data, offset)
        return sum(len(data) for _, data in runs)

    load = start_load(exe, target, seconds, rate)
    t0 = time.monotonic()
    cpu0 = os.times()
    while load.poll() is None:
        if reader is None:
            bpf.ring_buffer_poll(100)
        else:
            reader.wait(probes.READ_INTERVAL_S)
            read()
    if reader is None:
        bpf.ring_buffer_consume()
    else:
        read()
        reader.close()
    cpu1 = os.times()
    elapsed = time.monotonic() - t0
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    generated = int(load.communicate()[0])
    drops = sum(bpf[b"counters"][ctypes.c_int(probes.COUNTER_RINGBUF_DROPS)])
    rss = rss_mib(Path("/proc/self/status"))
    bpf.cleanup()
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return {
        "generated": generated, "delivered": n, "drops": drops, "rate": n / elapsed, "per_cpu_s": n / cpu,
        "cpu_s": cpu, "wall_s": elapsed, "rss_mib": rss,
    }  # fmt: skip


def agent(
    exe: Path, target: Path, seconds: float, tmp: Path, rate: float = 0, deployed: bool = False
) -> dict:
    ensure_kafka()
    tmp.mkdir(parents=True, exist_ok=True)
    with LocalKafka(tmp / "kafka", free_port(), free_port()) as kafka:
        make_topics(kafka.bootstrap)
        kafka_env = {"KTEL_KAFKA__BOOTSTRAP": kafka.bootstrap}
        return measure_agent(exe, target, seconds, tmp, kafka_env, rate, deployed)


def make_topics(bootstrap: str) -> None:
    import asyncio

    from ktel import config, topics

    cfg = config.Config(
        kafka=config.KafkaConfig(bootstrap=bootstrap), agent=config.AgentConfig(host_id="bench")
    )
    asyncio.run(create_topics(bootstrap, topics.specs(cfg)))


def measure_agent(
    exe: Path,
    target: Path,
    seconds: float,
    tmp: Path,
    kafka: dict[str, str],
    rate: float = 0,
    deployed: bool = False,
) -> dict:
    """``ktel agent`` with the ``kafka`` settings (KTEL_KAFKA__* variables) under the load
    (``rate`` opens a second; 0: as fast as it goes).

    ``deployed``: the agent as a node runs it, its default heartbeats (every 10 s, not
    the test harness's every second) and ring buffers (agent.ringbuf_pages, not this
    bench's RINGBUF_PAGES: their size sets how often a busy buffer wakes the reader),
    and the load started SETTLE_S after it, when its
    start-up (Kafka connections, the control topic's look-back, the first heartbeat)
    is over: what it costs a node from then on, not what its first seconds cost."""
    tmp.mkdir(parents=True, exist_ok=True)
    a = AgentProcess(
        tmp, kafka["KTEL_KAFKA__BOOTSTRAP"], wrapper=["taskset", "-c", "0"], ringbuf_pages=str(RINGBUF_PAGES)
    )
    a.env.update(kafka)
    if deployed:
        a.env.pop("KTEL_AGENT__HEARTBEAT_SECONDS")
        a.env.pop("KTEL_AGENT__RINGBUF_PAGES")
    a.start()
    assert a.proc is not None
    pid = a.proc.pid
    if deployed:
        time.sleep(SETTLE_S)
    before = a.metric("ktel_agent_events_published_total")
    status = Path(f"/proc/{pid}/status")
    idle_rss = rss_mib(status)
    cpu0 = proc_cpu(pid)
    load = start_load(exe, target, seconds, rate)
    t0 = time.monotonic()
    load_rss = 0.0
    while load.poll() is None:
        load_rss = max(load_rss, rss_mib(status))
        time.sleep(0.1)
    load_wall, load_cpu = time.monotonic() - t0, proc_cpu(pid) - cpu0
    generated = int(load.communicate()[0])
    # Until the agent has published every event the load made (or gives up after a while):
    # what it had read is not enough, as the last of them may still wait in the ring
    # buffer for the next read (agent.read_interval_ms).
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        published = a.metric("ktel_agent_events_published_total") - before
        dropped = a.metric("ktel_agent_ringbuf_drops_total", probe="file_created")
        if published + dropped >= generated and a.metric("ktel_agent_spool_bytes") == 0:
            break
        time.sleep(0.2)
    elapsed = time.monotonic() - t0
    cpu = proc_cpu(pid) - cpu0
    published = a.metric("ktel_agent_events_published_total") - before
    drops = a.metric("ktel_agent_ringbuf_drops_total", probe="file_created")
    rss, hwm = rss_mib(status), rss_mib(status, "VmHWM")
    a.stop()
    return {
        "generated": generated,
        "delivered": published,
        "drops": drops,
        "rate": published / elapsed,
        "per_cpu_s": published / cpu,
        "cpu_s": load_cpu,  # while the load ran
        "wall_s": load_wall,
        "rss_idle_mib": idle_rss,
        "rss_under_load_max_mib": load_rss,
        "rss_after_mib": rss,
        "vmhwm_mib": hwm,
    }


def security(exe: Path, target: Path, seconds: float, tmp: Path, rounds: int) -> None:
    """The agent over PLAINTEXT and over SASL_SSL (SCRAM-SHA-512, TLS), to one broker
    with both listeners, interleaved round by round (the order swapped every round)
    so that the machine's noise falls on both alike."""
    from ktel.stack import certs

    ensure_kafka()
    ca = certs.make_ca(tmp / "certs")
    password = os.urandom(16).hex()
    sasl_port = free_port()
    security = Security(certs.broker_keystore(ca), {"bench": password})
    variants = {
        "PLAINTEXT": {},
        "SASL_SSL": {
            "KTEL_KAFKA__BOOTSTRAP": f"127.0.0.1:{sasl_port}",
            "KTEL_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "KTEL_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
            "KTEL_KAFKA__SASL_USERNAME": "bench",
            "KTEL_KAFKA__SASL_PASSWORD": password,
            "KTEL_KAFKA__SSL_CAFILE": str(ca.cert),
        },
    }
    results: dict[str, list[dict]] = {k: [] for k in variants}
    with LocalKafka(tmp / "kafka", free_port(), free_port(), security, sasl_ssl_port=sasl_port) as kafka:
        make_topics(kafka.bootstrap)
        for i in range(rounds):
            order = list(variants) if i % 2 == 0 else list(reversed(variants))
            for name in order:
                settings = {"KTEL_KAFKA__BOOTSTRAP": kafka.bootstrap, **variants[name]}
                results[name].append(measure_agent(exe, target, seconds, tmp / f"agent-{name}-{i}", settings))
                print(f"round {i + 1} {name:10}: {results[name][-1]}", flush=True)
    print("medians:")
    for name in variants:
        print(
            f"  ktel agent over {name:10}: {median_of(results[name], 'per_cpu_s'):,.0f} events per CPU-second"
        )
    ratio = median_of(results["SASL_SSL"], "per_cpu_s") / median_of(results["PLAINTEXT"], "per_cpu_s")
    print(f"  SASL_SSL / PLAINTEXT (medians): {ratio:.3f}")
    # Each round's pair ran back to back: its ratio is spared the drift between rounds.
    paired = [
        s["per_cpu_s"] / p["per_cpu_s"]
        for s, p in zip(results["SASL_SSL"], results["PLAINTEXT"], strict=True)
    ]
    print(f"  SASL_SSL / PLAINTEXT, each round: {', '.join(f'{r:.2f}' for r in paired)}")
    print(f"  SASL_SSL / PLAINTEXT (median of the rounds' ratios): {statistics.median(paired):.3f}")


def rss_mib(status: Path, key: str = "VmRSS") -> float:
    return int(status.read_text().split(f"{key}:")[1].split()[0]) / 1024


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def bare_in_child(exe: Path, target: Path, seconds: float, how: str, rate: float = 0) -> dict:
    """bare() in a process of its own: the agent's measurements must not share
    pages with it (the agent pages out BCC's compiler after loading; pages another
    process maps stay resident), and each loop starts from a fresh interpreter."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--bare",
            how,
            "--seconds",
            str(seconds),
            "--exe",
            exe,
            "--target",
            target,
            "--rate",
            str(rate),
        ],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    return json.loads(out.splitlines()[-1])


def median_of(rounds: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=1, help="repeat every measurement; medians are reported")
    ap.add_argument(
        "--security",
        action="store_true",
        help="only the agent, over PLAINTEXT and over SASL_SSL, interleaved",
    )
    ap.add_argument("--bare", choices=["bcc", "bulk", "decode"], help=argparse.SUPPRESS)
    ap.add_argument("--exe", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--target", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare:
        print(json.dumps(bare(args.exe, args.target, args.seconds, args.bare, args.rate)))
        return
    names = {
        "bcc": "bare BCC loop",
        "bulk": "bare bulk loop",
        "decode": "bulk + decode",
        "agent": "ktel agent",
    }
    results: dict[str, list[dict]] = {k: [] for k in names}
    with tempfile.TemporaryDirectory(prefix="ktel-bench-") as d:
        tmp = Path(d)
        exe = build_load(tmp)
        target = tmp / "target"
        target.touch()
        if args.security:
            security(exe, target, args.seconds, tmp, args.rounds)
            return
        for i in range(args.rounds):
            for how in ("bcc", "bulk", "decode"):
                results[how].append(bare_in_child(exe, target, args.seconds, how))
                print(f"round {i + 1} {names[how]:14}: {results[how][-1]}", flush=True)
            results["agent"].append(agent(exe, target, args.seconds, tmp / f"agent-{i}"))
            print(f"round {i + 1} {names['agent']:14}: {results['agent'][-1]}", flush=True)
            base = results["bcc"][-1]["per_cpu_s"]
            ratios = ", ".join(
                f"{names[k]} {results[k][-1]['per_cpu_s'] / base:.2f}" for k in ("bulk", "decode", "agent")
            )
            print(f"round {i + 1} events per CPU-second / bare BCC loop: {ratios}", flush=True)
    print("medians:")
    for k, name in names.items():
        print(f"  {name:14}: {median_of(results[k], 'per_cpu_s'):,.0f} events per CPU-second")
    agent_ratios = [
        a["per_cpu_s"] / b["per_cpu_s"] for a, b in zip(results["agent"], results["bcc"], strict=True)
    ]
    print(f"  agent / bare BCC loop (median of the rounds' ratios): {statistics.median(agent_ratios):.2f}")
    for key in ("rss_idle_mib", "rss_under_load_max_mib", "rss_after_mib", "vmhwm_mib"):
        print(f"  agent {key}: {max(r[key] for r in results['agent']):.0f} (max of the rounds)")


if __name__ == "__main__":
    main()
