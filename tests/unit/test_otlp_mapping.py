"""Wire records -> OTLP: spans by ktel's request builder, checked against the SDK's own
encoder; logs and metrics through the SDK's encoders (what its exporters send)."""

import asyncio
import contextlib
import logging
import math
import threading
import time

import grpc
import pytest
import requests
from google.rpc.status_pb2 import Status as RpcStatus
from opentelemetry import trace as sdk_trace
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext, TraceFlags
from prometheus_client import REGISTRY

from exporters import otlp, otlp_spans
from exporters.consume import Record
from exporters.delivery import Transient, Unauthorized
from exporters.log2 import ZERO_THRESHOLD
from ktel import retry as retry_mod
from ktel import wire
from ktel.config import OtlpConfig
from ktel.retry import AskedPastDeadline, Permanent
from ktel.wire import HIST_SLOTS, LogBatch, MetricSnapshot, SpanBatch, decode_logs, decode_spans, log2_bounds
from ktel.wire import encode_logs as wire_logs
from ktel.wire import encode_spans as wire_spans
from tests.unit import new_host
from tests.unit.otlp_grpc import Channel

TRACE = bytes(range(16))
ROOT, CHILD = b"\x01" * 8, b"\x02" * 8
RESOURCE = {"host.id": "h1", "host.name": "node-1"}


def attrs(kvs: list[KeyValue]) -> dict:
    def value(v: AnyValue):
        kind = v.WhichOneof("value")
        if kind == "array_value":
            return [value(x) for x in v.array_value.values]
        return getattr(v, kind)

    return {kv.key: value(kv.value) for kv in kvs}


def sdk_spans(rows: list[tuple[otlp.Resource, list]]) -> list[ReadableSpan]:
    """The same rows as the SDK's own spans: what ktel's request must equal."""
    sampled = TraceFlags(TraceFlags.SAMPLED)
    out = []
    for resource, (trace_id, span_id, parent_id, name, start, end, status, message, attributes) in rows:
        tid = int.from_bytes(trace_id, "big")
        parent = SpanContext(tid, int.from_bytes(parent_id, "big"), False, sampled) if parent_id else None
        out.append(
            ReadableSpan(
                name=name,
                context=SpanContext(tid, int.from_bytes(span_id, "big"), False, sampled),
                parent=parent,
                resource=resource,
                attributes=attributes,
                status=sdk_trace.Status(sdk_trace.StatusCode(status), message if status == 2 else None),
                start_time=start,
                end_time=end,
                instrumentation_scope=otlp.SCOPE,
            )
        )
    return out


def test_spans_keep_ids_parents_status_attributes_and_resource():
    batch = SpanBatch(
        RESOURCE,
        [
            [TRACE, ROOT, b"", "syscall", 1000, 5000, 1, "", {"pid": 7, "comm": "touch"}],
            [TRACE, CHILD, ROOT, "vfs_open", 2000, 3000, 2, "ENOENT", {"path": "/x", "flags": [1, 2]}],
            [TRACE, b"\x03" * 8, ROOT, "unset", 2000, 2500, 0, "ignored", {"pid": True, "z": -0.0}],
            [TRACE, b"\x04" * 8, ROOT, "after", 2500, 2600, 0, "", {"pid": 1, "z": 0.0}],
        ],
    )
    batch = decode_spans(wire_spans(batch))  # exactly what the exporter reads from Kafka
    req = otlp_spans.span_request([(batch.resource, row) for row in batch.spans], otlp.SCOPE)
    [rs] = req.resource_spans
    assert attrs(rs.resource.attributes) == RESOURCE
    [ss] = rs.scope_spans
    assert (ss.scope.name, ss.scope.version) == ("ktel", otlp.SCOPE.version)
    root, child, unset, after = ss.spans
    assert (root.trace_id, root.span_id, root.parent_span_id) == (TRACE, ROOT, b"")
    assert (child.trace_id, child.span_id, child.parent_span_id) == (TRACE, CHILD, ROOT)
    assert (root.name, root.start_time_unix_nano, root.end_time_unix_nano) == ("syscall", 1000, 5000)
    assert (root.status.code, root.status.message) == (Status.STATUS_CODE_OK, "")
    assert (child.status.code, child.status.message) == (Status.STATUS_CODE_ERROR, "ENOENT")
    assert (unset.status.code, unset.status.message) == (Status.STATUS_CODE_UNSET, "")
    assert attrs(root.attributes) == {"pid": 7, "comm": "touch"}
    assert attrs(child.attributes) == {"path": "/x", "flags": [1, 2]}
    # True and 1, -0.0 and 0.0 are different values (the encoded-attribute cache keeps them apart).
    u, a = attrs(unset.attributes), attrs(after.attributes)
    assert [kv.value.WhichOneof("value") for kv in unset.attributes] == ["bool_value", "double_value"]
    assert [kv.value.WhichOneof("value") for kv in after.attributes] == ["int_value", "double_value"]
    assert (u["pid"], math.copysign(1, u["z"])) == (True, -1.0)
    assert (a["pid"], math.copysign(1, a["z"])) == (1, 1.0)
    resource = otlp.Resource(batch.resource)
    assert req == encode_spans(sdk_spans([(resource, row) for row in batch.spans]))


def test_span_request_merges_equal_resources_as_the_sdk_does():
    host_a = [
        {"host.id": "a", "process.pid": 1},
        {"process.pid": 1, "host.id": "a"},
    ]  # two batches, one resource
    rows = [
        (res, [TRACE, bytes([i + 1]) * 8, b"", f"s{i}", i, i + 1, 0, "", {"n": i}])
        for i, res in enumerate(host_a + [{"host.id": "b"}])
    ]
    req = otlp_spans.span_request(rows, otlp.SCOPE)
    assert [[s.name for s in rs.scope_spans[0].spans] for rs in req.resource_spans] == [["s0", "s1"], ["s2"]]
    sdk_rows = [(otlp.Resource(res), row) for res, row in rows]
    assert req == encode_spans(sdk_spans(sdk_rows))


def test_an_attribute_otlp_cannot_carry_is_left_out_and_counted():
    dropped = REGISTRY.get_sample_value("ktel_exporter_otlp_dropped_attributes_total") or 0.0
    # (OTLP requires a key to be non-empty; the wire's maps take one)
    row = [TRACE, ROOT, b"", "s", 1, 2, 0, "", {"addr": 2**64 - 1, 7: "x", "": "y", "comm": "touch"}]
    req = otlp_spans.span_request([({"host.id": "h", "boot": 2**63, "": "z"}, row)], otlp.SCOPE)
    [span] = req.resource_spans[0].scope_spans[0].spans
    assert attrs(span.attributes) == {"comm": "touch"}
    assert attrs(req.resource_spans[0].resource.attributes) == {"host.id": "h"}
    assert REGISTRY.get_sample_value("ktel_exporter_otlp_dropped_attributes_total") == dropped + 5


