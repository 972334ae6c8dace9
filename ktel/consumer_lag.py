"""Consumer lag (SLI: are the processors and exporters keeping up?), exported by
each consumer process for the partitions it holds now: in a fleet, Prometheus
scrapes the workers and exporters, and ``max by (group, topic, partition)``
hides a member that has just handed a partition over."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Gauge

LAG = Gauge(
    "ktel_consumer_lag_records",
    "records of the partition after the group's committed offset (this member's partitions)",
    ["group", "topic", "partition"],
)
UP = Gauge(
    "ktel_consumer_group_up",
    "1 while this process runs as one of the group's consumers, from its start (the lag comes "
    "only once it has read); the alert KtelConsumerGroupGone fires when a group has none",
    ["group"],
)
_held: dict[str, set[tuple[str, int]]] = {}


def up(group: str) -> None:
    """This process is one of ``group``'s consumers, from now until it ends."""
    UP.labels(group).set(1)


def export(group: str, lags: Mapping[tuple[str, int], int]) -> None:
    """Set the lag of each (topic, partition) ``group`` holds in this process now,
    and drop the series of those it no longer holds."""
    for topic, partition in _held.get(group, set()) - set(lags):
        LAG.remove(group, topic, str(partition))
    for (topic, partition), lag in lags.items():
        LAG.labels(group, topic, str(partition)).set(max(lag, 0))
    _held[group] = set(lags)
