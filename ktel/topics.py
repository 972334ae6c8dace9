"""ktel's topics, with the partition counts and retention the config gives."""

from __future__ import annotations

from ktel.config import Config
from ktel.stack.kafka import TopicSpec
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
)

HOUR_MS = 3_600_000


def specs(cfg: Config) -> list[TopicSpec]:
    k = cfg.kafka
    return [
        # Raw batches are the forensic record: kept by time, compressed by the producer.
        TopicSpec(RAW_TOPIC, k.raw_partitions, int(k.raw_retention_hours * HOUR_MS)),
        # Between stages in split mode: keyed and partitioned like ktel.raw, so
        # each stage's per-host table stays co-partitioned with its input.
        *(
            TopicSpec(t, k.raw_partitions, int(k.output_retention_hours * HOUR_MS))
            for t in (DEDUPED_TOPIC, ENRICHED_TOPIC, SAMPLED_TOPIC)
        ),
        *(
            TopicSpec(t, k.output_partitions, int(k.output_retention_hours * HOUR_MS))
            for t in (METRICS_TOPIC, SPANS_TOPIC, LOGS_TOPIC)
        ),
        TopicSpec(DLQ_TOPIC, 1, int(k.dlq_retention_hours * HOUR_MS)),
        # Partitioned like ktel.raw: the enrich stage keeps a host's heartbeat in the
        # same table partition as its batches (Faust refuses a table write from a
        # topic whose partition count differs from the table's changelog).
        TopicSpec(HEARTBEATS_TOPIC, k.raw_partitions, int(k.output_retention_hours * HOUR_MS)),
        # One partition: every agent reads all commands, in the order they were given.
        TopicSpec(CONTROL_TOPIC, 1, int(k.output_retention_hours * HOUR_MS)),
    ]
