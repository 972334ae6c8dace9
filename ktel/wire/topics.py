"""ktel's topic names (their partitions and retention: ktel/topics.py).

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
"""

RAW_TOPIC = "ktel.raw"
DEDUPED_TOPIC = "ktel.deduped"
ENRICHED_TOPIC = "ktel.enriched"
SAMPLED_TOPIC = "ktel.sampled"
METRICS_TOPIC = "ktel.metrics"
SPANS_TOPIC = "ktel.spans"
LOGS_TOPIC = "ktel.logs"
DLQ_TOPIC = "ktel.dlq"
HEARTBEATS_TOPIC = "ktel.heartbeats"
CONTROL_TOPIC = "ktel.control"
