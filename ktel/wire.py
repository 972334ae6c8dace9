"""The one wire module: every shape that crosses Kafka is defined here.

The edge agent, the processors, the exporters and replay all import this
module; nothing else defines a record or an event layout.

Topics
------
``ktel.raw``       raw event batches from the agents, keyed by host id, kept for
                   forensics (retention configurable, 7 days by default).
``ktel.deduped``   raw batches after the dedupe stage (split mode only).
``ktel.enriched``  raw batches after the enrich stage, with resource and process
                   attributes (split mode only).
``ktel.sampled``   raw batches after the sample stage, with weights (split mode only).
``ktel.metrics``   metric snapshots produced by the aggregate stage.
``ktel.spans``     kernel spans, for the OTLP traces exporter.
``ktel.logs``      kernel logs and notable events (OOM kills, ...), for OTLP logs.
``ktel.dlq``       records a stage could not use, with the reason and the bytes.
``ktel.heartbeats`` agent heartbeats: identity, probes, drops, spool, latency.
``ktel.control``   fidelity commands for the agents (one host or the fleet).

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

An event is an array, not a map: its first element is the kind id and the rest
are the kind's fields in the order ``EventKind.fields`` gives. Arrays keep
per-event encode/decode cost near zero, which is the agent's ceiling.

Metric snapshot record (topic ``ktel.metrics``, key = host id)::

    {"v": 1,
     "ts": int,          # sample timestamp, ms since epoch
     "series": [[name, type, {label: value}, value], ...]}

``type`` is ``"counter"`` (cumulative since the series began; value a number),
``"gauge"`` (value a number) or ``"histogram"`` (cumulative since the series
began; value ``{"count": int, "sum": float, "bounds": [float, ...],
"counts": [int, ...]}`` with ``len(counts) == len(bounds) + 1``: bucket i counts
values in ``(bounds[i-1], bounds[i]]``, the last bucket is ``(bounds[-1], +inf)``,
the layout of an OTLP explicit-bucket histogram).

Label names follow OpenTelemetry semantic conventions (``host.id``,
``process.pid``, ...); the Prometheus exporters translate them.

Span record (topic ``ktel.spans``, key = host id)::

    {"v": 1,
     "resource": {attr: value},    # host.id, host.name, ... (OTel resource)
     "spans": [[trace_id,          # 16 bytes
                span_id,           # 8 bytes
                parent_span_id,    # 8 bytes, or b"" for a root span
                name, start_ns, end_ns,   # wall clock, ns since epoch
                status,            # 0 unset, 1 ok, 2 error (OTLP StatusCode)
                status_message, {attr: value}], ...]}

Log record (topic ``ktel.logs``, key = host id)::

    {"v": 1,
     "resource": {attr: value},
     "logs": [[ts_ns,              # wall clock, ns since epoch
               severity_number,    # OTLP SeverityNumber, 1..24
               severity_text, body, {attr: value},
               trace_id,           # 16 bytes or b""
               span_id], ...]}     # 8 bytes or b""

Heartbeat record (topic ``ktel.heartbeats``, key = host id)::

    {"v": 1, "ts": int (ms),
     "host": {"host.id", "host.name", "host.arch", "os.type", "os.version" (kernel
              release), "boot.id", "ktel.agent.version"},
     "interval_s": float,         # seconds since the previous heartbeat (since start in the first)
     "probes": {name: {"loaded": bool, "reason": str, "sample_every": int,
                       "command": command id in force or None}},
     "counters": {name: int},     # cumulative since the agent started (see edge_agent/agent.py)
     "rates": {name: float},      # per second over the last interval
     "spool": {"depth_bytes": int},
     "send_latency_ms": {"p50": float, "max": float},
     "acked_commands": [command id, ...],
     "containers": [[cgroup_id, {attr: str}], ...]}   # optional

``containers`` lists the cgroups the agent knows to be a container's or a pod's
(edge_agent/containers.py), each with its ``container.*`` and ``k8s.*``
attributes.

Control command (topic ``ktel.control``, key = target)::

    {"v": 1, "id": str, "target": host id or "*" (the whole fleet),
     "probe": str, "sample_every": int >= 1, "until_ms": int}

sets a probe's sampling to 1 in ``sample_every`` until ``until_ms`` (wall clock);
afterwards the agent's configured rate comes back.

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
DEDUPED_TOPIC = "ktel.deduped"
ENRICHED_TOPIC = "ktel.enriched"
SAMPLED_TOPIC = "ktel.sampled"
METRICS_TOPIC = "ktel.metrics"
SPANS_TOPIC = "ktel.spans"
LOGS_TOPIC = "ktel.logs"
DLQ_TOPIC = "ktel.dlq"
HEARTBEATS_TOPIC = "ktel.heartbeats"
CONTROL_TOPIC = "ktel.control"


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
        "ts_ns",  # wall clock (ns since epoch) of the creating syscall's return
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

# The standard probe library (bpf/<probe>.bpf.c, edge_agent/<probe>.py). Timestamps
# are wall clock, ns since epoch (the probe's CLOCK_MONOTONIC plus the agent's offset).
TCP_RETRANSMIT = EventKind(
    2,
    "tcp_retransmit",
    (
        "ts_ns",
        "family",  # "ipv4" or "ipv6"
        "saddr",  # local address, text form
        "sport",  # local port
        "daddr",  # remote address, text form
        "dport",  # remote port
        "state",  # TCP state name without TCP_, e.g. "ESTABLISHED", "SYN_SENT"
        "err",  # the retransmission's result (0 or -errno); None where the kernel does not say
    ),
)

OOM_KILL = EventKind(
    3,
    "oom_kill",
    (
        "ts_ns",
        "pid",  # the victim, as the kernel gave it (task pid)
        "comm",  # the victim's name; "" where the tracepoint lacks it
        "uid",  # the victim's uid (None where the tracepoint lacks it)
        "total_vm_kb",  # the victim's memory, kB (None where the tracepoint lacks them)
        "anon_rss_kb",
        "file_rss_kb",
        "shmem_rss_kb",
        "pgtables_kb",
        "oom_score_adj",
        "trigger_pid",  # the process whose allocation ran into the limit (tgid)
        "trigger_comm",
    ),
)

PROCESS_EXEC = EventKind(
    4,
    "process_exec",
    (
        "ts_ns",
        "pid",  # tgid after the exec
        "tid",  # the thread that called execve (differs from pid when a non-leader thread exec'd)
        "ppid",  # tgid of the process that forked it; 0 when unknown (forked before the probe)
        "uid",
        "cgroup_id",  # cgroup v2 id (inode of its directory in the cgroup2 mount)
        "comm",  # the new comm
        "filename",  # as passed to execve (resolved by the kernel, not by the agent)
    ),
)

PROCESS_EXIT = EventKind(
    5,
    "process_exit",
    (
        "ts_ns",
        "pid",  # tgid
        "tid",  # the last thread to exit
        "ppid",  # as for process_exec
        "uid",
        "cgroup_id",
        "comm",
        "exit_code",  # the status passed to exit_group/exit (0-255); None when it died of a signal
        "signal",  # the fatal signal when exit_code is None (0: unknown)
    ),
)

SKB_DROP = EventKind(
    6,
    "skb_drop",
    (
        "ts_ns",
        "pid",  # task on CPU when the packet was dropped (often the sender, or a softirq thread)
        "comm",
        "protocol",  # ethertype, host order (0x0800 IPv4, 0x86dd IPv6)
        "reason",  # enum skb_drop_reason value
        "reason_name",  # its name from the running kernel's tracepoint format, e.g. "NO_SOCKET"
        "location",  # kernel address of the freeing code
    ),
)

DNS_SLOW = EventKind(
    7,
    "dns_slow",
    (
        "ts_ns",
        "pid",
        "tid",
        "comm",
        "host",  # the name passed to getaddrinfo (truncated at 255 bytes)
        "latency_ns",  # getaddrinfo's duration
        "ret",  # getaddrinfo's return value (0 ok, EAI_* < 0)
    ),
)

HISTOGRAM_DELTA = EventKind(
    8,
    "histogram_delta",
    (
        "ts_ns",  # end of the interval: when the agent read the BPF map
        "start_ns",  # start of the interval: the previous read (or the probe's load)
        "metric",  # e.g. "syscall_latency"
        "unit",  # unit of the values counted, e.g. "ns"
        "labels",  # {label: str | int}, e.g. {"syscall.id": 110, "cgroup.id": 1234}
        "count",  # values counted in the interval (== sum(buckets))
        "sum",  # their sum, in unit
        "buckets",  # log2 bucket counts for the interval (a delta, not cumulative):
        #            buckets[i] counts values v with 2**i <= v < 2**(i+1), except that
        #            buckets[0] counts 0 <= v < 2 and the last bucket counts every
        #            v >= 2**(len(buckets)-1); len(buckets) is 40 (KTEL_HIST_SLOTS)
        "sample_every",  # the probe's in-kernel sampling (1 in N) when read; counts are of
        #                  sampled values (multiply by it to estimate all)
    ),
)

# Events of kernel code that uses ktel's telemetry API (kmod/include/ktel/ktel.h),
# from the ktel:* tracepoints (probe ktel_api). Timestamps are wall clock, ns since
# epoch; ids are bytes in OTLP order (a kernel u64 span id as 8 bytes big-endian, so
# its hex is the %016llx the kernel prints).
KTEL_METRIC = EventKind(
    9,
    "ktel_metric",
    (
        "ts_ns",
        "pid",  # tgid of the task on the CPU when the kernel code emitted it
        "type",  # "counter" (value is an increment), "gauge" (the new value) or
        #          "histogram" (one observation)
        "name",  # as the kernel code named it (Prometheus style, unit suffix)
        "labels",  # {label: str}, at most 4 (KTEL_MAX_KV)
        "value",  # int
    ),
)

KTEL_SPAN = EventKind(
    10,
    "ktel_span",
    (
        "ts_ns",  # when the span ended
        "pid",
        "tid",
        "trace_id",  # 16 bytes
        "span_id",  # 8 bytes
        "parent_span_id",  # 8 bytes, b"" for a root span
        "name",
        "start_ns",
        "end_ns",
        "status",  # 0 unset, 1 ok, 2 error (OTLP StatusCode)
        "attrs",  # {key: str}, at most 4
    ),
)

KTEL_LOG = EventKind(
    11,
    "ktel_log",
    (
        "ts_ns",
        "pid",
        "tid",
        "severity",  # OTLP SeverityNumber: 1 TRACE, 5 DEBUG, 9 INFO, 13 WARN, 17 ERROR, 21 FATAL
        "message",  # at most 255 bytes
        "attrs",  # {key: str}, at most 4
        "trace_id",  # 16 bytes, b"" when the log is in no span
        "span_id",  # 8 bytes, b"" when the log is in no span
    ),
)

# Buckets of a log2 histogram: KTEL_HIST_SLOTS in bpf/ktel_hist.h (checked by
# tests/unit/test_probe_layout.py). The agent's histogram deltas and the aggregate
# stage's histograms of kernel code's observations have these, so they merge.
HIST_SLOTS = 40

KINDS: dict[int, EventKind] = {
    k.id: k
    for k in (
        FILE_CREATED,
        TCP_RETRANSMIT,
        OOM_KILL,
        PROCESS_EXEC,
        PROCESS_EXIT,
        SKB_DROP,
        DNS_SLOW,
        HISTOGRAM_DELTA,
        KTEL_METRIC,
        KTEL_SPAN,
        KTEL_LOG,
    )
}

# Fields of an event that name a process (whose attributes enrich attaches).
PID_FIELDS = ("pid", "trigger_pid")
# kind id -> indexes in the event array of its PID_FIELDS (index 0 is the kind id).
PID_INDEXES: dict[int, tuple[int, ...]] = {
    k.id: idx
    for k in KINDS.values()
    if (idx := tuple(i + 1 for i, f in enumerate(k.fields) if f in PID_FIELDS))
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

    @property
    def key(self) -> bytes:
        return self.host_id.encode()

    def keeping(self, events: Sequence[Sequence[Any]], weights: Sequence[float] | None) -> RawBatch:
        """This batch with only ``events`` (some of its own) and their weights.

        The attributes of processes that only the dropped events named go with them."""
        processes = self.processes
        if processes and len(events) < len(self.events):
            named = {str(ev[i]) for ev in events for i in PID_INDEXES.get(ev[0], ())}
            processes = {pid: attrs for pid, attrs in processes.items() if pid in named}
        return dataclasses.replace(self, events=events, weights=weights, processes=processes)


@dataclasses.dataclass(frozen=True)
class MetricSnapshot:
    ts_ms: int
    series: Sequence[Sequence[Any]]  # [name, type, labels, value]


@dataclasses.dataclass(frozen=True)
class SpanBatch:
    resource: dict[str, Any]
    spans: Sequence[Sequence[Any]]  # see the module docstring for the fields


@dataclasses.dataclass(frozen=True)
class LogBatch:
    resource: dict[str, Any]
    logs: Sequence[Sequence[Any]]


@dataclasses.dataclass(frozen=True)
class ControlCommand:
    id: str
    target: str  # host id, or "*" for every host
    probe: str
    sample_every: int
    until_ms: int

    @property
    def key(self) -> bytes:
        return self.target.encode()


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
    obj = {
        "v": SCHEMA_VERSION,
        "host": batch.host_id,
        "boot": batch.boot_id,
        "seq": batch.seq,
        "sent": batch.sent_ns,
        "events": batch.events,
    }
    if batch.weights is not None:
        obj["w"] = batch.weights
    if batch.resource is not None:
        obj["res"] = batch.resource
    if batch.processes is not None:
        obj["proc"] = batch.processes
    return _pack(obj)


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
    weights = obj.get("w")
    if weights is not None and (
        not isinstance(weights, list)
        or len(weights) != len(events)
        or not all(isinstance(w, int | float) and w > 0 for w in weights)
    ):
        raise WireError(f"{what}: 'w' must be one positive weight per event")
    resource = obj.get("res")
    if resource is not None and not isinstance(resource, dict):
        raise WireError(f"{what}: 'res' must be a map of resource attributes")
    processes = obj.get("proc")
    if processes is not None and not (
        isinstance(processes, dict) and all(isinstance(a, dict) for a in processes.values())
    ):
        raise WireError(f"{what}: 'proc' must map a pid to a map of process attributes")
    return RawBatch(
        host_id=_field(obj, "host", str, what),
        boot_id=_field(obj, "boot", str, what),
        seq=seq,
        sent_ns=_field(obj, "sent", int, what),
        events=events,
        weights=weights,
        resource=resource,
        processes=processes,
    )


def event_dict(event: Sequence[Any]) -> dict[str, Any]:
    """Name an event's fields; for tests, replay and logs, not hot paths."""
    kind = KINDS[event[0]]
    return {"kind": kind.name, **dict(zip(kind.fields, event[1:], strict=True))}


