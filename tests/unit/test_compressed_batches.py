"""Raw batches compressed by the agent (ktel/wire/codec.py, compress): one zstd frame
holding the batch's msgpack bytes. Every reader takes them as it takes plain ones,
and a hostile frame is refused with a reason before anything is inflated past
MAX_RECORD_BYTES."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings

from ktel import wire
from ktel.wire.codec import MAX_RECORD_BYTES, ZSTD_MAGIC, WireError, compress
from tests.unit.test_any_valid_batch import batches


@settings(max_examples=200, deadline=None)
@given(batches)
def test_a_compressed_batch_decodes_as_its_plain_bytes_do(batch):
    plain = wire.encode_batch(batch)
    frame = compress(plain)
    assert frame[:4] == ZSTD_MAGIC
    assert wire.decode_batch(frame) == wire.decode_batch(plain)


def plain_batch() -> bytes:
    ev = [1, 10**18, 100, 100, 0, "touch", "/tmp/x", 0o101, True]
    return wire.encode_batch(wire.RawBatch("h", "b", 1, 1, [ev] * 50))


def header(descriptor: int, rest: bytes) -> bytes:
    return ZSTD_MAGIC + bytes([descriptor]) + rest


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        # No content size (no single segment, a window descriptor, no FCS field).
        (header(0x00, b"\x58" + bytes(16)), "a zstd frame without its content size"),
        # An 8-byte content size past the bound.
        (header(0xE0, (MAX_RECORD_BYTES + 1).to_bytes(8, "little")), "more than"),
        (ZSTD_MAGIC + b"\xa0", "without its content size"),  # cut in its header
        (header(0xA0, (100).to_bytes(4, "little") + b"not zstd blocks"), "not a zstd frame"),
    ],
)
def test_a_hostile_zstd_frame_is_refused_with_its_reason(frame, reason):
    with pytest.raises(WireError, match=reason):
        wire.decode_batch(frame)


def test_a_frame_holding_more_or_less_than_it_declares_is_refused():
    frame = compress(plain_batch())
    # Two frames back to back: more than the first declares, never inflated past it.
    with pytest.raises(WireError, match="raw batch"):
        wire.decode_batch(frame + frame)
    # A declared size larger than the content: the 2-byte FCS (its value + 256) of a
    # single-segment frame, right after the descriptor.
    assert frame[4] == 0x60
    fcs = int.from_bytes(frame[5:7], "little")
    lying = frame[:5] + (fcs + 10).to_bytes(2, "little") + frame[7:]
    with pytest.raises(WireError, match="raw batch"):
        wire.decode_batch(lying)


def test_a_compressed_frame_of_something_else_is_refused_as_that():
    with pytest.raises(WireError, match="raw batch: expected a map"):
        wire.decode_batch(compress(msgpack.packb([1, 2, 3])))
