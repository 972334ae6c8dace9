"""The edge agent: ring buffers -> msgpack batch records -> Kafka ``ktel.raw``.

Per event, Python does two things: copy the record out of the ring buffer (in
the drain thread) and decode it into a wire event (here). Everything else is
per batch: sealing, numbering, encoding, publishing.

Delivery: batches are published in a pipeline with aiokafka's idempotent
producer (acks=all). A batch whose delivery fails is re-sent with the shared
retry helper until the broker takes it, under the same sequence number, so the
processors drop the copy if the first attempt did land. While the publish
queue is full the agent stops draining; the kernel then counts what the full
ring buffer refuses (ktel_agent_ringbuf_drops_total).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time

from aiokafka import AIOKafkaProducer
from prometheus_client import Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from edge_agent import probes as probes_mod
from edge_agent.identity import boot_id
from edge_agent.seqstore import SeqStore
from ktel import selfmetrics
from ktel.config import Config
from ktel.retry import retry
from ktel.wire import RAW_TOPIC, RawBatch, encode_batch

log = logging.getLogger("ktel.agent")

EVENTS_READ = Counter("ktel_agent_events_read", "events read from the ring buffers", ["probe"])
EVENTS_PUBLISHED = Counter("ktel_agent_events_published", "events acknowledged by Kafka")
BATCHES_PUBLISHED = Counter("ktel_agent_batches_published", "batch records acknowledged by Kafka")
PUBLISH_RETRIES = Counter("ktel_agent_publish_retries", "failed publish attempts, retried")
QUEUED = Gauge("ktel_agent_queued_batches", "sealed batches waiting for Kafka")
PROBES_LOADED = Gauge("ktel_agent_probe_loaded", "1 per loaded probe, 0 per skipped one", ["probe"])

# Batches sealed but not yet acknowledged; past this the agent stops draining.
MAX_QUEUED_BATCHES = 256
# Batches sent to the producer before the oldest is awaited.
MAX_IN_FLIGHT = 16


class KernelCounters(Collector):
    """Exports the probes' in-kernel per-CPU counters at scrape time."""

    def __init__(self, loaded: dict[str, probes_mod.LoadedProbe]):
        self.loaded = loaded

    def collect(self):
        drops = CounterMetricFamily(
            "ktel_agent_ringbuf_drops",
            "events the kernel could not reserve in a full ring buffer",
            labels=["probe"],
        )
        sampled = CounterMetricFamily(
            "ktel_agent_sampled_out",
            "events dropped in the kernel by the sampling knob",
            labels=["probe"],
        )
        for name, probe in self.loaded.items():
            c = probe.counters()
            drops.add_metric([name], c["ringbuf_drops"])
            sampled.add_metric([name], c["sampled_out"])
        yield drops
        yield sampled


class Agent:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.host_id = cfg.agent.host_id
        self.boot_id = boot_id()
        self.seqs = SeqStore(cfg.agent.state_dir)
        self.queue: asyncio.Queue[RawBatch] = asyncio.Queue(MAX_QUEUED_BATCHES)
        self.loaded: dict[str, probes_mod.LoadedProbe] = {}
        self.skipped: dict[str, str] = {}

    def seal(self, events: list) -> RawBatch:
        return RawBatch(self.host_id, self.boot_id, self.seqs.next(), time.time_ns(), events)

    async def collect(self, stop: asyncio.Event) -> None:
        """Drain the probes every batch_max_ms and seal batches."""
        acfg = self.cfg.agent
        pending: list = []
        sealed_at = time.monotonic()
        while True:
            stopping = stop.is_set()
            if stopping:
                # Close detaches and drains what the ring buffer still holds.
                for p in self.loaded.values():
                    p.close()
            for name, p in self.loaded.items():
                records = p.take()
                if records:
                    EVENTS_READ.labels(name).inc(len(records))
                    pending.extend(p.decode(records))
            now = time.monotonic()
            while len(pending) >= acfg.batch_max_events:
                await self.queue.put(self.seal(pending[: acfg.batch_max_events]))
                del pending[: acfg.batch_max_events]
                sealed_at = now
            if pending and (stopping or (now - sealed_at) * 1000 >= acfg.batch_max_ms):
                await self.queue.put(self.seal(pending))
                pending = []
                sealed_at = now
            QUEUED.set(self.queue.qsize())
            if stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), acfg.batch_max_ms / 1000)

    async def publish(self, producer: AIOKafkaProducer) -> None:
        """Send queued batches in a pipeline; re-send any that failed."""
        in_flight: collections.deque[tuple[RawBatch, bytes, asyncio.Future]] = collections.deque()

        async def send_one(batch: RawBatch, data: bytes) -> None:
            await producer.send_and_wait(RAW_TOPIC, data, key=batch.key)

        async def settle_oldest() -> None:
            batch, data, fut = in_flight.popleft()
            try:
                await fut
            except Exception as err:
                PUBLISH_RETRIES.inc()
                log.warning("batch %d not acknowledged (%s); re-sending", batch.seq, err)
                await retry(
                    lambda: send_one(batch, data),
                    what=f"publish batch {batch.seq}",
                    on_retry=lambda _e: PUBLISH_RETRIES.inc(),
                )
            BATCHES_PUBLISHED.inc()
            EVENTS_PUBLISHED.inc(len(batch.events))
            self.queue.task_done()

        while True:
            batch = await self.queue.get()
            data = encode_batch(batch)
            try:
                fut = await producer.send(RAW_TOPIC, data, key=batch.key)
            except Exception as err:  # e.g. the producer's buffer is full while the broker is away
                fut = asyncio.get_running_loop().create_future()
                fut.set_exception(err)
            in_flight.append((batch, data, fut))
            while in_flight and (len(in_flight) >= MAX_IN_FLIGHT or self.queue.empty()):
                await settle_oldest()

    async def run(self, stop: asyncio.Event) -> None:
        acfg = self.cfg.agent
        self.loaded, self.skipped = probes_mod.load(acfg.probes, acfg.ringbuf_pages)
        for name in acfg.probes:
            PROBES_LOADED.labels(name).set(1 if name in self.loaded else 0)
        if not self.loaded:
            raise RuntimeError(f"no probe could be loaded: {self.skipped}")
        REGISTRY.register(KernelCounters(self.loaded))
        selfmetrics.serve(acfg.metrics_port)
        producer = AIOKafkaProducer(
            bootstrap_servers=self.cfg.kafka.bootstrap,
            enable_idempotence=True,  # implies acks=all
            compression_type="lz4",
            linger_ms=5,
            max_request_size=4 * 1024 * 1024,
        )
        await retry(producer.start, what=f"connect to Kafka at {self.cfg.kafka.bootstrap}")
        log.info(
            "agent host.id=%s boot=%s publishing to %s (probes: %s; skipped: %s)",
            self.host_id,
            self.boot_id,
            RAW_TOPIC,
            ", ".join(self.loaded),
            self.skipped or "none",
        )
        publisher = asyncio.create_task(self.publish(producer))
        try:
            await self.collect(stop)
            # Flush: everything sealed is published before the producer stops.
            await self.queue.join()
        finally:
            publisher.cancel()
            await producer.stop()
            log.info("agent stopped; all sealed batches acknowledged")
