"""OTLP exporter: ``ktel export otlp`` sends ``ktel.spans``, ``ktel.logs`` and
``ktel.metrics`` to an OTLP backend (an OpenTelemetry Collector, Jaeger, Tempo, ...)
over gRPC or HTTP/protobuf.

The connection is the OpenTelemetry SDK's own OTLP exporters' (channel or session,
TLS, headers, compression, timeouts, the OTEL_EXPORTER_OTLP_* variables); ktel
builds the requests from the wire records (the pure core below, the SDK's encoders
and exporters/otlp_spans.py):

- span row -> an OTLP span, built straight into the protobuf request
  (exporters/otlp_spans.py says why and how).
- log row -> ``ReadableLogRecord``: timestamp (also the observed time: the agent
  saw the event when it happened), severity number and text, body, attributes, and
  the trace and span ids when both are present; the batch's ``resource`` map is the
  resource.
- metric snapshot row -> a data point at the snapshot's ``ts``: ``counter`` -> a
  cumulative monotonic Sum, ``gauge`` -> a Gauge, ``histogram`` -> a cumulative
  ExponentialHistogram (scale 0, exactly the kernel's log2 buckets, exporters/log2.py)
  or, with ``otlp.histograms = "explicit"`` and for histograms with other bounds, an
  explicit-bucket Histogram (the wire layout is OTLP's). The ``host.id`` label
  becomes the resource (one per host); the other labels are the point's attributes.
  Names are kept as on the wire. The wire has no series start time, so
  ``start_time_unix_nano`` is 0 (unknown, which OTLP allows). A stale snapshot's
  points (its host forgotten: its series end there) are flagged as holding no
  recorded value, OTLP's equivalent of Prometheus' stale marker.

Everything is under the instrumentation scope ``ktel``, and every resource carries
``service.name`` and OTEL_RESOURCE_ATTRIBUTES (``service_attributes``), under the
host's own attributes.

Delivery (exporters/delivery.py has the rules): a span, log record or data point
whose timestamp is outside ``otlp.max_age_seconds`` / ``max_future_seconds`` of the
exporter's clock goes to ``ktel.dlq``, never to the backend, and so does a span whose
trace, span or parent id is all zeros (an id OTLP does not allow) or that ends before
it starts. The rest are converted
and sent in requests of at most ``otlp.max_export_batch_size`` items, one attempt at
a time through the SDK exporter's own gRPC channel or HTTP client (``send_once``),
and the answer is classified here. No answer at all (the backend unreachable, a
timeout) and the answers OTLP lets a sender retry (HTTP 429, 502, 503, 504; gRPC
UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, CANCELLED, OUT_OF_RANGE, DATA_LOSS, and
RESOURCE_EXHAUSTED whose status holds a RetryInfo) are retried with the shared
helper (``ktel/retry.py``) until the backend takes the request, each time after at
least the wait the backend asked for (OTLP/HTTP's Retry-After, OTLP/gRPC's RetryInfo),
up to ``ktel.retry.MAX_RETRY_AFTER_S``. Any other failed answer (a 400, 408, 413,
500, INVALID_ARGUMENT, INTERNAL, RESOURCE_EXHAUSTED without a RetryInfo, ...) says
the same request will fail again: it is never sent again as it was, but split in
halves and re-sent, down to single items, and an item refused alone goes to
``ktel.dlq`` with the backend's answer, as a wire record of just that item. The
SDK's ``export()`` is not used: it retries on its own (and gives up where a
Retry-After or RetryInfo asks for more than what is left of its timeout, 10 s by
default) and reports only SUCCESS or FAILURE, which says neither whether to retry
nor why. A backend that refuses ktel's credentials (HTTP 401/403, gRPC
UNAUTHENTICATED/PERMISSION_DENIED), that has no receiver at its URL (HTTP 404/405 or
a redirect, gRPC UNIMPLEMENTED) or that fails its TLS handshake is misconfigured, not
sent bad data: one line names the settings, and the request is retried, its items
kept, until the configuration is fixed (OTLP would have them dropped: no item is to
blame, and dead-lettering all of them until someone fixes a setting would empty the
pipeline into ``ktel.dlq``). A token in ``otlp.bearer_token_file`` is read for every
request, so fixing or rotating it takes effect without a restart. The Kafka offset
(exporters/consume.py) is committed only once everything read is acknowledged or
dead-lettered.

Configuration: ``[otlp]`` in the config file (see OtlpConfig in ktel/config.py for
which OTEL_EXPORTER_OTLP_* variable each field stands for); an unset field is left
to the SDK, which reads the same environment variables as every OpenTelemetry SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import grpc
import requests
from google.rpc.status_pb2 import Status as RpcStatus
from opentelemetry import trace
from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs as encode_log_request
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.grpc.exporter import OTLPExporterMixin
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import DataPointFlags
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Buckets,
    ExponentialHistogram,
    ExponentialHistogramDataPoint,
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
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.semconv._incubating.attributes.host_attributes import HOST_ID
from opentelemetry.semconv.attributes.service_attributes import SERVICE_NAME
from opentelemetry.trace import SpanContext, TraceFlags
from prometheus_client import Counter

from exporters import consume, otlp_spans
from exporters.consume import DeadLetterSink, Decoder, Delivery, Record
from exporters.delivery import (
    Misconfigured,
    Transient,
    Unauthorized,
    Window,
    bearer,
    grpc_answer,
    grpc_retry_after,
    http_answer,
    otlp_http_retried,
    retry_after,
    send_split,
    undecodable,
)
from exporters.log2 import ZERO_THRESHOLD, exponential
from ktel import selfmetrics
from ktel.config import (
    DEFLATE_OVER_GRPC,
    OTLP_PROTOCOLS,
    Config,
    ConfigError,
    OtlpConfig,
    check_readable,
    otlp_endpoint_problem,
)
from ktel.retry import Permanent
from ktel.wire import (
    LogBatch,
    MetricSnapshot,
    SpanBatch,
    decode_logs,
    decode_snapshot,
    decode_spans,
    encode_logs,
    encode_snapshot,
    encode_spans,
)

log = logging.getLogger("ktel.export.otlp")

STAGE = "otlp"
GROUP = "export-otlp"  # the consumer group, under kafka.prefix (Topics.group)
SCOPE = InstrumentationScope("ktel", version("ktel"))
SAMPLED = TraceFlags(TraceFlags.SAMPLED)
# What an OTLP number data point holds as an int (as_int is an sfixed64); a wire int
# past it (msgpack's go to 2^64 - 1) goes as a double.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
IN_FLIGHT = 2  # span or log requests awaiting the backend at once
NO_RECORDED_VALUE = DataPointFlags.DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK
# OTLP's invalid ids: all zeros (the wire takes any 16 and 8 bytes; a root span's parent is b"").
ZERO_TRACE_ID, ZERO_SPAN_ID = bytes(16), bytes(8)

ITEMS = Counter(
    "ktel_exporter_otlp_items", "spans, log records and data points the OTLP backend acknowledged", ["signal"]
)
REJECTED = Counter(
    "ktel_exporter_otlp_rejected_items",
    "spans, log records and data points an OTLP backend's success said it rejected (a partial "
    "success: it names none, and OTLP forbids sending them again)",
    ["signal"],
)
FAILED = Counter(
    "ktel_exporter_otlp_failed_exports",
    "OTLP requests that failed (retried, or refused and split)",
    ["signal"],
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
        # A span id is only meaningful within its trace: with no trace id (empty or all
        # zeros, OTLP's "none") the log goes out with neither.
        if trace_id and span_id and trace_id != ZERO_TRACE_ID:
            sc = SpanContext(int.from_bytes(trace_id, "big"), int.from_bytes(span_id, "big"), False, SAMPLED)
            context = trace.set_span_in_context(trace.NonRecordingSpan(sc))
        record = LogRecord(
            timestamp=ts,
            observed_timestamp=ts,
            context=context,
            severity_number=SeverityNumber(severity),
            severity_text=severity_text,
            body=body,
            attributes=otlp_spans.carried(attrs),
        )
        out.append(ReadableLogRecord(record, resource, SCOPE))
    return out


def service_attributes(name: str) -> dict[str, Any]:
    """What every resource ktel sends carries: ``service.name`` (the ``service.name``
    setting) and OTEL_RESOURCE_ATTRIBUTES. OTEL_SERVICE_NAME, then a service.name in
    OTEL_RESOURCE_ATTRIBUTES, win over the setting: they are how any OpenTelemetry
    process is named by what deploys it."""
    return dict(Resource({SERVICE_NAME: name}).merge(OTELResourceDetector().detect()).attributes)


def to_metrics(
    rows: Sequence[tuple[int, Sequence[Any]] | tuple[int, Sequence[Any], bool]],
    histograms: str = "exponential",
    service: dict[str, Any] | None = None,
) -> MetricsData:
    """(ts_ms, wire series row) pairs -> SDK MetricsData, one resource per host.id,
    each with the ``service`` attributes too. A third item, True, says a row is a stale
    snapshot's (``metric_request`` flags its point).
    ``histograms``: ``"exponential"`` or ``"explicit"`` (OtlpConfig.histograms)."""
    return _to_metrics(rows, histograms, service)[0]


def _to_metrics(
    rows: Sequence[tuple[int, Sequence[Any]] | tuple[int, Sequence[Any], bool]],
    histograms: str,
    service: dict[str, Any] | None,
) -> tuple[MetricsData, list[list[bool]]]:
    """``to_metrics``, and for each metric whether each of its points is a stale
    snapshot's (a third item, True), in the order of the request the SDK's encoder makes
    of them (resource by resource, metric by metric, point by point). A series' points
    stay in one metric in the order of the rows: a stale snapshot's end of a series
    comes before a later snapshot's restart of it, as the series' points were sent."""
    # host.id -> (name, type, unit) -> (points, whether each is a stale snapshot's)
    hosts: dict[Any, dict[tuple[str, str, str], tuple[list[Any], list[bool]]]] = {}
    for ts_ms, (name, typ, labels, value), *stale in rows:
        # (a label of an empty name, which the wire's maps take and OTLP does not as a key,
        # left out and counted: the SDK's encoder sent it)
        attrs = dict(otlp_spans.carried(labels))
        # A series without host.id is under the service's (OTEL_RESOURCE_ATTRIBUTES may
        # set one): grouped apart from that host's series, its resource was equal to
        # theirs, and the SDK's encoder, which keeps one group per resource, sent only one
        # of the two, the other counted as acknowledged.
        host = attrs.pop(HOST_ID, None)
        if host is None and service:
            host = service.get(HOST_ID)
        t = ts_ms * 1_000_000
        unit = ""
        # min and max are unknown (the wire does not carry them); None leaves them unset
        # in OTLP, which the SDK's types do not declare but its encoder handles.
        no_min_max: Any = None
        point: NumberDataPoint | HistogramDataPoint | ExponentialHistogramDataPoint
        if typ == "histogram":
            exp = exponential(name, value) if histograms == "exponential" else None
            if exp is not None:
                name, unit, typ = exp.name, exp.unit, "exponential"
                point = ExponentialHistogramDataPoint(
                    attrs,
                    0,
                    t,
                    exp.count,
                    exp.sum,
                    0,  # scale 0: bucket k is (2^k, 2^(k+1)]
                    exp.zero_count,
                    Buckets(exp.offset, exp.counts),
                    Buckets(0, []),
                    0,
                    no_min_max,
                    no_min_max,
                )
            else:
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
            point = NumberDataPoint(
                attrs,
                0,
                t,
                value if type(value) is float or INT64_MIN <= value <= INT64_MAX else float(value),
            )
        points, flags = hosts.setdefault(host, {}).setdefault((name, typ, unit), ([], []))
        points.append(point)
        flags.append(bool(stale and stale[0]))
    resource_metrics = []
    ends = []
    for host, metrics in hosts.items():
        out = []
        for (name, typ, unit), (points, flags) in metrics.items():
            data: Sum | Gauge | Histogram | ExponentialHistogram
            if typ == "counter":
                data = Sum(points, AggregationTemporality.CUMULATIVE, is_monotonic=True)
            elif typ == "gauge":
                data = Gauge(points)
            elif typ == "exponential":
                data = ExponentialHistogram(points, AggregationTemporality.CUMULATIVE)
            else:
                data = Histogram(points, AggregationTemporality.CUMULATIVE)
            out.append(Metric(name, "", unit, data))
            ends.append(flags)
        resource = KtelResource({**(service or {}), **({} if host is None else {HOST_ID: host})})
        resource_metrics.append(ResourceMetrics(resource, [ScopeMetrics(SCOPE, out, "")], ""))
    return MetricsData(resource_metrics), ends


def metric_request(
    rows: Sequence[tuple[int, Sequence[Any]] | tuple[int, Sequence[Any], bool]],
    histograms: str = "exponential",
    service: dict[str, Any] | None = None,
) -> Any:
    """The OTLP request of these points (``to_metrics``: a third item True, a stale
    snapshot's). The SDK's encoder leaves an exponential histogram's zero threshold at 0
    (the zero bucket then holds zeros only): ktel's holds the kernel's slot 0, [0, 2)
    (exporters/log2.py). Nor do its points carry flags: a stale snapshot's are flagged
    here as holding no recorded value, OTLP's end of a series (Prometheus' stale
    marker, which the remote-write exporter sends for them)."""
    data, ends = _to_metrics(rows, histograms, service)
    request = encode_metrics(data)
    ended = iter(ends)
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                kind = metric.WhichOneof("data")
                if kind == "exponential_histogram":
                    for p in metric.exponential_histogram.data_points:
                        p.zero_threshold = ZERO_THRESHOLD
                for p, end in zip(getattr(metric, kind).data_points, next(ended), strict=True):
                    if end:
                        p.flags = NO_RECORDED_VALUE
    return request


# ------------------------------------------------------------------- exporters


def make_exporters(c: OtlpConfig) -> tuple[Any, Any, Any]:
    """The SDK's (span, metric, log) exporters for the configured protocol."""
    protocol = c.protocol or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    # (The config refused what neither protocol takes: with otlp.protocol unset, which one
    # this is was known only now.)
    if (
        c.endpoint is not None
        and protocol in OTLP_PROTOCOLS
        and (why := otlp_endpoint_problem(c.endpoint, protocol))
    ):
        where = "otlp.protocol" if c.protocol else "OTEL_EXPORTER_OTLP_PROTOCOL, otlp.protocol unset"
        if not c.protocol and "OTEL_EXPORTER_OTLP_PROTOCOL" not in os.environ:
            where = "the default, otlp.protocol and OTEL_EXPORTER_OTLP_PROTOCOL unset"
        raise ConfigError(f"otlp.endpoint = {c.endpoint!r} cannot be used over {protocol} ({where}): {why}")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        if c.compression == "deflate":
            raise ConfigError(DEFLATE_OVER_GRPC)
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
        return OTLPSpanExporter(**kw), OTLPMetricExporter(**kw), OTLPLogExporter(**kw)
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http import Compression
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLog
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetric
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpan

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
                "session": Session(c.bearer_token_file),
            }

        return (
            HttpSpan(**kwargs("v1/traces")),
            HttpMetric(**kwargs("v1/metrics")),
            HttpLog(**kwargs("v1/logs")),
        )
    raise ConfigError(
        f"OTLP protocol {protocol!r} (OTEL_EXPORTER_OTLP_PROTOCOL) is not supported: "
        "use grpc or http/protobuf"
    )


