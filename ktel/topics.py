"""ktel's topics, with the partition counts and retention the config gives."""

from __future__ import annotations

from ktel.config import Config
from ktel.stack.kafka import TopicSpec
from ktel.wire import DLQ_TOPIC, METRICS_TOPIC, RAW_TOPIC

HOUR_MS = 3_600_000


def specs(cfg: Config) -> list[TopicSpec]:
    k = cfg.kafka
    return [
        # Raw batches are the forensic record: kept by time, compressed by the producer.
        TopicSpec(RAW_TOPIC, k.raw_partitions, int(k.raw_retention_hours * HOUR_MS)),
        TopicSpec(METRICS_TOPIC, k.metrics_partitions, int(k.metrics_retention_hours * HOUR_MS)),
        TopicSpec(DLQ_TOPIC, 1, int(k.dlq_retention_hours * HOUR_MS)),
    ]
