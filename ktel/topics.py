"""ktel's topics, with the partition counts and retention the config gives, and the
Kafka admin calls that create and inspect topics."""

from __future__ import annotations

import dataclasses

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from ktel.config import Config
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


@dataclasses.dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    retention_ms: int | None = None
    extra_config: dict[str, str] = dataclasses.field(default_factory=dict)
    # The aiokafka admin speaks CreateTopics v3 at most, which cannot ask for the
    # broker's default (-1), so the factor is explicit; 1 suits the local broker.
    replication_factor: int = 1


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


async def create_topics(bootstrap: str, specs: list[TopicSpec]) -> None:
    """Create the topics; one that already exists is left as it is (not reconfigured)."""
    if not specs:
        return
    new = []
    for s in specs:
        config = {k: str(v) for k, v in s.extra_config.items()}
        if s.retention_ms is not None:
            config["retention.ms"] = str(s.retention_ms)
        new.append(NewTopic(s.name, s.partitions, s.replication_factor, topic_configs=config))
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resp = await admin.create_topics(new)
    finally:
        await admin.close()
    for topic, code, message in resp.topic_errors:
        if code not in (0, TopicAlreadyExistsError.errno):
            raise for_code(code)(f"creating topic {topic!r}: {message}")


async def partition_counts(bootstrap: str) -> dict[str, int]:
    """How many partitions each existing topic has."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        # Every topic, not just some: asking for a missing topic by name can
        # make the broker auto-create it with its default partition count.
        described = await admin.describe_topics()
    finally:
        await admin.close()
    return {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}


async def topic_partitions(bootstrap: str, topic: str) -> int | None:
    """How many partitions ``topic`` has; None if it does not exist."""
    return (await partition_counts(bootstrap)).get(topic)