class Session(requests.Session):
    """The OTLP/HTTP exporters' requests session. Its CA file (the SDK sets it as
    ``verify`` from otlp.certificate_file or OTEL_EXPORTER_OTLP_CERTIFICATE) is used:
    requests lets REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE, set on many hosts, replace a
    session's own (psf/requests#3829), and the backend's certificate would then fail
    verification. Each request carries the token of ``token_file`` as it is then. An
    answer whose body is not in its Content-Encoding is given with the error (``send``)."""

    def __init__(self, token_file: Path | None = None) -> None:
        super().__init__()
        self.token_file = token_file

    def prepare_request(self, request: requests.Request) -> requests.PreparedRequest:
        prepared = super().prepare_request(request)
        if self.token_file is not None:
            prepared.headers["Authorization"] = authorization(self.token_file)
        return prepared

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> Any:
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if isinstance(self.verify, str):
            settings["verify"] = self.verify
        return settings

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        # The body is read here, as requests' own send reads it, to keep the answer when
        # it is not in its Content-Encoding: requests' error lost it, the SDK's transport
        # took the attempt for one that got no answer, and a request the backend had
        # taken, a 2xx, was sent again for ever. send_once classifies it by its status.
        streamed = kwargs.pop("stream", self.stream)
        response = super().send(request, stream=True, **kwargs)
        if not streamed:
            try:
                response.content  # noqa: B018 -- read, as requests' send reads it
            except requests.exceptions.ContentDecodingError as err:
                response.close()  # its rest unread: the connection is not used again
                err.response = response
                raise
        return response


