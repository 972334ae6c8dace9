"""What bounding a compressed batch's expansion (ktel/kafka_batches.py) costs a reader.

Polls one fetch of one-record batches (700-byte values, the size of a raw batch of
about ten file creations) on each of four partitions, as aiokafka's consumer polls and
walks them (``Fetcher.fetched_records``; only the network is left out), with
aiokafka's own decoders, poll and walk (the baseline) and with ktel's bounded ones,
alternately in one process, per codec; prints the best of the rounds, in µs a batch.

    PYTHONPATH=. .venv/bin/python bench/batch_expansion.py [--batches 500] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import time

import aiokafka.codec
from aiokafka.consumer.fetcher import READ_UNCOMMITTED, Fetcher, FetchResult, PartitionRecords
from aiokafka.consumer.subscription_state import SubscriptionState
from aiokafka.record._crecords import default_records as c_default_records
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition

from ktel import kafka_batches

CODECS = {
    "none": DefaultRecordBatch.CODEC_NONE,
    "zstd": DefaultRecordBatch.CODEC_ZSTD,
    "lz4": DefaultRecordBatch.CODEC_LZ4,
    "gzip": DefaultRecordBatch.CODEC_GZIP,
}
DECODERS = ("gzip_decode", "lz4_decode", "zstd_decode", "snappy_decode")
TPS = [TopicPartition("ktel.raw", p) for p in range(4)]
# aiokafka's, before install
WALK, GETALL, POLL = PartitionRecords._unpack_records, FetchResult.getall, Fetcher.fetched_records


def fetched(batches: int, codec: int) -> bytes:
    out = []
    for base in range(batches):
        builder = DefaultRecordBatchBuilder(2, codec, 0, -1, -1, -1, 1 << 30)
        builder.append(0, timestamp=1, key=b"host-0001", value=bytes(range(70)) * 10, headers=[])
        data = bytearray(builder.build())
        struct.pack_into(">q", data, 0, base)
        out.append(bytes(data))
    return b"".join(out)


def use(bounded: bool) -> None:
    for name in DECODERS:
        setattr(
            c_default_records,
            name,
            kafka_batches._DECODERS[name] if bounded else getattr(aiokafka.codec, name),
        )
    PartitionRecords._unpack_records = kafka_batches._unpack_bounded if bounded else WALK
    FetchResult.getall = kafka_batches._getall_bounded if bounded else GETALL
    Fetcher.fetched_records = kafka_batches._fetched_records_bounded if bounded else POLL


async def poll_us(data: bytes, batches: int) -> float:
    """One poll of a consumer that fetched ``data`` on each of TPS."""
    subscriptions = SubscriptionState()
    subscriptions.assign_from_user(set(TPS))
    fetcher = object.__new__(Fetcher)
    fetcher._subscriptions, fetcher._wait_consume_future, fetcher._records = subscriptions, None, {}
    for tp in TPS:
        subscriptions.seek(tp, 0)
        records = PartitionRecords(tp, MemoryRecords(data), [], 0, None, None, True, READ_UNCOMMITTED)
        fetcher._records[tp] = FetchResult(
            tp, assignment=subscriptions.subscription.assignment, partition_records=records, backoff=0
        )
    start = time.perf_counter()
    got = await fetcher.fetched_records(set(), timeout=0)
    took = time.perf_counter() - start
    assert sum(map(len, got.values())) == batches * len(TPS)
    return took / (batches * len(TPS)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=500, help="a partition's")
    parser.add_argument("--rounds", type=int, default=7)
    opts = parser.parse_args()
    for name, codec in CODECS.items():
        data = fetched(opts.batches, codec)
        best = {False: float("inf"), True: float("inf")}
        for _ in range(opts.rounds):
            for bounded in (False, True):
                use(bounded)
                best[bounded] = min(best[bounded], asyncio.run(poll_us(data, opts.batches)))
        print(
            f"{name:5} aiokafka {best[False]:6.2f} µs a batch, bounded {best[True]:6.2f} "
            f"({best[True] - best[False]:+.2f}, x{best[True] / best[False]:.2f})"
        )


if __name__ == "__main__":
    main()