async def test_a_log_attribute_otlp_cannot_carry_is_left_out_and_counted(caplog):
    """Log records and their resources are encoded by the SDK, which left such an
    attribute out with a traceback each and counted nothing."""
    sent = []

    def submit(data: bytes, _timeout: float):
        sent.append(ExportLogsServiceRequest.FromString(data))
        return type("Result", (), {"status_code": 200, "error": None, "content": lambda _self: b""})()

    spans, metrics, logs = otlp.make_exporters(
        OtlpConfig(protocol="http/protobuf", endpoint="http://127.0.0.1:1")
    )
    logs._client._submit = submit
    sender = otlp.Sender(OtlpConfig(), (spans, metrics, logs))
    now = time.time_ns()
    row = [now, 9, "INFO", "hello", {"addr": 2**64 - 1, "": "y", "comm": "touch"}, b"", b""]
    value = wire_logs(LogBatch({"host.id": "h", "boot": 2**63, "": "z"}, [row]))
    rec = Record(decode_logs(value), "ktel.logs", 0, 1, b"h", value, wire.DLQ_TOPIC)
    dropped = REGISTRY.get_sample_value("ktel_exporter_otlp_dropped_attributes_total") or 0.0

    await asyncio.wait_for(sender.deliver([rec], Producer()), 30)

    [req] = sent
    [resource_logs] = req.resource_logs
    assert attrs(resource_logs.resource.attributes) == {"host.id": "h"}
    [record] = resource_logs.scope_logs[0].log_records
    assert attrs(record.attributes) == {"comm": "touch"}
    assert REGISTRY.get_sample_value("ktel_exporter_otlp_dropped_attributes_total") == dropped + 4
    assert "Traceback" not in caplog.text and "Failed to encode" not in caplog.text
    assert "invalid attribute key" not in caplog.text  # (the SDK's Resource, which counts nothing)


async def test_a_log_resource_attribute_left_out_is_not_counted_when_its_batch_is_not_sent():
    """A log batch's resource is cleaned of what OTLP cannot carry when its request is
    built, and what it left out counted once the backend takes it, as a log record's
    attributes are: a batch too old to send, dead-lettered whole, was counted as soon as
    it was read (and again at each read of it after a restart)."""
    sender = otlp.Sender(OtlpConfig(), (object(), object(), object()))
    old = time.time_ns() - 10 * 86_400 * 10**9  # (past otlp.max_age_seconds)
    value = wire_logs(LogBatch({"host.id": "h", "": "z"}, [[old, 9, "INFO", "too old", {}, b"", b""]]))
    rec = Record(decode_logs(value), "ktel.logs", 0, 7, b"h", value, wire.DLQ_TOPIC)
    dropped = REGISTRY.get_sample_value("ktel_exporter_otlp_dropped_attributes_total") or 0.0
    producer = Producer()
    await asyncio.wait_for(sender.deliver([rec], producer), 30)
    assert [topic for topic, _, _ in producer.sent] == [wire.DLQ_TOPIC]
    assert REGISTRY.get_sample_value("ktel_exporter_otlp_dropped_attributes_total") == dropped


def test_a_data_point_label_of_an_empty_name_is_left_out_and_counted():
    """A snapshot's labels become its points' attributes, and the wire's maps take an
    empty name, which OTLP does not allow as a key: the SDK's metrics encoder sent one.
    Left out and counted, as of a span or a log record, once the request is built."""
    dropped = REGISTRY.get_sample_value("ktel_exporter_otlp_dropped_attributes_total") or 0.0
    rows = [(1000, ["x", "gauge", {"host.id": "h", "": "y", "comm": "touch"}, 1.0])]
    request, left_out = otlp_spans.converted(otlp.metric_request, rows)
    [point] = request.resource_metrics[0].scope_metrics[0].metrics[0].gauge.data_points
    assert attrs(point.attributes) == {"comm": "touch"}
    assert left_out == 1
    assert REGISTRY.get_sample_value("ktel_exporter_otlp_dropped_attributes_total") == dropped


def test_a_batch_full_of_attributes_otlp_cannot_carry_logs_a_line_per_key_and_type_not_per_attribute(
    caplog, monkeypatch
):
    """One line per attribute left out made a batch of spans full of them (1.1 MB of
    ints beyond int64) write 8.9 MB of logs. Each is still counted; a key and type is
    logged once, and ever new keys (a hostile writer's) at most Once's bound of times."""
    from ktel.logs import Once

    monkeypatch.setattr(otlp_spans, "_warned", Once(limit=50))
    dropped = REGISTRY.get_sample_value("ktel_exporter_otlp_dropped_attributes_total") or 0.0
    far = 2**64 - 1
    rows = [
        (RESOURCE, [TRACE, ROOT, b"", "s", 1, 2, 0, "", {f"addr{j}": far for j in range(8)}])
        for _ in range(2000)
    ]
    with caplog.at_level("WARNING", logger=otlp_spans.log.name):
        otlp_spans.span_request(rows, otlp.SCOPE)
        otlp_spans.carried({"addr0": far, "addr1": [far], "addr2": far})  # a log's, the SDK encodes
    assert len(caplog.records) == 8 + 1  # addr0 .. addr7 as ints, addr1 as a list
    assert REGISTRY.get_sample_value("ktel_exporter_otlp_dropped_attributes_total") == dropped + 2000 * 8 + 3

    caplog.clear()
    rows = [(RESOURCE, [TRACE, ROOT, b"", "s", 1, 2, 0, "", {f"k{i}": far}]) for i in range(1000)]
    with caplog.at_level("WARNING", logger=otlp_spans.log.name):
        otlp_spans.span_request(rows, otlp.SCOPE)
    assert len(caplog.records) == 50 - 9  # what the bound had left


def test_log_attributes_otlp_carries_are_not_encoded_before_the_sdk_encodes_them(monkeypatch):
    """``carried`` only finds what OTLP cannot carry; the SDK's encoder then encodes a
    log's attributes. Encoding them there first cost a second encoding of each (but
    short strings and ints, which are kept encoded): a third of a log request's cost
    with floats, arrays or long strings."""

    def encode(key, value):
        raise AssertionError(f"{key} encoded")

    monkeypatch.setattr(otlp_spans, "_encode_key_value", encode)
    carried = {
        "ratio": 0.5,
        "flags": [1, -(2**63), "x"],
        "ok": False,
        "path": "/" + "x" * 300,
        "pid": 2**63 - 1,
    }
    assert otlp_spans.carried(carried) is carried


class RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_send_once_sends_the_request_as_built_and_classifies_the_answer():
    req = otlp_spans.span_request([(RESOURCE, [TRACE, ROOT, b"", "s", 1, 2, 1, "", {"a": 1}])], otlp.SCOPE)

    grpc_exporter, _, _ = otlp.make_exporters(OtlpConfig(protocol="grpc", endpoint="http://127.0.0.1:1"))
    answers: list[Exception | None] = [
        None,
        RpcError(grpc.StatusCode.UNAVAILABLE, "connection refused"),
        RpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad span"),
    ]
    sent = []

    class Stub:
        def Export(self, request, **_kw):  # noqa: N802 -- the generated stub's name
            sent.append(request)
            answer = answers.pop(0)
            if answer is not None:
                raise answer

    grpc_exporter._channel = Channel(Stub().Export)
    otlp.send_once(grpc_exporter, req)
    with pytest.raises(Transient, match="gRPC UNAVAILABLE: connection refused"):
        otlp.send_once(grpc_exporter, req)
    with pytest.raises(Permanent, match="gRPC INVALID_ARGUMENT: bad span"):
        otlp.send_once(grpc_exporter, req)
    assert sent == [req] * 3

    http_exporter, _, _ = otlp.make_exporters(
        OtlpConfig(protocol="http/protobuf", endpoint="http://127.0.0.1:1")
    )
    status = RpcStatus(code=3, message="request body too large").SerializeToString()
    replies = [(200, b""), (503, b"busy"), (400, status), (None, b"")]
    bodies = []

    class Result:
        def __init__(self, code, body):
            self.status_code, self.body = code, body
            self.error = None if code else ConnectionRefusedError("refused")

        def content(self):
            return self.body

    def submit(data, _timeout):
        bodies.append(data)
        return Result(*replies.pop(0))

    http_exporter._client._submit = submit
    otlp.send_once(http_exporter, req)
    with pytest.raises(Transient, match="HTTP 503: busy"):
        otlp.send_once(http_exporter, req)
    # The Collector's answer is a google.rpc.Status: its message is the reason.
    with pytest.raises(Permanent, match="^HTTP 400: request body too large$"):
        otlp.send_once(http_exporter, req)
    with pytest.raises(Transient, match="no answer from .*: refused"):
        otlp.send_once(http_exporter, req)
    assert [ExportTraceServiceRequest.FromString(b) for b in bodies] == [req] * 4