_GRPC_COMPRESSION = {"none": grpc.Compression.NoCompression, "gzip": grpc.Compression.Gzip}


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def authorization(token_file: Path) -> str:
    """The Authorization header of the token in ``token_file``, read now."""
    return bearer(token_file, "otlp.bearer_token_file")


def send_once(exporter: Any, request: Any, token_file: Path | None = None) -> tuple[int, str]:
    """One attempt to send an OTLP request through an SDK exporter's own gRPC channel or
    HTTP client (opentelemetry-exporter-otlp-proto-* 1.45.2, pinned in pyproject.toml);
    raises Transient or Permanent as exporters/delivery.py classifies the answer, and
    returns what a success says it rejected (``partial_success``).
    ``token_file``: the bearer token sent over gRPC (the HTTP exporters' Session sends it)."""
    if isinstance(exporter, OTLPExporterMixin):
        channel: Any = exporter._channel  # set by the exporter's constructor
        metadata: Any = exporter._headers  # pairs, once the constructor parsed them
        if token_file is not None:
            # The file's token replaces one from OTEL_EXPORTER_OTLP_HEADERS.
            metadata = (
                *((k, v) for k, v in metadata if k.lower() != "authorization"),
                ("authorization", authorization(token_file)),
            )
        # The call of the exporter's stub (exporter._client), on its channel (set by its
        # constructor: TLS, compression, options), but keeping the answer's message as
        # bytes: the stub fails an OK whose message is not the response OTLP defines with an
        # INTERNAL of its own, a refusal, and a request the backend took was split, sent
        # again and dead-lettered. An OK is a success whatever its message holds.
        export = channel.unary_unary(
            _export_method(request), request_serializer=type(request).SerializeToString
        )
        try:
            body = export(request, metadata=metadata, timeout=exporter._timeout)
        except grpc.RpcError as err:
            grpc_answer(err.code(), err.details(), grpc_retry_after(err))
        return partial_success(_response(request, body))
    client = exporter._client
    result = client._submit(client._compress(request.SerializePartialToString()), client._timeout)
    error = result.error
    if isinstance(error, requests.exceptions.ContentDecodingError) and error.response is not None:
        # An answer whose body is not in its Content-Encoding (Session.send): what its
        # status says, a 2xx a success that says nothing more.
        answer = error.response
        encoding = answer.headers.get("content-encoding")
        wait = retry_after(answer.headers.get("retry-after"))
        http_answer(answer.status_code, undecodable(encoding, error), wait, retried=otlp_http_retried)
        return partial_success(None)
    if result.status_code is None:
        if isinstance(error, Unauthorized):  # the token file, unreadable (Session)
            raise error
        raise Transient(f"no answer from {client._endpoint}: {error}")
    http_answer(result.status_code, _http_message(result), _retry_after(result), retried=otlp_http_retried)
    return partial_success(_response(request, result.content()))


