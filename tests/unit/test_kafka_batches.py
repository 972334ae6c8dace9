"""Compressed Kafka record batches as every ktel reader takes them (ktel/kafka_batches.py):
read as before up to EXPAND_MAX_BYTES, a batch past it replaced by one stand-in record
that goes to the DLQ with its reason, and a fetch that stops taking batches once they
expanded to the bound together. The batches are built and walked by aiokafka's own
record code, as its fetcher builds and walks them."""

from __future__ import annotations

import asyncio
import struct

import cramjam
import pytest
from aiokafka.consumer.fetcher import READ_UNCOMMITTED, Fetcher, FetchResult, PartitionRecords
from aiokafka.consumer.subscription_state import SubscriptionState
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import TopicPartition

from ktel import kafka_batches
from ktel.kafka_batches import EXPAND_MAX_BYTES, RECORD_BYTES
from ktel.wire import decode_batch
from ktel.wire.codec import Unreadable, WireError

kafka_batches.install()  # (what importing ktel.kafka_client does)

CODECS = {
    "gzip": DefaultRecordBatch.CODEC_GZIP,
    "snappy": DefaultRecordBatch.CODEC_SNAPPY,
    "lz4": DefaultRecordBatch.CODEC_LZ4,
    "zstd": DefaultRecordBatch.CODEC_ZSTD,
}
TP = TopicPartition("ktel.raw", 3)


def batch(base: int, values: list[bytes], codec: str = "zstd") -> bytes:
    attributes = DefaultRecordBatch.CODEC_NONE if codec == "none" else CODECS[codec]
    builder = DefaultRecordBatchBuilder(2, attributes, 0, -1, -1, -1, 1 << 40)
    for delta, value in enumerate(values):
        builder.append(delta, timestamp=1_000 + delta, key=b"host", value=value, headers=[])
    data = bytearray(builder.build())
    struct.pack_into(">q", data, 0, base)  # (the base offset; the CRC does not cover it)
    return bytes(data)


def fetch(*batches: bytes, fetch_offset: int = 0, tp: TopicPartition = TP) -> PartitionRecords:
    """One fetch of ``batches``, as the client walks it."""
    return PartitionRecords(
        tp, MemoryRecords(b"".join(batches)), [], fetch_offset, None, None, True, READ_UNCOMMITTED
    )


def walk(*batches: bytes, fetch_offset: int = 0) -> tuple[list, int]:
    """The records the client hands over from one fetch of ``batches``, and the
    offset it fetches next."""
    records = fetch(*batches, fetch_offset=fetch_offset)
    return list(records), records.next_fetch_offset


@pytest.mark.parametrize("codec", CODECS)
def test_a_compressed_batch_within_the_bound_is_read_as_it_was_written(codec):
    values = [b"a" * 1000, b"", bytes(range(256)) * 40]
    got, next_offset = walk(batch(10, values, codec), batch(13, [b"x"], codec))
    assert [(r.offset, r.value) for r in got] == [(10, values[0]), (11, b""), (12, values[2]), (13, b"x")]
    assert next_offset == 14


@pytest.mark.parametrize("codec", CODECS)
def test_a_batch_expanding_past_the_bound_is_one_stand_in_and_the_next_batch_is_read(codec):
    # Five records of 8 MiB of zeros: 40 MiB, past the 32 MiB bound.
    bomb = batch(5, [bytes(8 << 20)] * 5, codec)
    got, next_offset = walk(batch(0, [b"before"] * 5, codec), bomb, batch(10, [b"after"], codec))
    assert [r.offset for r in got] == [0, 1, 2, 3, 4, 9, 10]
    stand_in = got[5]
    assert (stand_in.topic, stand_in.partition, stand_in.key) == ("ktel.raw", 3, None)
    assert type(stand_in.value) is Unreadable and stand_in.value == b""
    assert stand_in.value.reason == (
        f"a Kafka record batch not read (offsets 5 to 9): its {codec} content expands past 32 MiB"
    )
    assert got[6].value == b"after"
    assert next_offset == 11


def content_size(data: bytes) -> int:
    """What a zstd batch's records section expands to (its records start at byte 61)."""
    return len(cramjam.zstd.decompress(data[61:]))