# Answers whose body cannot be read as their headers say: a Content-Encoding the body is
# not in (requests reads the body as it says), a charset whose codec fails on any byte it
# cannot decode or makes no text (ktel reads an OTLP body as bytes, never by its charset).
UNDECODABLE = {
    "gzip": ({"Content-Encoding": "gzip"}, b"request refused\n"),
    "deflate": ({"Content-Encoding": "deflate"}, b"request refused\n"),
    "idna": ({"Content-Type": "text/plain; charset=idna"}, b"request refused \xff\n"),
    "hex": ({"Content-Type": "text/plain; charset=hex"}, b"request refused\n"),
}


@pytest.fixture
def receiver():
    with answering() as answered:
        yield answered


@contextlib.contextmanager
def answering():
    """A real HTTP server on loopback that gives, for each request, the next of
    ``answers`` (status, headers, body) and keeps the request bodies it was sent; it keeps
    connections open (HTTP/1.1), as a backend does, so one answer's body left unread
    would garble the next. (url, answers, received)"""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answers: list[tuple[int, dict[str, str], bytes]] = []
    received: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802 -- http.server's name
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            status, headers, body = answers.pop(0)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # (polled often for a stop, so a test's end does not wait on it)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", answers, received
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("answer", sorted(UNDECODABLE))
@pytest.mark.parametrize(
    ("status", "outcome"), [(200, None), (400, Permanent), (401, Unauthorized), (503, Transient)]
)
def test_an_answer_whose_body_does_not_decode_is_classified_by_its_status(receiver, answer, status, outcome):
    """A 2xx is a success whatever its body holds: the backend took the request, which,
    were the attempt failed, would be sent again for ever. Any other answer is what its
    status says (a 400 split and dead-lettered, not retried), its Retry-After honoured,
    with what its body says or that it is not in its Content-Encoding. The next answer,
    on the same connection or another, is read whole, its partial success too."""
    import gzip

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTracePartialSuccess,
        ExportTraceServiceResponse,
    )

    url, answers, received = receiver
    headers, body = UNDECODABLE[answer]
    partial = ExportTracePartialSuccess(rejected_spans=2, error_message="x")
    good = gzip.compress(ExportTraceServiceResponse(partial_success=partial).SerializeToString())
    answers += [(status, {**headers, "Retry-After": "7"}, body), (200, {"Content-Encoding": "gzip"}, good)]
    req = otlp_spans.span_request([(RESOURCE, [TRACE, ROOT, b"", "s", 1, 2, 1, "", {}])], otlp.SCOPE)
    exporter, _, _ = otlp.make_exporters(OtlpConfig(protocol="http/protobuf", endpoint=url))

    if outcome is None:
        assert otlp.send_once(exporter, req) == (0, "")
    else:
        with pytest.raises(outcome) as failed:
            otlp.send_once(exporter, req)
        said = "(a body not in its Content-Encoding" if "Content-Encoding" in headers else "request refused"
        assert str(failed.value).startswith(f"HTTP {status}: {said}")
        if outcome is Transient:
            assert failed.value.retry_after == 7
    assert otlp.send_once(exporter, req) == (2, "x")
    assert [ExportTraceServiceRequest.FromString(b) for b in received] == [req] * 2  # each sent once