def _export_method(request: Any) -> str:
    """The gRPC method of a request, as its generated stub names it: its service's
    Export (``/opentelemetry.proto.collector.trace.v1.TraceService/Export``)."""
    [service] = request.DESCRIPTOR.file.services_by_name.values()
    return f"/{service.full_name}/Export"


def _response(request: Any, body: bytes) -> Any:
    """The response a success to ``request`` holds in ``body`` (its HTTP body, its gRPC
    message), or None: one that is not the response OTLP defines (a proxy's) says nothing."""
    try:
        return RESPONSES[type(request)].FromString(body)
    except Exception:  # noqa: BLE001 -- not the response OTLP defines (a proxy's body): nothing said
        return None


# Each request's response, which a success may carry a partial success in.
RESPONSES: dict[type, Any] = {
    ExportTraceServiceRequest: ExportTraceServiceResponse,
    ExportLogsServiceRequest: ExportLogsServiceResponse,
    ExportMetricsServiceRequest: ExportMetricsServiceResponse,
}
REJECTED_FIELDS = ("rejected_spans", "rejected_log_records", "rejected_data_points")


def partial_success(response: Any) -> tuple[int, str]:
    """The items an OTLP success says the backend rejected, and its message (either may
    be 0 or empty: a message alone is a warning). The backend names no item, and the
    OTLP spec forbids sending the request again: they are counted and logged."""
    if response is None or not response.HasField("partial_success"):
        return 0, ""
    ps = response.partial_success
    rejected = next(getattr(ps, f) for f in REJECTED_FIELDS if hasattr(ps, f))
    return int(rejected), ps.error_message


