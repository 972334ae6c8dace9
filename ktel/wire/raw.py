"""Raw batches (topics ``ktel.raw``, ``ktel.deduped``, ``ktel.enriched``, ``ktel.sampled``;
key = host id as UTF-8) and the event kinds they carry.

Record::

    {"v": 1,
     "host": str,        # host id (/etc/machine-id)
     "boot": str,        # boot id (/proc/sys/kernel/random/boot_id)
     "inc": str,         # optional: the agent's incarnation, a random id made when
                         # its state (edge_agent/seqstore.py) was created; a new
                         # one starts a new numbering. Absent: one numbering per boot
     "seq": int,         # batch sequence number, strictly increasing per host
                         # across agent restarts; (host, boot, inc, seq) is unique
     "part": [int, int], # optional: this batch is the part of batch ``seq`` that
                         # starts at its event ``part[0]``, of ``part[1]`` events in
                         # all (a batch Kafka refused as too large is split)
     "sent": int,        # wall clock (ns since epoch) when the batch was sealed
     "events": [[kind_id, field, ...], ...],
     "w": [float, ...],  # optional: each event's sampling weight (how many events
                         # it stands for); absent means every weight is 1
     "res": {attr: value},              # optional, added by the enrich stage: the
                         # host's OpenTelemetry resource attributes (host.id,
                         # host.name, host.arch, os.type, os.version, ...)
     "proc": {str(pid): {attr: value}}} # optional, added by the enrich stage: what is
                         # known of the processes this batch's events name
                         # (process.executable.name, process.parent_pid,
                         # container.id, k8s.pod.name, ...); unknown stays absent

On ``ktel.raw`` a record may instead be one zstd frame holding those msgpack bytes,
its content size in the frame's header (ktel/wire/codec.py, compress): the agent
compresses its batches itself with ``agent.compression = "zstd"``, the default, and
sends them without a Kafka codec. Readers take both; a frame that declares no size,
or more than ``MAX_RECORD_BYTES``, or holds more than it declares, is refused.

An event is an array, not a map: its first element is the kind id and the rest
are the kind's fields in order. Arrays keep per-event encode/decode cost near
zero, which is the agent's ceiling. The kinds, their fields, types and ranges
are declared by the probes that send them (ktel/probes/); ``ktel probes --kinds``
lists them. Every event of a batch is checked against its kind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import msgpack

from ktel.probes import HISTOGRAM_DELTA, KINDS
from ktel.schema import ATTR_VALUE, TS_NS, U63, Array, Int, IntList, Key, MapOf, Shape, Str, brief
from ktel.wire.codec import SCHEMA_VERSION, ZSTD_MAGIC, WireError, decompress, pack, unpack
from ktel.wire.control import EVERY_HOST

# A batch holds at most this many events (the agent seals at agent.batch_max_events).
MAX_EVENTS = 100_000
# The longest host id a batch may carry (agent.host_id is held to it).
HOST_CHARS = 256
# A weight stands for at most this many events: integers up to 2**53 are exact floats.
MAX_WEIGHT = float(1 << 53)
# What enrich adds: the host's resource, and the processes a batch names
# (enrich.max_processes), each of at most as many attributes as enrich gives
# (processors/enrich_core.py). The aggregate makes a span's or log's resource of a
# host's and its process's together (and process.pid), which its reader takes up to
# ATTRS' 128 (ktel/wire/signals.py): a batch taken here makes no record refused there.
# The host's: its heartbeat's (HOST_ATTRS, 32) and host.id.
RESOURCE_ATTRS = 33
# A process's: its own 6, its container's as its agent tells them (16) and a metadata
# feed line's (enrich_core.FEED_MAX_ATTRS, 64).
PROCESS_ATTRS = 86
RESOURCE = MapOf(ATTR_VALUE, RESOURCE_ATTRS)
PROCESSES = MapOf(MapOf(ATTR_VALUE, PROCESS_ATTRS), 8192, key_len=10)

SHAPE = Shape(
    (
        Key("host", Str(HOST_CHARS)),
        Key("boot", Str(256)),
        Key("inc", Str(64), required=False),
        Key("seq", Int(0, U63)),
        Key("part", IntList(2, 0, MAX_EVENTS), required=False),
        Key("sent", TS_NS),
        Key("events", Array(MAX_EVENTS)),  # each event checked against its kind
        Key("w", Array(MAX_EVENTS), required=False),  # checked with the events
        Key("res", RESOURCE, required=False),
        Key("proc", PROCESSES, required=False),
    )
)

# kind id -> the kind's validator (one lookup per event on the hot path).
_VALID = {k.id: k.valid for k in KINDS.values()}
# Where a histogram_delta holds its count and its buckets (``decode_batch`` checks one
# against the other).
_DELTA_COUNT, _DELTA_BUCKETS = HISTOGRAM_DELTA.index("count"), HISTOGRAM_DELTA.index("buckets")

# Fields of an event that name a process (whose attributes enrich attaches).
PID_FIELDS = ("pid", "trigger_pid")
# kind id -> indexes in the event array of its PID_FIELDS (index 0 is the kind id).
PID_INDEXES: dict[int, tuple[int, ...]] = {
    k.id: idx for k in KINDS.values() if (idx := tuple(k.index(f) for f in k.field_names if f in PID_FIELDS))
}


@dataclasses.dataclass(frozen=True)
class RawBatch:
    host_id: str
    boot_id: str
    seq: int
    sent_ns: int
    events: Sequence[Sequence[Any]]
    # Sampling weights, parallel to events; None when every event weighs 1.
    weights: Sequence[float] | None = None
    # Added by the enrich stage (see the module docstring); None before it.
    resource: dict[str, Any] | None = None
    processes: dict[str, dict[str, Any]] | None = None
    # The agent's incarnation; None from an agent that predates it (see the module docstring).
    incarnation: str | None = None
    # [first event, events in all] of the batch this one is a part of; None when whole.
    part: list[int] | None = None

    @property
    def key(self) -> bytes:
        return self.host_id.encode()

    def keeping(self, events: Sequence[Sequence[Any]], weights: Sequence[float] | None) -> RawBatch:
        """This batch with only ``events`` (some of its own) and their weights.

        The attributes of processes that only the dropped events named go with them."""
        if weights is None and self.weights is None and len(events) == len(self.events):
            return self  # (all kept, as most batches are: no new batch to make)
        processes = self.processes
        if processes and len(events) < len(self.events):
            named = {str(ev[i]) for ev in events for i in PID_INDEXES.get(ev[0], ())}
            processes = {pid: attrs for pid, attrs in processes.items() if pid in named}
        return dataclasses.replace(self, events=events, weights=weights, processes=processes)


def _fields(batch: RawBatch, events: Any) -> dict[str, Any]:
    """The record's map but ``v``, in the order it is written."""
    obj: dict[str, Any] = {
        "host": batch.host_id,
        "boot": batch.boot_id,
    }
    # Written only when set, so that a batch without them keeps its v1 bytes.
    if batch.incarnation is not None:
        obj["inc"] = batch.incarnation
    obj["seq"] = batch.seq
    if batch.part is not None:
        obj["part"] = batch.part
    obj |= {
        "sent": batch.sent_ns,
        "events": events,
    }
    if batch.weights is not None:
        obj["w"] = batch.weights
    if batch.resource is not None:
        obj["res"] = batch.resource
    if batch.processes is not None:
        obj["proc"] = batch.processes
    return obj