@pytest.fixture
def grpc_receiver():
    """A real gRPC server on loopback whose OTLP trace service answers each Export with
    the next of ``answers`` (a status, and for OK the bytes of its message: any bytes, as
    a server or a proxy may send) and keeps the requests' bytes."""
    from concurrent import futures

    answers: list[tuple[grpc.StatusCode, bytes]] = []
    received: list[bytes] = []

    def export(request: bytes, context: grpc.ServicerContext) -> bytes:
        received.append(request)
        code, message = answers.pop(0)
        if code is not grpc.StatusCode.OK:
            context.abort(code, message.decode())
        return message

    # No (de)serializers: the handler takes and gives bytes.
    service = "opentelemetry.proto.collector.trace.v1.TraceService"
    handler = grpc.method_handlers_generic_handler(
        service, {"Export": grpc.unary_unary_rpc_method_handler(export)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(1))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"http://127.0.0.1:{port}", answers, received
    server.stop(None)


async def test_a_grpc_ok_is_a_success_whatever_its_message_holds(grpc_receiver, caplog):
    """An OK says the backend took the request: one whose message is not the response
    OTLP defines is a success that rejects nothing, sent once and counted, with no
    warning. grpc's stub fails it with an INTERNAL of its own, and the request was split,
    sent again and dead-lettered. A response is read, its partial success too, and an
    INTERNAL the server sends is a refusal."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTracePartialSuccess,
        ExportTraceServiceResponse,
    )

    url, answers, received = grpc_receiver
    spans, metrics, logs = otlp.make_exporters(OtlpConfig(protocol="grpc", endpoint=url, insecure=True))
    sender = otlp.Sender(OtlpConfig(), (spans, metrics, logs))
    now = time.time_ns()
    rows = [[TRACE, bytes([i + 1]) * 8, b"", f"s{i}", now, now + 1, 0, "", {}] for i in range(2)]
    value = wire_spans(SpanBatch(RESOURCE, rows))
    rec = Record(decode_spans(value), "ktel.spans", 0, 9, b"h1", value, wire.DLQ_TOPIC)
    producer = Producer()
    acked = REGISTRY.get_sample_value("ktel_exporter_otlp_items_total", {"signal": "spans"}) or 0.0
    answers.append((grpc.StatusCode.OK, b"\xff\xff\xff"))

    with caplog.at_level(logging.WARNING):
        await sender.deliver([rec], producer)

    [sent] = received
    assert producer.sent == [] and caplog.records == []  # nothing dead-lettered, nothing said
    assert REGISTRY.get_sample_value("ktel_exporter_otlp_items_total", {"signal": "spans"}) == acked + 2
    req = ExportTraceServiceRequest.FromString(sent)
    partial = ExportTracePartialSuccess(rejected_spans=2, error_message="x")
    answers += [
        (grpc.StatusCode.OK, ExportTraceServiceResponse(partial_success=partial).SerializeToString()),
        (grpc.StatusCode.INTERNAL, b"cannot take it"),
    ]
    assert otlp.send_once(spans, req) == (2, "x")
    with pytest.raises(Permanent, match="^gRPC INTERNAL: cannot take it$"):
        otlp.send_once(spans, req)
    assert received == [sent] * 3
    sender.shutdown()


def test_logs_keep_time_severity_body_attributes_trace_context_and_resource():
    batch = LogBatch(
        RESOURCE,
        [
            [10, 17, "ERROR", "oom-kill: killed process 42", {"process.pid": 42}, TRACE, CHILD],
            [20, 9, "INFO", "plain", {}, b"", b""],
            # A span id means nothing without its trace: the log goes out with neither.
            [30, 9, "INFO", "no trace", {}, bytes(16), CHILD],
            [40, 9, "INFO", "trace only", {}, TRACE, bytes(8)],
        ],
    )
    batch = decode_logs(wire_logs(batch))
    resource = otlp.KtelResource(batch.resource)
    req = encode_logs(otlp.to_logs([(resource, row) for row in batch.logs]))
    [rl] = req.resource_logs
    assert attrs(rl.resource.attributes) == RESOURCE
    oom, plain, no_trace, trace_only = rl.scope_logs[0].log_records
    assert (oom.time_unix_nano, oom.observed_time_unix_nano) == (10, 10)
    assert (oom.severity_number, oom.severity_text) == (17, "ERROR")
    assert oom.body.string_value == "oom-kill: killed process 42"
    assert attrs(oom.attributes) == {"process.pid": 42}
    assert (oom.trace_id, oom.span_id) == (TRACE, CHILD)
    assert (plain.trace_id, plain.span_id) == (b"", b"")
    assert (no_trace.trace_id, no_trace.span_id) == (b"", b"")
    assert (trace_only.trace_id, trace_only.span_id) == (TRACE, b"")


def test_metrics_become_sums_gauges_histograms_with_host_id_as_resource():
    hist = {"count": 6, "sum": 21.5, "bounds": [1.0, 10.0], "counts": [1, 3, 2]}
    snaps = [
        MetricSnapshot(
            1000,
            [
                ["file_created_total", "counter", {"host.id": "a", "directory": "/tmp"}, 5],
                ["runq_latency_seconds", "histogram", {"host.id": "a"}, hist],
                ["spool_bytes", "gauge", {"host.id": "b"}, 1.5],
            ],
        ),
        MetricSnapshot(2000, [["file_created_total", "counter", {"host.id": "a", "directory": "/tmp"}, 7]]),
    ]
    rows = [(s.ts_ms, row) for s in snaps for row in s.series]
    req = encode_metrics(otlp.to_metrics(rows))
    by_host = {attrs(rm.resource.attributes)["host.id"]: rm for rm in req.resource_metrics}
    assert set(by_host) == {"a", "b"}
    metrics_a = {m.name: m for m in by_host["a"].scope_metrics[0].metrics}
    counter = metrics_a["file_created_total"].sum
    assert counter.is_monotonic
    assert counter.aggregation_temporality == AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    assert [(p.time_unix_nano, p.as_int) for p in counter.data_points] == [
        (1000 * 10**6, 5),
        (2000 * 10**6, 7),
    ]
    assert [attrs(p.attributes) for p in counter.data_points] == [{"directory": "/tmp"}] * 2
    h = metrics_a["runq_latency_seconds"].histogram
    assert h.aggregation_temporality == AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    [hp] = h.data_points
    assert (hp.count, hp.sum, list(hp.explicit_bounds), list(hp.bucket_counts)) == (
        6,
        21.5,
        [1.0, 10.0],
        [1, 3, 2],
    )
    assert not hp.HasField("min") and not hp.HasField("max")
    [gauge] = by_host["b"].scope_metrics[0].metrics
    assert (gauge.name, gauge.gauge.data_points[0].as_double) == ("spool_bytes", 1.5)


class Backend:
    """An OTLP/HTTP backend by content, behind the SDK exporter's own client: 503 for
    the first request, 400 for any request holding a span named ``bad``, else 200."""

    def __init__(self) -> None:
        self.answers: list[tuple[list[str], int]] = []

    def submit(self, data: bytes, _timeout: float):
        req = ExportTraceServiceRequest.FromString(data)
        names = [sp.name for rs in req.resource_spans for ss in rs.scope_spans for sp in ss.spans]
        code = 503 if not self.answers else 400 if "bad" in names else 200
        self.answers.append((names, code))
        body = RpcStatus(message=f"refused {names}").SerializeToString()
        return type("Result", (), {"status_code": code, "error": None, "content": lambda _self: body})()

    def delivered(self) -> list[str]:
        return [n for names, code in self.answers if code == 200 for n in names]


class Producer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None]] = []

    async def send_and_wait(self, topic, value, key=None):
        self.sent.append((topic, value, key))


def sample(name: str, exporter: str, signal: str) -> float:
    return REGISTRY.get_sample_value(name, {"exporter": exporter, "signal": signal}) or 0.0


async def test_transient_failures_are_retried_refusals_split_and_late_items_dead_lettered():
    backend = Backend()
    spans, metrics, logs = otlp.make_exporters(
        OtlpConfig(protocol="http/protobuf", endpoint="http://127.0.0.1:1")
    )
    spans._client._submit = backend.submit
    sender = otlp.Sender(OtlpConfig(max_export_batch_size=8), (spans, metrics, logs))
    now = time.time_ns()
    future = now + 3600 * 10**9
    names = ["a", "b", "bad", "c", "late", "d"]
    rows = [
        [TRACE, bytes([i + 1]) * 8, b"", name, future if name == "late" else now, now + 1, 0, "", {}]
        for i, name in enumerate(names)
    ]
    value = wire_spans(SpanBatch(RESOURCE, rows))
    rec = Record(decode_spans(value), "ktel.spans", 3, 41, b"h1", value, wire.DLQ_TOPIC)
    producer = Producer()
    dead = sample("ktel_exporter_dead_lettered_items_total", "otlp", "spans")
    acked = REGISTRY.get_sample_value("ktel_exporter_otlp_items_total", {"signal": "spans"}) or 0.0

    await sender.deliver([rec], producer)

    # 503 retried; the 400 for the five isolated "bad" by halves: [a b] [bad c d] -> [bad] [c d].
    assert backend.answers == [
        (["a", "b", "bad", "c", "d"], 503),
        (["a", "b", "bad", "c", "d"], 400),
        (["a", "b"], 200),
        (["bad", "c", "d"], 400),
        (["bad"], 400),
        (["c", "d"], 200),
    ]
    assert backend.delivered() == ["a", "b", "c", "d"]
    letters = [wire.decode_dead_letter(v) for t, v, k in producer.sent if t == wire.DLQ_TOPIC and k == b"h1"]
    assert [(d.stage, d.topic, d.partition, d.offset) for d in letters] == [("otlp", "ktel.spans", 3, 41)] * 2
    late, bad = letters
    assert "ahead of the exporter's clock (more than otlp.max_future_seconds = 600)" in late.reason
    assert [r[3] for r in decode_spans(late.payload).spans] == ["late"]
    assert bad.reason == "HTTP 400: refused ['bad']"
    assert decode_spans(bad.payload) == SpanBatch(RESOURCE, [rows[2]])
    assert sample("ktel_exporter_dead_lettered_items_total", "otlp", "spans") == dead + 2
    assert REGISTRY.get_sample_value("ktel_exporter_otlp_items_total", {"signal": "spans"}) == acked + 4


async def test_an_attribute_left_out_is_counted_once_however_often_its_span_is_sent():
    """A request is built again for each attempt: the attribute it leaves out is counted
    once, when the backend takes its span, not once per attempt."""
    backend = Backend()
    spans, metrics, logs = otlp.make_exporters(
        OtlpConfig(protocol="http/protobuf", endpoint="http://127.0.0.1:1")
    )
    spans._client._submit = backend.submit
    sender = otlp.Sender(OtlpConfig(), (spans, metrics, logs))
    now = time.time_ns()
    value = wire_spans(
        SpanBatch(RESOURCE, [[TRACE, ROOT, b"", "a", now, now + 1, 0, "", {"addr": 2**64 - 1}]])
    )
    rec = Record(decode_spans(value), "ktel.spans", 0, 1, b"h1", value, wire.DLQ_TOPIC)
    dropped = REGISTRY.get_sample_value("ktel_exporter_otlp_dropped_attributes_total") or 0.0

    await asyncio.wait_for(sender.deliver([rec], Producer()), 30)

    assert backend.answers == [(["a"], 503), (["a"], 200)]
    assert REGISTRY.get_sample_value("ktel_exporter_otlp_dropped_attributes_total") == dropped + 1


async def test_spans_with_ids_of_all_zeros_or_ending_before_they_start_are_dead_lettered_not_sent():
    """OTLP does not allow an id of all zeros: a backend would make one trace of every
    span with such a trace id. The wire takes any 16 and 8 bytes, and any start and end,
    so a writer of ktel.spans may send them; the rest of the batch goes on."""
    sent = []

    def submit(data: bytes, _timeout: float):
        sent.append(ExportTraceServiceRequest.FromString(data))
        return type("Result", (), {"status_code": 200, "error": None, "content": lambda _self: b""})()

    spans, metrics, logs = otlp.make_exporters(
        OtlpConfig(protocol="http/protobuf", endpoint="http://127.0.0.1:1")
    )
    spans._client._submit = submit
    sender = otlp.Sender(OtlpConfig(), (spans, metrics, logs))
    now = time.time_ns()
    zero16, zero8 = bytes(16), bytes(8)
    rows = [
        [trace_id, span_id, parent, name, now, now + 1, 0, "", {}]
        for trace_id, span_id, parent, name in [
            (TRACE, ROOT, b"", "ok"),
            (zero16, ROOT, b"", "zero trace"),
            (TRACE, zero8, b"", "zero span"),
            (TRACE, CHILD, zero8, "zero parent"),
            (TRACE, CHILD, ROOT, "backwards"),
            (TRACE, CHILD, ROOT, "child"),
        ]
    ]
    rows[4][4] = now + 5  # (ends 4 ns before it starts)
    value = wire_spans(SpanBatch(RESOURCE, rows))
    rec = Record(decode_spans(value), "ktel.spans", 0, 1, b"h1", value, wire.DLQ_TOPIC)
    producer = Producer()
    dead = sample("ktel_exporter_dead_lettered_items_total", "otlp", "spans")

    await asyncio.wait_for(sender.deliver([rec], producer), 30)

    [req] = sent
    assert [sp.name for sp in req.resource_spans[0].scope_spans[0].spans] == ["ok", "child"]
    [letter] = [wire.decode_dead_letter(v) for t, v, _ in producer.sent if t == wire.DLQ_TOPIC]
    assert letter.reason == "4 spans, the first: a trace id of all zeros, which OTLP does not allow"
    assert decode_spans(letter.payload).spans == rows[1:5]
    assert sample("ktel_exporter_dead_lettered_items_total", "otlp", "spans") == dead + 4
    assert [otlp._span_problem(row) for row in rows[2:5]] == [
        "a span id of all zeros, which OTLP does not allow",
        "a parent span id of all zeros, which OTLP does not allow",
        "it ends 4 ns before it starts",
    ]


def _answering(rejected: int, message: str) -> tuple[otlp.Sender, list[bytes]]:
    """A sender whose spans go over http/protobuf to a backend answering every request
    with a success that rejects ``rejected`` spans, and the requests it gets."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTracePartialSuccess,
        ExportTraceServiceResponse,
    )

    answers: list[bytes] = []

    def submit(data: bytes, _timeout: float):
        answers.append(data)
        partial = ExportTracePartialSuccess(rejected_spans=rejected, error_message=message)
        body = ExportTraceServiceResponse(partial_success=partial).SerializeToString()
        return type("Result", (), {"status_code": 200, "error": None, "content": lambda _self: body})()

    spans, metrics, logs = otlp.make_exporters(
        OtlpConfig(protocol="http/protobuf", endpoint="http://127.0.0.1:1")
    )
    spans._client._submit = submit
    return otlp.Sender(OtlpConfig(), (spans, metrics, logs)), answers