def _retry_after(result: Any) -> float | None:
    """The wait an OTLP/HTTP answer's Retry-After header asks for, or None."""
    try:
        headers = result.headers()
    except Exception:  # noqa: BLE001 -- the SDK's transports may raise for malformed headers: none said
        return None
    return retry_after(headers.get("retry-after"))


def _http_message(result: Any) -> str:
    """The message of an OTLP/HTTP error answer: a ``google.rpc.Status`` in the
    request's encoding (protobuf), or whatever text a proxy in between sent."""
    body = result.content()
    try:
        message = RpcStatus.FromString(body).message
    except Exception:  # noqa: BLE001 -- not a Status: the body is the message
        message = ""
    return message or body.decode("utf-8", "replace")


# What a signal's item is, for the counters and the dead letters.
ITEM_NAMES = {"spans": "spans", "logs": "log records", "metrics": "data points"}


class Sender:
    """Sends converted chunks through the SDK exporters' connections, one attempt at a
    time, with delivery.send_split deciding what is retried, split or dead-lettered."""

    def __init__(
        self,
        cfg: OtlpConfig,
        exporters: tuple[Any, Any, Any] | None = None,
        service: dict[str, Any] | None = None,
    ) -> None:
        """``service``: what every resource carries besides the host's (service_attributes)."""
        self.service = service or {}
        self.batch = cfg.max_export_batch_size
        self.histograms = cfg.histograms
        self.window = Window(cfg.max_age_seconds, cfg.max_future_seconds, "otlp")
        self.spans, self.metrics, self.logs = exporters or make_exporters(cfg)
        self.token_file = cfg.bearer_token_file
        endpoint = cfg.endpoint or "the endpoint of OTEL_EXPORTER_OTLP_ENDPOINT"
        self.backend = f"OTLP export to {endpoint}"
        credentials = "otlp.headers (or OTEL_EXPORTER_OTLP_HEADERS)"
        if cfg.bearer_token_file is not None:
            credentials = f"the token in otlp.bearer_token_file ({cfg.bearer_token_file})"
        self.misconfigured = Misconfigured(
            log,
            self.backend,
            credentials=credentials,
            receiver="otlp.endpoint and otlp.protocol (or OTEL_EXPORTER_OTLP_ENDPOINT and _PROTOCOL)",
            tls="otlp.certificate_file, client_certificate_file, client_key_file and endpoint "
            "(or their OTEL_EXPORTER_OTLP_* variables)",
        )

    async def deliver(self, records: list[Record], producer: DeadLetterSink) -> None:
        # Each item with the record it came from: (record, what its converter takes).
        spans: list[tuple[Record, tuple[dict[str, Any], Sequence[Any]]]] = []
        logs: list[tuple[Record, tuple[dict[str, Any], Sequence[Any]]]] = []
        points: list[tuple[Record, tuple[int, Sequence[Any], bool]]] = []
        now = time.time_ns()
        problem = self.window.problem
        for rec in records:
            item = rec.item
            if isinstance(item, SpanBatch):
                late = []
                span_resource = {**self.service, **item.resource}  # one object: one ResourceSpans
                for row in item.spans:
                    why = problem(row[4], now) or problem(row[5], now) or _span_problem(row)
                    if why is None:
                        spans.append((rec, (span_resource, row)))
                    else:
                        late.append((row, why))
                if late:
                    payload = encode_spans(SpanBatch(item.resource, [row for row, _ in late]))
                    await self._refuse(producer, rec, "spans", [why for _, why in late], payload)
            elif isinstance(item, LogBatch):
                resource = {**self.service, **item.resource}  # one object: one resource a request
                late = []
                for row in item.logs:
                    why = problem(row[0], now)
                    if why is None:
                        logs.append((rec, (resource, row)))
                    else:
                        late.append((row, why))
                if late:
                    payload = encode_logs(LogBatch(item.resource, [row for row, _ in late]))
                    await self._refuse(producer, rec, "logs", [why for _, why in late], payload)
            elif isinstance(item, MetricSnapshot):
                why = problem(item.ts_ms * 1_000_000, now)
                if why is None:
                    points += [(rec, (item.ts_ms, row, item.stale)) for row in item.series]
                elif item.series:  # (a snapshot of no series, stale or not, holds nothing to refuse)
                    await self._refuse(producer, rec, "metrics", [why] * len(item.series), None)
        # Spans and logs carry their own times and ids, so their requests may be in flight
        # together (one converts while another waits for the backend). A cumulative
        # metric's points must reach the backend in order: one request at a time.
        await _together(
            self._send("spans", spans, _span_request, self.spans, IN_FLIGHT, producer),
            self._send("logs", logs, _log_request, self.logs, IN_FLIGHT, producer),
        )
        request = functools.partial(metric_request, histograms=self.histograms, service=self.service)
        await self._send("metrics", points, request, self.metrics, 1, producer)

    async def _refuse(
        self, producer: DeadLetterSink, rec: Record, signal: str, reasons: list[str], payload: bytes | None
    ) -> None:
        reason = (
            reasons[0]
            if len(reasons) == 1
            else f"{len(reasons)} {ITEM_NAMES[signal]}, the first: {reasons[0]}"
        )
        await consume.refuse(producer, STAGE, rec, reason, signal=signal, items=len(reasons), payload=payload)

    async def _send(
        self,
        signal: str,
        rows: list[tuple[Record, Any]],
        convert: Callable[[list[Any]], Any],
        exporter: Any,
        in_flight: int,
        producer: DeadLetterSink,
    ) -> None:
        slots = asyncio.Semaphore(in_flight)

        async def send(part: Sequence[tuple[Record, Any]]) -> None:
            # Converting and sending are CPU and blocking I/O: off the event loop, which
            # keeps the Kafka consumer polling meanwhile.
            try:
                request, left_out = await asyncio.to_thread(
                    otlp_spans.converted, convert, [row for _, row in part]
                )
            except Exception as err:
                # The same items fail the same way every time: a refusal (split down to
                # the item to blame, which is dead-lettered), never a retry for ever.
                raise Permanent(f"cannot be put in an OTLP request: {type(err).__name__}: {err}") from None
            try:
                rejected, why = await asyncio.to_thread(send_once, exporter, request, self.token_file)
            except Exception as err:
                FAILED.labels(signal).inc()
                self.misconfigured.failed(err)  # refused credentials, no receiver, TLS: one line
                raise
            self.misconfigured.succeeded()
            rejected = min(max(rejected, 0), len(part))  # (an int64 from the backend)
            if rejected or why:
                log.warning(
                    "OTLP backend took %d of %d %s, rejected %d: %s",
                    len(part) - rejected,
                    len(part),
                    ITEM_NAMES[signal],
                    rejected,
                    why[:500] or "(no reason given)",
                )
                REJECTED.labels(signal).inc(rejected)
            ITEMS.labels(signal).inc(len(part) - rejected)
            otlp_spans.DROPPED_ATTRIBUTES.inc(left_out)
            consume.observe_acknowledged(STAGE, _oldest_per_record(signal, part))

        async def refused(entry: tuple[Record, Any], reason: str) -> None:
            rec, (_, row, *_) = entry
            item = rec.item
            if signal == "spans":
                payload = encode_spans(SpanBatch(item.resource, [row]))
            elif signal == "logs":
                payload = encode_logs(LogBatch(item.resource, [row]))
            else:
                # (stale too, if its snapshot is: replayed, it must end its series, not
                # give them their last values again)
                payload = encode_snapshot(dataclasses.replace(item, series=[row]))
            await consume.refuse(producer, STAGE, rec, reason, signal=signal, items=1, payload=payload)

        async def one(part: list[tuple[Record, Any]]) -> None:
            async with slots:
                await send_split(part, send, refused, what=f"OTLP export of {len(part)} {ITEM_NAMES[signal]}")

        parts = [rows[i : i + self.batch] for i in range(0, len(rows), self.batch)]
        if in_flight == 1:
            for part in parts:
                await one(part)
        else:
            await _together(*(one(part) for part in parts))

    def shutdown(self) -> None:
        for exporter in (self.spans, self.metrics, self.logs):
            exporter.shutdown()


