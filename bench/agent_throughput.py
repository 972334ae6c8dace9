"""Benchmark: events/s the agent drains, encodes, spools and publishes, against
the bare BCC drain loop, measured in the same run on the same probe and load.

Load: bench/create_loop.c opens an existing file with O_CREAT in a tight loop
(every open is a file_created event of the stable-tracepoint probe), pinned to
CPU 1. Both consumers are pinned to CPU 0, so "one core" is literal:

  bare   BCC's ring_buffer_poll with a Python callback that copies each record
         (what any BCC program pays; design notes section 2 measured ~0.87 M/s)
  agent  `ktel agent` publishing to a local Kafka: events acknowledged by Kafka
         per second (ktel_agent_events_published_total), and its peak RSS

The load generator tops out near 200 k opens/s on these machines, below what
either consumer can take, so wall-clock rates only show that both keep up.
Capacity is therefore measured as events per CPU-second of the consumer
(user + system time of its process while it drains): what one core sustains.

Run as root: .venv/bin/python bench/agent_throughput.py [--seconds 10]
Results go to bench/RESULTS.md by hand, with the date and the machine.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from edge_agent import probes  # noqa: E402
from ktel.stack.kafka import LocalKafka, create_topics, ensure_kafka, free_port  # noqa: E402
from tests.integration.agent_harness import AgentProcess  # noqa: E402

RINGBUF_PAGES = 4096  # 16 MiB, the size the design notes measured with


def build_load(tmp: Path) -> Path:
    exe = tmp / "create_loop"
    subprocess.run(["gcc", "-O2", "-o", exe, HERE / "create_loop.c"], check=True)
    return exe


def start_load(exe: Path, target: Path, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(
        ["taskset", "-c", "1", exe, target, str(seconds)], stdout=subprocess.PIPE, text=True
    )


def bare(exe: Path, target: Path, seconds: float) -> dict:
    os.sched_setaffinity(0, {0})
    from bcc import BPF

    # The same program the agent loads.
    bpf = BPF(
        text=probes.bpf_source("file_created").encode(),
        cflags=[f"-I{probes.BPF_DIR}", f"-DKTEL_RINGBUF_PAGES={RINGBUF_PAGES}"],
    )
    n = 0

    def cb(_ctx, data, size):
        nonlocal n
        ctypes.string_at(data, size)
        n += 1

    bpf[b"events"].open_ring_buffer(cb)
    load = start_load(exe, target, seconds)
    t0 = time.monotonic()
    cpu0 = os.times()
    while load.poll() is None:
        bpf.ring_buffer_poll(100)
    bpf.ring_buffer_consume()
    cpu1 = os.times()
    elapsed = time.monotonic() - t0
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    generated = int(load.stdout.read())
    drops = sum(bpf[b"counters"][ctypes.c_int(probes.COUNTER_RINGBUF_DROPS)])
    bpf.cleanup()
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return {"generated": generated, "delivered": n, "drops": drops, "rate": n / elapsed, "per_cpu_s": n / cpu}


def agent(exe: Path, target: Path, seconds: float, tmp: Path) -> dict:
    ensure_kafka()
    with LocalKafka(tmp / "kafka", free_port(), free_port()) as kafka:
        import asyncio

        from ktel import config, topics

        cfg = config.Config(
            kafka=config.KafkaConfig(bootstrap=kafka.bootstrap), agent=config.AgentConfig(host_id="bench")
        )
        asyncio.run(create_topics(kafka.bootstrap, topics.specs(cfg)))
        a = AgentProcess(
            tmp, kafka.bootstrap, wrapper=["taskset", "-c", "0"], ringbuf_pages=str(RINGBUF_PAGES)
        )
        a.start()
        before = a.metric("ktel_agent_events_published_total")
        cpu0 = proc_cpu(a.proc.pid)
        load = start_load(exe, target, seconds)
        t0 = time.monotonic()
        load.wait()
        generated = int(load.stdout.read())
        # Until the agent has published everything it read (or gives up after a while).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            read = a.metric("ktel_agent_events_read_total", probe="file_created")
            if (
                a.metric("ktel_agent_events_published_total") >= read
                and a.metric("ktel_agent_spool_bytes") == 0
            ):
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
        cpu = proc_cpu(a.proc.pid) - cpu0
        published = a.metric("ktel_agent_events_published_total") - before
        drops = a.metric("ktel_agent_ringbuf_drops_total", probe="file_created")
        status = Path(f"/proc/{a.proc.pid}/status").read_text()
        hwm, rss = (int(status.split(f"{k}:")[1].split()[0]) / 1024 for k in ("VmHWM", "VmRSS"))
        a.stop()
    return {
        "generated": generated,
        "delivered": published,
        "drops": drops,
        "rate": published / elapsed,
        "per_cpu_s": published / cpu,
        "rss_mib": rss,
        "peak_rss_mib": hwm,
    }


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ktel-bench-") as d:
        tmp = Path(d)
        exe = build_load(tmp)
        target = tmp / "target"
        target.touch()
        b = bare(exe, target, args.seconds)
        print(f"bare BCC loop : {b}")
        g = agent(exe, target, args.seconds, tmp)
        print(f"ktel agent    : {g}")
        print(f"agent / bare, events per CPU-second: {g['per_cpu_s'] / b['per_cpu_s']:.2f}")


if __name__ == "__main__":
    main()
