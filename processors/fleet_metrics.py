"""Per-host SLIs from agent heartbeats, on the self-metrics of the workers that read
``ktel.heartbeats`` (the enrich stage, or ``ktel process all``).

Each worker exports the hosts whose heartbeats it reads (their partitions), so a
fleet's Prometheus scrapes a few workers, not every node. After a rebalance a
worker keeps a host it no longer reads until the host's heartbeats are
``3 * interval_s`` late there, then reports it down until ``aggregate.host_ttl_seconds``:
queries take ``max by (host_id)`` over the workers. The series:

- ``ktel_agent_up{host_id}``: 1 while heartbeats arrive within three of their
  intervals, else 0 (SLI M1);
- ``ktel_agent_last_heartbeat_timestamp_seconds{host_id}``: the last one's time, by
  the agent's clock;
- ``ktel_agent_stopped_timestamp_seconds{host_id}``: when the last one says the agent
  stopped on purpose (a signal: a node drained or retired, an upgrade), its time, so
  that the alert on a silent host (deploy/prometheus/ktel-rules.yml) pages only for
  agents that died or lost Kafka;
- ``ktel_node_cpu_steal_seconds_total``, ``ktel_node_context_switches_total`` (M4, M9);
- ``ktel_node_cpus``: the node's online CPUs (steal over all of them, divided by it, is a
  fraction of the node's CPU time);
- ``ktel_node_disk_io_in_progress{device}`` (M8), the block devices' queue depth;
- ``ktel_agent_bpf_map_entries{probe,map}`` and ``ktel_agent_bpf_map_max_entries`` (M10).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ktel.wire import Heartbeat

# Heartbeats missed before a host counts as down.
MISSED_HEARTBEATS = 3
# Assumed when a heartbeat does not say its interval (the agent's default).
DEFAULT_INTERVAL_S = 10.0


@dataclass
class _Seen:
    received: float  # time.monotonic() when the worker read it
    ts_s: float  # the heartbeat's own time, seconds since the epoch
    interval_s: float
    node: dict[str, int]
    stopping: bool
    boot_id: object  # the heartbeat's boot.id (None without one)


class FleetMetrics(Collector):
    """The latest heartbeat of each host, exported at scrape time."""

    def __init__(self, forget_after_s: float) -> None:
        self.forget_after_s = forget_after_s
        self._hosts: dict[str, _Seen] = {}
        self._lock = threading.Lock()  # observe() on the event loop, collect() on the HTTP thread

    def observe(self, host_id: str, hb: Heartbeat) -> None:
        """Take ``hb`` as the host's latest, unless it is older than the one held of the
        same boot: re-read after a rebalance, or re-driven from ktel.dlq (``ktel dlq``),
        it would otherwise set the host up again, its time and counters back."""
        seen = _Seen(
            time.monotonic(),
            hb["ts"] / 1000,
            hb.get("interval_s", DEFAULT_INTERVAL_S),
            hb.get("node", {}),
            hb.get("stopping", False),
            hb["host"].get("boot.id"),
        )
        with self._lock:
            held = self._hosts.get(host_id)
            if held is None or held.boot_id != seen.boot_id or held.ts_s <= seen.ts_s:
                self._hosts[host_id] = seen

    def collect(self) -> Iterator[Metric]:
        now = time.monotonic()
        with self._lock:
            for host_id in [h for h, s in self._hosts.items() if now - s.received > self.forget_after_s]:
                del self._hosts[host_id]
            hosts = list(self._hosts.items())
        up = GaugeMetricFamily(
            "ktel_agent_up", "1 while the host's agent sends heartbeats", labels=["host_id"]
        )
        last = GaugeMetricFamily(
            "ktel_agent_last_heartbeat_timestamp_seconds",
            "time of the host's last heartbeat, by its clock",
            labels=["host_id"],
        )
        stopped = GaugeMetricFamily(
            "ktel_agent_stopped_timestamp_seconds",
            "time of the host's last heartbeat, when it said the agent stopped on purpose",
            labels=["host_id"],
        )
        steal = CounterMetricFamily(
            "ktel_node_cpu_steal_seconds", "CPU time stolen by the hypervisor, all CPUs", labels=["host_id"]
        )
        cpus = GaugeMetricFamily("ktel_node_cpus", "online CPUs of the node", labels=["host_id"])
        switches = CounterMetricFamily(
            "ktel_node_context_switches", "context switches since boot", labels=["host_id"]
        )
        disks = GaugeMetricFamily(
            "ktel_node_disk_io_in_progress", "I/Os in the block device's queue", labels=["host_id", "device"]
        )
        entries = GaugeMetricFamily(
            "ktel_agent_bpf_map_entries",
            "entries in a probe's BPF hash map",
            labels=["host_id", "probe", "map"],
        )
        capacity = GaugeMetricFamily(
            "ktel_agent_bpf_map_max_entries",
            "capacity of a probe's BPF hash map",
            labels=["host_id", "probe", "map"],
        )
        for host_id, s in hosts:
            alive = not s.stopping and now - s.received <= MISSED_HEARTBEATS * max(s.interval_s, 1.0)
            up.add_metric([host_id], 1.0 if alive else 0.0)
            last.add_metric([host_id], s.ts_s)
            if s.stopping:
                stopped.add_metric([host_id], s.ts_s)
            for key, value in s.node.items():
                name, _, rest = key.partition(".")
                if name == "cpu_steal_ms":
                    steal.add_metric([host_id], value / 1000)
                elif name == "cpus":
                    cpus.add_metric([host_id], value)
                elif name == "context_switches":
                    switches.add_metric([host_id], value)
                elif name == "disk_in_flight":
                    disks.add_metric([host_id, rest], value)
                elif name in ("map_entries", "map_max_entries") and "." in rest:
                    probe, _, bpf_map = rest.partition(".")
                    (entries if name == "map_entries" else capacity).add_metric(
                        [host_id, probe, bpf_map], value
                    )
        yield from (up, last, stopped, steal, cpus, switches, disks, entries, capacity)