async def _together(*sends: Awaitable[None]) -> None:
    """Await ``sends`` concurrently. The first to fail fails the delivery: the others are
    cancelled, and awaited, before its error is raised as it was (not in an
    ExceptionGroup, as asyncio.TaskGroup would: ``ktel dlq --redrive`` tells an
    AskedPastDeadline by its type). asyncio.gather left them running after it raised,
    while the caller took the delivery for failed (the exporter ends, to read the records
    again; ``--redrive`` ends, exit 2): they went on retrying, and dead-lettered what the
    backend refused, which the records read again dead-letter a second time.

    A send in a thread (``send_once``) cannot be cancelled: its task ends at once, but the
    thread goes on until the backend answers or ``otlp.timeout_seconds`` passes, and the
    request may reach the backend and be stored; nothing acts on its answer (no retry,
    split, dead letter or count): a duplicate at most, as at-least-once allows of any
    request whose answer was not seen. The process's exit still waits for that thread
    (asyncio.run joins its executor). A dead letter whose send to Kafka is cancelled may
    be written all the same."""
    tasks = [asyncio.ensure_future(send) for send in sends]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        # (cancelled ourselves, gather cancelled them and waited: this finds them done)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _span_problem(span: Sequence[Any]) -> str | None:
    """Why a wire span is not one to send, or None: an id OTLP does not allow (a backend
    would take a trace id of zeros as one trace, every such span in it, and a parent of
    zeros as a parent no span has; the agent writes none: a span id of 0 is refused, a
    parent of 0 is a root's b""), or an end before its start (a backend that takes the
    duration as an unsigned number makes it centuries long)."""
    trace_id, span_id, parent_id, start, end = span[0], span[1], span[2], span[4], span[5]
    if trace_id == ZERO_TRACE_ID or span_id == ZERO_SPAN_ID or parent_id == ZERO_SPAN_ID:
        which = "trace" if trace_id == ZERO_TRACE_ID else "span" if span_id == ZERO_SPAN_ID else "parent span"
        return f"a {which} id of all zeros, which OTLP does not allow"
    if end < start:
        return f"it ends {start - end} ns before it starts"
    return None