async def test_a_partial_success_counts_what_the_backend_rejected_and_sends_nothing_again(caplog):
    """A 200 whose body says some items were rejected (OTLP ``partial_success``): the
    backend names none and the spec forbids a retry, so they are counted and logged,
    not counted as delivered."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTracePartialSuccess,
        ExportTraceServiceResponse,
    )

    sender, answers = _answering(1, "span too old")
    now = time.time_ns()
    rows = [[TRACE, bytes([i + 1]) * 8, b"", f"s{i}", now, now + 1, 0, "", {}] for i in range(4)]
    value = wire_spans(SpanBatch(RESOURCE, rows))
    rec = Record(decode_spans(value), "ktel.spans", 0, 7, b"h1", value, wire.DLQ_TOPIC)
    producer = Producer()
    counted = {
        name: REGISTRY.get_sample_value(name, {"signal": "spans"}) or 0.0
        for name in ("ktel_exporter_otlp_items_total", "ktel_exporter_otlp_rejected_items_total")
    }

    await sender.deliver([rec], producer)

    assert len(answers) == 1 and producer.sent == []  # not sent again, nothing dead-lettered
    after = {name: REGISTRY.get_sample_value(name, {"signal": "spans"}) for name in counted}
    assert after == {
        "ktel_exporter_otlp_items_total": counted["ktel_exporter_otlp_items_total"] + 3,
        "ktel_exporter_otlp_rejected_items_total": counted["ktel_exporter_otlp_rejected_items_total"] + 1,
    }
    assert "OTLP backend took 3 of 4 spans, rejected 1: span too old" in caplog.text

    # Over gRPC the same answer comes as Export's message.
    grpc_exporter, _, _ = otlp.make_exporters(OtlpConfig(protocol="grpc", endpoint="http://127.0.0.1:1"))
    partial = ExportTracePartialSuccess(rejected_spans=2, error_message="x")

    class Stub:
        def Export(self, request, **_kw):  # noqa: N802 -- the generated stub's name
            return ExportTraceServiceResponse(partial_success=partial)

    grpc_exporter._channel = Channel(Stub().Export)
    req = otlp_spans.span_request([(RESOURCE, rows[0])], otlp.SCOPE)
    assert otlp.send_once(grpc_exporter, req) == (2, "x")


async def test_a_partial_success_rejecting_a_negative_number_of_items_is_a_success():
    """A backend (or a proxy before it) may answer a success whose ``rejected_spans``, an
    int64, is below zero: the request was taken, and is not sent again for ever."""
    sender, answers = _answering(-1, "odd")
    now = time.time_ns()
    rows = [[TRACE, bytes([i + 1]) * 8, b"", f"s{i}", now, now + 1, 0, "", {}] for i in range(2)]
    value = wire_spans(SpanBatch(RESOURCE, rows))
    rec = Record(decode_spans(value), "ktel.spans", 0, 8, b"h1", value, wire.DLQ_TOPIC)
    acked = REGISTRY.get_sample_value("ktel_exporter_otlp_items_total", {"signal": "spans"}) or 0.0

    await asyncio.wait_for(sender.deliver([rec], Producer()), 30)  # (a guard against retrying for ever)

    assert len(answers) == 1
    assert REGISTRY.get_sample_value("ktel_exporter_otlp_items_total", {"signal": "spans"}) == acked + 2


@pytest.mark.parametrize("other", ["logs", "spans"])
async def test_a_delivery_that_fails_leaves_no_send_running(other):
    """A delivery fails with the error of its first send to fail, as it was raised (here
    ``ktel dlq --redrive``'s: a backend asking for a wait past its deadline), once the
    sends in flight beside it (the other signal's, or another request of the same one) are
    ended: left running, they went on after the caller took the delivery for failed, and
    dead-lettered what the backend refused. A send in a thread cannot be stopped: what
    it answers after is not acted on."""
    in_flight, release, answered = threading.Event(), threading.Event(), threading.Event()
    sent: list[str] = []

    def answer(status: int, headers: dict[str, str]):
        body = RpcStatus(message="no").SerializeToString()
        members = {
            "status_code": status,
            "error": None,
            "content": lambda _s: body,
            "headers": lambda _s: headers,
        }
        return type("Result", (), members)()

    def blocking(_data: bytes, _timeout: float):
        sent.append("slow")
        in_flight.set()
        release.wait(10)  # (a backend slow to answer: the SDK's timeout)
        answered.set()
        return answer(400, {})

    def asking(_data: bytes, _timeout: float):
        in_flight.wait(10)
        return answer(503, {"retry-after": "600"})

    def spans_submit(data: bytes, timeout: float):
        req = ExportTraceServiceRequest.FromString(data)
        names = [sp.name for rs in req.resource_spans for ss in rs.scope_spans for sp in ss.spans]
        return blocking(data, timeout) if names == ["slow"] else asking(data, timeout)

    spans, metrics, logs = otlp.make_exporters(
        OtlpConfig(protocol="http/protobuf", endpoint="http://127.0.0.1:1")
    )
    spans._client._submit = spans_submit
    logs._client._submit = asking
    sender = otlp.Sender(OtlpConfig(max_export_batch_size=1), (spans, metrics, logs))
    now = time.time_ns()
    names = ["slow"] if other == "logs" else ["slow", "asking"]
    rows = [[TRACE, bytes([i + 1]) * 8, b"", name, now, now + 1, 0, "", {}] for i, name in enumerate(names)]
    value = wire_spans(SpanBatch(RESOURCE, rows))
    records = [Record(decode_spans(value), "ktel.spans", 0, 1, b"h1", value, wire.DLQ_TOPIC)]
    if other == "logs":
        value = wire_logs(LogBatch(RESOURCE, [[now, 9, "INFO", "hello", {}, b"", b""]]))
        records.append(Record(decode_logs(value), "ktel.logs", 0, 1, b"h1", value, wire.DLQ_TOPIC))
    producer = Producer()
    loop = asyncio.get_running_loop()
    before = asyncio.all_tasks()
    try:
        with retry_mod.deadline(loop.time() + 60), pytest.raises(AskedPastDeadline):
            await asyncio.wait_for(sender.deliver(records, producer), 30)
        assert asyncio.all_tasks() - before == set()
    finally:
        release.set()
    assert await asyncio.to_thread(answered.wait, 10)
    await asyncio.sleep(0.2)  # (time for anything left to act on the answer)
    assert sent == ["slow"] and producer.sent == []  # not split, not dead-lettered


def test_a_counter_past_int64_goes_as_a_double():
    from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics

    big = 2**64 - 1  # msgpack's largest int, which the wire takes
    data = otlp.to_metrics([(1, ["x_total", "counter", {"host.id": "h"}, big]), (1, ["y", "gauge", {}, 3])])
    [x, y] = [m.data.data_points[0].value for m in data.resource_metrics[0].scope_metrics[0].metrics] + [
        m.data.data_points[0].value for m in data.resource_metrics[1].scope_metrics[0].metrics
    ]
    assert (x, type(x), y, type(y)) == (float(big), float, 3, int)
    encode_metrics(data)  # (an int there: "Value out of range", and no request at all)


async def test_items_that_cannot_be_converted_are_dead_lettered_not_retried_for_ever(monkeypatch):
    backend = Backend()
    backend.answers.append(([], 200))  # (no 503 first this time)
    spans, metrics, logs = otlp.make_exporters(
        OtlpConfig(protocol="http/protobuf", endpoint="http://127.0.0.1:1")
    )
    spans._client._submit = backend.submit
    convert = otlp._span_request

    def failing(rows):
        if any(row[3] == "odd" for _, row in rows):
            raise ValueError("Value out of range")
        return convert(rows)

    monkeypatch.setattr(otlp, "_span_request", failing)
    sender = otlp.Sender(OtlpConfig(), (spans, metrics, logs))
    now = time.time_ns()
    rows = [[TRACE, bytes([i + 1]) * 8, b"", name, now, now + 1, 0, "", {}] for i, name in enumerate("ab")]
    rows.insert(1, [TRACE, b"\x09" * 8, b"", "odd", now, now + 1, 0, "", {}])
    value = wire_spans(SpanBatch(RESOURCE, rows))
    rec = Record(decode_spans(value), "ktel.spans", 0, 9, b"h1", value, wire.DLQ_TOPIC)
    producer = Producer()
    await asyncio.wait_for(sender.deliver([rec], producer), 30)  # (a guard against hanging)
    assert backend.delivered() == ["a", "b"]
    [letter] = [wire.decode_dead_letter(v) for t, v, _k in producer.sent if t == wire.DLQ_TOPIC]
    assert letter.reason == "cannot be put in an OTLP request: ValueError: Value out of range"
    assert [r[3] for r in decode_spans(letter.payload).spans] == ["odd"]


@pytest.mark.parametrize(
    ("protocol", "answer", "reason"),
    [
        ("grpc", grpc.StatusCode.RESOURCE_EXHAUSTED, "gRPC RESOURCE_EXHAUSTED: cannot take it"),
        ("grpc", grpc.StatusCode.INTERNAL, "gRPC INTERNAL: cannot take it"),
        ("grpc", grpc.StatusCode.UNKNOWN, "gRPC UNKNOWN: cannot take it"),
        ("http/protobuf", 500, "HTTP 500: cannot take it"),
        ("http/protobuf", 408, "HTTP 408: cannot take it"),
        ("http/protobuf", 501, "HTTP 501: cannot take it"),
    ],
)
async def test_an_answer_otlp_does_not_retry_is_dead_lettered_and_counted_not_sent_again(
    monkeypatch, protocol, answer, reason
):
    """RESOURCE_EXHAUSTED with no RetryInfo, INTERNAL, UNKNOWN, an HTTP 408 or a 5xx
    other than 502-504: the backend says the request will fail again. It is split as any
    refusal is, and the span refused alone goes to ktel.dlq with the answer and is
    counted; no request is sent again as it was (no wait between two attempts)."""

    async def no_retry(seconds: float) -> None:
        raise AssertionError(f"a request was to be sent again in {seconds:.2f} s")

    monkeypatch.setattr(retry_mod, "_sleep", no_retry)
    requests_: list[list[str]] = []

    def names_of(req: ExportTraceServiceRequest) -> list[str]:
        names = [sp.name for rs in req.resource_spans for ss in rs.scope_spans for sp in ss.spans]
        requests_.append(names)
        return names

    spans, metrics, logs = otlp.make_exporters(OtlpConfig(protocol=protocol, endpoint="http://127.0.0.1:1"))
    if protocol == "grpc":

        class Stub:
            def Export(self, request, **_kw):  # noqa: N802 -- the generated stub's name
                if "over" in names_of(request):
                    raise RpcError(answer, "cannot take it")
                return None

        spans._channel = Channel(Stub().Export)
    else:

        def submit(data: bytes, _timeout: float):
            code = answer if "over" in names_of(ExportTraceServiceRequest.FromString(data)) else 200
            body = RpcStatus(message="cannot take it").SerializeToString() if code != 200 else b""
            return type("Result", (), {"status_code": code, "error": None, "content": lambda _self: body})()

        spans._client._submit = submit
    sender = otlp.Sender(OtlpConfig(), (spans, metrics, logs))
    now = time.time_ns()
    rows = [
        [TRACE, bytes([i + 1]) * 8, b"", name, now, now + 1, 0, "", {}]
        for i, name in enumerate(["a", "over", "b"])
    ]
    value = wire_spans(SpanBatch(RESOURCE, rows))
    rec = Record(decode_spans(value), "ktel.spans", 2, 17, b"h1", value, wire.DLQ_TOPIC)
    producer = Producer()
    dead = sample("ktel_exporter_dead_lettered_items_total", "otlp", "spans")

    await sender.deliver([rec], producer)

    assert requests_ == [["a", "over", "b"], ["a"], ["over", "b"], ["over"], ["b"]]
    [letter] = [wire.decode_dead_letter(v) for t, v, k in producer.sent if t == wire.DLQ_TOPIC and k == b"h1"]
    assert (letter.stage, letter.topic, letter.partition, letter.offset) == ("otlp", "ktel.spans", 2, 17)
    assert letter.reason == reason
    assert decode_spans(letter.payload) == SpanBatch(RESOURCE, [rows[1]])
    assert sample("ktel_exporter_dead_lettered_items_total", "otlp", "spans") == dead + 1


async def test_a_data_point_of_a_stale_snapshot_refused_alone_is_dead_lettered_as_stale():
    """The dead letter's payload is a snapshot of just the point refused, and of its
    snapshot's kind: replayed, a stale one must end its series, not write its last value
    again (remote-write would send it as a sample, the pull endpoint serve it)."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    def submit(data: bytes, _timeout: float):
        req = ExportMetricsServiceRequest.FromString(data)
        names = [m.name for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]
        code = 400 if "bad" in names else 200
        body = RpcStatus(message="cannot take it").SerializeToString()
        return type("Result", (), {"status_code": code, "error": None, "content": lambda _self: body})()

    spans, metrics, logs = otlp.make_exporters(
        OtlpConfig(protocol="http/protobuf", endpoint="http://127.0.0.1:1")
    )
    metrics._client._submit = submit
    sender = otlp.Sender(OtlpConfig(), (spans, metrics, logs))
    snap = MetricSnapshot(
        time.time_ns() // 1_000_000,
        [["ok", "gauge", {"host.id": "h"}, 1], ["bad", "gauge", {"host.id": "h"}, 2]],
        stale=True,
    )
    value = wire.encode_snapshot(snap)
    rec = Record(wire.decode_snapshot(value), "ktel.metrics", 0, 5, b"h", value, wire.DLQ_TOPIC)
    producer = Producer()

    await asyncio.wait_for(sender.deliver([rec], producer), 30)

    [letter] = [wire.decode_dead_letter(v) for t, v, _ in producer.sent if t == wire.DLQ_TOPIC]
    assert wire.decode_snapshot(letter.payload) == MetricSnapshot(snap.ts_ms, [snap.series[1]], stale=True)


@pytest.mark.parametrize("histograms", ["exponential", "explicit"])
async def test_a_stale_snapshot_ends_its_series_with_points_of_no_recorded_value(histograms):
    """A forgotten host's last snapshot ends its series (remote-write sends Prometheus'
    stale marker for it): its points go flagged as holding no recorded value, OTLP's
    stale marker, not as values sampled again. Another snapshot's points in the same
    request are not flagged."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.metrics.v1.metrics_pb2 import DataPointFlags

    sent = []

    def submit(data: bytes, _timeout: float):
        sent.append(ExportMetricsServiceRequest.FromString(data))
        return type("Result", (), {"status_code": 200, "error": None, "content": lambda _self: b""})()

    spans, metrics, logs = otlp.make_exporters(
        OtlpConfig(protocol="http/protobuf", endpoint="http://127.0.0.1:1")
    )
    metrics._client._submit = submit
    sender = otlp.Sender(OtlpConfig(histograms=histograms), (spans, metrics, logs))
    now_ms = time.time_ns() // 1_000_000
    hist = {"count": 1, "sum": 3e-9, "bounds": log2_bounds(HIST_SLOTS, 1e-9), "counts": [0, 1] + [0] * 38}
    series = [
        ["x_total", "counter", {"host.id": "h"}, 5],
        ["g", "gauge", {"host.id": "h"}, 2.5],
        ["lat_seconds", "histogram", {"host.id": "h"}, hist],
    ]
    records = []
    for offset, snap in enumerate(
        [MetricSnapshot(now_ms - 1, series), MetricSnapshot(now_ms, series, stale=True)]
    ):
        value = wire.encode_snapshot(snap)
        records.append(
            Record(wire.decode_snapshot(value), "ktel.metrics", 0, offset, b"h", value, wire.DLQ_TOPIC)
        )

    await asyncio.wait_for(sender.deliver(records, Producer()), 30)

    [req] = sent
    flags: dict[tuple[str, int], int] = {}
    for m in req.resource_metrics[0].scope_metrics[0].metrics:
        for p in getattr(m, m.WhichOneof("data")).data_points:
            flags[(m.name, p.time_unix_nano // 1_000_000 - now_ms)] = p.flags
    no_value = DataPointFlags.DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK
    lat = "lat_nanoseconds" if histograms == "exponential" else "lat_seconds"
    assert flags == {
        ("x_total", -1): 0,
        ("g", -1): 0,
        (lat, -1): 0,
        ("x_total", 0): no_value,
        ("g", 0): no_value,
        (lat, 0): no_value,
    }


def test_a_series_ended_and_restarted_in_one_request_keeps_its_points_in_time_order():
    """A host forgotten (its stale snapshot), then back (its series at 0, then its value),
    all in one request (an exporter behind): the stale points went in a metric of their
    own, after the series' later points, so its end reached the backend after its
    restart. Now one metric a series, its points in the order sent, only the stale one
    flagged as holding no recorded value."""
    from opentelemetry.proto.metrics.v1.metrics_pb2 import DataPointFlags

    def row(v):
        return ["ops_total", "counter", {"host.id": "h"}, v]

    rows = [(1_000, row(1), False), (2_000, row(1), True), (2_999, row(0), False), (3_000, row(2), False)]
    [m] = otlp.metric_request(rows).resource_metrics[0].scope_metrics[0].metrics
    no_value = DataPointFlags.DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK
    assert [(p.time_unix_nano // 1_000_000, p.flags) for p in m.sum.data_points] == [
        (1_000, 0),
        (2_000, no_value),
        (2_999, 0),
        (3_000, 0),
    ]


def test_config_fields_reach_the_sdk_exporters_and_unset_ones_fall_back_to_otel_env(monkeypatch):
    cfg = OtlpConfig(
        protocol="http/protobuf",
        endpoint="http://collector:4318/",
        headers={"Authorization": "Bearer x"},
        compression="gzip",
        timeout_seconds=3,
    )
    spans, metrics, logs = otlp.make_exporters(cfg)
    assert [e._endpoint for e in (spans, metrics, logs)] == [
        "http://collector:4318/v1/traces",
        "http://collector:4318/v1/metrics",
        "http://collector:4318/v1/logs",
    ]
    assert spans._client._headers["authorization"] == "Bearer x"
    assert spans._compression.value == "gzip"

    assert isinstance(spans, HttpSpanExporter)

    spans, metrics, _ = otlp.make_exporters(OtlpConfig(protocol="grpc", endpoint="http://collector:4317"))
    assert isinstance(spans, GrpcSpanExporter)
    assert (type(metrics).__module__.split(".")[-2], spans._endpoint, spans._insecure) == (
        "grpc", "collector:4317", True
    )  # fmt: skip

    # Unset fields: the SDK reads the standard variables itself.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://otel.example:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=ktel")
    spans, _, logs = otlp.make_exporters(OtlpConfig())
    assert (spans._endpoint, logs._endpoint) == (
        "https://otel.example:4318/v1/traces", "https://otel.example:4318/v1/logs"
    )  # fmt: skip
    assert spans._client._headers["x-tenant"] == "ktel"


def test_kernel_histograms_become_scale_0_exponential_histograms_in_nanoseconds():
    counts = [3, 5, 0, 2] + [0] * 6 + [7] + [0] * (HIST_SLOTS - 11)
    hist = {"count": 17, "sum": 9000e-9, "bounds": log2_bounds(HIST_SLOTS, 1e-9), "counts": counts}
    rows = [(1000, ["syscall_latency_seconds", "histogram", {"host.id": "a", "cpu": "1"}, hist])]
    req = otlp.metric_request(rows)
    [m] = req.resource_metrics[0].scope_metrics[0].metrics
    assert (m.name, m.unit) == ("syscall_latency_nanoseconds", "ns")
    e = m.exponential_histogram
    assert e.aggregation_temporality == AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    [p] = e.data_points
    assert (attrs(p.attributes), p.time_unix_nano, p.count, p.scale) == ({"cpu": "1"}, 1000 * 10**6, 17, 0)
    assert p.sum == pytest.approx(9000)
    # slot 0, [0, 2) ns: the zero bucket up to 2; slot i: bucket i, (2^i, 2^(i+1)].
    assert (p.zero_count, p.zero_threshold) == (3, 2.0)
    assert (p.positive.offset, list(p.positive.bucket_counts)) == (1, [5, 0, 2, 0, 0, 0, 0, 0, 0, 7])
    assert not p.HasField("negative") and not p.HasField("min") and not p.HasField("max")
    # The explicit form stays: in seconds, the kernel's bounds.
    [m] = otlp.metric_request(rows, "explicit").resource_metrics[0].scope_metrics[0].metrics
    assert (m.name, list(m.histogram.data_points[0].bucket_counts)) == ("syscall_latency_seconds", counts)
    assert list(m.histogram.data_points[0].explicit_bounds) == log2_bounds(HIST_SLOTS, 1e-9)


@pytest.mark.parametrize("histograms", ["exponential", "explicit"])
def test_a_new_series_reaches_otlp_at_zero_then_at_its_value(histograms):
    """The aggregate's first window of a new host: each counter and histogram a point at
    0, 1 ms before the window's close, then one at its value (of one number type: a
    cumulative sum's points should not change type); the gauge its value alone. A
    histogram at 0 is an empty one: no buckets (exponential), or every bucket 0
    (explicit)."""
    zero, snap = new_host.first_window()
    rows = [(s.ts_ms, row) for s in (zero, snap) for row in s.series]
    [rm] = otlp.metric_request(rows, histograms).resource_metrics
    assert attrs(rm.resource.attributes)["host.id"] == "h"
    metrics = {m.name: m for m in rm.scope_metrics[0].metrics}
    t0, t1 = zero.ts_ms * 10**6, snap.ts_ms * 10**6
    files = metrics.pop("file_created_total").sum
    assert [(p.time_unix_nano, p.WhichOneof("value"), p.as_double) for p in files.data_points] == [
        (t0, "as_double", 0.0),
        (t1, "as_double", 1.0),
    ]
    [depth] = metrics.pop("queue_depth").gauge.data_points
    assert (depth.time_unix_nano, depth.as_int) == (t1, 3)
    if histograms == "exponential":
        assert sorted(metrics) == ["request_size_bytes", "syscall_latency_nanoseconds"]
        for name, count in (("syscall_latency_nanoseconds", 3), ("request_size_bytes", 1)):
            p0, p1 = metrics[name].exponential_histogram.data_points
            assert (p0.time_unix_nano, p0.count, p0.sum, p0.scale, p0.zero_count) == (t0, 0, 0.0, 0, 0)
            assert p0.zero_threshold == ZERO_THRESHOLD and not p0.positive.bucket_counts
            assert (p1.time_unix_nano, p1.count) == (t1, count) and sum(p1.positive.bucket_counts) == count
    else:
        assert sorted(metrics) == ["request_size_bytes", "syscall_latency_seconds"]
        for name, count in (("syscall_latency_seconds", 3), ("request_size_bytes", 1)):
            p0, p1 = metrics[name].histogram.data_points
            assert (p0.time_unix_nano, p0.count, p0.sum) == (t0, 0, 0.0)
            assert list(p0.bucket_counts) == [0] * HIST_SLOTS
            assert list(p0.explicit_bounds) == list(p1.explicit_bounds)
            assert (p1.time_unix_nano, p1.count) == (t1, count)


def test_the_bearer_token_file_is_read_for_every_request_over_grpc_and_http(tmp_path, monkeypatch):
    """A token fixed or rotated in its file goes with the next request; over gRPC it
    replaces one from OTEL_EXPORTER_OTLP_HEADERS."""
    token = tmp_path / "token"
    token.write_text("first\n")
    req = otlp_spans.span_request([(RESOURCE, [TRACE, ROOT, b"", "s", 1, 2, 1, "", {}])], otlp.SCOPE)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20env,x-tenant=t1")

    cfg = OtlpConfig(protocol="grpc", endpoint="http://127.0.0.1:1", bearer_token_file=token)
    grpc_exporter, _, _ = otlp.make_exporters(cfg)
    sent = []

    class Stub:
        def Export(self, request, metadata, **_kw):  # noqa: N802 -- the generated stub's name
            sent.append(dict(metadata))

    grpc_exporter._channel = Channel(Stub().Export)
    otlp.send_once(grpc_exporter, req, token)
    token.write_text("second\n")
    otlp.send_once(grpc_exporter, req, token)
    assert sent == [
        {"authorization": "Bearer first", "x-tenant": "t1"},
        {"authorization": "Bearer second", "x-tenant": "t1"},
    ]

    session = otlp.Session(token)
    prepared = session.prepare_request(requests.Request("POST", "http://127.0.0.1:1/v1/traces"))
    assert prepared.headers["Authorization"] == "Bearer second"
    token.write_text("third\n")
    prepared = session.prepare_request(requests.Request("POST", "http://127.0.0.1:1/v1/traces"))
    assert prepared.headers["Authorization"] == "Bearer third"

    # A token file gone (mid-rotation, say) is a credentials problem: retried, the data kept.
    http_exporter, _, _ = otlp.make_exporters(cfg.model_copy(update={"protocol": "http/protobuf"}))
    token.unlink()
    for exporter in (grpc_exporter, http_exporter):
        with pytest.raises(Unauthorized, match=f"cannot read otlp.bearer_token_file {token}"):
            otlp.send_once(exporter, req, token)


async def test_a_stale_snapshot_of_no_series_is_passed_over_and_the_next_record_delivered():
    """A snapshot that holds no series has nothing to deliver or refuse, stale or not.
    (Its refusal once asked for the first of no reasons: the exporter stopped on it at
    every restart and nothing after it on its partition went out.)"""
    sent = []

    def submit(data: bytes, _timeout: float):
        sent.append(data)
        return type("Result", (), {"status_code": 200, "error": None, "content": lambda _self: b""})()

    spans, metrics, logs = otlp.make_exporters(
        OtlpConfig(protocol="http/protobuf", endpoint="http://127.0.0.1:1")
    )
    metrics._client._submit = submit
    sender = otlp.Sender(OtlpConfig(), (spans, metrics, logs))
    now_ms = time.time_ns() // 1_000_000
    records = []
    for offset, snap in enumerate(
        [MetricSnapshot(0, []), MetricSnapshot(now_ms, [["x_total", "counter", {"host.id": "h"}, 5]])]
    ):
        value = wire.encode_snapshot(snap)
        item = wire.decode_snapshot(value)
        records.append(Record(item, "ktel.metrics", 0, offset, b"h1", value, wire.DLQ_TOPIC))
    producer = Producer()

    await asyncio.wait_for(sender.deliver(records, producer), 30)

    assert producer.sent == []  # nothing to dead-letter
    assert len(sent) == 1  # the next record's series went out


def test_long_attribute_values_are_encoded_but_not_kept():
    """A host sending a new 4 KB value in every span must not grow the exporter by
    the encoded copies of them all; short, repeated values are kept encoded."""
    otlp_spans._cache.clear()
    rows = [
        ({"host.id": "h"}, [TRACE, ROOT, b"", "s", 1, 2, 0, "", {"path": f"{i:04d}" + "x" * 4000, "pid": 7}])
        for i in range(100)
    ]
    req = otlp_spans.span_request(rows, otlp.SCOPE)
    spans = req.resource_spans[0].scope_spans[0].spans
    assert [attrs(s.attributes)["path"][:4] for s in spans] == [f"{i:04d}" for i in range(100)]
    assert sum(len(kv.value.string_value) for kv in otlp_spans._cache.values()) < 1000
    assert ("pid", int, 7) in otlp_spans._cache
