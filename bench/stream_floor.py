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
  faust-take       a Faust agent on stream.take_events(1000, within=0.05), doing
                   nothing; +decode: each record decoded
  faust-bulk       the raw topic's records taken from Faust's fetch loop where it
                   hands each to the Conductor, and handed to a task in lists
                   (class Bulk); +decode: each record decoded
  faust-fetch      the same, taken below Faust's per-record fetch loop: each
                   fetch's records of a partition handed over as one list;
                   +decode: each record decoded, and with it a small changelog
                   value written per record through Faust's changelog topic
                   (+send), straight to the aiokafka producer Faust holds
                   (+producer), or once per partition per list (+coalesced)
  ktel             `ktel process all`, the fused worker

Each consumer's CPU (user + system, all threads) is taken from its first record to
its last, so start-up and the join are left out. CPU per record over --events gives
that consumer's part of the CPU per event at this batch size. Each Faust consumer
also checks its raw topic's offset commits against the records it has handled
(class Floor): "early" counts commits past a partition's last handled record,
"behind" the records handled but not committed after a last commit.

Run: PYTHONPATH=. .venv/bin/python bench/stream_floor.py [--records 20000] [--events 10]
     [--variants faust,faust-fetch+decode] [--faust broker_commit_every=100]
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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import psutil  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402
from fleet import Host, make_batch  # noqa: E402
from processing_throughput import AGENT_KAFKA_CODEC, agent_record, machine, scrape, start_worker  # noqa: E402

from ktel import config, topics  # noqa: E402
from ktel.stack.kafka import LocalKafka  # noqa: E402
from ktel.stack.proc import free_port  # noqa: E402
from ktel.stack.proc import stop as stop_proc  # noqa: E402
from ktel.topics import create_topics  # noqa: E402
from ktel.wire import RAW_TOPIC, decode_batch  # noqa: E402

VARIANTS = (
    "aiokafka",
    "faust",
    "faust+decode",
    "faust+table",
    "faust-take",
    "faust-take+decode",
    "faust-bulk",
    "faust-bulk+decode",
    "faust-fetch",
    "faust-fetch+decode",
    "faust-fetch+send",
    "faust-fetch+producer",
    "faust-fetch+coalesced",
    "ktel",
)
# The bulk paths' ways of writing a changelog record (see consume_faust).
WRITES = ("send", "producer", "coalesced")


async def produce(bootstrap: str, hosts: int, records: int, events: int) -> None:
    rng = random.Random(1)
    fleet = [Host(i, rng) for i in range(hosts)]
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, compression_type=AGENT_KAFKA_CODEC, linger_ms=5, acks="all"
    )
    await producer.start()
    try:
        futures = []
        for i in range(records):
            batch, _ = make_batch(fleet[i % hosts], events, rng)
            futures.append(await producer.send(RAW_TOPIC, agent_record(batch), key=batch.key))
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


