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
