"""OTLP exporter: ``ktel export otlp`` sends ``ktel.spans``, ``ktel.logs`` and
``ktel.metrics`` to an OTLP backend (an OpenTelemetry Collector, Jaeger, Tempo, ...)
over gRPC or HTTP/protobuf.

The sending is the OpenTelemetry SDK's own OTLP exporters; ktel builds what they
take from the wire records (the pure core below and exporters/otlp_spans.py):

- span row -> an OTLP span, built straight into the protobuf request
  (exporters/otlp_spans.py says why and how).
- log row -> ``ReadableLogRecord``: timestamp (also the observed time: the agent
  saw the event when it happened), severity number and text, body, attributes, and
  the trace and span ids when both are present; the batch's ``resource`` map is the
  resource.
- metric snapshot row -> a data point at the snapshot's ``ts``: ``counter`` -> a
  cumulative monotonic Sum, ``gauge`` -> a Gauge, ``histogram`` -> a cumulative
  explicit-bucket Histogram (the wire layout is OTLP's). The ``host.id`` label
  becomes the resource (one per host); the other labels are the point's attributes.
  Names are kept as on the wire. The wire has no series start time, so
  ``start_time_unix_nano`` is 0 (unknown, which OTLP allows).

Everything is under the instrumentation scope ``ktel``.

Delivery: records are converted and sent in requests of at most
``otlp.max_export_batch_size`` items. The SDK exporter retries transient errors
itself within its timeout, then returns FAILURE; ktel then retries the request with
the shared helper (``ktel/retry.py``) until the backend takes it, so the Kafka offset
(exporters/consume.py) is committed only once everything read is acknowledged.

Configuration: ``[otlp]`` in the config file (see OtlpConfig in ktel/config.py for
which OTEL_EXPORTER_OTLP_* variable each field stands for); an unset field is left
to the SDK, which reads the same environment variables as every OpenTelemetry SDK.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from importlib.metadata import version
from typing import Any

import grpc
from aiokafka import AIOKafkaProducer
from opentelemetry import trace
from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, TraceFlags
from prometheus_client import Counter

from exporters import consume, otlp_spans
from ktel import selfmetrics
from ktel.config import Config, OtlpConfig
from ktel.retry import retry
from ktel.wire import (
    LOGS_TOPIC,
    METRICS_TOPIC,
    SPANS_TOPIC,
    LogBatch,
    MetricSnapshot,
    SpanBatch,
    decode_logs,
    decode_snapshot,
    decode_spans,
)

log = logging.getLogger("ktel.export.otlp")

STAGE = "otlp"
GROUP = "ktel-export-otlp"
SCOPE = InstrumentationScope("ktel", version("ktel"))
SAMPLED = TraceFlags(TraceFlags.SAMPLED)
IN_FLIGHT = 2  # span or log requests awaiting the backend at once

ITEMS = Counter(
    "ktel_exporter_otlp_items", "spans, log records and data points the OTLP backend acknowledged", ["signal"]
)
FAILED = Counter(
    "ktel_exporter_otlp_failed_exports", "OTLP requests that failed and were retried", ["signal"]
)


# ------------------------------------------------------------------ pure core


class KtelResource(Resource):
    """A Resource that hashes once: the SDK's encoders look the resource of every
    log record and metric up in a dict, and Resource.__hash__ serialises all
    attributes to JSON."""

    def __init__(self, attributes: dict[str, Any]) -> None:
        super().__init__(attributes)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


def to_logs(rows: Sequence[tuple[Resource, Sequence[Any]]]) -> list[ReadableLogRecord]:
    """(resource, wire log row) pairs -> SDK log records."""
    out = []
    for resource, (ts, severity, severity_text, body, attrs, trace_id, span_id) in rows:
        context = None
        if trace_id and span_id:
            sc = SpanContext(int.from_bytes(trace_id, "big"), int.from_bytes(span_id, "big"), False, SAMPLED)
            context = trace.set_span_in_context(trace.NonRecordingSpan(sc))
        record = LogRecord(
            timestamp=ts,
            observed_timestamp=ts,
            context=context,
            severity_number=SeverityNumber(severity),
            severity_text=severity_text,
            body=body,
            attributes=attrs,
        )
        out.append(ReadableLogRecord(record, resource, SCOPE))
    return out


def to_metrics(rows: Sequence[tuple[int, Sequence[Any]]]) -> MetricsData:
    """(ts_ms, wire series row) pairs -> SDK MetricsData, one resource per host.id."""
    # host.id -> (name, type) -> points
    hosts: dict[Any, dict[tuple[str, str], list[Any]]] = {}
    for ts_ms, (name, typ, labels, value) in rows:
        attrs = dict(labels)
        host = attrs.pop("host.id", None)
        t = ts_ms * 1_000_000
        point: NumberDataPoint | HistogramDataPoint
        if typ == "histogram":
            # min and max are unknown (the wire does not carry them); None leaves them unset
            # in OTLP, which the SDK's types do not declare but its encoder handles.
            no_min_max: Any = None
            point = HistogramDataPoint(
                attrs,
                0,
                t,
                value["count"],
                value["sum"],
                value["counts"],
                value["bounds"],
                no_min_max,
                no_min_max,
            )
        else:
            point = NumberDataPoint(attrs, 0, t, value)
        hosts.setdefault(host, {}).setdefault((name, typ), []).append(point)
    resource_metrics = []
    for host, metrics in hosts.items():
        out = []
        for (name, typ), points in metrics.items():
            data: Sum | Gauge | Histogram
            if typ == "counter":
                data = Sum(points, AggregationTemporality.CUMULATIVE, is_monotonic=True)
            elif typ == "gauge":
                data = Gauge(points)
            else:
                data = Histogram(points, AggregationTemporality.CUMULATIVE)
            out.append(Metric(name, "", "", data))
        resource = KtelResource({} if host is None else {"host.id": host})
        resource_metrics.append(ResourceMetrics(resource, [ScopeMetrics(SCOPE, out, "")], ""))
    return MetricsData(resource_metrics)


# ------------------------------------------------------------------- exporters


def make_exporters(c: OtlpConfig) -> tuple[Any, Any, Any]:
    """The SDK's (span, metric, log) exporters for the configured protocol."""
    protocol = c.protocol or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        if c.compression == "deflate":
            raise ValueError("otlp.compression = 'deflate' is not available over grpc (use gzip)")
        creds = None
        if c.certificate_file or c.client_key_file or c.client_certificate_file:
            creds = grpc.ssl_channel_credentials(
                _read(c.certificate_file), _read(c.client_key_file), _read(c.client_certificate_file)
            )
        kw: dict[str, Any] = {
            "endpoint": c.endpoint,
            "insecure": c.insecure,
            "credentials": creds,
            "headers": c.headers,
            "timeout": c.timeout_seconds,
            "compression": None if c.compression is None else _GRPC_COMPRESSION[c.compression],
        }
        return otlp_spans.GrpcRequestExporter(**kw), OTLPMetricExporter(**kw), OTLPLogExporter(**kw)
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http import Compression
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLog
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetric

        def kwargs(path: str) -> dict[str, Any]:
            # Like OTEL_EXPORTER_OTLP_ENDPOINT: a base URL to which the signal's path is
            # appended (the SDK takes a constructor endpoint as the full URL).
            return {
                "endpoint": f"{c.endpoint.rstrip('/')}/{path}" if c.endpoint else None,
                "certificate_file": c.certificate_file,
                "client_key_file": c.client_key_file,
                "client_certificate_file": c.client_certificate_file,
                "headers": c.headers,
                "timeout": c.timeout_seconds,
                "compression": None if c.compression is None else Compression(c.compression),
            }

        return (
            otlp_spans.HttpRequestExporter(**kwargs("v1/traces")),
            HttpMetric(**kwargs("v1/metrics")),
            HttpLog(**kwargs("v1/logs")),
        )
    raise ValueError(f"OTLP protocol {protocol!r} is not supported (use grpc or http/protobuf)")