def encode_batch(batch: RawBatch) -> bytes:
    return pack(_fields(batch, batch.events))


# Stands for the events in the map encode_packed packs around them.
_EVENTS = object()


def encode_packed(batch: RawBatch, count: int, events: bytes | bytearray) -> bytes:
    """``encode_batch`` of ``batch`` with ``count`` events given packed, end to end in
    ``events`` (ktel/probes/decode.py, PackedEvents): the same bytes, without
    unpacking them.

    The agent holds its events packed (a file creation is packed straight from its
    ring-buffer record, ktel/probes/file_created.py), so sealing a batch costs a copy."""
    packer = msgpack.Packer(use_bin_type=True)
    obj = {"v": SCHEMA_VERSION, **_fields(batch, _EVENTS)}
    out: list[bytes | bytearray] = [packer.pack_map_header(len(obj))]
    for key, value in obj.items():
        out.append(packer.pack(key))
        if value is _EVENTS:
            out.append(packer.pack_array_header(count))
            out.append(events)
        else:
            out.append(packer.pack(value))
    return b"".join(out)


def _bad_event(events: list, what: str) -> WireError:
    """The first event that fails its kind, named (the slow path, after a failed check)."""
    for i, ev in enumerate(events):
        if not isinstance(ev, list) or not ev:
            return WireError(f"{what}: event {i} is not a non-empty array")
        kind = KINDS.get(ev[0]) if type(ev[0]) is int else None
        if kind is None:
            return WireError(f"{what}: event {i} has unknown kind id {brief(ev[0])}")
        if not kind.valid(ev):
            return WireError(f"{what}: event {i} ({kind.name}) {kind.why(ev)}")
    return WireError(f"{what}: an event failed its check")  # not reached