def _oldest_per_record(signal: str, part: Sequence[tuple[Record, Any]]) -> Iterable[int]:
    """The oldest timestamp (ns) of each record's items in ``part``: a span's end, a
    log record's time, a data point's snapshot time."""
    oldest: dict[tuple[str, int, int], int] = {}
    for rec, (first, row, *_) in part:
        if signal == "spans":
            ts = row[5]
        elif signal == "logs":
            ts = row[0]
        else:
            ts = first * 1_000_000
        key = (rec.topic, rec.partition, rec.offset)
        oldest[key] = min(ts, oldest.get(key, ts))
    return oldest.values()


def _span_request(rows: list[tuple[dict[str, Any], Sequence[Any]]]) -> Any:
    return otlp_spans.span_request(rows, SCOPE)


def _log_request(rows: list[tuple[dict[str, Any], Sequence[Any]]]) -> Any:
    # A batch's resource is made here, inside ``converted``, once a request: what it leaves
    # out is counted when the backend takes the request, not when the batch is read (it
    # may be dead-lettered whole, or read again after a restart).
    made: dict[int, KtelResource] = {}

    def resource(attrs: dict[str, Any]) -> KtelResource:
        if (r := made.get(id(attrs))) is None:
            r = made[id(attrs)] = KtelResource(otlp_spans.carried(attrs))
        return r

    return encode_log_request(to_logs([(resource(attrs), row) for attrs, row in rows]))


