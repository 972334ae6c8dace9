"""An exporter's consumer lag (exporters/consume.py, _lags) while a rebalance revokes
partitions: the lag is a metric, and a partition revoked while the position before it
was awaited is left out, not the end of the exporter. A stub consumer stands for
aiokafka's here, raising where it raises for a partition no longer assigned."""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition
from aiokafka.errors import IllegalStateError

from exporters.consume import _lags

A, B, C = (TopicPartition("ktel.metrics", p) for p in range(3))


class Rebalanced:
    """Three partitions held; awaiting A's position (one waiting for its reset) lets a
    rebalance revoke B and C, and C's position is being awaited when it is revoked."""

    def __init__(self) -> None:
        self.held = {A, B, C}
        self.ends = {A: 10, B: 20, C: 30}

    def assignment(self):
        return [tp for tp in (A, B, C) if tp in self.held]  # (the order positions are awaited in)

    def highwater(self, tp):
        assert tp in self.held, "Partition is not assigned"  # (as aiokafka's)
        return self.ends[tp]

    async def position(self, tp):
        if tp not in self.held:
            raise IllegalStateError(f"Partition {tp} is not assigned")
        if tp == A:
            await asyncio.sleep(0)
            self.held -= {B}
        if tp == C:
            self.held -= {C}
            raise IllegalStateError(f"Partition {tp} is not assigned")  # revoked while awaited
        return 4


def test_partitions_revoked_while_the_lag_is_read_are_left_out():
    consumer = Rebalanced()
    lags = asyncio.run(_lags(consumer))
    assert lags == {("ktel.metrics", 0): 6}


def test_the_lag_of_each_partition_held_is_its_end_less_the_position():
    consumer = Rebalanced()

    async def position(tp):
        return {A: 4, B: 20, C: 1}[tp]

    consumer.position = position
    assert asyncio.run(_lags(consumer)) == {
        ("ktel.metrics", 0): 6,
        ("ktel.metrics", 1): 0,
        ("ktel.metrics", 2): 29,
    }