def encode_snapshot(snap: MetricSnapshot) -> bytes:
    return _pack({"v": SCHEMA_VERSION, "ts": snap.ts_ms, "series": snap.series})


def _valid_histogram(h: Any) -> bool:
    return (
        isinstance(h, dict)
        and isinstance(h.get("count"), int)
        and isinstance(h.get("sum"), int | float)
        and isinstance(h.get("bounds"), list)
        and isinstance(h.get("counts"), list)
        and len(h["counts"]) == len(h["bounds"]) + 1
    )


def decode_snapshot(data: bytes) -> MetricSnapshot:
    what = "metric snapshot"
    obj = _unpack(data, what)
    series = _field(obj, "series", list, what)
    for i, s in enumerate(series):
        if not (
            isinstance(s, list)
            and len(s) == 4
            and isinstance(s[0], str)
            and isinstance(s[2], dict)
            and (
                (s[1] in ("counter", "gauge") and isinstance(s[3], int | float))
                or (s[1] == "histogram" and _valid_histogram(s[3]))
            )
        ):
            raise WireError(f"{what}: series {i} is not [name, counter|gauge|histogram, labels, value]")
    return MetricSnapshot(ts_ms=_field(obj, "ts", int, what), series=series)


def encode_spans(batch: SpanBatch) -> bytes:
    return _pack({"v": SCHEMA_VERSION, "resource": batch.resource, "spans": batch.spans})