def test_a_batch_taking_exactly_the_bound_is_read_and_one_byte_more_is_not():
    # What a batch takes: its content and RECORD_BYTES for each of its four records.
    room = EXPAND_MAX_BYTES - 4 * RECORD_BYTES
    values = [bytes(8 << 20)] * 4
    framing = content_size(batch(0, values)) - 4 * (8 << 20)
    values[3] = bytes((8 << 20) - framing - 4 * RECORD_BYTES)
    assert content_size(batch(0, values)) == room
    got, _ = walk(batch(0, values))
    assert [len(r.value) for r in got] == [len(v) for v in values]
    values[3] += b"\0"
    [stand_in], _ = walk(batch(0, values))
    assert stand_in.value.reason == (
        f"a Kafka record batch not read (offsets 0 to 3): its zstd content ({room + 1} bytes) "
        "and its records take more than 32 MiB"
    )


def test_a_batch_whose_compressed_content_is_broken_is_a_stand_in_naming_that():
    broken = bytearray(batch(0, [b"y" * 5000] * 3))
    broken[61:65] = b"\0\0\0\0"  # the zstd frame's magic, where the records begin
    # (with the CRC made again: the broker checks it, not the content)
    struct.pack_into(">I", broken, 17, calc_crc32c(bytes(broken[21:])))
    got, next_offset = walk(bytes(broken), batch(3, [b"z"]))
    assert [r.offset for r in got] == [2, 3] and next_offset == 4
    assert got[0].value.reason.startswith(
        "a Kafka record batch not read (offsets 0 to 2): its content is not valid zstd ("
    )


def test_a_fetch_stops_taking_batches_once_they_expanded_to_the_bound_and_fetches_the_rest_again():
    # Four batches of 12 MiB each: three reach the bound (36 MiB), the fourth waits.
    big = [batch(i, [bytes(12 << 20)]) for i in range(4)]
    got, next_offset = walk(*big)
    assert [r.offset for r in got] == [0, 1, 2]
    assert next_offset == 3
    got, next_offset = walk(big[3], fetch_offset=3)
    assert [r.offset for r in got] == [3] and next_offset == 4


def test_each_fetch_is_charged_for_its_own_batches_only():
    one = fetch(batch(0, [bytes(20 << 20)]), batch(1, [bytes(20 << 20)]))
    other = fetch(batch(0, [bytes(20 << 20)]), tp=TopicPartition("ktel.raw", 4))
    assert next(one).offset == 0
    assert next(other).offset == 0  # (20 MiB more expanded in this thread, for another fetch)
    assert next(one).offset == 1  # 40 MiB in all, but 20 of them this fetch's: it goes on


def test_a_stand_in_is_refused_by_every_ktel_decoder_with_its_reason():
    with pytest.raises(WireError) as refused:
        decode_batch(Unreadable("a Kafka record batch not read (offsets 5 to 9): why"))
    assert str(refused.value) == "raw batch: a Kafka record batch not read (offsets 5 to 9): why"
    # True though empty: a reader's `value or b""` keeps it, and its reason.
    assert (Unreadable("why") or b"").reason == "why"
    # Bytes from Kafka are never one, even empty ones.
    with pytest.raises(WireError, match="not msgpack"):
        decode_batch(b"")


class Reader:
    """A consumer of ``partitions`` partitions of ktel.raw whose fetches are given by
    hand (``fetched``) and polled by aiokafka's own ``Fetcher.fetched_records``: only
    the network half of the client is left out. ``group``: its partitions come from
    its group (``assign``), else it assigned them itself."""

    def __init__(self, partitions: int, group: bool = False) -> None:
        self.tps = [TopicPartition("ktel.raw", p) for p in range(partitions)]
        self.subscriptions = SubscriptionState()
        if group:
            self.subscriptions.subscribe({"ktel.raw"})
        else:
            self.subscriptions.assign_from_user(set(self.tps))
        fetcher = self.fetcher = object.__new__(Fetcher)
        fetcher._subscriptions, fetcher._records = self.subscriptions, {}
        fetcher._wait_consume_future, fetcher._fetch_waiters = None, set()
        fetcher._closed, fetcher._loop = False, asyncio.get_running_loop()

    def assign(self) -> None:
        self.subscriptions.assign_from_subscribed(set(self.tps))

    def fetched(self, partition: int, *batches: bytes) -> None:
        tp, assignment = self.tps[partition], self.subscriptions.subscription.assignment
        assignment.state_value(tp).seek(0)
        records = fetch(*batches, tp=tp)
        self.fetcher._records[tp] = FetchResult(
            tp, assignment=assignment, partition_records=records, backoff=0
        )

    def kept(self) -> list[int]:
        """The partitions whose fetched records wait for a poll."""
        return sorted(tp.partition for tp in self.fetcher._records)

    def position(self, partition: int) -> int:
        return self.subscriptions.subscription.assignment.state_value(self.tps[partition]).position

    async def poll(self, timeout: float = 0, max_records: int | None = None) -> dict[int, list[int]]:
        """The offsets a poll hands over, by partition."""
        drained = await self.fetcher.fetched_records(set(), timeout=timeout, max_records=max_records)
        return {tp.partition: [r.offset for r in records] for tp, records in drained.items()}


