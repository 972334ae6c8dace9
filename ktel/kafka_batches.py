"""Compressed Kafka record batches, expanded within a bound by every ktel reader.

The Kafka client (aiokafka) expands a compressed record batch whole before any record
of it reaches ktel, so ktel's bound on a record (``MAX_RECORD_BYTES``) comes too late
for it, and Kafka's broker does not bound what a batch expands to either. Anyone who
may write to a topic ktel reads could send a megabyte of zstd that expands to
gigabytes (a compression bomb): every reader of that partition would be OOM-killed at
each start, a whole stage stopped by one record.

:func:`install` (ktel/kafka_client.py calls it: every ktel client is made there)
replaces the client's decompressors with ones that write into a buffer of
``EXPAND_MAX_BYTES`` and stop when it is full, and wraps the client's walk over a
fetched partition's batches:

- A batch whose content is larger (or is not valid for its codec) is not read. In its
  place the reader gets one stand-in record at the batch's last offset, whose value is
  an :class:`~ktel.wire.codec.Unreadable`: every ktel decoder refuses it with its
  reason, so it goes to ktel.dlq like any malformed record, and the batch's offsets are
  committed only after that. The records of that batch are lost; they are a hostile or
  broken writer's.
- The batches of one partition's fetch are taken until they have expanded to
  ``EXPAND_MAX_BYTES`` together; the rest is fetched again once those records were
  handed over, so many small bombs in one fetch do not add up either.
- So are the batches of one poll (a ``getmany``, which walks every fetched partition):
  once a poll has taken ``EXPAND_MAX_BYTES`` and has records to hand over, it walks
  no more batches, and the partitions it did not walk keep their fetched records for
  the next poll. Each poll takes at least one batch, so every partition is read in
  turn.

What a batch takes is what its content expands to (nothing for an uncompressed
batch, whose bytes the fetch already holds) plus ``RECORD_BYTES`` for each of its
records: a record handed over is an object of its own, and a batch of a million
empty records expands to 11 MiB but takes 200 MiB as records. A batch that would take
more than ``EXPAND_MAX_BYTES`` (at most 131,072 records, less the room its content
takes) is not read either, as one past the bound. So a poll hands over at most twice
the bound (the batch that crossed it included) of records, keys and values, however
many partitions the reader has.

A legitimate batch stays far below the bound: ktel's writers (aiokafka's producers)
put at most 16 KiB of records in a batch, or one record alone, and a record is at most
``MAX_RECORD_BYTES``.
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import cramjam
from aiokafka.consumer.fetcher import Fetcher, FetchResult, PartitionRecords
from aiokafka.record import default_records as py_default_records
from aiokafka.record import legacy_records as py_legacy_records
from aiokafka.structs import ConsumerRecord

from ktel.wire.codec import MAX_RECORD_BYTES, Unreadable

# What one batch, and one partition's fetch, may expand to: four of the largest record.
EXPAND_MAX_BYTES = 4 * MAX_RECORD_BYTES
# What a record handed over takes besides its key's and value's bytes, counted as a
# batch's: aiokafka's ConsumerRecord and the bytes objects' headers (208 bytes for an
# empty record, measured with tracemalloc).
RECORD_BYTES = 256

# How the reason of a batch's stand-in begins (ktel/dlq.py tells its dead letters by it).
BATCH_NOT_READ = "a Kafka record batch not read"
# cramjam's error when the output buffer is full before the content ends.
_BUFFER_FULL = "failed to write whole buffer"
# A snappy batch from a Java producer is xerial's framing of raw snappy blocks: this
# header, then blocks each preceded by its length (big-endian int32).
_XERIAL_HEADER = b"\x82SNAPPY\x00\x00\x00\x00\x01\x00\x00\x00\x01"


class _TooLarge(Exception):
    """A batch that is not expanded; ``str(err)`` says why."""


class _Poll:
    """One poll of one reader: what its walks have taken, and whether it has records
    to hand over yet."""

    def __init__(self) -> None:
        self.taken = 0
        self.gave = False

    def spent(self) -> bool:
        return self.gave and self.taken >= EXPAND_MAX_BYTES


# The poll in progress, per task: a poll may wait for a fetch, or for the reader's
# group to assign it partitions, while other tasks poll their own readers.
_poll: ContextVar[_Poll | None] = ContextVar("ktel_kafka_poll", default=None)


class _Expansion(threading.local):
    """Per thread (a reader's event loop): the buffer batches are expanded into, one
    byte longer than the bound so that content of exactly the bound still fits (an
    anonymous mapping takes memory only as far as the largest batch yet has written
    into it), and the fetch whose batch is being expanded, which is charged for it."""

    def __init__(self) -> None:
        self.buffer = memoryview(mmap.mmap(-1, EXPAND_MAX_BYTES + 1))
        self.fetch: _Batches | None = None


_expansion = _Expansion()


def _too_large(codec: str) -> _TooLarge:
    return _TooLarge(f"its {codec} content expands past {EXPAND_MAX_BYTES >> 20} MiB")


def _bounded(codec: str, into: Callable[[Any, memoryview], int]) -> Callable[[Any], bytes]:
    def expand(payload: Any) -> bytes:
        buffer = _expansion.buffer
        try:
            size = into(payload, buffer)
        except cramjam.DecompressionError as err:
            if _BUFFER_FULL in str(err):
                raise _too_large(codec) from None
            raise _TooLarge(f"its content is not valid {codec} ({err})") from None
        if size > EXPAND_MAX_BYTES:
            raise _too_large(codec)
        fetch = _expansion.fetch
        if fetch is not None:
            # (what the batch's records were charged, next_batch, and its content: one
            # batch takes at most the bound, so a poll at most twice it)
            if fetch.batch_took + size > EXPAND_MAX_BYTES:
                raise _TooLarge(
                    f"its {codec} content ({size} bytes) and its records take more than "
                    f"{EXPAND_MAX_BYTES >> 20} MiB"
                )
            fetch.charge(size)
        return bytes(buffer[:size])

    return expand


def _snappy_into(payload: Any, buffer: memoryview) -> int:
    """Raw snappy, or xerial's framing of it; each block's length is declared up
    front, so one that would not fit is refused before it is expanded."""
    data = memoryview(payload)
    if bytes(data[:16]) != _XERIAL_HEADER:
        blocks = [data]
    else:
        blocks, at = [], 16
        while at < len(data):
            length = int.from_bytes(data[at : at + 4], "big", signed=True)
            if length < 0:
                raise cramjam.DecompressionError(f"a negative block length {length}")
            blocks.append(data[at + 4 : at + 4 + length])
            at += 4 + length
    size = 0
    for block in blocks:
        if cramjam.snappy.decompress_raw_len(block) > len(buffer) - size:
            raise cramjam.DecompressionError(_BUFFER_FULL)
        size += cramjam.snappy.decompress_raw_into(block, buffer[size:])
    return size


_DECODERS = {
    "gzip_decode": _bounded("gzip", cramjam.gzip.decompress_into),
    "lz4_decode": _bounded("lz4", cramjam.lz4.decompress_into),
    "zstd_decode": _bounded("zstd", cramjam.zstd.decompress_into),
    "snappy_decode": _bounded("snappy", _snappy_into),
}


class _Batches:
    """A fetched partition's batches as the client walks them, remembering the one it
    is in (``in_batch`` until its last record was given) and what it took, and ending
    (``has_next`` False) once they, or the poll walking them, have taken the bound (a
    poll's, only past the walk's first batch or once the poll has records: each poll
    takes at least one batch)."""

    def __init__(self, records: Any) -> None:
        self.records = records
        self.batch: Any = None
        self.in_batch = False
        self.batch_took = 0
        self.taken = 0

    def charge(self, size: int) -> None:
        self.batch_took += size
        self.taken += size
        poll = _poll.get()
        if poll is not None:
            poll.taken += size

    def has_next(self) -> bool:
        self.in_batch = False  # (asked once the batch's records were all given)
        if self.taken >= EXPAND_MAX_BYTES:
            return False
        poll = _poll.get()
        if poll is not None and poll.taken >= EXPAND_MAX_BYTES and (poll.gave or self.batch is not None):
            return False
        return self.records.has_next()

    def next_batch(self) -> Any:
        # The client expands a batch as soon as it is given (before any other fetch's
        # walk can run), so this fetch is the one to charge.
        batch = self.batch = self.records.next_batch()
        self.in_batch, self.batch_took = True, 0
        _expansion.fetch = self
        # (Kafka's broker numbers a batch's records one offset each, so its offsets count
        # them; a legacy batch, v0 or v1, as one.)
        records = batch.next_offset - getattr(batch, "base_offset", batch.next_offset - 1)
        # (One whose CRC fails goes to the client, which fetches it again: its offsets may
        # be what is corrupt, and a stand-in at a corrupt offset would skip real records.)
        if records * RECORD_BYTES > EXPAND_MAX_BYTES and batch.validate_crc():
            raise _TooLarge(f"it holds {records} records, more than {EXPAND_MAX_BYTES // RECORD_BYTES}")
        self.charge(records * RECORD_BYTES)
        return batch


def _stand_in(tp: Any, batch: Any, why: str) -> ConsumerRecord:
    last = batch.next_offset - 1
    first = getattr(batch, "base_offset", last)
    value = Unreadable(f"{BATCH_NOT_READ} (offsets {first} to {last}): {why}")
    return ConsumerRecord(
        topic=tp.topic,
        partition=tp.partition,
        offset=last,
        timestamp=getattr(batch, "max_timestamp", -1),
        timestamp_type=getattr(batch, "timestamp_type", 0),
        key=None,
        value=value,
        checksum=None,
        serialized_key_size=-1,
        serialized_value_size=0,
        headers=[],
    )


_unpack_records = PartitionRecords._unpack_records


def _unpack_bounded(self: PartitionRecords) -> Iterator[ConsumerRecord]:
    batches = self._records = _Batches(self._records)
    try:
        while True:
            try:
                yield from _unpack_records(self)
                return
            except _TooLarge as err:
                # (a batch is expanded before its first record is given: none of it was)
                stand_in = _stand_in(self._tp, batches.batch, str(err))
                self.next_fetch_offset = batches.batch.next_offset
                yield stand_in
    finally:
        if _expansion.fetch is batches:
            _expansion.fetch = None  # (nothing keeps a walked fetch's bytes)


_getall = FetchResult.getall


def _getall_bounded(self: FetchResult, max_records: int | None = None) -> list[ConsumerRecord]:
    """One partition's records in a poll: none once the poll is spent (the partition
    keeps them for the next; those of an assignment since replaced go to the client,
    which drops them), else the client's walk, charged to the poll."""
    poll = _poll.get()
    if poll is None:
        return _getall(self, max_records)
    if poll.spent() and self._assignment.active:
        return []
    walk = getattr(self._partition_records, "_records", None)
    if isinstance(walk, _Batches) and walk.in_batch:
        # An earlier poll's max_records stopped the walk within a batch: what is left of
        # it goes to this poll, charged as much as the whole.
        poll.taken += walk.batch_took
    records = _getall(self, max_records)
    if records:
        poll.gave = True
    return records


_fetched_records = Fetcher.fetched_records


async def _fetched_records_bounded(
    self: Fetcher, partitions: Any, timeout: float = 0, max_records: Any = None
) -> Any:
    """The client's poll (``getmany``), with a budget of its own."""
    started = _poll.set(_Poll())
    try:
        return await _fetched_records(self, partitions, timeout, max_records)
    finally:
        # (ValueError: a poll left pending at a stop, closed outside its task when
        # collected; its context is gone with it)
        with contextlib.suppress(ValueError):
            _poll.reset(started)


def install() -> None:
    """Bound every batch expansion of this process's Kafka clients (idempotent)."""
    if PartitionRecords._unpack_records is _unpack_bounded:
        return
    modules = [py_default_records, py_legacy_records]
    try:
        from aiokafka.record._crecords import default_records, legacy_records
    except ImportError:  # (aiokafka without its C extensions)
        pass
    else:
        modules += [default_records, legacy_records]
    for module in modules:
        for name, decoder in _DECODERS.items():
            if hasattr(module, name):
                setattr(module, name, decoder)
    PartitionRecords._unpack_records = _unpack_bounded
    FetchResult.getall = _getall_bounded
    Fetcher.fetched_records = _fetched_records_bounded
