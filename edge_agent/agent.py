"""The edge agent: ring buffers -> msgpack batch records -> spool -> Kafka ``ktel.raw``.

Per event, Python does one thing: decode the record into a wire event (here,
in bulk where the probe has a bulk decoder). The drain thread takes the ring
buffer's records a run at a time, one copy per run (edge_agent/ringbuf.py).
Everything else is per batch: sealing, numbering, encoding, spooling, publishing.

Delivery: every sealed batch is first written to the on-disk spool
(edge_agent/spool.py), zstd-compressed by default (Agent.for_kafka), then
published from it in order, pipelined, with aiokafka's idempotent producer
(acks=all). The spool's cursor advances only on Kafka's acknowledgement; a
batch whose delivery failed is re-sent with the shared retry helper under the
same sequence number, so the processors drop the copy if the first attempt did
land. While Kafka is away batches pile up in the spool (bounded; what a full
spool drops is counted) and are sent in order when it returns. A batch Kafka
refuses as too large is sent in halves (see _deliver), or set aside when it no
longer decodes to be split (a spool kept across agent versions); while Kafka refuses this
agent the write (authorization), batches wait in the spool. What a SIGKILL can
lose: events still in the ring buffer or drained but not yet sealed (at most a
read interval of them while the agent keeps up, edge_agent/ticks.py; at most
probes.QUEUE_MAX_BYTES of records per probe when it does not). A state
directory that refuses writes (a full disk) costs the batches sealed meanwhile,
counted; the agent goes on and spools again once it can.

Every long-running task (collecting, publishing, heartbeats, following
commands) lives as long as the agent: if one dies, the agent logs which and
why and exits with status 1, for its supervisor to restart it, rather than
running on without it.

Alongside: heartbeats on ``ktel.heartbeats`` every ``heartbeat_seconds`` and
fidelity commands from ``ktel.control`` (edge_agent/control.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import os
import socket
import statistics
import time
from collections.abc import Iterable
from importlib.metadata import version

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    KafkaConnectionError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    TopicAuthorizationFailedError,
    UnknownProducerId,
)
from opentelemetry.semconv._incubating.attributes.host_attributes import HOST_ARCH, HOST_ID, HOST_NAME
from opentelemetry.semconv._incubating.attributes.os_attributes import OS_TYPE, OS_VERSION, OsTypeValues
from prometheus_client import Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from edge_agent import node_stats, statelock
from edge_agent import probes as probes_mod
from edge_agent.containers import Containers
from edge_agent.control import Control
from edge_agent.identity import boot_id, host_arch
from edge_agent.redact import Redactor
from edge_agent.seqstore import SeqStore, private_dir
from edge_agent.spool import Cursor, Record, SegmentUnreadable, Spool
from edge_agent.ticks import HoldPolicy, SealClock
from ktel import runtime, selfmetrics
from ktel.config import Config, ConfigError
from ktel.kafka_client import agent_kafka_codec, client_kwargs, explained_by_ktel, start
from ktel.probes import file_created
from ktel.probes.decode import PackedEvents, count, pack_event, records
from ktel.retry import Backoff, Permanent, retry
from ktel.wire import (
    Heartbeat,
    RawBatch,
    decode_batch,
    encode_batch,
    encode_heartbeat,
)
from ktel.wire.codec import WireError, compress
from ktel.wire.raw import encode_packed

log = logging.getLogger("ktel.agent")

EVENTS_READ = Counter("ktel_agent_events_read", "events read from the ring buffers", ["probe"])
DECODE_ERRORS = Counter("ktel_agent_decode_errors", "ring-buffer records that did not decode", ["probe"])
EVENTS_PUBLISHED = Counter("ktel_agent_events_published", "events acknowledged by Kafka")
BATCHES_PUBLISHED = Counter("ktel_agent_batches_published", "batch records acknowledged by Kafka")
PUBLISH_RETRIES = Counter("ktel_agent_publish_retries", "failed publish attempts, retried")
PRODUCER_RENEWALS = Counter("ktel_agent_producer_renewals", "Kafka producers replaced after a fatal error")
# Errors after which aiokafka's idempotent producer fails every send (see _renew_producer).
# ProducerFenced: the broker refuses the producer's epoch (InvalidProducerEpoch), which
# the producer keeps for its life, so every retry of it is refused the same.
BROKEN_PRODUCER = (OutOfOrderSequenceNumber, UnknownProducerId, ProducerFenced)
# Errors after which resending the same bytes cannot succeed until someone changes Kafka's ACLs.
UNAUTHORIZED = (TopicAuthorizationFailedError, ClusterAuthorizationFailedError)
# How long a batch Kafka refuses this agent waits between tries, at most.
UNAUTHORIZED_MAX_WAIT_S = 60.0
# aiokafka's line at each metadata update while the refusal lasts (aiokafka/cluster.py):
# _deliver says it once.
explained_by_ktel("aiokafka.cluster", "Topic %s is not authorized for this client")
DISK_DROPPED = Counter(
    "ktel_agent_disk_dropped_events",
    "events of batches the state directory refused to keep (a full disk, an I/O error)",
)
TOO_LARGE_DROPPED = Counter(
    "ktel_agent_too_large_dropped_events", "events Kafka refused as too large even alone, dropped"
)
BATCHES_SPLIT = Counter("ktel_agent_batches_split", "batches Kafka refused as too large, sent in halves")
SET_ASIDE = Counter(
    "ktel_agent_set_aside_events",
    "events of spooled batches Kafka refused as too large that did not decode to be sent in halves, "
    "moved out of the spool",
)
# Where such batches go, under agent.state_dir, each with its reason beside it; what they
# may take there at most, past which one is counted and logged but not kept.
SET_ASIDE_DIR = "set-aside"
SET_ASIDE_MAX_BYTES = 64 << 20
# How often the publisher reads a spool segment the disk refuses (EIO) before it sets it
# aside (Spool.set_aside), and how long it waits between: an error that passes (a path
# failing over, a device reset) costs seconds, one that stays (a bad sector) failed the
# publisher at every start, nothing after the segment sent.
SPOOL_READ_TRIES = 5
SPOOL_READ_BACKOFF = Backoff(initial=0.5, maximum=4.0)
HEARTBEATS = Counter("ktel_agent_heartbeats", "heartbeats acknowledged by Kafka")
NODE_READ_ERRORS = Counter(
    "ktel_agent_node_read_errors",
    "heartbeats sent without a source's node readings: reading it failed",
    ["source"],
)
# The counters each heartbeat reports (Agent.heartbeat).
OWN_COUNTERS = (
    EVENTS_READ,
    DECODE_ERRORS,
    EVENTS_PUBLISHED,
    BATCHES_PUBLISHED,
    PUBLISH_RETRIES,
    DISK_DROPPED,
    TOO_LARGE_DROPPED,
    BATCHES_SPLIT,
    SET_ASIDE,
)
PROBES_LOADED = Gauge("ktel_agent_probe_loaded", "1 per loaded probe, 0 per skipped one", ["probe"])
CONTAINERS = Gauge("ktel_agent_containers", "container and pod cgroups the last heartbeat listed")
CONTAINERS_UNLISTED = Gauge(
    "ktel_agent_containers_unlisted", "container and pod cgroups over the heartbeat's bound, not listed"
)

# How often the collect loop passes when no probe queued records and no batch is pending.
IDLE_PASS_S = 1.0
# Records sent to the producer before the oldest is awaited.
MAX_IN_FLIGHT = 32
# How long a stopping agent keeps publishing its spool; the rest waits on disk for the next start.
FLUSH_TIMEOUT_S = 10.0
# How long a stopping agent waits for Kafka to take its last heartbeat.
GOODBYE_TIMEOUT_S = 2.0
PRODUCER_STOP_TIMEOUT_S = 5.0
# How often a stopping agent cancels a task that goes on (``cancelled``).
CANCEL_ROUNDS = 3


async def cancelled(tasks: Iterable[asyncio.Task], timeout_s: float) -> set[asyncio.Task]:
    """Cancel ``tasks`` and wait up to ``timeout_s`` for them to end, cancelling again,
    up to CANCEL_ROUNDS times, those that go on; the ones still running after that.

    One cancel is not always enough: Python 3.11's ``asyncio.wait_for`` loses a
    cancellation that comes as the operation it wraps completes, so a task looping
    around one (a heartbeat's send, a batch's) can go on after it, and a stop that
    waited for it would wait for good."""
    tasks = set(tasks)
    pending = tasks
    for _ in range(CANCEL_ROUNDS):
        if not pending:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=timeout_s)
    for task in tasks - pending:
        if not task.cancelled():
            task.exception()  # (retrieved: a task's failure is reported where it happened)
    return pending


async def close_producer(producer: AIOKafkaProducer) -> None:
    """Stop ``producer``, waiting at most PRODUCER_STOP_TIMEOUT_S for it to flush: what it
    holds is still in the spool. stop() would wait forever for a broker that is gone,
    and cut short it leaves the sender and the connections running, so those are
    closed after it (else every producer renewal would leave one behind).

    A sender closed so (cancelled) leaves the sends it had not finished unanswered:
    aiokafka fails them only when its sender ends with an error. They are failed here,
    so whoever waits on one (the publisher's oldest batch in flight) sends it again
    through the producer that replaced this one, rather than waiting for ever."""
    try:
        await asyncio.wait_for(producer.stop(), PRODUCER_STOP_TIMEOUT_S)
    except Exception as err:
        log.warning("Kafka producer did not stop in %.0f s (%s): closing it", PRODUCER_STOP_TIMEOUT_S, err)
        with contextlib.suppress(Exception):
            if producer._sender is not None:
                await asyncio.wait_for(producer._sender.close(), PRODUCER_STOP_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await producer.client.close()
        producer._message_accumulator.fail_all(
            KafkaConnectionError("its producer was closed before Kafka took it")
        )


class TooLarge(Permanent):
    """Kafka refused a batch as above its message size limit."""


class Unauthorized(Permanent):
    """Kafka refused this agent the write."""


class AgentCollector(Collector):
    """Exports, at scrape time, the counters that live elsewhere: the probes'
    in-kernel per-CPU counters, the spool's, and the sampling in force."""

    def __init__(self, agent: Agent):
        self.agent = agent

    def collect(self):
        a = self.agent
        drops = CounterMetricFamily(
            "ktel_agent_ringbuf_drops",
            "events the kernel could not reserve in a full ring buffer",
            labels=["probe"],
        )
        sampled = CounterMetricFamily(
            "ktel_agent_sampled_out", "events dropped in the kernel by the sampling knob", labels=["probe"]
        )
        every = GaugeMetricFamily("ktel_agent_sample_every", "sampling in force: 1 in N", labels=["probe"])
        inflight = CounterMetricFamily(
            "ktel_agent_inflight_lost",
            "samples lost in the kernel between a call's start and its end: a map of calls in flight"
            " had no room (full or evicted: no_room), or the start was read after the end (negative_latency)",
            labels=["probe", "reason"],
        )
        lost = CounterMetricFamily(
            "ktel_agent_histogram_lost",
            "values an in-kernel histogram could not count (map full)",
            labels=["probe"],
        )
        truncated = CounterMetricFamily(
            "ktel_agent_truncated_paths",
            "events sent with only the start of their path, the rest cut to fit the probe's record",
            labels=["probe"],
        )
        unresolved = CounterMetricFamily(
            "ktel_agent_unresolved_paths",
            "events whose file the kernel could not name (filewatcher: d_path failed, a path past PATH_MAX)",
            labels=["probe"],
        )
        skipped = CounterMetricFamily(
            "ktel_agent_kernel_dropped_events",
            "events the kernel did not give the probe's programs: runs it skipped because another"
            " BPF program was running on that CPU (recursion)",
            labels=["probe", "reason"],
        )
        for name, probe in a.loaded.items():
            c = probe.counters()
            if "recursion_misses" in c:
                skipped.add_metric([name, "recursion"], c["recursion_misses"])
            drops.add_metric([name], c["ringbuf_drops"])
            sampled.add_metric([name], c["sampled_out"])
            inflight.add_metric([name, "no_room"], c["inflight_lost"])
            if "negative_latency" in c:
                inflight.add_metric([name, "negative_latency"], c["negative_latency"])
            every.add_metric([name], a.control.sample_every(name))
            if "hist_lost" in c:
                lost.add_metric([name], c["hist_lost"])
            if "truncated_paths" in c:
                truncated.add_metric([name], c["truncated_paths"])
            if "unresolved_paths" in c:
                unresolved.add_metric([name], c["unresolved_paths"])
        yield drops
        yield sampled
        yield inflight
        yield skipped
        yield every
        yield lost
        yield truncated
        yield unresolved
        yield CounterMetricFamily(
            "ktel_agent_spool_dropped_events", "events a full spool dropped", a.spool.dropped_events
        )
        yield CounterMetricFamily(
            "ktel_agent_spool_corrupt_bytes", "damaged spool bytes skipped", a.spool.corrupt_bytes
        )
        yield CounterMetricFamily(
            "ktel_agent_spool_unreadable_bytes",
            "spool bytes the disk would not read, set aside unsent",
            a.spool.unreadable_bytes,
        )
        yield GaugeMetricFamily(
            "ktel_agent_spool_bytes", "spooled bytes not yet acknowledged", a.spool.depth_bytes()
        )


class Agent:
    producer: AIOKafkaProducer  # made in run(), renewed by _renew_producer()

    def __init__(self, cfg: Config):
        acfg = cfg.agent
        self.cfg = cfg
        self.topics = cfg.kafka.topics
        if not acfg.host_id:
            raise ConfigError(
                "agent.host_id is empty: /etc/machine-id, its default, is missing or empty here; set "
                "agent.host_id (KTEL_AGENT__HOST_ID) to this host's id"
            )
        self.host_id = acfg.host_id
        self.boot_id = boot_id()
        # What the heartbeat's host attributes hold for the process's lifetime, read once:
        # version() looks the distribution up on disk, a few ms each heartbeat.
        self.static_host = {
            HOST_ARCH: host_arch(),
            OS_TYPE: OsTypeValues.LINUX.value,
            OS_VERSION: os.uname().release,
            "ktel.agent.version": version("ktel"),
        }
        self.started = 0.0  # time.monotonic() once the probes are loaded (run)
        # The last heartbeat's counters and time (beat): its rates are over the interval since.
        self._beat_counters: dict[str, int] = {}
        self._beat_at = 0.0
        self._beat_seq = 0  # the last heartbeat's seq (``heartbeat``)
        self.key = self.host_id.encode()
        self.state_lock: int | None = None  # held until run() ends (edge_agent/statelock.py)
        try:
            # Before anything in the directory is read: another agent's spool, batch
            # numbers and commands are not this one's to take.
            self.state_lock = statelock.acquire(acfg.state_dir)
            self.seqs = SeqStore(acfg.state_dir)
            self.spool = Spool(
                acfg.state_dir / "spool",
                max_bytes=acfg.spool_max_mb << 20,
                full_policy=acfg.spool_full_policy,
                fsync=acfg.spool_fsync,
            )
        except OSError as err:
            # Nothing can be numbered or spooled: one line naming what to fix, as for any
            # setting found unusable as a command starts (exit 2), not a traceback. Not run
            # degraded: no batch could be numbered or kept, and heartbeats would show a
            # live host whose every event is dropped; stopping shows the misconfiguration
            # (a read-only root filesystem with no volume there) at rollout. A full disk
            # is not this: it passes, and the agent runs on (seqstore.no_space).
            statelock.release(self.state_lock)
            raise ConfigError(
                f"agent.state_dir = '{acfg.state_dir}': cannot be used ({err.strerror or err}: "
                f"{err.filename}): the agent keeps its batch numbers and its spool there; make it a "
                "directory the agent can write (not read-only), or set agent.state_dir "
                "(KTEL_AGENT__STATE_DIR) to one"
            ) from None
        except statelock.Held as held:
            # The same: one line, exit 2. A supervisor restarting it (systemd, whose unit
            # sets no start limit: deploy/ktel-agent.service; a pod's restarts) starts it
            # once the other has ended.
            raise ConfigError(
                f"agent.state_dir = '{acfg.state_dir}': in use by another ktel agent, {held.holder} "
                f"({held.path} is locked): two agents on one state directory number their batches "
                "alike, and the processors drop one's as duplicates of the other's; stop that agent "
                "first, or give this one a directory of its own (agent.state_dir, KTEL_AGENT__STATE_DIR)"
            ) from None
        self.redactor = Redactor(acfg.redact)
        self.spooled = asyncio.Event()
        self._renewal: asyncio.Task | None = None  # see _renew_producer
        self.loaded: dict[str, probes_mod.LoadedProbe] = {}
        self.skipped: dict[str, str] = {}
        self.control = Control.of(acfg, self.apply_rate)
        self.latencies_ms: list[float] = []
        self.containers = Containers.of_host(acfg.cgroup_root)
        self.disk_failing = False  # the last spool write failed (spool_batch)
        self.node_sources_failing: set[str] = set()  # (node_readings)
        # Kafka took the producer's connection and, since, the last heartbeat (/readyz).
        self.kafka_reached = False

    # ------------------------------------------------------------ collecting

    def seal(self, events: PackedEvents, weights: list[float] | None = None) -> RawBatch:
        """A batch of these packed events: its RawBatch holds them as packed."""
        return RawBatch(
            self.host_id,
            self.boot_id,
            self.seqs.next(),
            time.time_ns(),
            events,
            weights,
            incarnation=self.seqs.incarnation,
        )

    def encoded(self, events: PackedEvents, weights: list[float]) -> list[tuple[RawBatch, bytes]]:
        """``events`` (packed) sealed and encoded as one batch, or as consecutive batches each
        within ``agent.batch_max_bytes``: halved while the encoding is larger.

        Events encode to a fraction of their records' size (a file creation's 304-byte
        record to about 66 bytes), so a bound on the records would seal batches
        several times smaller than the limit, and a batch costs the agent more than
        its events do (bench/RESULTS.md, "Agent cost at ordinary rates"). The first
        part keeps the sequence number sealed; the next take the next ones, in order."""
        uniform = weights.count(1.0) == len(weights)
        return self._fitted(self.seal(events, None if uniform else weights), events)

    def _fitted(self, batch: RawBatch, events: PackedEvents) -> list[tuple[RawBatch, bytes]]:
        """``batch`` (of the packed ``events``) encoded, halved until each part fits."""
        n = len(events)
        payload = encode_packed(batch, n, events.data)
        if len(payload) <= self.cfg.agent.batch_max_bytes or n == 1:
            # One event too large even alone: Kafka's refusal splits no further.
            return [(batch, self.for_kafka(payload))]
        half = n // 2
        w = batch.weights
        head, rest = events.split(half)
        first = dataclasses.replace(batch, events=head, weights=w if w is None else w[:half])
        out = self._fitted(first, head)  # sealed before rest: numbers stay in order
        return out + self._fitted(self.seal(rest, None if w is None else list(w[half:])), rest)

    def for_kafka(self, payload: bytes) -> bytes:
        """A sealed batch's bytes as the spool keeps them and Kafka gets them: with
        agent.compression "zstd", one zstd frame (ktel/wire/codec.py). Compressed here,
        not by the Kafka client, it costs the agent less (level 1, and the spool writes
        and checksums a tenth of the bytes), the spool holds ten times the batches, and
        any broker takes it (Kafka's own zstd needs 2.1 or later)."""
        return compress(payload) if self.cfg.agent.compression == "zstd" else payload

    def spool_batch(self, events: PackedEvents, weights: list[float]) -> None:
        """Seal ``events`` (packed, redacted) into the spool."""
        spooled = 0  # events of the parts the spool has taken (or dropped and counted)
        try:
            for batch, payload in self.encoded(events, weights):
                if not self.spool.append(payload, len(batch.events)):
                    n = len(batch.events)
                    # (drop_newest, or drop_oldest with nothing older left to drop: the
                    # batch alone is larger than the spool's bound less its open segment)
                    log.error(
                        "spool full (%s): dropped batch %d (%d events)", self.spool.full_policy, batch.seq, n
                    )
                spooled += len(batch.events)
        except OSError as err:
            # The batch is lost, not the agent: it keeps draining the probes (their
            # buffers stay bounded), counts what it cannot keep, and spools again as
            # soon as the disk takes writes. One line per failing stretch.
            DISK_DROPPED.inc(len(events) - spooled)
            if not self.disk_failing:
                log.error(
                    "state directory %s refuses writes (%s): batches are dropped and counted "
                    "(ktel_agent_disk_dropped_events_total) until it takes them again",
                    self.cfg.agent.state_dir,
                    err,
                )
            self.disk_failing = True
            return
        if self.disk_failing:
            log.warning("state directory %s takes writes again: spooling resumed", self.cfg.agent.state_dir)
            self.disk_failing = False
        self.spooled.set()

    def drain_once(self, pending: PackedEvents, weights: list[float]) -> None:
        """Decode what the ring buffers hold into ``pending``, packed (pack_event) and
        redacted, and each event's sampling weight into ``weights``: the probe's 1-in-N
        rate in force now. (Events sampled just before a rate change and drained after
        it carry the new rate: the error lasts one drain interval.)

        Events are held packed from here on, end to end in one buffer (PackedEvents): a
        batch is sealed by copying that buffer (encode_packed), and a file creation never
        becomes a Python object at all (Probe.pack_run). Redaction rules need the
        fields, so with rules the events are decoded, masked, then packed."""
        redact = self.redactor.apply if self.redactor else None
        for name, p in self.loaded.items():
            # Histogram probes: their in-kernel histograms as HISTOGRAM_DELTA events every
            # probes.SNAPSHOT_SECONDS, and the last deltas after close() (edge_agent/probes.py).
            # Weight 1: the counts are of sampled values and each event carries sample_every.
            snap = p.maybe_snapshot()
            if snap:
                if redact:
                    redact(snap)
                pending.extend(map(pack_event, snap))
                weights += [1.0] * len(snap)
            runs = p.take()
            if not runs:
                continue
            EVENTS_READ.labels(name).inc(count(runs))
            before = len(pending)
            try:
                if redact:
                    events = p.decode(runs)
                    redact(events)
                    pending.extend(map(pack_event, events))
                else:
                    p.pack(runs, pending)
            except Exception:
                # A decoder bug must not take the node's telemetry down: decode one by one,
                # count the bad ones.
                pending.truncate(before)
                offset = time.time_ns() - time.monotonic_ns()
                for r in (r for run in runs for r in records(run)):
                    try:
                        event = p.spec.decode(r, offset)
                        if redact:
                            redact([event])
                        packed = pack_event(event)
                    except Exception as err:
                        DECODE_ERRORS.labels(name).inc()
                        log.warning("probe %s: undecodable record of %d bytes: %s", name, len(r), err)
                        continue
                    pending.append(packed)
            weights.extend([float(self.control.sample_every(name))] * (len(pending) - before))

    async def collect(self, stop: asyncio.Event) -> None:
        """Take what the probes' drain threads queued as soon as they queued it, and
        seal batches into the spool: a batch not full on the next tick of
        batch_max_ms, when the probes' timed reads of that tick are in
        (edge_agent/ticks.py), unless it is below batch_min_events and younger than
        batch_hold_ms (``HoldPolicy``); a full one at once. After a pass that sealed a full
        batch, again at once (after the publisher's turn): the probes' queues are
        bounded (probes.QUEUE_MAX_BYTES), so a busy agent keeps taking from them
        rather than letting records wait there. With nothing queued and nothing
        pending, a pass every IDLE_PASS_S (histogram snapshots, commands that expire)."""
        loop = asyncio.get_running_loop()
        queued = asyncio.Event()
        for p in self.loaded.values():
            p.on_queued = functools.partial(loop.call_soon_threadsafe, queued.set)
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await self._collect(stop, stopped, queued)
        finally:
            stopped.cancel()

    async def _collect(self, stop: asyncio.Event, stopped: asyncio.Future, queued: asyncio.Event) -> None:
        acfg = self.cfg.agent
        pending = PackedEvents()
        weights: list[float] = []
        clock = SealClock(acfg.batch_max_ms / 1000)
        hold = HoldPolicy(acfg.batch_min_events, acfg.batch_hold_ms / 1000)
        while True:
            queued.clear()  # before taking: records queued from now on wake the next wait
            stopping = stop.is_set()
            if stopping:
                for p in self.loaded.values():
                    p.stop_draining()  # every probe's thread at once, then each is closed
                for p in self.loaded.values():
                    p.close()  # detaches, then drains what the ring buffer still holds
            self.drain_once(pending, weights)
            self.control.expire()
            now = time.monotonic()
            limit = acfg.batch_max_events
            busy = len(pending) >= limit
            while len(pending) >= limit:
                self.spool_batch(pending.take(limit), weights[:limit])
                del weights[:limit]
            if busy:
                hold.taken(0, now)  # what is left came with this pass's take: held from now
            hold.taken(len(pending), now)
            if pending and (stopping or clock.due(now)):
                # A tick's seal, made or (a quiet host's few events waiting for more)
                # passed over: either way the next is due on the next tick.
                if stopping or hold.ready(len(pending), now):
                    self.spool_batch(pending.take(len(pending)), weights)
                    weights = []
                    hold.taken(0, now)
                clock.sealed(now)
            self.spool.sync_due()
            if stopping:
                return
            if busy:
                await asyncio.sleep(0)
                continue
            woken = asyncio.ensure_future(queued.wait())
            # At most IDLE_PASS_S also with events pending: commands expire and histogram
            # probes snapshot on time whatever batch_max_ms is.
            timeout = min(clock.wait(now), IDLE_PASS_S) if pending else IDLE_PASS_S
            await asyncio.wait({woken, stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()

    # ------------------------------------------------------------ publishing

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **client_kwargs(self.cfg.kafka),
            enable_idempotence=True,  # implies acks=all
            # zstd: the batches come compressed (for_kafka), heartbeats are small. lz4
            # (aiokafka compresses it at level 9) costs several times zstd's CPU here.
            compression_type=agent_kafka_codec(self.cfg.agent.compression),
            # A batch record is larger than aiokafka's batch_size (16 KiB): each goes in a
            # Kafka batch of its own, so lingering gathers nothing; it cost 0.4 ms of CPU a
            # send (a third of the send) in aiokafka's sender loop (bench/RESULTS.md).
            linger_ms=0,
            max_request_size=4 * 1024 * 1024,
        )

    async def _renew_producer(self, broken: AIOKafkaProducer, err: Exception) -> None:
        """Replace a producer whose idempotence state is broken.

        After a broker restart, aiokafka's idempotent producer can fail every send
        with OutOfOrderSequenceNumber (or UnknownProducerId) and never recover
        (aio-libs/aiokafka#1017); one whose epoch the broker refuses (ProducerFenced)
        is refused at every send after, its epoch the same. A new producer gets a new
        producer id and epoch; the
        batches it re-sends from the spool keep their ktel sequence numbers, so
        the processors drop any copy that had landed.

        The renewal runs in a task of its own that callers wait on shielded: a caller
        that stops waiting (the heartbeat's timeout) must not cancel it between the
        broken producer's stop and the new one's start, which would leave a stopped
        producer in place that every later send finds closed.
        """
        if self.producer is broken and (self._renewal is None or self._renewal.done()):
            self._renewal = asyncio.create_task(self._replace_producer(broken, err), name="renew producer")
        renewal = self._renewal
        if renewal is not None and not renewal.done():
            await asyncio.shield(renewal)

    async def _replace_producer(self, broken: AIOKafkaProducer, err: Exception) -> None:
        PRODUCER_RENEWALS.inc()
        log.warning("Kafka producer broken (%s): starting a new one", err)
        await close_producer(broken)
        fresh = self._new_producer()
        try:
            await start(fresh, self.cfg.kafka, "ktel agent")
        except BaseException:  # cancelled at shutdown: leave nothing running
            await close_producer(fresh)
            raise
        self.producer = fresh

    async def _send_and_wait(self, topic: str, payload: bytes) -> None:
        producer = self.producer
        try:
            await producer.send_and_wait(topic, payload, key=self.key)
        except BROKEN_PRODUCER as err:
            await self._renew_producer(producer, err)
            raise

    async def _deliver(self, payload: bytes, n_events: int) -> int:
        """Send one spooled batch of ``n_events``, alone, until Kafka acknowledges it; the
        number of its events dropped because Kafka refuses them as too large even alone,
        or set aside.

        Too large (above the topic's or broker's message limit): the batch is sent
        as two halves, each delivered the same way, down to single events. A half
        keeps the batch's (boot, incarnation, seq) and says which of its events it
        holds (``part``: first event, events in all), so no sequence number is
        issued twice and dedupe (processors/dedupe_core.py) counts each event once,
        also when a re-sent batch is split again after a crash. A split batch is
        not pipelined: its parts go one at a time and are acknowledged before the
        spool moves on. A batch too large that does not decode (spooled by another
        version of the agent whose batches this one's decoder refuses: a downgrade, a
        bound made tighter) cannot be split: it is set aside (``_set_aside``), else it
        would fail the publisher at every start, the spool stuck behind it.

        Unauthorized: resending cannot help until the ACLs change; the batch stays
        in the spool and is tried again after a wait that grows to a minute, with
        one log line when the refusals start and one when they end.
        """

        async def attempt() -> None:
            try:
                await self._send_and_wait(self.topics.raw, payload)
            except MessageSizeTooLargeError as err:
                raise TooLarge(str(err)) from err
            except UNAUTHORIZED as err:
                raise Unauthorized(f"{type(err).__name__}: {err}") from err

        waits = Backoff(maximum=UNAUTHORIZED_MAX_WAIT_S).delays()
        refused = False
        while True:
            try:
                await retry(
                    attempt, what="publish a spooled batch", on_retry=lambda _e: PUBLISH_RETRIES.inc()
                )
                break
            except Unauthorized as err:
                PUBLISH_RETRIES.inc()
                if not refused:
                    log.error(
                        "Kafka refuses this agent writes to %s (%s): batches wait in the spool; "
                        "allow the agent's principal to write (and describe) %s and to write idempotently",
                        self.topics.raw,
                        err,
                        self.topics.raw,
                    )
                    refused = True
                await asyncio.sleep(next(waits))
            except TooLarge as err:
                return await self._split(payload, n_events, err)
        if refused:
            log.warning("Kafka accepts this agent's batches again")
        return 0

    async def _split(self, payload: bytes, n_events: int, err: TooLarge) -> int:
        try:
            batch = decode_batch(payload)  # the agent's own bytes, from its spool
        except WireError as why:
            return self._set_aside(payload, n_events, f"Kafka refuses it as too large ({err}); {why}")
        n = len(batch.events)
        first, total = batch.part or [0, n]
        if n == 1:
            TOO_LARGE_DROPPED.inc()
            log.error(
                "Kafka refuses event %d of batch %d as too large even alone (%s, %d bytes): dropped and "
                "counted (ktel_agent_too_large_dropped_events_total); raise the topic's max.message.bytes",
                first,
                batch.seq,
                err,
                len(payload),
            )
            return 1
        BATCHES_SPLIT.inc()
        log.warning(
            "Kafka refuses batch %d (events %d..%d, %d bytes) as too large (%s): sending it in halves",
            batch.seq,
            first,
            first + n - 1,
            len(payload),
            err,
        )
        mid = n // 2
        dropped = 0
        for lo, hi in ((0, mid), (mid, n)):
            weights = None if batch.weights is None else batch.weights[lo:hi]
            half = dataclasses.replace(
                batch, events=batch.events[lo:hi], weights=weights, part=[first + lo, total]
            )
            dropped += await self._deliver(self.for_kafka(encode_batch(half)), hi - lo)
        return dropped

    def _set_aside(self, payload: bytes, n_events: int, reason: str) -> int:
        """Move a spooled batch that cannot be sent out of the publisher's way: its bytes
        into agent.state_dir/set-aside/<time>.batch, its reason into <time>.reason, for
        an operator to look at (or a ktel that decodes it to send), unless those files
        would pass SET_ASIDE_MAX_BYTES or the disk refuses them. Its events are counted
        either way; returns their number, as dropped."""
        SET_ASIDE.inc(n_events)
        where = self.cfg.agent.state_dir / SET_ASIDE_DIR
        name = where / str(time.time_ns())
        files = ((name.with_suffix(".batch"), payload), (name.with_suffix(".reason"), f"{reason}\n".encode()))
        try:
            held = sum(p.stat().st_size for p in where.iterdir()) if where.is_dir() else 0
            if held + len(payload) > SET_ASIDE_MAX_BYTES:
                kept = f"not kept: {where} holds {held} bytes already"
            else:
                private_dir(where)
                for path, data in files:
                    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                        f.write(data)
                kept = f"moved to {files[0][0]}"
        except OSError as err:
            for path, _ in files:  # (no batch without its reason, nor a part of one)
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            kept = f"not kept: {err}"
        log.error(
            "spooled batch of %d events (%d bytes) set aside, %s: %s; counted in "
            "ktel_agent_set_aside_events_total",
            n_events,
            len(payload),
            kept,
            reason,
        )
        return n_events

    async def _read_spool(self, cursor: Cursor, limit: int) -> list[Record]:
        """``Spool.read``, a segment the disk refuses to read (EIO) tried again with the
        retry helper, up to ``SPOOL_READ_TRIES`` times, then set aside (``Spool.set_aside``)
        and the read gone on past it."""
        tries = 0

        async def attempt() -> list[Record] | SegmentUnreadable:
            nonlocal tries
            tries += 1
            try:
                return self.spool.read(cursor, limit)
            except SegmentUnreadable as err:
                if tries < SPOOL_READ_TRIES:
                    raise
                return err  # (given up on)
            except Exception as err:  # (not the disk's: fails the publisher, as before)
                raise Permanent("reading the spool") from err

        while True:
            try:
                got = await retry(attempt, what="read the spool", backoff=SPOOL_READ_BACKOFF)
            except Permanent as err:
                # Raised as it was, so the publisher's last line names it (the OSError of
                # a spool the agent cannot read at all), not the wrapper that ended the retries.
                raise err.__cause__ or err from None
            if not isinstance(got, SegmentUnreadable):
                return got
            self.spool.set_aside(got)
            tries = 0

    async def publish(self) -> None:
        """Send spooled records in order, pipelined; advance the spool on acknowledgement."""
        in_flight: collections.deque[tuple[Record, float, asyncio.Future, AIOKafkaProducer]] = (
            collections.deque()
        )
        cursor = self.spool.ack_cursor

        async def settle_oldest() -> None:
            rec, sent_at, fut, sent_by = in_flight.popleft()
            dropped = 0
            try:
                await fut
            except Exception as err:
                PUBLISH_RETRIES.inc()
                log.warning("batch at %s not acknowledged (%s); re-sending it alone", rec.start, err)
                if isinstance(err, BROKEN_PRODUCER):
                    await self._renew_producer(sent_by, err)
                dropped = await self._deliver(rec.payload, rec.n_events)
            self.latencies_ms.append((time.monotonic() - sent_at) * 1000)
            self.spool.ack(rec.next)
            if dropped < rec.n_events:  # some of it reached Kafka
                BATCHES_PUBLISHED.inc()
            EVENTS_PUBLISHED.inc(rec.n_events - dropped)

        while True:
            records = await self._read_spool(cursor, MAX_IN_FLIGHT)
            if not records:
                while in_flight:
                    await settle_oldest()
                self.spooled.clear()
                if await self._read_spool(cursor, 1):  # appended between read and clear
                    continue
                await self.spooled.wait()
                continue
            for rec in records:
                producer = self.producer
                try:
                    fut = await producer.send(self.topics.raw, rec.payload, key=self.key)
                except Exception as err:  # e.g. metadata unavailable while the broker is away
                    fut = asyncio.get_running_loop().create_future()
                    fut.set_exception(err)
                in_flight.append((rec, time.monotonic(), fut, producer))
                cursor = rec.next
                while len(in_flight) >= MAX_IN_FLIGHT:
                    await settle_oldest()

    # ------------------------------------------------------------ heartbeats

    def node_readings(self) -> tuple[dict[str, int], int]:
        """The heartbeat's ``node`` map (edge_agent/node_stats.py), and the number of disks
        left out of it (node_stats.within_bound); blocking, run in a thread."""
        sources = [
            *node_stats.PROC_SOURCES.items(),
            *((f"bpf_maps.{name}", p.map_usage) for name, p in list(self.loaded.items())),
        ]
        node: dict[str, int] = {}
        for source, read in sources:
            try:
                node.update(read())
            except Exception as err:
                # Its readings are left out of this heartbeat, not the heartbeat: a reading
                # missing for a while costs less than a host that looks down. One line
                # per failing stretch; every heartbeat without them is counted.
                NODE_READ_ERRORS.labels(source).inc()
                if source not in self.node_sources_failing:
                    self.node_sources_failing.add(source)
                    log.warning(
                        "node readings of %s left out of heartbeats until it can be read (%s: %s)",
                        source,
                        type(err).__name__,
                        err,
                    )
                continue
            if source in self.node_sources_failing:
                self.node_sources_failing.discard(source)
                log.warning("node readings of %s read again", source)
        return node_stats.within_bound(node)

    def heartbeat(
        self,
        elapsed: float,
        previous: dict[str, int],
        containers: list[list],
        node: dict[str, int],
        disks_left_out: int = 0,
    ) -> tuple[Heartbeat, dict[str, int]]:
        """The heartbeat record; ``rates`` are the counters' increase over the last
        ``elapsed`` seconds (since start, in the first), per second. ``disks_left_out``:
        the node's disks ``node`` has no room for, which the workers count as left out.

        ``interval_s`` is agent.heartbeat_seconds, whatever ``elapsed`` is: the workers
        report the host down three of them after its last heartbeat
        (processors/fleet_metrics.py). The time since start, which the first heartbeat
        said before (it goes out as soon as Kafka is reached, often well under a second
        after the probes loaded), had the host down from about 3 s after it until the
        second, an interval later, and kept an agent that reached Kafka only after
        minutes up for three times as long."""

        # The agent's own counters, read once: REGISTRY.get_sample_value would collect
        # every metric (the probes' in-kernel counters too) for each value.
        totals = {
            (sample.name, sample.labels.get("probe")): sample.value
            for counter in OWN_COUNTERS
            for family in counter.collect()
            for sample in family.samples
        }

        def value(name: str, probe: str | None = None) -> int:
            return int(totals.get((f"ktel_agent_{name}_total", probe), 0))

        counters: dict[str, int] = {
            "events_read": sum(value("events_read", n) for n in self.loaded),
            "events_published": value("events_published"),
            "batches_published": value("batches_published"),
            "publish_retries": value("publish_retries"),
            "decode_errors": sum(value("decode_errors", n) for n in self.loaded),
            "spool_dropped_events": self.spool.dropped_events,
            "spool_corrupt_bytes": self.spool.corrupt_bytes,
            "spool_unreadable_bytes": self.spool.unreadable_bytes,
            "disk_dropped_events": value("disk_dropped_events"),
            "too_large_dropped_events": value("too_large_dropped_events"),
            "batches_split": value("batches_split"),
            "set_aside_events": value("set_aside_events"),
            **self.control.counts,
        }
        probes: dict[str, dict] = {}
        for name in self.cfg.agent.probes:
            p = self.loaded.get(name)
            if p is not None:
                c = p.counters()
                counters[f"ringbuf_drops.{name}"] = c["ringbuf_drops"]
                counters[f"sampled_out.{name}"] = c["sampled_out"]
                counters[f"inflight_lost.{name}"] = c["inflight_lost"]
                if "negative_latency" in c:
                    counters[f"negative_latency.{name}"] = c["negative_latency"]
                if "recursion_misses" in c:
                    counters[f"recursion_misses.{name}"] = c["recursion_misses"]
                if "hist_lost" in c:
                    counters[f"histogram_lost.{name}"] = c["hist_lost"]
                if "truncated_paths" in c:
                    counters[f"truncated_paths.{name}"] = c["truncated_paths"]
                if "unresolved_paths" in c:
                    counters[f"unresolved_paths.{name}"] = c["unresolved_paths"]
            cmd = self.control.command(name)
            probes[name] = {
                "loaded": p is not None,
                "reason": self.skipped.get(name, ""),
                "sample_every": self.control.sample_every(name),
                "command": cmd.id if cmd else None,
            }
        lat, self.latencies_ms = self.latencies_ms, []
        # The workers order a boot's heartbeats by seq, not by ts (ktel/wire/control.py):
        # CLOCK_MONOTONIC counts from the boot and is never set, so the numbers go on
        # increasing across the agent's restarts within the boot, with nothing to keep on
        # disk, whatever is done to the wall clock. (+ 1: two heartbeats within one tick.)
        self._beat_seq = max(self._beat_seq + 1, time.monotonic_ns())
        hb: Heartbeat = {
            "ts": time.time_ns() // 1_000_000,
            "seq": self._beat_seq,
            "host": {
                HOST_ID: self.host_id,
                # (read each time: it may be changed while the agent runs)
                HOST_NAME: self.cfg.agent.host_name or socket.gethostname(),
                **self.static_host,
                "boot.id": self.boot_id,
            },
            "interval_s": self.cfg.agent.heartbeat_seconds,
            "probes": probes,
            "counters": counters,
            "rates": {k: (v - previous.get(k, 0)) / elapsed for k, v in counters.items()},
            "spool": {"depth_bytes": self.spool.depth_bytes()},
            "send_latency_ms": {
                "p50": statistics.median(lat) if lat else 0.0,
                "max": max(lat) if lat else 0.0,
            },
            "acked_commands": self.control.take_acks(),
            "refused_commands": self.control.take_refusals(),
            "containers": containers,
            "node": node,
        }
        if disks_left_out:
            hb["node_left_out"] = {"disks": disks_left_out}
        self.redactor.apply_heartbeat(hb)
        return hb, counters

    async def send_heartbeats(self) -> None:
        # The first goes out as soon as Kafka is reached, not an interval later: the
        # enrich stage takes a boot's host attributes from it, and batches it has not
        # seen a heartbeat of carry only host.id.
        interval = self.cfg.agent.heartbeat_seconds
        self._beat_at = self.started
        while True:
            await self.beat(interval)
            await asyncio.sleep(interval)

    async def beat(self, timeout: float, stopping: bool = False) -> None:
        """Send one heartbeat, waiting at most ``timeout`` for Kafka. ``stopping``: the
        last of an agent stopped on purpose (a signal), which the workers report as
        stopped, not down (processors/fleet_metrics.py)."""
        containers = await asyncio.to_thread(self.containers.scan)
        node, disks_left_out = await asyncio.to_thread(self.node_readings)
        CONTAINERS.set(len(containers))
        CONTAINERS_UNLISTED.set(self.containers.unlisted)
        now = time.monotonic()
        elapsed = max(now - self._beat_at, 1e-3)
        hb, self._beat_counters = self.heartbeat(
            elapsed, self._beat_counters, containers, node, disks_left_out
        )
        self._beat_at = now
        if stopping:
            hb["stopping"] = True
        try:
            # Only the latest heartbeat matters: one that cannot be sent in time is skipped, not queued.
            await asyncio.wait_for(self._send_and_wait(self.topics.heartbeats, encode_heartbeat(hb)), timeout)
            HEARTBEATS.inc()
            self.kafka_reached = True
        except Exception as err:
            self.kafka_reached = False
            self.control.unack(hb["acked_commands"], hb["refused_commands"])
            log.warning("heartbeat not sent: %s", err)
        except asyncio.CancelledError:
            # A stop cancels the periodic one in its send: the last heartbeat carries them.
            self.control.unack(hb["acked_commands"], hb["refused_commands"])
            raise

    def readiness(self) -> str | None:
        """Why the agent is not ready (/readyz), or None: probes loaded and Kafka reached."""
        if not self.loaded:
            return "no probe loaded"
        if not self.kafka_reached:
            return f"Kafka at {self.cfg.kafka.bootstrap} not reached (the spool keeps what is collected)"
        return None

    # ---------------------------------------------------------------- control

    def apply_rate(self, probe: str, every: int) -> None:
        p = self.loaded.get(probe)
        if p is not None:
            p.set_sample_every(every)

    # -------------------------------------------------------------------- run

    async def run(self, stop: asyncio.Event) -> None:
        acfg = self.cfg.agent
        runtime.tune_gc()
        self.loaded, self.skipped = probes_mod.load(
            acfg.probes,
            acfg.ringbuf_pages,
            read_interval_s=acfg.read_interval_ms / 1000,
            libc_path=acfg.libc_path,
        )
        self.started = time.monotonic()  # counting starts now, not before BCC's compile
        # BCC compiled the probes in this process; its compiler is not needed again.
        runtime.release_memory(probes_mod.COMPILER_LIBRARIES)
        for name in acfg.probes:
            PROBES_LOADED.labels(name).set(1 if name in self.loaded else 0)
        if not self.loaded:
            raise RuntimeError(f"no probe could be loaded: {self.skipped}")
        if "file_created" in self.loaded and not file_created.compiled():
            log.warning("file_created: no compiled packer (installing ktel builds it); packing in Python")
        for probe in self.loaded:
            self.apply_rate(probe, self.control.sample_every(probe))
        REGISTRY.register(AgentCollector(self))
        selfmetrics.ready_when(self.readiness)
        selfmetrics.serve(acfg.metrics_port, self.cfg.service.metrics_bind, "agent.metrics_port")
        self.producer = self._new_producer()
        log.info(
            "agent host.id=%s boot=%s (probes: %s; skipped: %s; spool backlog %d bytes)",
            self.host_id,
            self.boot_id,
            ", ".join(self.loaded),
            self.skipped or "none",
            self.spool.depth_bytes(),
        )
        collector = asyncio.create_task(self.collect(stop), name="collect")
        # Collecting runs meanwhile: a broker that is away at start only means spooling.
        connector = asyncio.create_task(start(self.producer, self.cfg.kafka, "ktel agent"), name="connect")
        senders: list[asyncio.Task] = []
        failed: asyncio.Task | None = None
        try:
            running: set[asyncio.Task] = {collector, connector}
            while collector in running and failed is None:
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is not None:
                        failed = task
                    elif task is connector:
                        self.kafka_reached = True
                        senders = [
                            asyncio.create_task(self.publish(), name="publish"),
                            asyncio.create_task(self.send_heartbeats(), name="heartbeats"),
                            asyncio.create_task(self.control.follow(self.cfg.kafka), name="control"),
                        ]
                        running.update(senders)
                    elif task is not collector:
                        failed = task  # runs until cancelled: ending is failing
            if failed is None:
                deadline = time.monotonic() + FLUSH_TIMEOUT_S
                while senders and not self.spool.empty() and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                if senders:
                    # Stopped on purpose (a node drained or retired, an upgrade): said, so
                    # that its silence from now on pages no one (deploy/prometheus/ktel-rules.yml).
                    # The last heartbeat, after the periodic ones.
                    await cancelled((t for t in senders if t.get_name() == "heartbeats"), GOODBYE_TIMEOUT_S)
                    try:
                        # Bounded whole (its readings too): nothing may hold a stop up.
                        await asyncio.wait_for(
                            self.beat(GOODBYE_TIMEOUT_S, stopping=True), 2 * GOODBYE_TIMEOUT_S
                        )
                    except TimeoutError:
                        log.warning(
                            "last heartbeat not sent: its readings took over %.0f s", 2 * GOODBYE_TIMEOUT_S
                        )
            elif failed is not collector:
                stop.set()  # the collector seals what it holds into the spool, for the next start
                await asyncio.wait({collector})
        finally:
            tasks = [connector, *senders, *([self._renewal] if self._renewal else [])]
            for task in await cancelled(tasks, GOODBYE_TIMEOUT_S):
                log.warning("agent task %s did not end when cancelled; stopping without it", task.get_name())
            await close_producer(self.producer)
            try:
                self.spool.close()
            finally:
                statelock.release(self.state_lock)
            log.info("agent stopped; %d spooled bytes not yet acknowledged", self.spool.depth_bytes())
        if failed is not None:
            err = failed.exception()
            why = f"failed: {type(err).__name__}: {err}" if err else "ended"
            log.critical("agent task %s %s; exiting with status 1", failed.get_name(), why)
            raise SystemExit(1)
