"""Kernel spans -> an OTLP ``ExportTraceServiceRequest``.

Why not the SDK's path (wire row -> ``ReadableSpan`` -> ``encode_spans``): the
SDK builds a protobuf message per attribute, value and span in Python, and that
was the OTLP exporter's ceiling at about 40 k spans per CPU-second (bench/RESULTS.md).
Building the request from the wire rows directly, with each distinct attribute
(key, value) encoded once and copied into the spans that carry it, is about three
times faster. The messages are the generated ``opentelemetry-proto`` ones and
attribute values are encoded by the SDK's own helper, so the request is the one
the SDK would send (tests/unit/test_otlp_mapping.py compares them).

The mapping, as the SDK's: trace and span ids as given; a non-empty parent id is
the parent (same trace, not remote, so the flags say "parent is local"); kind
INTERNAL (the wire has none); status code, and its message for errors only;
attributes as given; one ``ResourceSpans`` per distinct resource map, under the
instrumentation scope ``ktel``.

An attribute OTLP cannot carry (an int beyond int64, a key that is not a string
or is empty, a value of another type) is left out of its span or resource and counted; the rest
of the span goes. It is logged once for each key and type of value, up to a bound
(``Once``): a batch of spans full of such attributes, one line each, made eight
times its size in logs. ``carried`` does the same for log records and their
resources, which the SDK encodes.

The request is sent as it is (exporters/otlp.py, ``send_once``); the Collector
tests (tests/integration/test_otlp_collector.py) send through both protocols.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar

from opentelemetry.exporter.otlp.proto.common._internal import (
    _encode_instrumentation_scope,
    _encode_key_value,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, SpanFlags, Status
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import Counter

from ktel.logs import Once
from ktel.schema import I64

log = logging.getLogger("ktel.export.otlp")

# The wire's status codes are OTLP's (0 unset, 1 ok, 2 error).
_STATUS = {0: Status(), 1: Status(code=Status.STATUS_CODE_OK)}
_FLAGS = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK  # and not IS_REMOTE: parents are local
_INTERNAL = Span.SPAN_KIND_INTERNAL
# Distinct attribute (key, value) pairs kept encoded. Kernel spans repeat a few keys
# with few values (pids, comms, paths of one workload); past this many it starts over.
# Floats are not kept: -0.0 == 0.0 and NaN != NaN would make wrong or useless entries.
# Nor are long keys or values (the wire takes strings of 4,096 characters): a host
# sending a new long value in every span would otherwise hold about 65,536 x 8 KiB,
# half a GiB, here; short ones bound the cache to a few tens of MiB.
_CACHE_SIZE = 65_536
_CACHED_LEN = 256
_CACHED_TYPES = frozenset({str, int, bool, bytes})
_SIZED = frozenset({str, bytes})
_cache: dict[tuple[str, type, Any], KeyValue] = {}

DROPPED_ATTRIBUTES = Counter(
    "ktel_exporter_otlp_dropped_attributes",
    "attributes of spans, logs, data points and their resources left out because OTLP cannot carry them "
    "(an int beyond int64, a non-string key)",
)


def _key_value(key: str, value: Any) -> KeyValue:
    t = type(value)
    if (
        t not in _CACHED_TYPES
        or type(key) is not str
        or len(key) > _CACHED_LEN
        or (t in _SIZED and len(value) > _CACHED_LEN)
    ):
        return _encoded(key, value)
    cache_key = (key, t, value)  # the type keeps True apart from 1
    kv = _cache.get(cache_key)
    if kv is None:
        if len(_cache) >= _CACHE_SIZE:
            _cache.clear()
        kv = _cache[cache_key] = _encoded(key, value)
    return kv


def _encoded(key: Any, value: Any) -> KeyValue:
    # OTLP requires an attribute's key to be non-empty, which the wire's maps do not
    # (the SDK's encoder sends one, while its Resource drops one uncounted).
    if key == "":
        raise ValueError("an empty key, which OTLP does not allow")
    return _encode_key_value(key, value)


def _attributes(attrs: dict[Any, Any]) -> list[KeyValue]:
    try:
        return [_key_value(k, v) for k, v in attrs.items()]
    except Exception:  # noqa: BLE001 -- any attribute the encoder refuses: the slow path sorts them out
        return [kv for k, v in attrs.items() if (kv := _carried(k, v)) is not None]


def carried(attrs: dict[Any, Any]) -> dict[Any, Any]:
    """``attrs`` without what OTLP cannot carry (left out, logged and counted), for
    the SDK's own encoders (log records, a log's resource): those leave such an
    attribute out with a traceback each and count nothing."""
    if all(type(k) is str and k and _fits(v) for k, v in attrs.items()):
        return attrs  # (looked at, not encoded: the SDK's encoder does that once)
    return {k: v for k, v in attrs.items() if _carried(k, v) is not None}


def _fits(value: Any) -> bool:
    """Whether OTLP carries ``value``, told without encoding it, for the values the
    wire holds (anything else is tried by encoding it): a string, float or bool, an
    int within int64, or an array of them."""
    t = type(value)
    if t is int:
        return I64[0] <= value <= I64[1]
    if t is list:
        return all(_fits(v) for v in value)
    return t is str or t is float or t is bool


# Attributes left out that were logged, by key and type of value (keys are short: the
# wire's are at most 256 characters).
_warned = Once()


# The attributes left out while ``converted`` builds a request, counted once the backend
# takes it: a request is built again at each retry and each half of a refused one, and
# counting each build counted an attribute once per attempt (hundreds of times while a
# backend was away). Outside ``converted``, counted at once.
_left_out: ContextVar[list[int] | None] = ContextVar("_left_out", default=None)
R = TypeVar("R")


def converted(convert: Callable[[Any], R], rows: Any) -> tuple[R, int]:
    """``convert(rows)``, and how many attributes it left out (not yet counted in
    DROPPED_ATTRIBUTES: the caller counts them once the request is taken)."""
    tally = [0]
    token = _left_out.set(tally)
    try:
        return convert(rows), tally[0]
    finally:
        _left_out.reset(token)


def _carried(key: Any, value: Any) -> KeyValue | None:
    try:
        return _key_value(key, value)
    except Exception as err:  # noqa: BLE001
        tally = _left_out.get()
        if tally is None:
            DROPPED_ATTRIBUTES.inc()
        else:
            tally[0] += 1
        if _warned((key, type(value))):
            log.warning(
                "attribute %.60r = %.60r left out: %s (counted in "
                "ktel_exporter_otlp_dropped_attributes_total; logged once for its key and type)",
                key,
                value,
                err,
            )
        return None


def span_request(
    rows: Sequence[tuple[dict[str, Any], Sequence[Any]]], scope: InstrumentationScope
) -> ExportTraceServiceRequest:
    """(resource map, wire span row) pairs -> the OTLP request for them.

    Rows whose resource maps are equal go into one ``ResourceSpans``; a map is
    looked at once per object (every row of a wire batch shares its batch's map).
    """
    by_object: dict[int, tuple[dict[str, Any], list[Span]]] = {}  # id(resource) -> it, its spans
    for resource, (trace_id, span_id, parent_id, name, start, end, status, message, attrs) in rows:
        entry = by_object.get(id(resource))
        if entry is None:
            entry = by_object[id(resource)] = (resource, [])
        entry[1].append(
            Span(
                trace_id=trace_id,
                span_id=span_id,
                parent_span_id=parent_id,
                name=name,
                kind=_INTERNAL,
                start_time_unix_nano=start,
                end_time_unix_nano=end,
                attributes=_attributes(attrs),
                status=Status(code=status, message=message) if status == 2 else _STATUS[status],
                flags=_FLAGS,
            )
        )
    # Equal maps from different batches (one host's records) share one ResourceSpans.
    merged: dict[str, tuple[dict[str, Any], list[Span]]] = {}
    for resource, spans in by_object.values():
        merged.setdefault(repr(sorted(resource.items(), key=_first_str)), (resource, []))[1].extend(spans)
    pb_scope = _encode_instrumentation_scope(scope)
    return ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=_attributes(resource)),
                scope_spans=[ScopeSpans(scope=pb_scope, spans=spans)],
            )
            for resource, spans in merged.values()
        ]
    )


def _first_str(item: tuple[Any, Any]) -> str:
    return str(item[0])  # resource keys are strings; a wire record's may not be


def count(request: ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
