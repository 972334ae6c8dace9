"""The exporters' shared Kafka loop: at-least-once from ``ktel.metrics``.

An offset is committed only after ``deliver`` returned, i.e. after the backend
acknowledged everything made from the records up to it (design principle 4).
Records that do not decode go to ``ktel.dlq`` with the reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import Counter

from ktel.retry import retry
from ktel.wire import (
    DLQ_TOPIC,
    METRICS_TOPIC,
    DeadLetter,
    MetricSnapshot,
    WireError,
    decode_snapshot,
    encode_dead_letter,
)

log = logging.getLogger("ktel.export")

DEAD_LETTERS = Counter("ktel_exporter_dead_letters", "records or samples sent to ktel.dlq", ["exporter"])


async def dead_letter(producer: AIOKafkaProducer, dl: DeadLetter, key: bytes | None = None) -> None:
    await producer.send_and_wait(DLQ_TOPIC, encode_dead_letter(dl), key=key)
    DEAD_LETTERS.labels(dl.stage).inc()


async def run(
    *,
    bootstrap: str,
    group_id: str | None,
    stage: str,
    deliver: Callable[[list[MetricSnapshot], AIOKafkaProducer], Awaitable[None]],
    stop: asyncio.Event,
) -> None:
    """Consume snapshots and hand them to ``deliver`` chunk by chunk.

    ``group_id=None`` reads every partition from the beginning without a group
    (the pull endpoint: each instance needs the whole picture).
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=500,
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await retry(consumer.start, what=f"connect consumer to {bootstrap}")
    await retry(producer.start, what=f"connect producer to {bootstrap}")
    try:
        if group_id is None:
            parts = await retry(lambda: _partitions(producer), what=f"find the partitions of {METRICS_TOPIC}")
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
        else:
            consumer.subscribe([METRICS_TOPIC])
        while not stop.is_set():
            fetched = await consumer.getmany(timeout_ms=500)
            snaps: list[MetricSnapshot] = []
            for tp, records in fetched.items():
                for rec in records:
                    try:
                        snaps.append(decode_snapshot(rec.value))
                    except WireError as err:
                        log.warning("dead letter %s[%d]@%d: %s", tp.topic, tp.partition, rec.offset, err)
                        await dead_letter(
                            producer,
                            DeadLetter(stage, str(err), tp.topic, tp.partition, rec.offset, rec.value),
                            rec.key,
                        )
            if snaps:
                await deliver(snaps, producer)
            if fetched and group_id is not None:
                await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()


async def _partitions(producer: AIOKafkaProducer) -> list[TopicPartition]:
    # The producer fetches metadata for a topic on demand; a group-less consumer does not.
    parts = await producer.partitions_for(METRICS_TOPIC)
    return [TopicPartition(METRICS_TOPIC, p) for p in sorted(parts)]