_GRPC_COMPRESSION = {"none": grpc.Compression.NoCompression, "gzip": grpc.Compression.Gzip}


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


class ExportFailed(Exception):
    pass


class Sender:
    """Sends converted chunks with the SDK exporters, retrying FAILURE until acknowledged."""

    def __init__(self, cfg: OtlpConfig, exporters: tuple[Any, Any, Any] | None = None) -> None:
        self.batch = cfg.max_export_batch_size
        self.spans, self.metrics, self.logs = exporters or make_exporters(cfg)

    async def deliver(self, items: list[Any], _producer: AIOKafkaProducer | None = None) -> None:
        spans: list[tuple[dict[str, Any], Sequence[Any]]] = []
        logs: list[tuple[Resource, Sequence[Any]]] = []
        points: list[tuple[int, Sequence[Any]]] = []
        for item in items:
            if isinstance(item, SpanBatch):
                spans += [(item.resource, row) for row in item.spans]
            elif isinstance(item, LogBatch):
                resource = KtelResource(item.resource)
                logs += [(resource, row) for row in item.logs]
            elif isinstance(item, MetricSnapshot):
                points += [(item.ts_ms, row) for row in item.series]
        # Spans and logs carry their own times and ids, so their requests may be in flight
        # together (one converts while another waits for the backend). A cumulative
        # metric's points must reach the backend in order: one request at a time.
        await asyncio.gather(
            self._send("spans", spans, _span_request, self.spans.export, IN_FLIGHT),
            self._send("logs", logs, to_logs, self.logs.export, IN_FLIGHT),
        )
        await self._send("metrics", points, to_metrics, self.metrics.export, 1)

    async def _send(
        self, signal: str, rows: list[Any], convert: Callable[[Any], Any], export: Any, in_flight: int
    ) -> None:
        slots = asyncio.Semaphore(in_flight)

        async def one(part: list[Any]) -> None:
            async with slots:
                # Converting and sending are CPU and blocking I/O: off the event loop, which
                # keeps the Kafka consumer polling meanwhile.
                data = await asyncio.to_thread(convert, part)

                async def attempt() -> None:
                    result = await asyncio.to_thread(export, data)
                    if result.name != "SUCCESS":
                        FAILED.labels(signal).inc()
                        raise ExportFailed(
                            f"the backend did not acknowledge {len(part)} {signal} ({result.name})"
                        )

                await retry(attempt, what=f"OTLP export of {len(part)} {signal}")
                ITEMS.labels(signal).inc(len(part))

        parts = [rows[i : i + self.batch] for i in range(0, len(rows), self.batch)]
        if in_flight == 1:
            for part in parts:
                await one(part)
        else:
            await asyncio.gather(*(one(part) for part in parts))

    def shutdown(self) -> None:
        for exporter in (self.spans, self.metrics, self.logs):
            exporter.shutdown()


def _span_request(rows: list[tuple[dict[str, Any], Sequence[Any]]]) -> Any:
    return otlp_spans.span_request(rows, SCOPE)


TOPICS = {SPANS_TOPIC: decode_spans, LOGS_TOPIC: decode_logs, METRICS_TOPIC: decode_snapshot}


async def run(cfg: Config, stop: asyncio.Event, *, group_id: str = GROUP) -> None:
    selfmetrics.serve(cfg.otlp.metrics_port)
    sender = Sender(cfg.otlp)
    try:
        await consume.run(
            kafka=cfg.kafka,
            group_id=group_id,
            stage=STAGE,
            topics=TOPICS,
            deliver=sender.deliver,
            stop=stop,
        )
    finally:
        sender.shutdown()
