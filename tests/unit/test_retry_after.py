"""A backend that says when to come back is not sent the request again before then, and
at most ktel.retry.MAX_RETRY_AFTER_S later: an HTTP Retry-After (seconds or an
HTTP-date: remote-write 2.0's and OTLP/HTTP's throttling), a google.rpc.RetryInfo in
a gRPC error's status details (OTLP/gRPC's). The retries' waits are recorded, not waited
(ktel.retry._sleep); the backends are fakes behind each exporter's own client."""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate

import grpc
import httpx
import pytest
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status as RpcStatus
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from exporters import otlp, remote_write
from exporters.consume import Record
from exporters.delivery import Window, grpc_retry_after, retry_after
from exporters.remote_write_client import Receiver
from ktel import retry as retry_mod
from ktel import wire
from ktel.config import OtlpConfig, RemoteWriteConfig
from ktel.retry import MAX_RETRY_AFTER_S, AskedPastDeadline, Backoff, Transient, retry
from ktel.wire import MetricSnapshot, SpanBatch, decode_snapshot, decode_spans, encode_snapshot, encode_spans
from tests.unit.otlp_grpc import Channel

NOW = 1_764_000_000.0
TRACE = bytes(range(16))


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """Each wait between two attempts, in seconds, in order."""
    waited: list[float] = []

    async def record(seconds: float) -> None:
        waited.append(seconds)

    monkeypatch.setattr(retry_mod, "_sleep", record)
    return waited


class Producer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None]] = []

    async def send_and_wait(self, topic, value, key=None):
        self.sent.append((topic, value, key))


def failing(*failures: Exception):
    """An attempt that fails with each of ``failures`` in turn, then succeeds."""
    left = list(failures)

    async def attempt() -> str:
        if left:
            raise left.pop(0)
        return "taken"

    return attempt


@pytest.mark.parametrize(
    ("asked", "waited"),
    [(30.0, 30.0), (0.5, 0.5), (MAX_RETRY_AFTER_S, MAX_RETRY_AFTER_S), (86_400.0, MAX_RETRY_AFTER_S)],
)
async def test_the_retry_helper_waits_what_was_asked_up_to_its_bound(waits, asked, waited):
    assert await retry(failing(Transient("busy", retry_after=asked)), what="test") == "taken"
    assert waits == [waited]


async def test_a_wait_asked_past_the_deadline_is_not_waited(waits):
    """Within a deadline (ktel dlq --redrive's --backend-wait), a wait asked for that would
    make the next attempt after it raises at once, saying what was asked, in the tasks
    started within it too (the OTLP exporter sends spans and logs in tasks of their own);
    a wait that ends before it, or a failure that asks for none, is waited as ever."""
    loop = asyncio.get_running_loop()
    with retry_mod.deadline(loop.time() + 10):
        busy = Transient("HTTP 503: busy", retry_after=600.0)
        with pytest.raises(AskedPastDeadline) as raised:
            await asyncio.create_task(retry(failing(busy), what="remote-write to x"))
        assert (
            await retry(failing(Transient("busy", retry_after=5.0), Transient("down")), what="x") == "taken"
        )
        # (one within another: the earlier counts)
        with retry_mod.deadline(loop.time() + 3600), pytest.raises(AskedPastDeadline):
            await retry(failing(Transient("busy", retry_after=60.0)), what="x")
    assert (raised.value.failure, raised.value.asked, raised.value.what) == (busy, 600.0, "remote-write to x")
    assert 9 < raised.value.left <= 10
    assert waits[0] == 5.0 and len(waits) == 2
    # Out of it, no deadline.
    assert await retry(failing(Transient("busy", retry_after=600.0)), what="x") == "taken"
    assert waits[2:] == [MAX_RETRY_AFTER_S]


async def test_a_wait_shorter_than_the_backoff_leaves_the_backoff(waits):
    backoff = Backoff(initial=10.0, maximum=10.0, multiplier=1.0)
    asked = [Transient("busy", retry_after=0.0), Transient("busy")]
    await retry(failing(*asked), what="test", backoff=backoff)
    assert len(waits) == 2 and all(0 <= w <= 10.0 for w in waits)