def decode_spans(data: bytes) -> SpanBatch:
    what = "span batch"
    obj = _unpack(data, what)
    spans = _field(obj, "spans", list, what)
    for i, sp in enumerate(spans):
        if not (
            isinstance(sp, list)
            and len(sp) == 9
            and isinstance(sp[0], bytes)
            and len(sp[0]) == 16
            and isinstance(sp[1], bytes)
            and len(sp[1]) == 8
            and isinstance(sp[2], bytes)
            and len(sp[2]) in (0, 8)
            and isinstance(sp[3], str)
            and isinstance(sp[4], int)
            and isinstance(sp[5], int)
            and sp[6] in (0, 1, 2)
            and isinstance(sp[7], str)
            and isinstance(sp[8], dict)
        ):
            raise WireError(f"{what}: span {i} does not have the documented fields")
    return SpanBatch(_field(obj, "resource", dict, what), spans)


def encode_logs(batch: LogBatch) -> bytes:
    return _pack({"v": SCHEMA_VERSION, "resource": batch.resource, "logs": batch.logs})


def decode_logs(data: bytes) -> LogBatch:
    what = "log batch"
    obj = _unpack(data, what)
    logs = _field(obj, "logs", list, what)
    for i, lg in enumerate(logs):
        if not (
            isinstance(lg, list)
            and len(lg) == 7
            and isinstance(lg[0], int)
            and isinstance(lg[1], int)
            and 0 <= lg[1] <= 24
            and isinstance(lg[4], dict)
            and isinstance(lg[5], bytes)
            and isinstance(lg[6], bytes)
        ):
            raise WireError(f"{what}: log {i} does not have the documented fields")
    return LogBatch(_field(obj, "resource", dict, what), logs)


