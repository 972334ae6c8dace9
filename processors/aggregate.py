"""The aggregate stage's Faust shell: ``ktel process aggregate``.

Consumes ``ktel.raw`` (keyed by host id, so one host's batches stay in one
partition and in one worker), folds each batch into that host's state with the
pure core (processors/aggregate_core.py), and every ``window_seconds`` emits
each host's cumulative series as one snapshot record on ``ktel.metrics``.

The host state lives in a Faust table (changelog-backed), so a restarted or
rebalanced worker continues the counters and the dedupe record instead of
starting from zero. Start more workers with the same command to share the
partitions.
"""

from __future__ import annotations

import logging
import time

import faust
from prometheus_client import Counter

from ktel import selfmetrics
from ktel.config import Config
from ktel.wire import (
    DLQ_TOPIC,
    METRICS_TOPIC,
    RAW_TOPIC,
    DeadLetter,
    MetricSnapshot,
    WireError,
    decode_batch,
    encode_dead_letter,
    encode_snapshot,
)
from processors import aggregate_core

log = logging.getLogger("ktel.aggregate")

BATCHES = Counter("ktel_processor_batches", "raw batches folded into the aggregates")
EVENTS = Counter("ktel_processor_events", "events counted into the aggregates")
DUPLICATES = Counter("ktel_processor_duplicate_batches", "re-sent batches dropped by (host, boot, seq)")
DEAD_LETTERS = Counter("ktel_processor_dead_letters", "records sent to ktel.dlq", ["stage"])
OVERFLOW = Counter("ktel_processor_series_overflow", "events folded into an overflow series")
SNAPSHOTS = Counter("ktel_processor_snapshots", "metric snapshot records produced")

STAGE = "aggregate"
DEAD_LETTERS.labels(STAGE)  # exported as 0 from the start, so a dashboard shows it


def make_app(cfg: Config) -> faust.App:
    opts = aggregate_core.Options(
        directory_depth=cfg.aggregate.directory_depth,
        include_filename=cfg.aggregate.include_filename,
    )
    app = faust.App(
        "ktel-aggregate",
        broker=f"kafka://{cfg.kafka.bootstrap}",
        store="memory://",
        web_enabled=False,
        # Standbys would put other workers' hosts into this worker's snapshots.
        table_standby_replicas=0,
        topic_replication_factor=1,
        topic_partitions=cfg.kafka.raw_partitions,
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
    )
    raw = app.topic(RAW_TOPIC, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    metrics = app.topic(METRICS_TOPIC, key_serializer="raw", value_serializer="raw")
    dlq = app.topic(DLQ_TOPIC, key_serializer="raw", value_serializer="raw")
    # Keyed by host id; co-partitioned with ktel.raw, which is keyed the same way.
    hosts = app.Table("host-state", default=dict, partitions=cfg.kafka.raw_partitions)

    @app.agent(raw)
    async def aggregate(stream):
        async for event in stream.events():
            msg = event.message
            try:
                batch = decode_batch(event.value)
            except WireError as err:
                DEAD_LETTERS.labels(STAGE).inc()
                log.warning("dead letter %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, err)
                await dlq.send(
                    key=event.key,
                    value=encode_dead_letter(
                        DeadLetter(
                            STAGE,
                            str(err),
                            msg.topic,
                            msg.partition,
                            msg.offset,
                            bytes(event.value),
                        )
                    ),
                )
                continue
            state = hosts[batch.host_id]
            outcome = aggregate_core.apply(state, batch, opts)
            if outcome.duplicate:
                DUPLICATES.inc()
                continue
            hosts[batch.host_id] = state  # reassign: writes the changelog
            BATCHES.inc()
            EVENTS.inc(outcome.counted)
            OVERFLOW.inc(outcome.overflowed)

    @app.timer(cfg.aggregate.window_seconds)
    async def emit_snapshots():
        ts_ms = time.time_ns() // 1_000_000
        for host_id, state in list(hosts.items()):
            rows = aggregate_core.snapshot(host_id, state)
            if rows:
                await metrics.send(key=host_id.encode(), value=encode_snapshot(MetricSnapshot(ts_ms, rows)))
                SNAPSHOTS.inc()

    @app.task
    async def serve_metrics():
        selfmetrics.serve(cfg.aggregate.metrics_port)

    return app


def run(cfg: Config, log_level: str = "info") -> None:
    app = make_app(cfg)
    worker = faust.Worker(app, loglevel=log_level.upper(), quiet=True)
    worker.execute_from_commandline()
