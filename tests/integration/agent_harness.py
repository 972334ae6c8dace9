"""Run the real agent (`ktel agent`) as a child process, and read what ktel left in Kafka:
records, dead letters, consumer groups' committed offsets."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families

from ktel.stack.proc import free_port
from ktel.stack.proc import stop as stop_process
from ktel.wire import (
    DLQ_TOPIC,
    RAW_TOPIC,
    DeadLetter,
    WireError,
    decode_batch,
    decode_dead_letter,
    event_dict,
)


class AgentProcess:
    # Every agent a test started, so a fixture can kill what a failed test left running.
    started: list[AgentProcess] = []

    def __init__(
        self,
        tmp_path: Path,
        bootstrap: str,
        wrapper: list[str] | None = None,
        module: str = "ktel.cli",
        **settings: str,
    ):
        """``module``: what ``python -m`` runs with the argument ``agent``; another
        than ktel's own CLI only to inject a fault into the real agent."""
        self.wrapper = wrapper or []
        self.module = module
        self.port = free_port()
        self.state_dir = tmp_path / "agent-state"
        self.log_path = tmp_path / "agent.log"
        self.env = dict(
            os.environ,
            KTEL_KAFKA__BOOTSTRAP=bootstrap,
            KTEL_AGENT__STATE_DIR=str(self.state_dir),
            KTEL_AGENT__METRICS_PORT=str(self.port),
            KTEL_AGENT__HEARTBEAT_SECONDS="1",
        )
        self.env.update({f"KTEL_AGENT__{k.upper()}": v for k, v in settings.items()})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> AgentProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", self.module, "agent"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        AgentProcess.started.append(self)
        deadline = time.monotonic() + timeout
        while not _port_open(self.port):
            assert self.proc.poll() is None, f"agent exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"agent not ready:\n{self.log()}"
            time.sleep(0.1)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", trust_env=False).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_until_spool_empty(self, timeout: float = 120, published: int = 0) -> None:
        """Until the spool is empty and Kafka acknowledged at least ``published`` events
        (an empty spool alone may only mean the last events are not read or sealed yet)."""
        deadline = time.monotonic() + timeout
        while (
            self.metric("ktel_agent_spool_bytes") > 0
            or self.metric("ktel_agent_events_published_total") < published
        ):
            assert time.monotonic() < deadline, f"spool not drained:\n{self.log()[-3000:]}"
            time.sleep(0.2)

    def stop(self) -> int:
        assert self.proc is not None
        stop_process(self.proc, 60, signal.SIGINT)
        return self.proc.wait()


def kill_leftovers() -> None:
    for agent in AgentProcess.started:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()
    AgentProcess.started.clear()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def dead_letters_of(bootstrap: str, run: str, n: int = 1) -> list[DeadLetter]:
    """The first ``n`` dead letters in ktel.dlq whose payload names ``run`` (waits for them)."""
    consumer = AIOKafkaConsumer(DLQ_TOPIC, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    mine: list[DeadLetter] = []
    try:
        async with asyncio.timeout(60):  # a guard against hanging, not a timing assertion
            while len(mine) < n:
                for recs in (await consumer.getmany(timeout_ms=500)).values():
                    letters = map(decode_dead_letter, (r.value for r in recs))
                    mine += [dl for dl in letters if run.encode() in (dl.payload or b"")]
    finally:
        await consumer.stop()
    return mine


async def committed_offsets(bootstrap: str, group: str) -> dict[tuple[str, int], int]:
    """(topic, partition) -> the consumer group's committed offset."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}


async def topic_partitions(bootstrap: str, topic: str) -> list[TopicPartition]:
    """The topic's partitions, in order."""
    # A producer fetches a topic's metadata on demand; a group-less consumer does not.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        return [TopicPartition(topic, p) for p in sorted(await producer.partitions_for(topic))]
    finally:
        await producer.stop()


async def start_group_at_end(bootstrap: str, group_id: str, *topics: str) -> None:
    """Commit the topics' current end offsets for the group: its consumer then reads only
    what a test produces next, not the other tests' records on the session's topics (for an
    exporter: a sample Prometheus refuses, e.g. one too old, would make it refuse a whole
    request; a bad record another test left would be dead-lettered again)."""
    parts = [tp for topic in topics for tp in await topic_partitions(bootstrap, topic)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(parts)
        await consumer.commit(await consumer.end_offsets(parts))
    finally:
        await consumer.stop()


async def read_topic(bootstrap: str, topic: str, idle_s: float = 3.0, timeout: float = 120) -> list:
    """Every record of ``topic`` from the beginning up to its end when called,
    then until nothing new arrives for idle_s (a topic written every second,
    like ktel.metrics, is read to its end at the call, not forever)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    records: list = []
    try:
        parts = await topic_partitions(bootstrap, topic)
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        last = time.monotonic()
        deadline = last + timeout
        while time.monotonic() < deadline:
            got = await consumer.getmany(timeout_ms=500)
            for recs in got.values():
                records.extend(recs)
            if got:
                last = time.monotonic()
            positions = [await consumer.position(tp) for tp in parts]
            caught_up = all(pos >= ends[tp] for pos, tp in zip(positions, parts, strict=True))
            if caught_up and (time.monotonic() - last >= idle_s or any(ends.values())):
                break
    finally:
        await consumer.stop()
    return records


def raw_events_under(bootstrap: str, prefix: str) -> tuple[list[dict], int]:
    """Events whose path starts with prefix, deduplicated by (host, boot, seq); and the duplicate count."""
    seen: set[tuple[str, str, int]] = set()
    dups = 0
    events: list[dict] = []
    for rec in asyncio.run(read_topic(bootstrap, RAW_TOPIC)):
        try:
            batch = decode_batch(rec.value)
        except WireError:
            # Not an agent's: the shared broker's ktel.raw also holds test_replay's
            # garbage record. An agent that wrote one would miss events under prefix.
            continue
        ident = (batch.host_id, batch.boot_id, batch.seq)
        if ident in seen:
            dups += 1
            continue
        seen.add(ident)
        weights = batch.weights or [1.0] * len(batch.events)
        for ev, w in zip(batch.events, weights, strict=True):
            e = event_dict(ev)
            if e.get("path", "").startswith(prefix):
                events.append({**e, "weight": w})
    return events, dups
