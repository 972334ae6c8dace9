"""The pipeline's own records: agent heartbeats (``ktel.heartbeats``), fidelity commands
(``ktel.control``) and dead letters (``ktel.dlq``).

Heartbeat (key = host id)::

    {"v": 1, "ts": int (ms),
     "seq": int,                  # optional: orders the heartbeats of one boot (see below)
     "host": {"host.id", "host.name", "host.arch", "os.type", "os.version" (kernel
              release), "boot.id", "ktel.agent.version"},
     "interval_s": float,         # the agent's heartbeat period: the next is due that long after
     "probes": {name: {"loaded": bool, "reason": str, "sample_every": int,
                       "command": command id in force or None}},
     "counters": {name: int},     # cumulative since the agent started (see edge_agent/agent.py)
     "rates": {name: float},      # per second since the previous heartbeat (since start in the first)
     "spool": {"depth_bytes": int},
     "send_latency_ms": {"p50": float, "max": float},
     "acked_commands": [command id, ...],
     "refused_commands": [[command id, reason], ...],  # optional
     "containers": [[cgroup_id, {attr: str}], ...],   # optional
     "node": {name: int},         # optional: the node's SLI readings (edge_agent/node_stats.py)
     "node_left_out": {"disks": int},  # optional: readings of the node ``node`` had no room for
     "stopping": true}            # optional: the last heartbeat of an agent stopped on purpose

``node`` holds what the agent read of its node: ``cpu_steal_ms`` and
``context_switches`` (cumulative since boot, /proc/stat), ``cpus`` (online CPUs),
``disk_in_flight.<device>``
(I/Os in progress now, /proc/diskstats) and, per BPF hash map of a loaded probe,
``map_entries.<probe>.<map>`` and ``map_max_entries.<probe>.<map>``, at most
``MAX_NODE_READINGS`` in all (a node with more disks sends the first by name, and
the number of the others in ``node_left_out``). The processing workers export a
bounded part of it per host and count what is left out, by the agent or by them
(processors/fleet_metrics.py).
``containers`` lists the cgroups the agent knows to be a container's or a pod's
(edge_agent/containers.py), each with its ``container.*`` and ``k8s.*``
attributes. ``acked_commands`` names the commands the agent applied since its
previous heartbeat; ``refused_commands`` those it refused as out of bounds, each
with the reason (edge_agent/control.py), its id cut to the agent's
``agent.control_max_id_chars``. Only ``ts``, ``host`` (with ``host.id``),
``probes`` and ``counters`` must be there; what is there must have its type.

``ts`` is the heartbeat's time by the agent's wall clock, which the workers show
(``ktel_agent_last_heartbeat_timestamp_seconds``, ``ktel status``), but which steps
back when the node's clock is set (NTP, a VM restored: see ``heartbeat_older``).
``seq`` orders the heartbeats of one boot instead: strictly increasing within a boot,
across agent restarts too (the agent numbers them from CLOCK_MONOTONIC,
edge_agent/agent.py). The workers take a
host's heartbeats in order and ignore one older than those taken of its boot, a
re-delivery (``heartbeat_older``); ordered by ``ts`` alone, as older agents' without
``seq`` are, a clock set back an hour had every heartbeat ignored for that hour, the
host's attributes and readings frozen and the host reported down. A heartbeat of
a boot not taken before is newer whatever its numbers.

Control command (key = target)::

    {"v": 1, "id": str, "target": host id or "*" (the whole fleet),
     "probe": str, "sample_every": int >= 1, "until_ms": int,
     "ttl_ms": int,               # optional
     "restore": true}             # optional

sets a probe's sampling to 1 in ``sample_every`` for ``ttl_ms`` from when the
agent applies it; afterwards the agent's configured rate comes back. A duration,
not a deadline, so that the sender's and the agent's clocks need not agree.
``until_ms`` is the same deadline on the sender's wall clock, for agents that
predate ``ttl_ms``; a command without ``ttl_ms`` (from such a sender) lasts
``until_ms`` minus the record's Kafka timestamp, both from the sender's clock.
A command with ``restore`` ends the probe's command in force instead: the agent's
configured rate comes back now. Agents that predate ``restore`` ignore it (a map
may carry keys its reader does not know) and apply ``sample_every`` for ``ttl_ms``
as for any command, so a restore carries the rate and the duration for them.
The agent refuses a command out of its bounds (edge_agent/control.py).

Dead letter (key = the original key)::

    {"v": 1, "stage": str, "reason": str, "topic": str, "partition": int,
     "offset": int, "payload": bytes}

Re-drive marker (key = the dead letter's key on ktel.dlq, in its partition, after it)::

    {"v": 1, "redriven": {"partition": int, "offset": int, "at_ms": int, "to": str}}

says that ``ktel dlq --redrive`` delivered the dead letter at
``ktel.dlq[partition]@offset`` at ``at_ms`` (its wall clock) to ``to`` (the backend it
was sent to, or the topic it was re-published to), so that a later re-drive skips it
(ktel/dlq.py). The two are one family: ``decode_dlq_record`` reads either, and
``decode_dead_letter`` refuses a marker. A record with a ``redriven`` key is a marker,
whatever else it holds, and is never taken for a dead letter; readers that predate
markers refuse one as not a dead letter (it has none of a dead letter's fields).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NotRequired, TypedDict

from opentelemetry.semconv._incubating.attributes.host_attributes import HOST_ID

from ktel.schema import (
    U32,
    U63,
    U64,
    Blob,
    Bool,
    Field,
    Float,
    Int,
    Key,
    ListOf,
    MapOf,
    Row,
    Shape,
    Str,
)
from ktel.wire.codec import MAX_RECORD_BYTES, SEND_MAX_BYTES, WireError, pack, unpack

ID = Str(256)
# A command id names the host, probe and time it was made for (processors/sample_core.py).
COMMAND_ID = Str(512)
# A command's target meaning every host: never a host id (ktel/wire/raw.py refuses a
# batch of it, whose anomaly would make the sample stage command the whole fleet).
EVERY_HOST = "*"
# The most a refused command's reason may take in a heartbeat.
REFUSAL_CHARS = 256
MAX_CONTAINERS = 4096  # the agent lists at most 2048 (edge_agent/containers.py)
# A heartbeat's node readings: the agent sends no more (edge_agent/node_stats.py).
MAX_NODE_READINGS = 1024


class Heartbeat(TypedDict):
    ts: int
    seq: NotRequired[int]
    host: dict[str, str]
    probes: dict[str, dict[str, Any]]
    counters: dict[str, int]
    interval_s: NotRequired[float]
    rates: NotRequired[dict[str, float]]
    spool: NotRequired[dict[str, int]]
    send_latency_ms: NotRequired[dict[str, float]]
    acked_commands: NotRequired[list[str]]
    refused_commands: NotRequired[list[list[str]]]
    containers: NotRequired[list[list[Any]]]
    node: NotRequired[dict[str, int]]
    node_left_out: NotRequired[dict[str, int]]
    stopping: NotRequired[bool]


PROBE_STATE = Shape(
    (
        Key("loaded", Bool()),
        Key("reason", Str(4096), required=False),
        Key("sample_every", Int(1, U32), required=False),
        Key("command", Str(512, optional=True), required=False),
    )
)
HEARTBEAT_SHAPE = Shape(
    (
        Key("ts", Int(0, U63)),
        Key("seq", Int(0, U63), required=False),
        Key("host", Shape((Key(HOST_ID, ID),))),
        Key("probes", MapOf(PROBE_STATE, 256, key_len=64)),
        Key("counters", MapOf(Int(0, U64), 1024)),
        Key("interval_s", Float(0), required=False),
        Key("rates", MapOf(Float(), 1024), required=False),
        Key("spool", MapOf(Int(0, U64), 16), required=False),
        Key("send_latency_ms", MapOf(Float(0), 16), required=False),
        Key("acked_commands", ListOf(COMMAND_ID, 1024), required=False),
        Key(
            "refused_commands",
            ListOf(Row((Field("id", COMMAND_ID), Field("reason", Str(REFUSAL_CHARS)))), 1024),
            required=False,
        ),
        Key("stopping", Bool(), required=False),
        Key("node", MapOf(Int(0, U64), MAX_NODE_READINGS, key_len=256), required=False),
        # (a node's readings left out, per kind: never near 2**32)
        Key("node_left_out", MapOf(Int(0, U32), 16, key_len=64), required=False),
        Key(
            "containers",
            ListOf(
                Row((Field("cgroup_id", Int(1, U64)), Field("attrs", MapOf(Str(1024), 16)))),
                MAX_CONTAINERS,
            ),
            required=False,
        ),
    )
)
# host's other attributes are strings too.
HOST_ATTRS = MapOf(Str(1024), 32)


def heartbeat_older(hb: Mapping[str, Any], seq: int | None, ts: int) -> bool:
    """Whether ``hb`` is older than the heartbeats taken of its boot before it, of which
    ``seq`` is the highest ``seq`` (None: none carried one) and ``ts`` the highest ``ts``:
    a re-delivery (a partition read again after a rebalance, a record re-driven from
    ktel.dlq), to be ignored. Two heartbeats that carry ``seq`` are ordered by it, so a
    wall clock set back orders nothing, and one with a ``seq`` taken already is one
    taken already. One older by ``seq`` but newer by ``ts`` is still taken, as after a
    VM restored from a snapshot with its memory: the node's CLOCK_MONOTONIC, hence
    ``seq``, goes back with it until the next boot, and only its wall clock, set right
    again, moves on past the heartbeats before. An older agent's heartbeat (no ``seq``)
    is ordered by ``ts`` as before."""
    if seq is not None and "seq" in hb:
        return bool(hb["seq"] <= seq and hb["ts"] <= ts)
    return bool(hb["ts"] < ts)


def heartbeat_newest(hb: Mapping[str, Any], seq: int | None, ts: int) -> tuple[int | None, int]:
    """The highest ``seq`` and ``ts`` of a boot's heartbeats taken once ``hb`` is (see
    ``heartbeat_older``)."""
    if "seq" in hb:
        seq = hb["seq"] if seq is None else max(seq, hb["seq"])
    return seq, max(ts, hb["ts"])


def encode_heartbeat(hb: Heartbeat) -> bytes:
    return pack(dict(hb))


def decode_heartbeat(data: bytes) -> Heartbeat:
    what = "heartbeat"
    obj = unpack(data, what, HEARTBEAT_SHAPE)
    if not HOST_ATTRS.check(obj["host"]):
        raise WireError(f"{what}: field 'host' {HOST_ATTRS.why(obj['host'])}")
    obj.pop("v")
    return obj  # type: ignore[return-value]  # its shape is HEARTBEAT_SHAPE's


@dataclasses.dataclass(frozen=True)
class ControlCommand:
    id: str
    target: str  # host id, or "*" for every host
    probe: str
    sample_every: int
    until_ms: int  # the deadline on the sender's clock, for agents without ttl_ms
    ttl_ms: int | None = None  # how long it holds from when the agent applies it
    # Ends the probe's command in force; sample_every and the durations are for older agents.
    restore: bool = False

    @property
    def key(self) -> bytes:
        return self.target.encode()


def sample_command_id(what: str, host_id: str, probe: str, now_ms: int) -> str:
    """The id the sample stage gives a command (``what``: raise or restore), unique per
    host, probe and window; an agent refuses one longer than its
    ``agent.control_max_id_chars`` (ktel/config.py holds the two to each other)."""
    return f"ktel-sample-{what}-{host_id}-{probe}-{now_ms}"


COMMAND_SHAPE = Shape(
    (
        Key("id", COMMAND_ID),
        Key("target", ID),
        Key("probe", Str(64)),
        Key("sample_every", Int(1, U63)),
        Key("until_ms", Int(0, U63)),
        Key("ttl_ms", Int(0, U63), required=False),
        Key("restore", Bool(), required=False),
    )
)


def encode_command(cmd: ControlCommand) -> bytes:
    obj = dataclasses.asdict(cmd)
    if cmd.ttl_ms is None:
        del obj["ttl_ms"]  # the form without it keeps its v1 bytes
    if not cmd.restore:
        del obj["restore"]  # (likewise)
    return pack(obj)


def decode_command(data: bytes) -> ControlCommand:
    obj = unpack(data, "control command", COMMAND_SHAPE)
    return ControlCommand(
        obj["id"],
        obj["target"],
        obj["probe"],
        obj["sample_every"],
        obj["until_ms"],
        obj.get("ttl_ms"),
        obj.get("restore", False),
    )


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    stage: str
    reason: str
    topic: str
    partition: int
    offset: int
    # The record's value as read; None: it had none (a tombstone), sent as empty.
    payload: bytes | None


REASON_CHARS = 4096
DEAD_LETTER_SHAPE = Shape(
    (
        Key("stage", Str(64)),
        Key("reason", Str(REASON_CHARS)),
        Key("topic", Str(256)),
        Key("partition", Int(0, U32)),
        Key("offset", Int(-1, U63)),
        Key("payload", Blob(MAX_RECORD_BYTES)),
    )
)


def encode_dead_letter(dl: DeadLetter) -> bytes:
    """Every dead letter in a form ``decode_dead_letter`` reads back: a tombstone's
    payload empty, a reason (a backend's error text, say) cut to what the schema takes."""
    obj = dataclasses.asdict(dl)
    obj["reason"] = dl.reason[:REASON_CHARS]
    obj["payload"] = b"" if dl.payload is None else bytes(dl.payload)
    return pack(obj)


# A dead letter takes at most SEND_MAX_BYTES on Kafka. A record near the largest Kafka
# takes (a hostile one: an agent seals its batches well below) does not fit with the
# reason around it: its payload is cut (dead_letter_record).
# A dead letter's key is its record's (a host id, when it is ktel's), cut to this.
DEAD_LETTER_KEY_BYTES = 1024
# In the reason of a dead letter whose payload was cut (`ktel dlq` re-drives it from its topic).
PAYLOAD_CUT = "[payload cut to fit ktel.dlq:"


def dead_letter_fits(dl: DeadLetter, key: bytes | None) -> bool:
    """Whether ``dead_letter_record`` keeps the whole of ``dl``'s payload."""
    return len(encode_dead_letter(dl)) + len((key or b"")[:DEAD_LETTER_KEY_BYTES]) <= SEND_MAX_BYTES


def dead_letter_record(dl: DeadLetter, key: bytes | None) -> tuple[bytes | None, bytes]:
    """A dead letter as it goes to ktel.dlq, keyed by its record's ``key``: (key, value),
    at most ``SEND_MAX_BYTES`` together, so that any record can be dead-lettered.
    One that would take more keeps the start of its payload, and its reason says where
    the whole record is (its topic keeps it for its retention)."""
    if key is not None:
        key = key[:DEAD_LETTER_KEY_BYTES]
    if dead_letter_fits(dl, key):
        return key, encode_dead_letter(dl)
    room = SEND_MAX_BYTES - len(key or b"")
    payload = dl.payload or b""
    note = (
        f" {PAYLOAD_CUT} the record has {len(payload)} bytes, "
        f"at {dl.topic[:256]}[{dl.partition}]@{dl.offset}]"
    )
    cut = dataclasses.replace(dl, reason=dl.reason[: REASON_CHARS - len(note)] + note, payload=b"")
    # (an empty payload's header is 2 bytes, a long one's 5)
    keep = max(0, room - len(encode_dead_letter(cut)) - 3)
    return key, encode_dead_letter(dataclasses.replace(cut, payload=payload[:keep]))


@dataclasses.dataclass(frozen=True)
class Redriven:
    """A re-drive marker: the dead letter at ktel.dlq[partition]@offset was delivered."""

    partition: int
    offset: int
    at_ms: int  # when, by the wall clock of ``ktel dlq --redrive``
    to: str  # the backend it was sent to, or the topic it was re-published to


REDRIVEN = "redriven"
REDRIVEN_TO_CHARS = 512
REDRIVEN_SHAPE = Shape(
    (
        Key(
            REDRIVEN,
            Shape(
                (
                    Key("partition", Int(0, U32)),
                    Key("offset", Int(0, U63)),
                    Key("at_ms", Int(0, U63)),
                    Key("to", Str(REDRIVEN_TO_CHARS)),
                )
            ),
        ),
    )
)
# A map of the schema's version, of any keys: what a record of ktel.dlq is before it is
# told a marker or a dead letter.
_ANY_MAP = Shape(())


def encode_redriven(marker: Redriven) -> bytes:
    obj = dataclasses.asdict(marker)
    obj["to"] = marker.to[:REDRIVEN_TO_CHARS]
    return pack({REDRIVEN: obj})


def decode_dlq_record(data: bytes) -> DeadLetter | Redriven:
    """A record of ktel.dlq: a dead letter, or a re-drive marker (one with a ``redriven``
    key, whatever else it holds); raises WireError naming what is wrong."""
    obj = unpack(data, "dead letter", _ANY_MAP)
    if REDRIVEN in obj:
        problem = REDRIVEN_SHAPE.problem(obj)
        if problem is not None:
            raise WireError(f"re-drive marker: {problem}")
        m = obj[REDRIVEN]
        return Redriven(m["partition"], m["offset"], m["at_ms"], m["to"])
    problem = DEAD_LETTER_SHAPE.problem(obj)
    if problem is not None:
        raise WireError(f"dead letter: {problem}")
    return DeadLetter(
        obj["stage"], obj["reason"], obj["topic"], obj["partition"], obj["offset"], obj["payload"]
    )


def decode_dead_letter(data: bytes) -> DeadLetter:
    """A dead letter; WireError for anything else, a re-drive marker included."""
    record = decode_dlq_record(data)
    if isinstance(record, Redriven):
        raise WireError("dead letter: a re-drive marker, not a dead letter")
    return record
