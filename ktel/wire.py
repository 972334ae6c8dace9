"""The one wire module: every shape that crosses Kafka is defined here.

The edge agent, the processors, the exporters and replay all import this
module; nothing else defines a record or an event layout.

Topics
------
``ktel.raw``       raw event batches from the agents, keyed by host id, kept for
                   forensics (retention configurable, 7 days by default).
``ktel.metrics``   metric snapshots produced by the aggregate stage.
``ktel.dlq``       records a stage could not use, with the reason and the bytes.

Records are msgpack maps with short keys; every record carries ``v`` (the
schema version). A reader rejects a version it does not know rather than
guessing at its layout.

Raw batch record (topic ``ktel.raw``, key = host id as UTF-8)::

    {"v": 1,
     "host": str,        # host id (/etc/machine-id)
     "boot": str,        # boot id (/proc/sys/kernel/random/boot_id)
     "seq": int,         # batch sequence number, strictly increasing per host
                         # across agent restarts; (host, boot, seq) is unique
     "sent": int,        # wall clock (ns since epoch) when the batch was sealed
     "events": [[kind_id, field, ...], ...]}

An event is an array, not a map: its first element is the kind id and the rest
are the kind's fields in the order ``EventKind.fields`` gives. Arrays keep
per-event encode/decode cost near zero, which is the agent's ceiling.

Metric snapshot record (topic ``ktel.metrics``, key = host id)::

    {"v": 1,
     "ts": int,          # sample timestamp, ms since epoch
     "series": [[name, type, {label: value}, value], ...]}

``type`` is ``"counter"`` (cumulative since the series began) or ``"gauge"``.

Dead-letter record (topic ``ktel.dlq``, key = the original key)::

    {"v": 1, "stage": str, "reason": str, "topic": str, "partition": int,
     "offset": int, "payload": bytes}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import msgpack

SCHEMA_VERSION = 1

RAW_TOPIC = "ktel.raw"
METRICS_TOPIC = "ktel.metrics"
DLQ_TOPIC = "ktel.dlq"


class WireError(ValueError):
    """A record that cannot be used; ``str(err)`` is the reason for the DLQ."""


@dataclasses.dataclass(frozen=True)
class EventKind:
    id: int
    name: str
    fields: tuple[str, ...]


# Kind ids are an ABI: never reuse or renumber one.
FILE_CREATED = EventKind(
    1,
    "file_created",
    (
        "ts_ns",  # CLOCK_MONOTONIC of the creating syscall's return (bpf_ktime_get_ns)
        "pid",  # thread group id (process.pid)
        "tid",  # thread id
        "uid",
        "comm",  # process.executable.name as the kernel knows it (16 bytes max)
        "path",  # absolute when the agent could resolve it, else as the caller passed it
        "flags",  # open flags
        "certain",  # True: O_EXCL or filewatcher saw the create; False: O_CREAT on
        #            a file that may already have existed (stable-tracepoint fallback)
    ),
)

KINDS: dict[int, EventKind] = {k.id: k for k in (FILE_CREATED,)}


@dataclasses.dataclass(frozen=True)
class RawBatch:
    host_id: str
    boot_id: str
    seq: int
    sent_ns: int
    events: Sequence[Sequence[Any]]

    @property
    def key(self) -> bytes:
        return self.host_id.encode()


@dataclasses.dataclass(frozen=True)
class MetricSnapshot:
    ts_ms: int
    series: Sequence[Sequence[Any]]  # [name, type, labels, value]


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    stage: str
    reason: str
    topic: str
    partition: int
    offset: int
    payload: bytes


def _pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes, what: str) -> dict[str, Any]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"{what}: expected bytes, got {type(data).__name__}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as err:  # msgpack raises several unrelated types
        raise WireError(f"{what}: not msgpack ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise WireError(f"{what}: expected a map, got {type(obj).__name__}")
    version = obj.get("v")
    if version != SCHEMA_VERSION:
        raise WireError(f"{what}: unknown schema version {version!r} (this reader knows {SCHEMA_VERSION})")
    return obj


def _field(obj: dict[str, Any], name: str, typ: type | tuple[type, ...], what: str) -> Any:
    value = obj.get(name)
    if not isinstance(value, typ) or isinstance(value, bool) and typ is int:
        raise WireError(f"{what}: field {name!r} must be {typ}, got {value!r:.60}")
    return value


def encode_batch(batch: RawBatch) -> bytes:
    return _pack(
        {
            "v": SCHEMA_VERSION,
            "host": batch.host_id,
            "boot": batch.boot_id,
            "seq": batch.seq,
            "sent": batch.sent_ns,
            "events": batch.events,
        }
    )


def decode_batch(data: bytes) -> RawBatch:
    """Decode a raw batch; raises WireError naming what is wrong."""
    what = "raw batch"
    obj = _unpack(data, what)
    events = _field(obj, "events", list, what)
    for i, ev in enumerate(events):
        if not isinstance(ev, list) or not ev:
            raise WireError(f"{what}: event {i} is not a non-empty array")
        kind = KINDS.get(ev[0])
        if kind is None:
            raise WireError(f"{what}: event {i} has unknown kind id {ev[0]!r}")
        if len(ev) != len(kind.fields) + 1:
            raise WireError(
                f"{what}: event {i} ({kind.name}) has {len(ev) - 1} fields, expected {len(kind.fields)}"
            )
    seq = _field(obj, "seq", int, what)
    if seq < 0:
        raise WireError(f"{what}: negative sequence number {seq}")
    return RawBatch(
        host_id=_field(obj, "host", str, what),
        boot_id=_field(obj, "boot", str, what),
        seq=seq,
        sent_ns=_field(obj, "sent", int, what),
        events=events,
    )


def event_dict(event: Sequence[Any]) -> dict[str, Any]:
    """Name an event's fields; for tests, replay and logs, not hot paths."""
    kind = KINDS[event[0]]
    return {"kind": kind.name, **dict(zip(kind.fields, event[1:], strict=True))}


def encode_snapshot(snap: MetricSnapshot) -> bytes:
    return _pack({"v": SCHEMA_VERSION, "ts": snap.ts_ms, "series": snap.series})


def decode_snapshot(data: bytes) -> MetricSnapshot:
    what = "metric snapshot"
    obj = _unpack(data, what)
    series = _field(obj, "series", list, what)
    for i, s in enumerate(series):
        if (
            not isinstance(s, list)
            or len(s) != 4
            or not isinstance(s[0], str)
            or s[1] not in ("counter", "gauge")
            or not isinstance(s[2], dict)
            or not isinstance(s[3], int | float)
        ):
            raise WireError(f"{what}: series {i} is not [name, counter|gauge, labels, number]")
    return MetricSnapshot(ts_ms=_field(obj, "ts", int, what), series=series)


def encode_dead_letter(dl: DeadLetter) -> bytes:
    return _pack({"v": SCHEMA_VERSION, **dataclasses.asdict(dl)})


def decode_dead_letter(data: bytes) -> DeadLetter:
    obj = _unpack(data, "dead letter")
    obj.pop("v")
    try:
        return DeadLetter(**obj)
    except TypeError as err:
        raise WireError(f"dead letter: {err}") from None