def host_id_problem(host_id: str) -> str | None:
    """Why ``host_id`` is no host id a batch may carry, or None: the one rule, which a
    batch's host is held to and a record's key is judged by (``key_problem``)."""
    if len(host_id) > HOST_CHARS:
        return f"host id of {len(host_id)} characters is longer than the {HOST_CHARS} a host id may take"
    if host_id == EVERY_HOST:
        # The sample stage commands a host by its id: this one's would go to every agent.
        return f"host id {EVERY_HOST!r} is ktel.control's every-host target, not a host's"
    return None


def key_problem(key: bytes) -> str | None:
    """Why a record's key names no host id a batch may carry (a batch is keyed by its
    host id in UTF-8), or None."""
    try:
        host_id = key.decode()
    except UnicodeDecodeError:
        return "a host id is UTF-8, and this key is not"
    return host_id_problem(host_id)


def decode_batch(data: bytes | bytearray) -> RawBatch:
    """Decode a raw batch, plain or zstd-compressed (codec.compress), and check every
    event against its kind; raises WireError naming what is wrong."""
    what = "raw batch"
    if isinstance(data, bytes | bytearray) and data[:4] == ZSTD_MAGIC:
        data = decompress(data, what)
    obj = unpack(data, what, SHAPE)
    problem = host_id_problem(obj["host"])
    if problem is not None:
        raise WireError(f"{what}: {problem}")
    events = obj["events"]
    valid = _VALID
    try:
        ok = all(valid[ev[0]](ev) for ev in events)
    except (KeyError, TypeError, IndexError):  # no kind id, or an unknown one
        ok = False
    if not ok:
        raise _bad_event(events, what)
    # A delta's count is what the aggregate counts of it (events, and drops of a full
    # histogram), its buckets what it adds: one apart from the other would count
    # observations that are not there, or add some uncounted.
    hid, count, buckets = HISTOGRAM_DELTA.id, _DELTA_COUNT, _DELTA_BUCKETS
    for ev in events:
        if ev[0] == hid and ev[count] != sum(ev[buckets]):
            raise WireError(
                f"{what}: a histogram_delta of {ev[count]} values whose buckets hold {sum(ev[buckets])}"
            )
    weights = obj.get("w")
    if weights is not None and (
        len(weights) != len(events)
        # NaN fails both comparisons; a bool is not a weight.
        or not all(type(w) in (int, float) and 0 < w <= MAX_WEIGHT for w in weights)
    ):
        raise WireError(f"{what}: 'w' must be one positive weight (at most 2**53) per event")
    part = obj.get("part")
    if part is not None and not (part[0] + len(events) <= part[1] and events):
        raise WireError(f"{what}: 'part' must name where its events lie among the whole batch's")
    return RawBatch(
        host_id=obj["host"],
        boot_id=obj["boot"],
        seq=obj["seq"],
        sent_ns=obj["sent"],
        events=events,
        weights=weights,
        resource=obj.get("res"),
        processes=obj.get("proc"),
        incarnation=obj.get("inc"),
        part=obj.get("part"),
    )


def event_dict(event: Sequence[Any]) -> dict[str, Any]:
    """Name an event's fields; for tests, replay and logs, not hot paths."""
    kind = KINDS[event[0]]
    return {"kind": kind.name, **dict(zip(kind.field_names, event[1:], strict=True))}