def consume_faust(bootstrap: str, records: int, variant: str, settings: dict[str, Any]) -> None:
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
        **settings,
    )
    source = app.topic(
        RAW_TOPIC, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    path, _, work = variant.partition("+")
    # faust+table writes through the table; the bulk paths' changelog writes go to its topic.
    table = app.Table("t", default=dict, partitions=partitions) if work in ("table", *WRITES) else None
    floor = Floor(app, records)

    if path == "faust":

        @app.agent(source)
        async def consume_events(stream):  # type: ignore[no-untyped-def]
            async for event in stream.events():
                floor.start()
                if work:
                    batch = decode_batch(event.value)
                    if table is not None:
                        table[batch.host_id] = {"boot": batch.boot_id, "seq": batch.seq}
                floor.handled(event.message)

    elif path == "faust-take":

        @app.agent(source)
        async def consume_take(stream):  # type: ignore[no-untyped-def]
            # take_events buffers and acks as take does (each event after the body has
            # handled its list) and yields the events, whose offsets the check needs.
            async for events in stream.take_events(1000, within=0.05):
                floor.start()
                for event in events:
                    if work:
                        decode_batch(event.value)
                    floor.handled(event.message)

    else:
        bulk = Bulk(app)
        if path == "faust-bulk":
            bulk.below_conductor()
        else:
            bulk.below_fetch()

        @app.agent(source)
        async def consume_idle(stream):  # type: ignore[no-untyped-def]
            # Subscribes the worker to the raw topic and makes Faust ack and commit it;
            # its records are taken below the stream, so none reaches this agent.
            async for _ in stream:
                raise AssertionError("a raw record reached the stream")

        @app.task
        async def drain() -> None:
            assert table is not None or work not in WRITES
            changelog = table.changelog_topic if table is not None else None
            producer: Any = app.producer  # (its aiokafka producer is not in ProducerT)
            while True:
                messages = await bulk.take()
                floor.start()
                coalesced: dict[int, dict[str, Any]] = {}
                for message in messages:
                    if work:
                        batch = decode_batch(message.value)  # type: ignore[arg-type]
                        value = {"boot": batch.boot_id, "seq": batch.seq}
                        if work == "send":
                            assert changelog is not None
                            await changelog.send(
                                key=batch.host_id.encode(),
                                value=json.dumps(value).encode(),
                                partition=message.partition,
                                key_serializer="raw",
                                value_serializer="raw",
                            )
                        elif work == "producer":
                            assert changelog is not None
                            await producer._ensure_producer().send(
                                changelog.get_topic_name(),
                                json.dumps(value).encode(),
                                key=batch.host_id.encode(),
                                partition=message.partition,
                            )
                        elif work == "coalesced":
                            coalesced.setdefault(message.partition, {})[batch.host_id] = value
                if coalesced:
                    assert changelog is not None
                    for partition, values in coalesced.items():
                        await changelog.send(
                            key=b"bulk",
                            value=json.dumps(values).encode(),
                            partition=partition,
                            key_serializer="raw",
                            value_serializer="raw",
                        )
                # Handled, and its changelog records in the producer: now they may be committed.
                for message in messages:
                    floor.handled(message)
                    message.ack(app.consumer)

    @app.task
    async def check() -> None:
        await floor.finish()

    worker = faust.Worker(app, loglevel="WARNING", quiet=True)
    # Faust keeps its start-up spinner at levels above info, and the spinner sets the root
    # logger to DEBUG (faust.Worker._setup_spinner_handler): every logger.debug in Faust
    # then builds its record (one per changelog send). ktel's worker at its default level,
    # info, has no spinner; nor has this one.
    worker.spinner = None
    worker.execute_from_commandline()


class Floor:
    """A Faust consumer's measure, and its check that commits follow the handling.

    CPU and wall time run from the first record handled to the last. Every offset
    commit of the raw topic is compared with the records handled by then: one
    past a partition's last handled record is early, the bulk path acking what it
    has not handled. After the last record the worker commits once more, and what
    was handled but is still not committed is reported as behind (acks lost).
    """

    def __init__(self, app: Any, records: int) -> None:
        self.app = app
        self.records = records
        self.n = 0
        self.t0: tuple[float, float] | None = None
        self.result: dict[str, Any] = {}
        self.last: dict[Any, int] = {}  # raw partition -> offset of its last handled record
        self.commits = 0
        self.early = 0
        self.all_handled = asyncio.Event()
        consumer = app.consumer
        commit = consumer._commit

        async def checked(offsets: Mapping[Any, int]) -> bool:
            for tp, offset in offsets.items():
                if tp.topic == RAW_TOPIC:
                    self.commits += 1
                    self.early += offset > self.last.get(tp, -1) + 1
            return bool(await commit(offsets))

        consumer._commit = checked

    def start(self) -> None:
        if self.t0 is None:
            self.t0 = (time.process_time(), time.monotonic())

    def handled(self, message: Any) -> None:
        self.last[message.tp] = message.offset
        self.n += 1
        if self.n == self.records:
            assert self.t0 is not None
            cpu0, wall0 = self.t0
            self.result = {"cpu": time.process_time() - cpu0, "wall": time.monotonic() - wall0, "n": self.n}
            self.all_handled.set()

    async def finish(self) -> None:
        await self.all_handled.wait()
        consumer = self.app.consumer
        # The last records are acked once their handler returns (a stream's on its next
        # step, a take's after its list): give it that, then commit what was acked.
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not consumer.unacked:
                break
        await consumer.commit()
        committed = consumer._committed_offset
        behind = sum(offset + 1 - (committed.get(tp) or 0) for tp, offset in self.last.items())
        print(
            json.dumps(dict(self.result, commits=self.commits, early=self.early, behind=behind)),
            flush=True,
        )
        os._exit(0)


class Bulk:
    """The raw topic's records handed to a task in lists, below Faust's stream.

    ``below_conductor`` takes them where the consumer's fetch loop hands each
    record to the Conductor (``Consumer.callback``), so Faust's per-record fetch
    loop still runs; ``below_fetch`` replaces that loop (``Consumer._drain_messages``)
    with one that hands over each fetch's records of a partition as one list. Both
    track each record as Faust's stream does (``Consumer.track_message``), and the
    task acks each once handled, so the offsets Faust commits are still only those
    of records handled. Records of other topics (changelogs in recovery) go to the
    Conductor as before. Neither carries what a worker would need around a
    rebalance (flow control, dropping records of an older generation, the
    gaps of a compacted topic): a bench of one worker and one topic has none.
    """

    LIMIT = 4000  # records held before the fetcher waits for the task

    def __init__(self, app: Any) -> None:
        self.app = app
        self.pending: list[Any] = []
        self.ready = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()

    async def take(self) -> list[Any]:
        await self.ready.wait()
        self.ready.clear()
        messages, self.pending = self.pending, []
        self.room.set()
        return messages

    async def put(self, messages: list[Any]) -> None:
        consumer = self.app.consumer
        for message in messages:
            message.tracked = True
            consumer.track_message(message)
        self.pending.extend(messages)
        self.ready.set()
        if len(self.pending) >= self.LIMIT:
            self.room.clear()
            await self.room.wait()

    def below_conductor(self) -> None:
        consumer = self.app.consumer
        conductor = consumer.callback

        async def on_message(message: Any) -> None:
            if message.topic == RAW_TOPIC:
                await self.put([message])
            else:
                await conductor(message)

        consumer.callback = on_message

    def below_fetch(self) -> None:
        app = self.app
        consumer = app.consumer
        conductor = consumer.callback

        async def drain_messages(fetcher: Any) -> None:
            commit_every = consumer._commit_every
            to_message = consumer._to_message
            while not (consumer.should_stop or fetcher.should_stop):
                await asyncio.sleep(0)
                records, _ = await consumer._wait_next_records(1.0)
                # Where Faust's loop commits: before handing on what was fetched.
                if commit_every is not None and consumer._n_acked >= commit_every:
                    consumer._n_acked = 0
                    await consumer.commit()
                for tp, fetched in (records or {}).items():
                    messages = [to_message(tp, record) for record in fetched]
                    if tp.topic == RAW_TOPIC:
                        await self.put(messages)
                    else:
                        for message in messages:
                            await conductor(message)
                    consumer._read_offset[tp] = messages[-1].offset

        consumer._drain_messages = drain_messages


# ------------------------------------------------------------ one consumer, measured


def run_variant(variant: str, bootstrap: str, records: int, tmp: Path, faust: list[str]) -> dict[str, Any]:
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
                *(arg for setting in faust for arg in ("--faust", setting)),
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
    p.add_argument(
        "--faust",
        action="append",
        default=[],
        metavar="SETTING=INT",
        help="a setting of the Faust consumers' App, e.g. broker_commit_every=100 and"
        " broker_max_poll_records=200 for many more commits for the commit check to see",
    )
    p.add_argument("--consume", choices=VARIANTS[:-1], help=argparse.SUPPRESS)
    p.add_argument("--bootstrap", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.consume == "aiokafka":
        asyncio.run(consume_aiokafka(args.bootstrap, args.records))
        return
    if args.consume:
        settings: dict[str, Any] = {k: int(v) for k, v in (s.split("=", 1) for s in args.faust)}
        consume_faust(args.bootstrap, args.records, args.consume, settings)
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
            print(
                "| consumer | CPU µs/record | CPU µs/event at this batch size | records/s (wall)"
                " | raw commits | early | behind |"
            )
            print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
            for variant in args.variants.split(","):
                r = run_variant(variant, kafka.bootstrap, args.records, tmp, args.faust)
                us = 1e6 * r["cpu"] / r["n"]
                checked = " | ".join(str(r.get(k, "-")) for k in ("commits", "early", "behind"))
                rate = r["n"] / r["wall"]
                print(
                    f"| {variant} | {us:.1f} | {us / args.events:.1f} | {rate:,.0f} | {checked} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