def encode_dead_letter(dl: DeadLetter) -> bytes:
    return _pack({"v": SCHEMA_VERSION, **dataclasses.asdict(dl)})


def decode_dead_letter(data: bytes) -> DeadLetter:
    obj = _unpack(data, "dead letter")
    obj.pop("v")
    try:
        return DeadLetter(**obj)
    except TypeError as err:
        raise WireError(f"dead letter: {err}") from None


def encode_heartbeat(hb: dict[str, Any]) -> bytes:
    return _pack({"v": SCHEMA_VERSION, **hb})


def decode_heartbeat(data: bytes) -> dict[str, Any]:
    what = "heartbeat"
    obj = _unpack(data, what)
    host = _field(obj, "host", dict, what)
    if not isinstance(host.get("host.id"), str):
        raise WireError(f"{what}: host has no host.id")
    for name in ("probes", "counters"):
        _field(obj, name, dict, what)
    _field(obj, "ts", int, what)
    containers = obj.get("containers", [])  # absent from agents older than the field
    if not isinstance(containers, list):
        raise WireError(f"{what}: containers is not an array")
    for i, entry in enumerate(containers):
        if not (
            isinstance(entry, list)
            and len(entry) == 2
            and type(entry[0]) is int
            and entry[0] > 0
            and isinstance(entry[1], dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in entry[1].items())
        ):
            raise WireError(f"{what}: containers entry {i} is not [cgroup id, {{attribute: string}}]")
    return obj


def encode_command(cmd: ControlCommand) -> bytes:
    return _pack({"v": SCHEMA_VERSION, **dataclasses.asdict(cmd)})


def decode_command(data: bytes) -> ControlCommand:
    what = "control command"
    obj = _unpack(data, what)
    every = _field(obj, "sample_every", int, what)
    if every < 1:
        raise WireError(f"{what}: sample_every must be >= 1, got {every}")
    return ControlCommand(
        id=_field(obj, "id", str, what),
        target=_field(obj, "target", str, what),
        probe=_field(obj, "probe", str, what),
        sample_every=every,
        until_ms=_field(obj, "until_ms", int, what),
    )
