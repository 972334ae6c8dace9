"""ktel's topic and consumer-group names (their partitions and retention: ktel/topics.py).

``ktel.raw``        raw event batches from the agents, keyed by host id, kept for
                    forensics (retention configurable, 7 days by default).
``ktel.deduped``    raw batches after the dedupe stage (split mode only).
``ktel.enriched``   raw batches after the enrich stage, with resource and process
                    attributes (split mode only).
``ktel.sampled``    raw batches after the sample stage, with weights (split mode only).
``ktel.metrics``    metric snapshots produced by the aggregate stage.
``ktel.spans``      kernel spans, for the OTLP traces exporter.
``ktel.logs``       kernel logs and notable events (OOM kills, ...), for OTLP logs.
``ktel.dlq``        records a stage could not use, with the reason and the bytes.
``ktel.heartbeats`` agent heartbeats: identity, probes, drops, spool, latency.
``ktel.control``    fidelity commands for the agents (one host or the fleet).

Consumer groups and Faust app ids are ``ktel-<name>`` (``ktel-dedupe``,
``ktel-export-otlp``); a Faust app's own topics start with its id.

Several pipelines can share one Kafka cluster: each gets a ``kafka.prefix``
(ktel/config.py) that starts every one of these names. Code takes the names from
the configuration's :class:`Topics` (``cfg.kafka.topics``); the constants below
are the names without a prefix.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Topics:
    """ktel's names under one prefix ("" by default: the names above)."""

    prefix: str = ""

    def topic(self, name: str) -> str:
        """``<prefix>ktel.<name>``."""
        return f"{self.prefix}ktel.{name}"

    def group(self, name: str) -> str:
        """A consumer group or Faust app id: ``<prefix>ktel-<name>``."""
        return f"{self.prefix}ktel-{name}"

    @property
    def raw(self) -> str:
        return self.topic("raw")

    @property
    def deduped(self) -> str:
        return self.topic("deduped")

    @property
    def enriched(self) -> str:
        return self.topic("enriched")

    @property
    def sampled(self) -> str:
        return self.topic("sampled")

    @property
    def metrics(self) -> str:
        return self.topic("metrics")

    @property
    def spans(self) -> str:
        return self.topic("spans")

    @property
    def logs(self) -> str:
        return self.topic("logs")

    @property
    def dlq(self) -> str:
        return self.topic("dlq")

    @property
    def heartbeats(self) -> str:
        return self.topic("heartbeats")

    @property
    def control(self) -> str:
        return self.topic("control")


UNPREFIXED = Topics()
RAW_TOPIC = UNPREFIXED.raw
DEDUPED_TOPIC = UNPREFIXED.deduped
ENRICHED_TOPIC = UNPREFIXED.enriched
SAMPLED_TOPIC = UNPREFIXED.sampled
METRICS_TOPIC = UNPREFIXED.metrics
SPANS_TOPIC = UNPREFIXED.spans
LOGS_TOPIC = UNPREFIXED.logs
DLQ_TOPIC = UNPREFIXED.dlq
HEARTBEATS_TOPIC = UNPREFIXED.heartbeats
CONTROL_TOPIC = UNPREFIXED.control
