"""Benchmark: what a processing worker pays per Kafka record before ktel does anything.

bench/fleet.py finds the worker's CPU per event growing with the number of hosts at
a fixed fleet rate: more hosts means smaller batches, and part of the cost is per
record (per batch), not per event. This bench measures that part on its own, on one
set of records (agent-shaped raw batches of --events events from --hosts hosts, made
by bench/fleet.py's traffic model and produced to a fresh local Kafka before any
consumer starts), each consumer reading all of them from the start:

  aiokafka         AIOKafkaConsumer.getmany, each record decoded (ktel/wire):
                   the floor of any Python consumer
  faust            a Faust agent (the stages' App, processors/faust_app.py, same
                   settings) iterating stream.events(), doing nothing
  faust+decode     the same, each record decoded
  faust+table      the same, plus a small table value per host written to its
                   changelog, as every stage that keeps state does once per batch
  ktel             `ktel process all`, the fused worker

Each consumer's CPU (user + system, all threads) is taken from its first record to
its last, so start-up and the join are left out. CPU per record over --events gives
that consumer's part of the CPU per event at this batch size.

Run: PYTHONPATH=. .venv/bin/python bench/stream_floor.py [--records 20000] [--events 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import psutil  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402
from fleet import Host, make_batch  # noqa: E402
from processing_throughput import machine, scrape, start_worker  # noqa: E402

from ktel import config, topics  # noqa: E402
from ktel.stack.kafka import LocalKafka  # noqa: E402
from ktel.stack.proc import free_port  # noqa: E402
from ktel.stack.proc import stop as stop_proc  # noqa: E402
from ktel.topics import create_topics  # noqa: E402
from ktel.wire import RAW_TOPIC, decode_batch, encode_batch  # noqa: E402

VARIANTS = ("aiokafka", "faust", "faust+decode", "faust+table", "ktel")


async def produce(bootstrap: str, hosts: int, records: int, events: int) -> None:
    rng = random.Random(1)
    fleet = [Host(i, rng) for i in range(hosts)]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, compression_type="lz4", linger_ms=5, acks="all")
    await producer.start()
    try:
        futures = []
        for i in range(records):
            batch, _ = make_batch(fleet[i % hosts], events, rng)
            futures.append(await producer.send(RAW_TOPIC, encode_batch(batch), key=batch.key))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


# ------------------------------------------------------------ the consumers (subprocesses)


def report(cpu0: float, wall0: float, n: int) -> None:
    print(
        json.dumps({"cpu": time.process_time() - cpu0, "wall": time.monotonic() - wall0, "n": n}), flush=True
    )


async def consume_aiokafka(bootstrap: str, records: int) -> None:
    consumer = AIOKafkaConsumer(
        RAW_TOPIC,
        bootstrap_servers=bootstrap,
        group_id=f"floor-{uuid.uuid4().hex}",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    n, t0 = 0, None
    while n < records:
        for msgs in (await consumer.getmany(timeout_ms=1000, max_records=2000)).values():
            if t0 is None:
                t0 = (time.process_time(), time.monotonic())
            for msg in msgs:
                decode_batch(msg.value)  # type: ignore[arg-type]
                n += 1
    assert t0 is not None
    report(*t0, n)
    os._exit(0)


def consume_faust(bootstrap: str, records: int, variant: str) -> None:
    import faust

    from ktel.kafka_client import faust_settings
    from processors.faust_app import App

    partitions = config.KafkaConfig().raw_partitions
    tmp = tempfile.mkdtemp(prefix="ktel-bench-floor-")
    app = App(
        f"floor-{uuid.uuid4().hex[:8]}",
        **faust_settings(config.KafkaConfig(bootstrap=bootstrap)),
        store="memory://",
        datadir=tmp,
        web_enabled=False,
        table_standby_replicas=0,
        topic_partitions=partitions,
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
    )
    source = app.topic(
        RAW_TOPIC, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    table = app.Table("t", default=dict, partitions=partitions) if variant == "faust+table" else None
    seen = {"n": 0}
    t0: list[tuple[float, float]] = []

    @app.agent(source)
    async def consume(stream):  # type: ignore[no-untyped-def]
        async for event in stream.events():
            if not t0:
                t0.append((time.process_time(), time.monotonic()))
            if variant != "faust":
                batch = decode_batch(event.value)
                if table is not None:
                    table[batch.host_id] = {"boot": batch.boot_id, "seq": batch.seq}
            seen["n"] += 1
            if seen["n"] == records:
                report(*t0[0], records)
                os._exit(0)

    faust.Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()


# ------------------------------------------------------------ one consumer, measured


def run_variant(variant: str, bootstrap: str, records: int, tmp: Path) -> dict[str, float]:
    if variant != "ktel":
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--consume",
                variant,
                "--bootstrap",
                bootstrap,
                "--records",
                str(records),
            ],
            capture_output=True,
            text=True,
            timeout=1800,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        # (Faust's worker logs what its agents print, so the line may be on either stream)
        found = re.findall(r'\{"cpu".*?\}', out.stdout + out.stderr)
        if not found:
            raise RuntimeError(f"{variant}: no result\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
        return json.loads(found[-1])
    worker, port = start_worker(tmp, bootstrap, tmp / "ktel.log")
    try:
        ps = psutil.Process(worker.pid)
        t0: tuple[float, float, float] | None = None
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            n = scrape(port, "ktel_processor_batches_total") or 0.0
            if t0 is None and n > 0:
                t0 = (sum(ps.cpu_times()[:2]), time.monotonic(), n)
            if n >= records:
                assert t0 is not None
                return {
                    "cpu": sum(ps.cpu_times()[:2]) - t0[0],
                    "wall": time.monotonic() - t0[1],
                    "n": n - t0[2],
                }
            time.sleep(0.2)
        raise RuntimeError("ktel process all did not count every record in time")
    finally:
        stop_proc(worker, 30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=20000)
    p.add_argument("--events", type=int, default=10, help="events a batch (record)")
    p.add_argument("--hosts", type=int, default=10000)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--consume", choices=VARIANTS[:-1], help=argparse.SUPPRESS)
    p.add_argument("--bootstrap", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.consume == "aiokafka":
        asyncio.run(consume_aiokafka(args.bootstrap, args.records))
        return
    if args.consume:
        consume_faust(args.bootstrap, args.records, args.consume)
        return

    print(machine())
    with tempfile.TemporaryDirectory(prefix="ktel-bench-floor-") as d:
        tmp = Path(d)
        with LocalKafka(tmp / "kafka", free_port(), free_port()) as kafka:
            cfg = config.Config(
                kafka=config.KafkaConfig(bootstrap=kafka.bootstrap), agent=config.AgentConfig(host_id="b")
            )
            asyncio.run(create_topics(kafka.bootstrap, topics.specs(cfg)))
            asyncio.run(produce(kafka.bootstrap, args.hosts, args.records, args.events))
            load = os.getloadavg()[0]
            print(
                f"{args.records:,} records of {args.events} events, {args.hosts:,} hosts, load {load:.1f}\n"
            )
            print("| consumer | CPU µs/record | CPU µs/event at this batch size | records/s (wall) |")
            print("| --- | ---: | ---: | ---: |")
            for variant in args.variants.split(","):
                r = run_variant(variant, kafka.bootstrap, args.records, tmp)
                us = 1e6 * r["cpu"] / r["n"]
                print(
                    f"| {variant} | {us:.1f} | {us / args.events:.1f} | {r['n'] / r['wall']:,.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
