"""Consumer lag is exported for the partitions a process holds now, and only those."""

from __future__ import annotations

from prometheus_client import REGISTRY

from ktel import consumer_lag


def lag(group: str, topic: str, partition: int) -> float | None:
    labels = {"group": group, "topic": topic, "partition": str(partition)}
    return REGISTRY.get_sample_value("ktel_consumer_lag_records", labels)


def test_lag_follows_the_assignment():
    consumer_lag.export("g-unit", {("ktel.raw", 0): 5, ("ktel.raw", 1): 0})
    assert (lag("g-unit", "ktel.raw", 0), lag("g-unit", "ktel.raw", 1)) == (5, 0)
    # Partition 0 handed over to another member: its series goes, not a stale value.
    consumer_lag.export("g-unit", {("ktel.raw", 1): 7})
    assert (lag("g-unit", "ktel.raw", 0), lag("g-unit", "ktel.raw", 1)) == (None, 7)


def test_a_processing_workers_lag_is_of_the_partitions_whose_commit_it_knows():
    """Faust's monitor knows a partition's committed offset from this worker's first
    commit there, and forgets them at every rebalance: a partition fetched from before
    then has no lag to tell, not its whole end offset."""
    from types import SimpleNamespace

    from faust.types import TP

    from processors.stages import held_lags

    raw = [TP("ktel.raw", p) for p in range(3)]
    monitor = SimpleNamespace(
        tp_end_offsets={raw[0]: 5_000_010, raw[1]: 7_000_000, raw[2]: 40},
        tp_committed_offsets={raw[0]: 5_000_000, raw[2]: 40},
    )
    assert held_lags(monitor, {raw[0], raw[1]}) == {("ktel.raw", 0): 10}