def topics(cfg: Config) -> dict[str, Decoder]:
    """The topics the exporter reads, each with its records' decoder."""
    names = cfg.kafka.topics
    return {names.spans: decode_spans, names.logs: decode_logs, names.metrics: decode_snapshot}


@contextlib.asynccontextmanager
async def delivery(cfg: Config) -> AsyncIterator[Delivery]:
    """``Sender.deliver`` to the configured backend: the exporter's, and ``ktel dlq
    --redrive``'s for the exporter's dead letters."""
    check_readable("otlp", cfg.otlp, cfg.otlp.FILES)
    sender = Sender(cfg.otlp, service=service_attributes(cfg.service.name))
    try:
        yield Delivery(sender.deliver, sender.backend)
    finally:
        sender.shutdown()


async def run(cfg: Config, stop: asyncio.Event, *, group_id: str | None = None) -> None:
    """``group_id``: the consumer group, if not ktel-export-otlp (under kafka.prefix)."""
    for signal in ITEM_NAMES:  # as 0 from the start (exporters/consume.py: run)
        for counter in (ITEMS, REJECTED, FAILED):
            counter.labels(signal)
    async with delivery(cfg) as to_backend:
        selfmetrics.serve(cfg.otlp.metrics_port, cfg.service.metrics_bind, "otlp.metrics_port")
        await consume.run(
            kafka=cfg.kafka,
            group_id=group_id or cfg.kafka.topics.group(GROUP),
            stage=STAGE,
            topics=topics(cfg),
            deliver=to_backend.deliver,
            stop=stop,
        )
