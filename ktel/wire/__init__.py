"""The one wire contract: every record that crosses Kafka, its topic and its codec.

The edge agent, the processors, the exporters and replay all import this
package; nothing else defines a record. Split by record family:

- ``ktel.wire.topics``: the topic names;
- ``ktel.wire.raw``: raw batches of kernel events (the event kinds themselves
  are declared by the probes, ktel/probes/);
- ``ktel.wire.signals``: metric snapshots, span and log batches;
- ``ktel.wire.control``: heartbeats, fidelity commands, dead letters;
- ``ktel.wire.codec``: msgpack, the schema version, ``WireError``, and the
  zstd frame a raw batch may come in (the agent's compression).

Each record is a typed shape (ktel/schema.py): every decode checks types,
ranges, finite numbers and sizes, and raises ``WireError`` with the reason a
dead letter carries. The v1 bytes of every family are pinned by golden files
in tests/golden/wire/.

What is used across the code base is importable from here.
"""

from ktel.probes import HIST_SLOTS, HISTOGRAM_DELTA, KINDS
from ktel.probes.dns_latency import DNS_SLOW
from ktel.probes.file_created import FILE_CREATED
from ktel.probes.ktel_api import KTEL_LOG, KTEL_METRIC, KTEL_SPAN
from ktel.probes.oom_kill import OOM_KILL
from ktel.probes.process import PROCESS_EXEC, PROCESS_EXIT
from ktel.probes.skb_drop import SKB_DROP
from ktel.probes.tcp_retransmit import TCP_RETRANSMIT
from ktel.schema import EventKind
from ktel.wire.codec import SCHEMA_VERSION, WireError
from ktel.wire.control import (
    ControlCommand,
    DeadLetter,
    Heartbeat,
    Redriven,
    dead_letter_fits,
    dead_letter_record,
    decode_command,
    decode_dead_letter,
    decode_dlq_record,
    decode_heartbeat,
    encode_command,
    encode_dead_letter,
    encode_heartbeat,
    encode_redriven,
)
from ktel.wire.raw import (
    PID_FIELDS,
    PID_INDEXES,
    RawBatch,
    decode_batch,
    encode_batch,
    event_dict,
    key_problem,
)
from ktel.wire.signals import (
    MAX_PROMETHEUS_BYTES,
    LogBatch,
    MetricSnapshot,
    SpanBatch,
    check_keyed,
    decode_logs,
    decode_snapshot,
    decode_spans,
    encode_logs,
    encode_signal,
    encode_snapshot,
    encode_spans,
    encoded_parts,
    log2_bounds,
    not_part_of,
    prometheus_size,
    row_bytes,
    rows_of,
    series_chars,
    series_size,
    with_rows,
)
from ktel.wire.topics import (
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

__all__ = [
    "CONTROL_TOPIC",
    "DEDUPED_TOPIC",
    "DLQ_TOPIC",
    "DNS_SLOW",
    "ENRICHED_TOPIC",
    "FILE_CREATED",
    "HEARTBEATS_TOPIC",
    "HISTOGRAM_DELTA",
    "HIST_SLOTS",
    "KINDS",
    "KTEL_LOG",
    "KTEL_METRIC",
    "KTEL_SPAN",
    "LOGS_TOPIC",
    "MAX_PROMETHEUS_BYTES",
    "METRICS_TOPIC",
    "OOM_KILL",
    "PID_FIELDS",
    "PID_INDEXES",
    "PROCESS_EXEC",
    "PROCESS_EXIT",
    "RAW_TOPIC",
    "SAMPLED_TOPIC",
    "SCHEMA_VERSION",
    "SKB_DROP",
    "SPANS_TOPIC",
    "TCP_RETRANSMIT",
    "ControlCommand",
    "DeadLetter",
    "EventKind",
    "Heartbeat",
    "LogBatch",
    "MetricSnapshot",
    "RawBatch",
    "Redriven",
    "SpanBatch",
    "WireError",
    "dead_letter_fits",
    "dead_letter_record",
    "decode_batch",
    "decode_command",
    "decode_dead_letter",
    "decode_dlq_record",
    "decode_heartbeat",
    "check_keyed",
    "decode_logs",
    "decode_snapshot",
    "decode_spans",
    "encode_batch",
    "encode_command",
    "encode_dead_letter",
    "encode_heartbeat",
    "encode_redriven",
    "encode_logs",
    "encode_signal",
    "encode_snapshot",
    "encode_spans",
    "encoded_parts",
    "event_dict",
    "key_problem",
    "log2_bounds",
    "not_part_of",
    "prometheus_size",
    "row_bytes",
    "rows_of",
    "series_chars",
    "series_size",
    "with_rows",
]
