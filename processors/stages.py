"""The processing stages' Faust shell: ``ktel process <stage>``.

Split mode, each stage its own Faust app and consumer group, scaled by
starting more workers of it::

    ktel.raw --dedupe--> ktel.deduped --enrich--> ktel.enriched --sample--> ktel.sampled
                                        ^                             |
                      ktel.heartbeats --+                             +--> ktel.control (fidelity commands)

    ktel.sampled --aggregate--> ktel.metrics, ktel.spans, ktel.logs

Fused mode (``ktel process all``, for small setups and ``ktel up``) runs the
four cores in one worker from ``ktel.raw`` (and ``ktel.heartbeats``). Records
stay batches all the way.

Every topic is keyed by host id, so a host's batches stay in one partition and
one worker, and each stage keeps its per-host state in a changelog-backed
Faust table co-partitioned with its input (the sample stage's anomaly
detector keeps its per-host rates in the worker; see ``activity`` below). A stage that keeps counts dedupes
its own input in the same table value as the counts, so redelivery after a
crash (its input is at-least-once) neither loses nor doubles anything.
The enrich stage keeps no counts and passes a redelivered batch on (the
aggregate stage drops it); it takes heartbeats into the same table, which is
why ``ktel.heartbeats`` is partitioned like ``ktel.raw``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

import faust
from prometheus_client import Counter, Gauge

from ktel import selfmetrics
from ktel.config import Config
from ktel.retry import retry
from ktel.stack.kafka import TopicSpec, create_topics, partition_counts
from ktel.wire import (
    CONTROL_TOPIC,
    DEDUPED_TOPIC,
    DLQ_TOPIC,
    ENRICHED_TOPIC,
    HEARTBEATS_TOPIC,
    LOGS_TOPIC,
    METRICS_TOPIC,
    RAW_TOPIC,
    SAMPLED_TOPIC,
    SPANS_TOPIC,
    DeadLetter,
    MetricSnapshot,
    WireError,
    decode_batch,
    decode_heartbeat,
    encode_batch,
    encode_command,
    encode_dead_letter,
    encode_logs,
    encode_snapshot,
    encode_spans,
)
from processors import aggregate_core, dedupe_core, enrich_core, sample_core
from processors.faust_app import App

log = logging.getLogger("ktel.process")

STAGES = ("dedupe", "enrich", "sample", "aggregate", "all")
# A host silent for this many sample windows is forgotten by the anomaly detector.
IDLE_WINDOWS = 30
# How often the enrich stage looks whether its metadata file changed (a stat).
FEED_CHECK_SECONDS = 5.0
SOURCE = {
    "dedupe": RAW_TOPIC,
    "enrich": DEDUPED_TOPIC,
    "sample": ENRICHED_TOPIC,
    "aggregate": SAMPLED_TOPIC,
    "all": RAW_TOPIC,
}
SINK = {"dedupe": DEDUPED_TOPIC, "enrich": ENRICHED_TOPIC, "sample": SAMPLED_TOPIC}  # the rest: METRICS_TOPIC

BATCHES = Counter("ktel_processor_batches", "batches a stage processed", ["stage"])
EVENTS = Counter("ktel_processor_events", "events counted into the aggregates (weighted)", ["stage"])
DUPLICATES = Counter(
    "ktel_processor_duplicate_batches", "re-sent batches dropped by (host, boot, seq)", ["stage"]
)
SAMPLED_OUT = Counter("ktel_processor_sampled_out", "events the sample stage dropped", ["stage"])
COMMANDS = Counter("ktel_processor_commands", "fidelity commands sent to ktel.control", ["stage"])
DEAD_LETTERS = Counter("ktel_processor_dead_letters", "records sent to ktel.dlq", ["stage"])
OVERFLOW = Counter("ktel_processor_series_overflow", "events folded into an overflow series", ["stage"])
SNAPSHOTS = Counter("ktel_processor_snapshots", "metric snapshot records produced", ["stage"])
SPANS = Counter("ktel_processor_spans", "kernel spans sent to ktel.spans", ["stage"])
LOGS = Counter("ktel_processor_logs", "kernel logs and OOM kills sent to ktel.logs", ["stage"])
HEARTBEATS = Counter("ktel_processor_heartbeats", "agent heartbeats the enrich stage read", ["stage"])
EVICTIONS = Counter(
    "ktel_processor_process_evictions", "processes dropped by enrich.max_processes, not by exit", ["stage"]
)
PROCESSES = Gauge(
    "ktel_processor_processes_known", "processes the enrich stage knows, over the hosts it served", ["stage"]
)


async def persist(table: Any, key: str, value: dict[str, Any]) -> None:
    """``table[key] = value``, with the changelog record handed to the Kafka producer
    before the stream moves on, so before the source offset can be committed.

    Faust's own ``table[key] = value`` queues the record in its ProducerBuffer,
    and the producer flush that precedes every offset commit can return while the
    buffer's sender still holds a record (faust-streaming 0.15.3,
    ``ProducerBuffer.flush_atmost``). Seen here: a commit went through with a host's
    last changelog record unsent, and a worker SIGKILLed right then lost that
    batch's counts. Records sent this way are in aiokafka's accumulator, whose
    flush waits for the broker's acknowledgement (acks=all). That holds while
    ``stream_publish_on_commit`` is off (Faust's default, not changed here): on, it
    would hold the record back until the commit.

    Otherwise this is Faust's own write (``Table.on_key_set``), minus the key TTL of
    windowed tables, which this one is not.
    """
    table.data[key] = value
    await table.changelog_topic.send(
        key=key,
        value=value,
        partition=table.partition_for_key(key),  # the event's partition: the table is co-partitioned
        key_serializer=table.key_serializer,
        value_serializer=table.value_serializer,
        callback=table._on_changelog_sent,  # the store's persisted offset (a no-op for memory://)
    )
    table._sensor_on_set(table, key, value)


def make_app(cfg: Config, stage: str) -> faust.App:
    agg_opts = aggregate_core.Options.from_config(cfg.aggregate)
    s = cfg.sample
    sampler = sample_core.Sampler(sample_core.Options.from_config(s))
    enrich_opts = enrich_core.Options.from_config(cfg.enrich)
    does = {
        "dedupe": stage == "dedupe",
        "enrich": stage in ("enrich", "all"),
        "sample": stage in ("sample", "all"),
        "aggregate": stage in ("aggregate", "all"),
    }
    for name in ("batches", "events", "duplicates", "dead letters"):  # exported as 0 from the start
        {"batches": BATCHES, "events": EVENTS, "duplicates": DUPLICATES, "dead letters": DEAD_LETTERS}[
            name
        ].labels(stage)
    if does["enrich"]:
        for metric in (HEARTBEATS, EVICTIONS, PROCESSES):
            metric.labels(stage)

    session = cfg.process.session_timeout_seconds
    datadir = cfg.process.data_dir / stage
    datadir.mkdir(parents=True, exist_ok=True)
    app = App(
        f"ktel-{stage}",
        broker=f"kafka://{cfg.kafka.bootstrap}",
        store="memory://",
        datadir=str(datadir),
        web_enabled=False,
        # Standbys would put other workers' hosts into this worker's timers.
        table_standby_replicas=0,
        topic_replication_factor=1,
        topic_partitions=cfg.kafka.raw_partitions,
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=session,
        # A few heartbeats per session, as Kafka advises; Faust's 3 s past 30 s.
        broker_heartbeat_interval=min(3.0, session / 10),
        broker_request_timeout=max(90.0, session),  # Faust: never below the session
    )

    def raw_topic(name: str) -> Any:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    source = raw_topic(SOURCE[stage])
    sink = raw_topic(SINK.get(stage, METRICS_TOPIC))
    control, dlq = raw_topic(CONTROL_TOPIC), raw_topic(DLQ_TOPIC)
    spans_topic, logs_topic = raw_topic(SPANS_TOPIC), raw_topic(LOGS_TOPIC)
    # The sample stage alone keeps no table: a table it never writes would still
    # need its changelog topic at start.
    keeps_state = does["dedupe"] or does["enrich"] or does["aggregate"]
    # Stages that keep counts (or are the dedupe stage) drop duplicates; see the module doc.
    dedupes = does["dedupe"] or does["aggregate"]
    hosts = app.Table("host-state", default=dict, partitions=cfg.kafka.raw_partitions) if keeps_state else {}
    feed = enrich_core.MetadataFile(cfg.enrich.metadata_file)
    # Processes known per host, for the gauge (the table is not safe to walk from
    # the metrics server's thread).
    known: dict[str, int] = {}

    def reload_feed() -> None:
        errors = feed.refresh()
        if errors is not None:
            for err in errors:
                log.warning("metadata feed: %s", err)
            log.info("metadata feed %s: %d cgroups", feed.path, feed.entries)

    async def dead_letter(event: Any, err: WireError) -> None:
        msg = event.message
        DEAD_LETTERS.labels(stage).inc()
        log.warning("dead letter %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, err)
        dl = DeadLetter(stage, str(err), msg.topic, msg.partition, msg.offset, bytes(event.value))
        await dlq.send(key=event.key, value=encode_dead_letter(dl))

    # Per-host rates for anomaly detection live in the worker, not the table:
    # Faust only lets a stream modify a table, and timers close the windows. A
    # restart or rebalance relearns a host's baseline in a few windows.
    activity: dict[str, dict[str, Any]] = {}

    @app.agent(source)
    async def process(stream):
        async for event in stream.events():
            try:
                batch = decode_batch(event.value)
            except WireError as err:
                await dead_letter(event, err)
                continue
            state = hosts[batch.host_id] if keeps_state else {}
            # Whether the table value must be written back (to the changelog).
            changed = dedupes
            if dedupes:
                # The dedupe record lives where the stage's output state lives (see the module doc).
                dedupe_state = state.setdefault("aggregate" if does["aggregate"] else "dedupe", {})
                if not dedupe_core.first_time(dedupe_state, batch):
                    DUPLICATES.labels(stage).inc()
                    await persist(hosts, batch.host_id, state)  # the dedupe record may have been trimmed
                    continue
            BATCHES.labels(stage).inc()
            if does["enrich"]:
                enriched = enrich_core.enrich(state.setdefault("enrich", {}), batch, feed.feed, enrich_opts)
                batch = enriched.batch
                # Only the LRU order changed otherwise: not worth a changelog record.
                changed |= enriched.changed
                EVICTIONS.labels(stage).inc(enriched.evicted)
                PROCESSES.labels(stage).inc(enriched.processes - known.get(batch.host_id, 0))
                known[batch.host_id] = enriched.processes
            if does["sample"]:
                hs = activity.setdefault(batch.host_id, {})
                hs["count"] = hs.get("count", 0.0) + (
                    sum(batch.weights) if batch.weights else len(batch.events)
                )
                hs["probes"] = sorted(
                    set(hs.get("probes", [])) | sample_core.probes_of({ev[0] for ev in batch.events})
                )
                hs["seen_ms"] = time.time_ns() // 1_000_000
                before = len(batch.events)
                batch = sampler.sample(batch)
                SAMPLED_OUT.labels(stage).inc(before - len(batch.events))
            if does["aggregate"]:
                out = aggregate_core.add(state["aggregate"], batch, agg_opts)
                EVENTS.labels(stage).inc(out.counted)
                OVERFLOW.labels(stage).inc(out.overflowed)
                span_records, log_records = aggregate_core.signals(batch)
                for sb in span_records:
                    await spans_topic.send(key=event.key, value=encode_spans(sb))
                    SPANS.labels(stage).inc(len(sb.spans))
                for lb in log_records:
                    await logs_topic.send(key=event.key, value=encode_logs(lb))
                    LOGS.labels(stage).inc(len(lb.logs))
            if changed:  # (only stages that keep state change it)
                await persist(hosts, batch.host_id, state)
            if not does["aggregate"]:
                await sink.send(key=event.key, value=encode_batch(batch))

    if does["enrich"]:

        @app.agent(raw_topic(HEARTBEATS_TOPIC))
        async def take_heartbeats(stream):
            async for event in stream.events():
                try:
                    hb = decode_heartbeat(event.value)
                    host_id = hb["host"]["host.id"]
                    if event.key != host_id.encode():
                        # The table key must hash to the partition the record came from.
                        raise WireError(
                            f"heartbeat: key {event.key!r:.60} is not its host.id {host_id!r:.60}"
                        )
                except WireError as err:
                    await dead_letter(event, err)
                    continue
                HEARTBEATS.labels(stage).inc()
                state = hosts[host_id]
                if enrich_core.observe_heartbeat(state.setdefault("enrich", {}), hb):
                    await persist(hosts, host_id, state)

        reload_feed()  # before the first batch, so a configured feed applies from the start
        if feed.path is not None:

            @app.timer(FEED_CHECK_SECONDS)
            async def check_feed():
                reload_feed()

    if does["sample"]:

        @app.timer(s.window_seconds)
        async def close_sample_window():
            assigned = [tp for tp in app.assignor.assigned_actives() if tp.topic == SOURCE[stage]]
            sampler.end_window(share=len(assigned) / cfg.kafka.raw_partitions)
            now_ms = time.time_ns() // 1_000_000
            for host_id, hs in list(activity.items()):
                if now_ms - hs["seen_ms"] > IDLE_WINDOWS * s.window_seconds * 1000:
                    del activity[host_id]  # gone quiet, or its partition moved to another worker
                    continue
                for cmd in sample_core.observe_host(hs, host_id, hs["probes"], now_ms, sampler.opts):
                    log.info(
                        "host %s: %s sampled 1 in %d (command %s)",
                        host_id,
                        cmd.probe,
                        cmd.sample_every,
                        cmd.id,
                    )
                    await control.send(key=cmd.key, value=encode_command(cmd))
                    COMMANDS.labels(stage).inc()

    if does["aggregate"]:

        @app.timer(cfg.aggregate.window_seconds)
        async def emit_snapshots():
            ts_ms = time.time_ns() // 1_000_000
            for host_id, state in list(hosts.items()):
                rows = aggregate_core.snapshot(host_id, state.get("aggregate", {}))
                if rows:
                    await sink.send(key=host_id.encode(), value=encode_snapshot(MetricSnapshot(ts_ms, rows)))
                    SNAPSHOTS.labels(stage).inc()

    @app.task
    async def serve_metrics():
        selfmetrics.serve(cfg.process.metrics_port)

    return app


def changelog_topic(stage: str) -> str:
    return f"ktel-{stage}-host-state-changelog"  # Faust's name for the "host-state" table of app ktel-<stage>


def check_partitions(cfg: Config, stage: str) -> None:
    """Refuse to start a stage whose table would not be co-partitioned with its input.

    The table (and its changelog) has ``kafka.raw_partitions`` partitions; Faust
    refuses a table write from a record of a topic partitioned otherwise, and a
    worker would crash on its first batch. That happens after ``kafka.raw_partitions``
    is changed once the topics exist, and with a ktel.heartbeats made before the
    enrich stage existed (then it followed ``kafka.output_partitions``).
    """
    if stage == "sample":
        return  # it keeps no table
    want = cfg.kafka.raw_partitions
    # What to do about each topic, by the partition count it has ({n}). ktel.raw
    # comes first: when it is the one that differs, the others follow from it.
    remake = "delete it with the stages stopped and run `ktel topics`, or set kafka.raw_partitions = {n}"
    fixes = {RAW_TOPIC: "set kafka.raw_partitions = {n}"}
    fixes.setdefault(SOURCE[stage], remake)  # never "delete ktel.raw"
    fixes[changelog_topic(stage)] = "delete it with the stage stopped (the stage makes it again, empty)"
    if stage in ("enrich", "all"):
        fixes[HEARTBEATS_TOPIC] = "delete it (it holds only recent heartbeats) and run `ktel topics`"
    counts = asyncio.run(
        retry(functools.partial(partition_counts, cfg.kafka.bootstrap), what="describe the topics")
    )
    for topic, fix in fixes.items():
        n = counts.get(topic)
        if n is not None and n != want:
            raise SystemExit(
                f"ktel process {stage}: {topic} has {n} partitions but kafka.raw_partitions = {want}, "
                f"which the stage's table has and must share with {topic}: {fix.format(n=n)}"
            )


def run(cfg: Config, stage: str, log_level: str = "info") -> None:
    check_partitions(cfg, stage)
    if stage != "sample":
        # Created before Faust starts: when Faust creates it itself, a worker that
        # reads metadata a moment too early crashes with PartitionsMismatch and
        # never recovers (seen with Kafka 3.9 and faust-streaming 0.15).
        spec = TopicSpec(
            changelog_topic(stage), cfg.kafka.raw_partitions, extra_config={"cleanup.policy": "compact"}
        )
        asyncio.run(
            retry(lambda: create_topics(cfg.kafka.bootstrap, [spec]), what="create the changelog topic")
        )
    worker = faust.Worker(make_app(cfg, stage), loglevel=log_level.upper(), quiet=True)
    worker.execute_from_commandline()
