"""The msgpack codec every record shares, and the error a record that cannot be used raises.

Records are msgpack maps with short keys; every record carries ``v`` (the schema
version). A reader rejects a version it does not know rather than guessing at
its layout. The bytes of each record family are pinned by golden files
(tests/golden/wire/): a change to what goes on the wire fails a test until
``SCHEMA_VERSION`` says so.
"""

from __future__ import annotations

from typing import Any

import msgpack

from ktel.schema import Shape, brief

SCHEMA_VERSION = 1

# Bounds on what a reader unpacks at all, before any shape is checked: the largest
# record Kafka accepts by default is 1 MiB, so nothing larger is ktel's.
MAX_RECORD_BYTES = 8 << 20


class WireError(ValueError):
    """A record that cannot be used; ``str(err)`` is the reason for the DLQ."""


def pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb({"v": SCHEMA_VERSION, **obj}, use_bin_type=True)


def unpack(data: bytes, what: str, shape: Shape) -> dict[str, Any]:
    """A record's map, checked against ``shape``; raises WireError naming what is wrong."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > MAX_RECORD_BYTES:
        raise WireError(f"{what}: {len(data)} bytes, more than {MAX_RECORD_BYTES}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
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
