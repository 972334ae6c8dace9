"""The msgpack codec every record shares, and the error a record that cannot be used raises.

Records are msgpack maps with short keys; every record carries ``v`` (the schema
version). A reader rejects a version it does not know rather than guessing at
its layout. The bytes of each record family are pinned by golden files
(tests/golden/wire/): a change to what goes on the wire fails a test until
``SCHEMA_VERSION`` says so.
"""

from __future__ import annotations

import threading
from typing import Any

import msgpack
import zstandard

from ktel.schema import Shape, brief

SCHEMA_VERSION = 1

# Bounds on what a reader unpacks at all, before any shape is checked: the largest
# record Kafka accepts by default is 1 MiB, so nothing larger is ktel's.
MAX_RECORD_BYTES = 8 << 20
# The most a record a worker writes takes, its key and value together: below the
# smallest record limit on its way (Faust's producer sends at most 1,000,000 bytes a
# request; Kafka's default max.message.bytes is 1 MiB), with room for Kafka's framing.
# Dead letters (ktel.wire.control.dead_letter_record) and output signals
# (ktel.wire.signals.encoded_parts) are cut or split to fit it.
SEND_MAX_BYTES = 990_000
# At most one array or map for this many bytes of a record. An empty map is one byte of
# msgpack and 72 of memory (the dict and its slot in the list holding it), and msgpack
# builds the whole record before any shape is checked: 8 MiB of them (282 bytes of zstd)
# took 600 MB and 1.3 s to refuse, about 100 MB at most now. What ktel writes is sparser,
# 9 bytes or more a container: a log row with no attributes, an event (an array with a
# 9-byte timestamp; 7 bytes for a ktel_log event whose timestamp agent.redact made 0).
# Counted only in records of COUNTED_FROM bytes or more (the count costs a call a
# container, bench/RESULTS.md, "Decoding"): one smaller makes at most 300 KB of objects,
# and a heartbeat or a quiet host's batch, most of a fleet's records, is smaller.
CONTAINER_BYTES = 6
COUNTED_FROM = 4 << 10


class _TooManyContainers(Exception):
    """Raised from within msgpack's hooks (``unpack``) to stop unpacking."""


class WireError(ValueError):
    """A record that cannot be used; ``str(err)`` is the reason for the DLQ."""


class Unreadable(bytes):
    """The value of the record a reader gets in place of a Kafka record batch it did not
    expand (ktel/kafka_batches.py): empty, so that any reader refuses it, and ``unpack``
    refuses it with ``reason``. Made only by the reader itself: no value from Kafka is one."""

    reason: str

    def __new__(cls, reason: str) -> Unreadable:
        value = super().__new__(cls, b"")
        value.reason = reason
        return value

    def __bool__(self) -> bool:
        # True though empty: a reader's ``value or b""`` (a tombstone's None as empty
        # bytes) keeps it, and with it its reason.
        return True


# A raw batch may come as one zstd frame holding its msgpack bytes: the agent
# compresses its batches itself (agent.compression "zstd"), before they reach its
# spool, so the spool holds a tenth of the bytes and Kafka takes them as they are.
# A msgpack record starts with a map header, never with this magic.
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# zstd's fastest level: a batch of 5,000 file creations (340 KB of msgpack) took 236 µs
# here against level 3's (aiokafka's) 266, and compressed to the same size.
ZSTD_LEVEL = 1


class _Contexts(threading.local):
    """zstd's contexts, one pair per thread (a context is not thread-safe), made once:
    making one costs more than the frame. A worker decompresses a record of 10 events
    in about 1 µs with its context kept, 25-50 µs with a new one each time (cramjam's
    way, what aiokafka's codec does), a twentieth of its cost per record at 10,000
    hosts (bench/RESULTS.md, "The stream's cost per record")."""

    def __init__(self) -> None:
        self.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
        self.decompressor = zstandard.ZstdDecompressor()


_contexts = _Contexts()


def compress(data: bytes | bytearray) -> bytes:
    """``data`` as one zstd frame that records its content size (what ``decompress`` needs)."""
    return _contexts.compressor.compress(data)


def _content_size(frame: bytes | bytearray | memoryview) -> int | None:
    """The content size a zstd frame's header declares, or None (RFC 8878, 3.1.1.1)."""
    if len(frame) < 6:
        return None
    descriptor = frame[4]
    if descriptor & 0x08:  # reserved bit
        return None
    single_segment = (descriptor >> 5) & 1
    at = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3]
    width = (single_segment, 2, 4, 8)[descriptor >> 6]
    if width == 0 or len(frame) < at + width:
        return None
    size = int.from_bytes(frame[at : at + width], "little")
    return size + 256 if width == 2 else size


def decompress(frame: bytes | bytearray | memoryview, what: str) -> bytes:
    """A zstd frame's content, at most MAX_RECORD_BYTES: decompressed into a buffer of
    the size its header declares (zstandard's ``decompress`` sizes its output so), after
    that size is checked here, so a frame that holds more (or claims no size) is
    refused, never inflated."""
    size = _content_size(frame)
    if size is None:
        raise WireError(f"{what}: a zstd frame without its content size")
    if size > MAX_RECORD_BYTES:
        raise WireError(f"{what}: a zstd frame of {size} bytes, more than {MAX_RECORD_BYTES}")
    try:
        # (allow_extra_data=False: anything after the frame, another frame too, is refused)
        out = _contexts.decompressor.decompress(frame, allow_extra_data=False)
    except zstandard.ZstdError as err:
        raise WireError(f"{what}: not a zstd frame ({err})") from None
    if len(out) != size:
        raise WireError(f"{what}: a zstd frame of {len(out)} bytes, its header says {size}")
    return out


def pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb({"v": SCHEMA_VERSION, **obj}, use_bin_type=True)


def unpack(data: bytes | bytearray, what: str, shape: Shape) -> dict[str, Any]:
    """A record's map, checked against ``shape``; raises WireError naming what is wrong."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"{what}: expected bytes, got {type(data).__name__}")
    if type(data) is Unreadable:
        raise WireError(f"{what}: {data.reason}")
    if len(data) > MAX_RECORD_BYTES:
        raise WireError(f"{what}: {len(data)} bytes, more than {MAX_RECORD_BYTES}")
    budget = len(data) // CONTAINER_BYTES
    left = budget

    def counted(container: Any) -> Any:
        nonlocal left
        left -= 1
        if left < 0:
            raise _TooManyContainers
        return container

    hooks = {"object_hook": counted, "list_hook": counted} if len(data) >= COUNTED_FROM else {}
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, **hooks)
    except _TooManyContainers:
        raise WireError(
            f"{what}: more than {budget} arrays and maps in {len(data)} bytes (at most one per "
            f"{CONTAINER_BYTES} bytes)"
        ) from None
    except Exception as err:  # msgpack raises several unrelated types
        raise WireError(f"{what}: not msgpack ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise WireError(f"{what}: expected a map, got {type(obj).__name__}")
    version = obj.get("v")
    if version != SCHEMA_VERSION:
        raise WireError(
            f"{what}: unknown schema version {brief(version)} (this reader knows {SCHEMA_VERSION})"
        )
    problem = shape.problem(obj)
    if problem is not None:
        raise WireError(f"{what}: {problem}")
    return obj