@pytest.mark.parametrize(
    ("header", "wait"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        (formatdate(NOW + 90, usegmt=True), 90.0),  # an HTTP-date
        (formatdate(NOW - 90, usegmt=True), 0.0),  # past: no wait
        ("soon", None),
        ("Mon, 01 Jan 99999999999 00:00:00 GMT", None),  # a year no datetime holds
        ("nan", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_takes_seconds_and_http_dates(header, wait):
    assert retry_after(header, now=NOW) == wait


def details(*messages) -> bytes:
    """A google.rpc.Status holding ``messages`` in its details, as gRPC's
    grpc-status-details-bin trailer carries it."""
    packed = []
    for message in messages:
        any_ = AnyProto()
        any_.Pack(message)
        packed.append(any_)
    return RpcStatus(code=grpc.StatusCode.UNAVAILABLE.value[0], details=packed).SerializeToString()


class RpcError(grpc.RpcError):
    """A failed unary call, as grpc raises it (the error is also the call)."""

    def __init__(self, code: grpc.StatusCode, trailers=()) -> None:
        self._code, self._trailers = code, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "slow down"

    def trailing_metadata(self):
        return self._trailers


def retry_info(seconds: int, nanos: int = 0) -> RetryInfo:
    return RetryInfo(retry_delay=Duration(seconds=seconds, nanos=nanos))


def test_grpc_retry_info_is_read_from_the_status_details():
    status = ("grpc-status-details-bin", details(RpcStatus(message="other"), retry_info(7, 500_000_000)))
    assert grpc_retry_after(RpcError(grpc.StatusCode.UNAVAILABLE, (("x-a", "b"), status))) == 7.5
    assert grpc_retry_after(RpcError(grpc.StatusCode.UNAVAILABLE, (("x-a", "b"),))) is None
    bare = grpc.RpcError()  # (raised by an interceptor: no call, no trailers)
    assert grpc_retry_after(bare) is None
    garbled = ("grpc-status-details-bin", b"\xff\xff")
    assert grpc_retry_after(RpcError(grpc.StatusCode.UNAVAILABLE, (garbled,))) is None
    # A RetryInfo that does not parse (a broken proxy's) asks for nothing, and the answer
    # is classified by its code: a refusal stays one, split and dead-lettered, not retried.
    bad_info = AnyProto(type_url="type.googleapis.com/google.rpc.RetryInfo", value=b"\xff\xff\xff")
    status = RpcStatus(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], details=[bad_info])
    refused = RpcError(
        grpc.StatusCode.INVALID_ARGUMENT, (("grpc-status-details-bin", status.SerializeToString()),)
    )
    assert grpc_retry_after(refused) is None


async def deliver_remote_write(answers: list[httpx.Response]) -> int:
    """Deliver one snapshot to a receiver answering ``answers`` in turn; the requests made."""
    requests = 0

    def receive(request: httpx.Request) -> httpx.Response:
        nonlocal requests
        requests += 1
        return answers.pop(0)

    snap = MetricSnapshot(time.time_ns() // 1_000_000, [["g", "gauge", {"host.id": "h"}, 1.0]])
    value = encode_snapshot(snap)
    rec = Record(decode_snapshot(value), wire.METRICS_TOPIC, 0, 5, b"h", value, wire.DLQ_TOPIC)
    async with Receiver(RemoteWriteConfig(url="http://receiver.test/api/v1/write")) as receiver:
        receiver.client = httpx.AsyncClient(transport=httpx.MockTransport(receive))
        window = Window(3600, 600, "remote_write")
        # (the timeout is only a guard against retrying for ever)
        await asyncio.wait_for(remote_write.deliver(receiver, [rec], Producer(), window), 30)
    return requests


async def test_remote_write_waits_what_a_429_retry_after_asks(waits):
    answers = [httpx.Response(429, headers={"Retry-After": "30"}), httpx.Response(204)]
    assert await deliver_remote_write(answers) == 2
    assert waits == [30.0]


async def test_an_answer_whose_retry_after_is_no_date_is_taken_as_it_is(waits):
    """A Retry-After of a year past any date (a broken proxy's) asks for nothing: the
    2xx it came with is a success, the request not sent again."""
    garbled = {"Retry-After": "Mon, 01 Jan 99999999999 00:00:00 GMT"}
    answers = [httpx.Response(204, headers=garbled), httpx.Response(204)]
    assert await deliver_remote_write(answers) == 1
    assert waits == []


async def test_remote_write_waits_at_most_the_bound_for_a_far_http_date(waits):
    later = formatdate(time.time() + 3600, usegmt=True)
    answers = [httpx.Response(503, headers={"Retry-After": later}), httpx.Response(204)]
    assert await deliver_remote_write(answers) == 2
    assert waits == [MAX_RETRY_AFTER_S]


def span_record() -> Record:
    now = time.time_ns()
    rows = [[TRACE, b"\x01" * 8, b"", "s", now, now + 1, 0, "", {}]]
    value = encode_spans(SpanBatch({"host.id": "h1"}, rows))
    return Record(decode_spans(value), "ktel.spans", 0, 3, b"h1", value, wire.DLQ_TOPIC)


class HttpResult:
    """An OTLP/HTTP answer as the SDK's transport returns it."""

    def __init__(self, status: int, headers: dict[str, str]) -> None:
        self.status_code, self.error = status, None
        self._headers = httpx.Headers(headers)  # (case-insensitive, as the SDK's are)

    def content(self) -> bytes:
        if self.status_code == 200:
            return ExportTraceServiceResponse().SerializeToString()
        return RpcStatus(message="slow down").SerializeToString()

    def headers(self):
        return self._headers


async def test_otlp_http_waits_what_a_retry_after_asks(waits):
    spans, metrics, logs = otlp.make_exporters(
        OtlpConfig(protocol="http/protobuf", endpoint="http://127.0.0.1:1")
    )
    answers = [
        HttpResult(429, {"retry-after": "12"}),
        HttpResult(503, {"Retry-After": "9999"}),
        HttpResult(200, {}),
    ]
    spans._client._submit = lambda _data, _timeout: answers.pop(0)
    sender = otlp.Sender(OtlpConfig(), (spans, metrics, logs))
    await asyncio.wait_for(sender.deliver([span_record()], Producer()), 30)
    assert answers == []
    assert waits == [12.0, MAX_RETRY_AFTER_S]


async def test_otlp_grpc_waits_what_a_retry_info_asks(waits):
    spans, metrics, logs = otlp.make_exporters(OtlpConfig(protocol="grpc", endpoint="http://127.0.0.1:1"))
    throttled = [
        RpcError(grpc.StatusCode.UNAVAILABLE, (("grpc-status-details-bin", details(retry_info(20))),)),
        RpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, (("grpc-status-details-bin", details(retry_info(3600))),)
        ),
    ]

    class Stub:
        def Export(self, request, **_kw):  # noqa: N802 -- the generated stub's name
            if throttled:
                raise throttled.pop(0)
            return ExportTraceServiceResponse()

    spans._channel = Channel(Stub().Export)
    sender = otlp.Sender(OtlpConfig(), (spans, metrics, logs))
    await asyncio.wait_for(sender.deliver([span_record()], Producer()), 30)
    assert throttled == []
    assert waits == [20.0, MAX_RETRY_AFTER_S]
