"""What bounding a compressed batch's expansion (ktel/kafka_batches.py) costs a reader.

Walks one fetch of one-record batches (700-byte values, the size of a raw batch of
about ten file creations), as aiokafka's fetcher walks it, with aiokafka's own
decoders and walk (the baseline) and with ktel's bounded ones, alternately in one
process, per codec; prints the best of the rounds, in µs a batch.

    PYTHONPATH=. .venv/bin/python bench/batch_expansion.py [--batches 2000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import struct
import time

import aiokafka.codec
from aiokafka.consumer.fetcher import READ_UNCOMMITTED, PartitionRecords
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
TP = TopicPartition("ktel.raw", 0)
WALK = PartitionRecords._unpack_records  # (aiokafka's, before install)


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


def walk_us(data: bytes, batches: int) -> float:
    start = time.perf_counter()
    got = list(PartitionRecords(TP, MemoryRecords(data), [], 0, None, None, True, READ_UNCOMMITTED))
    took = time.perf_counter() - start
    assert len(got) == batches
    return took / batches * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    opts = parser.parse_args()
    for name, codec in CODECS.items():
        data = fetched(opts.batches, codec)
        best = {False: float("inf"), True: float("inf")}
        for _ in range(opts.rounds):
            for bounded in (False, True):
                use(bounded)
                best[bounded] = min(best[bounded], walk_us(data, opts.batches))
        print(
            f"{name:5} aiokafka {best[False]:6.2f} µs a batch, bounded {best[True]:6.2f} "
            f"({best[True] - best[False]:+.2f}, x{best[True] / best[False]:.2f})"
        )


if __name__ == "__main__":
    main()