async def test_a_poll_walks_no_more_partitions_once_it_took_the_bound_and_they_wait_for_the_next():
    # Four partitions, each a batch of 28 MiB: a poll takes two (56 MiB), the others
    # keep their fetched records for the next poll, which takes them.
    reader = Reader(4)
    for p in range(4):
        reader.fetched(p, batch(0, [bytes(7 << 20)] * 4))
    assert await reader.poll() == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
    assert reader.kept() == [2, 3]
    assert await reader.poll() == {2: [0, 1, 2, 3], 3: [0, 1, 2, 3]}
    assert await reader.poll() == {} and reader.kept() == []
    assert [reader.position(p) for p in range(4)] == [4] * 4


async def test_a_walk_that_crosses_a_polls_bound_ends_there_and_fetches_its_rest_again():
    # 24 MiB in the first partition; the second's first batch takes the poll to 36 MiB,
    # so its walk ends after it and its second batch is fetched again from offset 1.
    reader, twelve = Reader(2), [bytes(12 << 20)]
    reader.fetched(0, batch(0, twelve), batch(1, twelve))
    reader.fetched(1, batch(0, twelve), batch(1, twelve))
    assert await reader.poll() == {0: [0, 1], 1: [0]}
    assert reader.kept() == [] and reader.position(1) == 1


async def test_an_uncompressed_batch_is_charged_for_its_records_only():
    reader = Reader(3)
    reader.fetched(0, batch(0, [bytes(7 << 20)] * 4))
    plain = batch(0, [bytes(1 << 20)] * 8, codec="none")  # 8 MiB, nothing expanded
    reader.fetched(1, plain)
    reader.fetched(2, plain)
    assert await reader.poll() == {0: [0, 1, 2, 3], 1: list(range(8)), 2: list(range(8))}


async def test_a_poll_that_waits_for_its_groups_assignment_has_a_budget_all_the_same():
    # The poll starts while the group reassigns partitions (a rebalance, or the first
    # join), and the fetches come for the new assignment.
    reader = Reader(4, group=True)
    polled = asyncio.create_task(reader.poll(timeout=10))
    await asyncio.sleep(0)
    reader.assign()
    for p in range(4):
        reader.fetched(p, batch(0, [bytes(7 << 20)] * 4))
    assert await polled == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
    assert reader.kept() == [2, 3]


async def test_the_rest_of_a_batch_an_earlier_poll_left_is_charged_to_the_poll_that_takes_it():
    # max_records stops the first poll within the second partition's 31 MiB batch; the
    # next poll takes the rest of it and the third partition's (62 MiB): the fourth waits.
    reader = Reader(4)
    reader.fetched(0, batch(0, [b"small"]))
    reader.fetched(1, batch(0, [bytes(8 << 20), bytes(23 << 20)]))
    reader.fetched(2, batch(0, [bytes(31 << 20)]))
    reader.fetched(3, batch(0, [bytes(31 << 20)]))
    assert await reader.poll(max_records=2) == {0: [0], 1: [0]}
    assert await reader.poll(max_records=4) == {1: [1], 2: [0]}
    assert await reader.poll(max_records=4) == {3: [0]}


def test_a_batch_of_more_records_than_the_bound_allows_is_a_stand_in_and_the_next_is_read():
    most = EXPAND_MAX_BYTES // RECORD_BYTES  # 131,072 records, uncompressed: nothing else taken
    got, _ = walk(batch(0, [b""] * most, codec="none"))
    assert len(got) == most
    got, next_offset = walk(batch(0, [b""] * (most + 1), codec="none"), batch(most + 1, [b"after"]))
    assert [r.offset for r in got] == [most, most + 1] and next_offset == most + 2
    assert got[0].value.reason == (
        f"a Kafka record batch not read (offsets 0 to {most}): it holds {most + 1} records, more than {most}"
    )
    assert got[1].value == b"after"


def test_a_batch_whose_offsets_are_corrupt_is_fetched_again_not_taken_for_many_records():
    # Its last offset delta (covered by the CRC) made to claim a million records: the
    # client refuses the batch as corrupt (and fetches it again), as it would without ktel.
    corrupt = bytearray(batch(0, [b"x"] * 3))
    struct.pack_into(">i", corrupt, 23, 1_000_000)
    with pytest.raises(CorruptRecordException):
        walk(bytes(corrupt))
