"""The v1 bytes on the wire, pinned: each record family's golden file under
tests/golden/wire/ must be exactly what ktel encodes today and decode to exactly
these records. A change to what goes on the wire (a field, its order, its
encoding) fails here until ``SCHEMA_VERSION`` says so: then write new golden files
for the new version with ``python -m tests.unit.test_wire_golden --write`` and keep
the old version's files while readers of it may remain.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ktel import wire
from ktel.probes import HIST_SLOTS, KINDS
from ktel.wire.codec import ZSTD_MAGIC

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "wire"
TS = 1_764_000_000_000_000_000  # ns since the epoch
TRACE, SPAN, PARENT = bytes(range(1, 17)), bytes(range(17, 25)), bytes(range(25, 33))

# One event of every kind, in kind order.
EVENTS: list[list[Any]] = [
    [1, TS, 4242, 4243, 1000, "touch", "/tmp/ktel/a file", 0o100101, True],
    [2, TS, "ipv6", "2001:db8::1", 40000, "2001:db8::2", 443, "ESTABLISHED", None],
    [3, TS, 777, "hog", 1000, 2_000_000, 1_900_000, 1024, 0, 4096, 0, 777, "hog"],
    [4, TS, 10, 11, 1, 0, 1234, "sh", "/bin/sh"],
    [5, TS, 10, 10, 1, 0, 1234, "sh", None, 9],
    [6, TS, 0, "swapper/0", 0x0800, 3, "NO_SOCKET", 0xFFFFFFFF81000000],
    [7, TS, 20, 21, "curl", "example.org", 250_000_000, -2],
    [
        8,
        TS,
        TS - 10**10,
        "syscall_latency",
        "ns",
        {"syscall.id": 0, "syscall.name": "read"},
        3,
        9000,
        [1, 0, 2] + [0] * (HIST_SLOTS - 3),
        1,
    ],  # fmt: skip
    [9, TS, 30, "counter", "ktel_sample_operations_total", {"result": "ok"}, 1],
    [10, TS, 30, 31, TRACE, SPAN, PARENT, "ktel_sample.checksum", TS - 5000, TS, 1, {"bytes": "64"}],
    [11, TS, 30, 31, 13, "took 5 ns", {"k": "v"}, TRACE, SPAN],
    [12, TS, 40, "insmod", "ktel_sample", 0x3000, "OE"],
]

HEARTBEAT: wire.Heartbeat = {
    "ts": TS // 10**6,
    "host": {"host.id": "a" * 32, "host.name": "node-1", "host.arch": "x86_64", "os.type": "linux"},
    "interval_s": 10.0,
    "probes": {"file_created": {"loaded": True, "reason": "", "sample_every": 1, "command": None}},
    "counters": {"events_read": 23, "ringbuf_drops.file_created": 0},
    "rates": {"events_read": 2.3},
    "spool": {"depth_bytes": 0},
    "send_latency_ms": {"p50": 1.5, "max": 4.0},
    "acked_commands": ["ktel-sample-raise-a-file_created-1"],
    "containers": [[4242, {"container.id": "c" * 64, "container.runtime.name": "containerd"}]],
}

HISTOGRAM = {"count": 3, "sum": 9e-06, "bounds": [2e-09, 4e-09], "counts": [1, 0, 2]}

# file name -> (encode, decode, the record)
RECORDS: dict[str, tuple[Callable[[Any], bytes], Callable[[bytes], Any], Any]] = {
    "raw_batch": (wire.encode_batch, wire.decode_batch, wire.RawBatch("a" * 32, "b" * 32, 7, TS, EVENTS)),
    "raw_batch_enriched": (
        wire.encode_batch,
        wire.decode_batch,
        wire.RawBatch(
            "a" * 32,
            "b" * 32,
            8,
            TS,
            EVENTS[:1],
            weights=[10.0],
            resource={"host.id": "a" * 32, "host.name": "node-1"},
            processes={"4242": {"process.executable.name": "touch", "process.parent_pid": 1}},
        ),
    ),
    # From an agent that knows its incarnation, a part of a batch split for Kafka.
    "raw_batch_part": (
        wire.encode_batch,
        wire.decode_batch,
        wire.RawBatch("a" * 32, "b" * 32, 9, TS, EVENTS[2:4], incarnation="c" * 32, part=[2, 12]),
    ),
    "metric_snapshot": (
        wire.encode_snapshot,
        wire.decode_snapshot,
        wire.MetricSnapshot(
            TS // 10**6,
            [
                ["file_created_total", "counter", {"host.id": "a" * 32, "directory": "/tmp/ktel"}, 23],
                ["ktel_sample_queue_depth", "gauge", {"host.id": "a" * 32}, -4],
                ["syscall_latency_seconds", "histogram", {"host.id": "a" * 32}, HISTOGRAM],
            ],
        ),
    ),
    "metric_snapshot_stale": (
        wire.encode_snapshot,
        wire.decode_snapshot,
        wire.MetricSnapshot(
            TS // 10**6, [["file_created_total", "counter", {"host.id": "a" * 32}, 23]], stale=True
        ),
    ),
    "span_batch": (
        wire.encode_spans,
        wire.decode_spans,
        wire.SpanBatch(
            {"host.id": "a" * 32, "process.pid": 30},
            [[TRACE, SPAN, b"", "ktel_sample.operation", TS - 5000, TS, 1, "", {"ktel.sample_weight": 2.0}]],
        ),
    ),
    "log_batch": (
        wire.encode_logs,
        wire.decode_logs,
        wire.LogBatch(
            {"host.id": "a" * 32}, [[TS, 17, "ERROR", "OOM killer killed process 777", {}, b"", b""]]
        ),
    ),
    "heartbeat": (wire.encode_heartbeat, wire.decode_heartbeat, HEARTBEAT),
    "control_command": (
        wire.encode_command,
        wire.decode_command,
        wire.ControlCommand("ktel-sample-raise-a-file_created-1", "a" * 32, "file_created", 1, TS // 10**6),
    ),
    # The form agents read since commands carry a duration (ttl_ms).
    "control_command_ttl": (
        wire.encode_command,
        wire.decode_command,
        wire.ControlCommand(
            "ktel-sample-raise-a-file_created-2", "*", "file_created", 10, TS // 10**6 + 300_000, 300_000
        ),
    ),
    # A restore: agents since restores end the probe's raise; older ones read the
    # normal rate for a TTL (a later optional key).
    "control_command_restore": (
        wire.encode_command,
        wire.decode_command,
        wire.ControlCommand(
            "ktel-sample-restore-a-file_created-3",
            "a" * 32,
            "file_created",
            1,
            TS // 10**6 + 300_000,
            300_000,
            restore=True,
        ),
    ),
    # With the commands the agent refused (a later optional key).
    "heartbeat_refused": (
        wire.encode_heartbeat,
        wire.decode_heartbeat,
        {
            **HEARTBEAT,
            "refused_commands": [["ktel-bad-1", "sample_every 4294967296 is over the agent's 1000000"]],
        },
    ),
    "dead_letter": (
        wire.encode_dead_letter,
        wire.decode_dead_letter,
        wire.DeadLetter("aggregate", "raw batch: not msgpack", wire.RAW_TOPIC, 3, 42, b"\xc1junk"),
    ),
    # A re-drive marker: a record of ktel.dlq that is not a dead letter (a later family member).
    "dead_letter_redriven": (
        wire.encode_redriven,
        wire.decode_dlq_record,
        wire.Redriven(3, 42, TS // 10**6, "OTLP export to http://otel-collector:4318"),
    ),
}


def test_the_golden_batch_has_one_event_of_every_kind():
    assert [ev[0] for ev in EVENTS] == sorted(KINDS)


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_golden_bytes_are_what_ktel_encodes_and_decodes(name):
    encode, decode, record = RECORDS[name]
    golden = (GOLDEN / f"v{wire.SCHEMA_VERSION}" / f"{name}.msgpack").read_bytes()
    assert encode(record) == golden, f"the bytes of {name} changed: see this file's docstring"
    assert decode(golden) == record


def test_the_golden_batch_compressed_by_an_agent_decodes_as_the_golden_batch():
    """A raw batch as the agent sends it with agent.compression "zstd": one zstd frame
    around the golden bytes (written once by ktel/wire/codec.py's compress; zstd's own
    bytes may differ between its versions, so only the reading is pinned)."""
    frame = (GOLDEN / f"v{wire.SCHEMA_VERSION}" / "raw_batch.zst").read_bytes()
    assert frame[:4] == ZSTD_MAGIC
    assert wire.decode_batch(frame) == RECORDS["raw_batch"][2]


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_any_one_byte_changed_is_caught(name):
    """Each byte of a golden file matters: changing it either fails to decode or
    decodes to another record (so the test above would fail on such a file)."""
    encode, decode, record = RECORDS[name]
    golden = encode(record)
    for i in range(len(golden)):
        changed = bytearray(golden)
        changed[i] ^= 0x01
        with contextlib.suppress(wire.WireError):
            assert decode(bytes(changed)) != record, f"byte {i} of {name} changed, same record"


def write() -> None:
    out = GOLDEN / f"v{wire.SCHEMA_VERSION}"
    out.mkdir(parents=True, exist_ok=True)
    for name, (encode, _decode, record) in RECORDS.items():
        (out / f"{name}.msgpack").write_bytes(encode(record))
        print(f"wrote {out / name}.msgpack")


if __name__ == "__main__" and "--write" in sys.argv:
    write()
