"""Benchmark: how long `ktel status` takes to read a fleet's heartbeats, against a
plain consumer reading the same records in the same run.

  ktel      ktel.status.read(): admin client (topics, groups, offsets) + a group-less
            consumer from offsets_for_times up to the end offsets, each heartbeat
            decoded and checked (ktel.wire), the newest per host kept
  baseline  a group-less aiokafka consumer reading the same partitions from the same
            offsets to the same end, decoding nothing; handed the partitions (its
            metadata call untimed, which favours it)

The fleet: --hosts agents' heartbeats, --beats each (15 minutes of 10 s heartbeats is
90), shaped as edge_agent/agent.py makes them (two probes, its counters and rates, no
containers), on a local single-node Kafka in a temporary directory.

Run: .venv/bin/python bench/status_read.py [--hosts 1000] [--beats 30] [--runs 3]
Results go to bench/RESULTS.md by hand, with the date and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402

from ktel import config, status, topics  # noqa: E402
from ktel.stack.kafka import LocalKafka, ensure_kafka  # noqa: E402
from ktel.stack.proc import free_port  # noqa: E402
from ktel.topics import create_topics  # noqa: E402
from ktel.wire import HEARTBEATS_TOPIC, encode_heartbeat  # noqa: E402
from tests.integration.agent_harness import topic_partitions  # noqa: E402

COUNTERS = [
    "events_read", "events_published", "batches_published", "publish_retries", "decode_errors",
    "spool_dropped_events", "spool_corrupt_bytes", "spool_unreadable_bytes", "disk_dropped_events",
    "too_large_dropped_events",
    "batches_split", "ringbuf_drops.file_created", "sampled_out.file_created", "inflight_lost.file_created",
]  # fmt: skip


def heartbeat(host: int, ts: int) -> bytes:
    counters = {name: 1000 + host for name in COUNTERS}
    return encode_heartbeat(
        {
            "ts": ts,
            "host": {
                "host.id": f"{host:032x}",
                "host.name": f"node-{host}",
                "host.arch": "amd64",
                "os.type": "linux",
                "os.version": "6.1.0-13-amd64",
                "boot.id": f"{host:032x}",
                "ktel.agent.version": "0.1.0",
            },
            "interval_s": 10.0,
            "probes": {
                "file_created": {"loaded": True, "reason": "", "sample_every": 1, "command": None},
                "ktel_api": {"loaded": False, "reason": "this kernel lacks tracepoint(s) ktel:ktel_counter"},
            },
            "counters": counters,
            "rates": {name: 1.5 for name in COUNTERS},
            "spool": {"depth_bytes": 0},
            "send_latency_ms": {"p50": 2.0, "max": 9.0},
            "acked_commands": [],
            "refused_commands": [],
        }
    )


async def fill(bootstrap: str, hosts: int, beats: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        now = time.time_ns() // 1_000_000
        for b in range(beats):
            ts = now - (beats - b) * 1000  # all within the look-back
            await asyncio.gather(
                *[
                    await producer.send(HEARTBEATS_TOPIC, heartbeat(h, ts), key=f"{h:032x}".encode())
                    for h in range(hosts)
                ]
            )
    finally:
        await producer.stop()


async def baseline(bootstrap: str, since_s: float, parts: list[TopicPartition]) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(parts)
        ends = await consumer.end_offsets(parts)
        found = await consumer.offsets_for_times(
            {tp: int(time.time() * 1000 - since_s * 1000) for tp in parts}
        )
        for tp in parts:
            hit = found.get(tp)
            consumer.seek(tp, hit.offset if hit is not None else ends[tp])
        n = 0
        while [tp for tp in parts if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                n += len(records)
        return n
    finally:
        await consumer.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--beats", type=int, default=30)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    ensure_kafka()
    with tempfile.TemporaryDirectory() as tmp:
        broker = LocalKafka(Path(tmp) / "kafka", free_port(), free_port())
        broker.start()
        try:
            bootstrap = broker.bootstrap
            cfg = config.Config(
                kafka=config.KafkaConfig(bootstrap=bootstrap), agent=config.AgentConfig(host_id="b")
            )
            asyncio.run(create_topics(bootstrap, topics.specs(cfg)))
            asyncio.run(fill(bootstrap, args.hosts, args.beats))
            since = args.beats + 600.0
            parts = asyncio.run(topic_partitions(bootstrap, HEARTBEATS_TOPIC))
            total = args.hosts * args.beats
            best_ktel = best_base = float("inf")
            for _ in range(args.runs):
                t = time.perf_counter()
                got = asyncio.run(status.read(bootstrap, since))
                best_ktel = min(best_ktel, time.perf_counter() - t)
                assert len(got.heartbeats) == args.hosts and got.bad_heartbeats == 0
                t = time.perf_counter()
                n = asyncio.run(baseline(bootstrap, since, parts))
                best_base = min(best_base, time.perf_counter() - t)
                assert n == total, n
        finally:
            broker.stop()
    print(f"{args.hosts} hosts x {args.beats} heartbeats = {total} records, best of {args.runs}")
    print(f"ktel status read: {best_ktel:.2f} s ({total / best_ktel:,.0f} heartbeats/s)")
    print(f"plain consumer:   {best_base:.2f} s ({total / best_base:,.0f} records/s)")
    print(f"ktel / baseline time: {best_ktel / best_base:.2f}")


if __name__ == "__main__":
    main()
