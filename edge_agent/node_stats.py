"""The node's SLI readings the agent sends in each heartbeat (``node``, ktel/wire/control.py).

CPU steal and context switches come from /proc/stat, the block devices' I/Os in
progress (their queue depth) from /proc/diskstats, and the fill of the probes'
BPF hash maps from the maps themselves. The processors export them per host
(processors/fleet_metrics.py), so a fleet is watched from its few processing
workers rather than by scraping every node.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ktel.wire.control import MAX_NODE_READINGS

# /proc/stat counts CPU time in USER_HZ ticks (proc(5)).
TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")
# A disk's reading: this and the device's name.
DISK_PREFIX = "disk_in_flight."
# Devices whose queue says nothing about the node's disks.
VIRTUAL_DISKS = re.compile(r"^(loop|ram|zram|nbd)\d")
# A BCC hash map's declaration and the name it gives the map: BPF_HASH(name, ...),
# BPF_PERCPU_HASH(name, ...) or BPF_TABLE("lru_hash"/"hash"/..., key, leaf, name, ...).
_HASH_MAP = re.compile(
    r'BPF_(?:PERCPU_)?HASH\(\s*(\w+)|BPF_TABLE\(\s*"(?:lru_)?(?:percpu_)?hash"\s*,[^,]+,[^,]+,\s*(\w+)'
)


def cpu_stat(text: str) -> dict[str, int]:
    """``cpu_steal_ms`` (all CPUs), ``cpus`` (the online CPUs: a line each) and
    ``context_switches`` from /proc/stat's text."""
    out: dict[str, int] = {}
    cpus = 0
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu" and len(fields) > 8:
            # user nice system idle iowait irq softirq steal ...
            out["cpu_steal_ms"] = round(int(fields[8]) * TICK_MS)
        elif fields and fields[0].startswith("cpu") and fields[0][3:].isdigit():
            cpus += 1
        elif fields and fields[0] == "ctxt":
            out["context_switches"] = int(fields[1])
    if cpus:
        out["cpus"] = cpus
    return out


def disks_in_flight(text: str, disks: set[str]) -> dict[str, int]:
    """``disk_in_flight.<device>`` for each of ``disks`` (whole block devices, as
    /sys/block lists them: partitions are in their disk's count) in /proc/diskstats'
    text: its 12th column, I/Os currently in progress."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 12 and fields[2] in disks and not VIRTUAL_DISKS.match(fields[2]):
            out[f"{DISK_PREFIX}{fields[2]}"] = int(fields[11])
    return out


def hash_maps(source: str) -> list[str]:
    """The names of the hash maps a probe's BCC source declares."""
    return [a or b for a, b in _HASH_MAP.findall(source)]


def map_usage(probe: str, tables: Iterable[tuple[str, Any]]) -> dict[str, int]:
    """``map_entries.<probe>.<map>`` and ``map_max_entries.<probe>.<map>`` for BCC
    tables; counting walks the keys (one syscall each), so this runs off the event loop."""
    out: dict[str, int] = {}
    for name, table in tables:
        out[f"map_entries.{probe}.{name}"] = sum(1 for _ in table)  # a BCC table iterates its keys
        out[f"map_max_entries.{probe}.{name}"] = int(table.max_entries)
    return out


def within_bound(readings: dict[str, int]) -> tuple[dict[str, int], int]:
    """``readings`` cut to what a heartbeat takes (MAX_NODE_READINGS), and how many disks
    were left out: a storage node's disks (multipath LUNs, each seen on several paths)
    can be more, and a heartbeat with more readings does not decode, so the workers
    would see no heartbeat of the node at all. The disks go first, the last by name, so
    that the same ones stay from one heartbeat to the next. The number left out goes in
    the heartbeat (``node_left_out``), for the workers to count with those they leave out."""
    if len(readings) <= MAX_NODE_READINGS:
        return readings, 0
    disks = sorted(k for k in readings if k.startswith(DISK_PREFIX))
    room = max(0, MAX_NODE_READINGS - (len(readings) - len(disks)))
    left_out = set(disks[room:])
    return {k: v for k, v in readings.items() if k not in left_out}, len(left_out)


def read_stat() -> dict[str, int]:
    return cpu_stat(Path("/proc/stat").read_text())


def read_diskstats() -> dict[str, int]:
    return disks_in_flight(Path("/proc/diskstats").read_text(), set(os.listdir("/sys/block")))


# The node's readings in /proc, by source: each is read on its own (Agent.node_readings),
# so that one failing leaves its readings out of the heartbeat, not the others.
PROC_SOURCES: dict[str, Callable[[], dict[str, int]]] = {
    "/proc/stat": read_stat,
    "/proc/diskstats": read_diskstats,
}
