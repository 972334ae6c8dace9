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

The hosts held count against ``process.max_hosts`` with the worker's table's
(``host_ids``; processors/stages.py refuses a heartbeat of a host past it), a
heartbeat that gives its host no table value (no ``boot.id``) too: else a writer of
ktel.heartbeats inventing host ids would grow this map, and the scrape, past the cap.

The ``device``, ``probe`` and ``map`` labels are names from the heartbeat's ``node``
keys, which whoever can write ``ktel.heartbeats`` chooses: the decoder takes up to
1,024 keys of 256 characters (ktel/wire/control.py), and a heartbeat may name other
devices than the last. So what one host may put here is bounded to what a node
needs: ``MAX_DISKS`` devices and ``MAX_BPF_MAPS`` maps at once, and twice as many
names over the time this worker holds the host (devices come and go, but a host
renaming them every heartbeat would churn Prometheus's series without end), each
name printable ASCII of at most ``MAX_NAME_CHARS``. What is left out is counted
(``observe`` returns it, exported as ``ktel_processor_node_readings_left_out_total``)
and logged when a host starts having readings left out, with the disks its agent had
no room for in the heartbeat (its ``node_left_out``, past 1,024 readings). The bound is here and not in
the decoder: the enrich stage takes the heartbeat's host attributes, which one disk
too many should not cost the host.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import threading
import time

from ktel.wire import Heartbeat
from ktel.wire.control import MAX_NODE_READINGS, heartbeat_newest, heartbeat_older

# Heartbeats missed before a host counts as down.
MISSED_HEARTBEATS = 3
# Assumed when a heartbeat does not say its interval (the agent's default).
DEFAULT_INTERVAL_S = 10.0
# The longest interval of a heartbeat that keeps its host held past ``forget_after_s``: the
# agents' longest agent.heartbeat_seconds (ktel/config.py MAX_PERIOD_SECONDS).
MAX_INTERVAL_S = 3600.0
# Block devices one host may have exported at once: the agent sends whole disks only
# (partitions count in their disk's, loop and RAM disks are left out: edge_agent/node_stats.py),
# a handful on most nodes; a storage node with more has the rest counted as left out.
MAX_DISKS = 32
# BPF hash maps (probe, map) one host may have exported at once: the probes ktel ships
# declare 10 (bpf/*.bpf.c), so this leaves room for the registry to grow.
MAX_BPF_MAPS = 32
# The names a host may go through while this worker holds it, as a multiple of the
# bounds above: a disk replaced or a volume attached takes a new name, but a host that
# named other devices in every heartbeat would make new series on every scrape.
NAMES_HELD_FACTOR = 2
# A device, probe or map name as a label value: what the kernel and ktel name them with
# (block device names take at most 31 characters, DISK_NAME_LEN), printable ASCII
# without spaces. Anything else (control characters, an empty name) is not exported.
MAX_NAME_CHARS = 64
LEGIBLE_NAME = re.compile(rf"[!-~]{{1,{MAX_NAME_CHARS}}}")
# Each kind of reading whose key names series of its own, and its bound at once.
BOUNDS = {"disks": MAX_DISKS, "bpf_maps": MAX_BPF_MAPS}
# How often a worker lets go of hosts silent for ``forget_after_s`` between scrapes (a
# scrape does too).
FORGET_EVERY_S = 60.0
# The readings exported without a name of their own, and the family of FAMILIES of each.
SCALARS = {"cpu_steal_ms": "steal", "cpus": "cpus", "context_switches": "switches"}

log = logging.getLogger("ktel.process")


@dataclasses.dataclass
class _Seen:
    received: float  # time.monotonic() when the worker read it
    ts_s: float  # the heartbeat's own time, seconds since the epoch
    # The highest seq (None: none carried one) and ts (ms) of the boot's heartbeats taken,
    # which order the next (ktel.wire.control.heartbeat_older).
    seq: int | None
    newest_ms: int
    # The agent's heartbeat period. (Agents before it said so sent the time since their
    # previous heartbeat, and since their start in the first: such a host reads down
    # from a few seconds after its first heartbeat until its second.)
    interval_s: float
    node: dict[str, int]  # the readings exported (within the bounds)
    stopping: bool
    boot_id: object  # the heartbeat's boot.id (None without one)
    names: dict[str, set[str]]  # per kind of BOUNDS, the names exported while this worker held the host
    left_out: dict[str, int]  # readings of this heartbeat left out, per kind of BOUNDS
    label: bytes  # its host_id label, as the text format writes it
    # Per family of FAMILIES, each of the host's series: the line up to its value, and
    # the reading of ``node`` that is its value (_series).
    series: dict[str, list[tuple[bytes, str]]]

    def alive(self, now: float) -> bool:
        return not self.stopping and now - self.received <= MISSED_HEARTBEATS * max(self.interval_s, 1.0)


def bounded(node: dict[str, int], names: dict[str, set[str]]) -> tuple[dict[str, int], dict[str, int]]:
    """The readings of ``node`` to export, and how many were left out per kind of BOUNDS.

    ``names`` holds what the host's series were named before, and takes the new names
    kept. Those come first, then new ones in order, so that a host over a bound keeps
    the same series from one heartbeat to the next. A reading of a kind this worker does
    not know (a newer agent's) is neither exported nor counted."""
    kept: dict[str, int] = {}
    left_out: collections.Counter[str] = collections.Counter()
    by_name: dict[str, dict[str, list[str]]] = {kind: {} for kind in BOUNDS}
    for key in node:
        if (reading := _reading(key)) is None:
            continue
        _, kind, parts = reading
        if kind is None:
            kept[key] = node[key]
        elif all(LEGIBLE_NAME.fullmatch(part) for part in parts):
            by_name[kind].setdefault(key.partition(".")[2], []).append(key)
        else:
            left_out[kind] += 1
    for kind, keys in by_name.items():
        held = names[kind]
        at_once = 0
        for name in sorted(keys, key=lambda n: (n not in held, n)):
            if at_once < BOUNDS[kind] and (name in held or len(held) < NAMES_HELD_FACTOR * BOUNDS[kind]):
                held.add(name)
                at_once += 1
                kept.update((key, node[key]) for key in keys[name])
            else:
                left_out[kind] += len(keys[name])
    # (the heartbeat's own map when all of it is kept: no copy held)
    return (node if len(kept) == len(node) else kept), dict(left_out)


def _reading(key: str) -> tuple[str, str | None, tuple[str, ...]] | None:
    """What a key of a heartbeat's ``node`` map reads: its family of FAMILIES, its kind
    of BOUNDS (None for one exported without a name), and the names it gives its series
    (a device; a probe and a map); None for a reading this worker does not export."""
    if key in SCALARS:
        return SCALARS[key], None, ()
    reading, _, rest = key.partition(".")
    if reading == "disk_in_flight":
        return "disks", "disks", (rest,)
    if reading in ("map_entries", "map_max_entries"):
        probe, _, bpf_map = rest.partition(".")
        return ("entries" if reading == "map_entries" else "capacity"), "bpf_maps", (probe, bpf_map)
    return None


# The series, in the order a scrape lists them: (name, type, help) by family.
FAMILIES = {
    "up": ("ktel_agent_up", "gauge", "1 while the host's agent sends heartbeats"),
    "last": (
        "ktel_agent_last_heartbeat_timestamp_seconds",
        "gauge",
        "time of the host's last heartbeat, by its clock",
    ),
    "stopped": (
        "ktel_agent_stopped_timestamp_seconds",
        "gauge",
        "time of the host's last heartbeat, when it said the agent stopped on purpose",
    ),
    "steal": ("ktel_node_cpu_steal_seconds_total", "counter", "CPU time stolen by the hypervisor, all CPUs"),
    "cpus": ("ktel_node_cpus", "gauge", "online CPUs of the node"),
    "switches": ("ktel_node_context_switches_total", "counter", "context switches since boot"),
    "disks": ("ktel_node_disk_io_in_progress", "gauge", "I/Os in the block device's queue"),
    "entries": ("ktel_agent_bpf_map_entries", "gauge", "entries in a probe's BPF hash map"),
    "capacity": ("ktel_agent_bpf_map_max_entries", "gauge", "capacity of a probe's BPF hash map"),
}


class FleetMetrics:
    """The latest heartbeat of each host, exported at scrape time (``exposition``)."""

    def __init__(self, forget_after_s: float) -> None:
        self.forget_after_s = forget_after_s
        self._hosts: dict[str, _Seen] = {}
        self._lock = threading.Lock()  # observe() on the event loop, exposition() on the HTTP thread
        self._forgotten_at = time.monotonic()  # when hosts past forget_after_s were last let go

    def _forget(self, now: float) -> None:
        """Let go of the hosts whose last heartbeat is ``forget_after_s`` old and which are
        no longer up (the lock held): an agent whose heartbeats come less often than
        ``forget_after_s`` (agent.heartbeat_seconds above aggregate.host_ttl_seconds) is
        kept while it is up, else it would leave ktel_agent_up between two heartbeats and
        page as down. How long a heartbeat's own interval keeps its host is bounded by
        ``MAX_INTERVAL_S``: whoever writes ktel.heartbeats says it."""
        self._forgotten_at = now
        for host_id in [
            h
            for h, s in self._hosts.items()
            if now - s.received
            > max(self.forget_after_s, MISSED_HEARTBEATS * min(s.interval_s, MAX_INTERVAL_S))
        ]:
            del self._hosts[host_id]

    def clear(self) -> None:
        """Forget every host: a worker's new app holds only the hosts it reads."""
        with self._lock:
            self._hosts.clear()

    def host_ids(self) -> list[str]:
        """The hosts held, those past ``forget_after_s`` let go first: what the worker counts
        against process.max_hosts with its table's (processors/stages.py), as a heartbeat
        that changes no table value (no ``boot.id``) still puts its host here."""
        with self._lock:
            self._forget(time.monotonic())
            return list(self._hosts)

    def observe(self, host_id: str, hb: Heartbeat) -> dict[str, int]:
        """Take ``hb`` as the host's latest, unless it is older than those taken of the
        same boot (by its ``seq``, or its ``ts`` from an agent that sends none:
        ktel.wire.control.heartbeat_older): re-read after a rebalance, or re-driven from
        ktel.dlq (``ktel dlq``), it would otherwise set the host up again, its time and
        counters back. One of another boot is taken. Its ``ts`` is the time shown, even
        below the one before (the agent's clock set back).

        Returns the readings of its node left out of the host's series (see the
        module's docstring), per kind (``disks``, ``bpf_maps``): those of its ``node``
        past the bounds and those its agent left out of ``node`` (``node_left_out``)."""
        ts_s = hb["ts"] / 1000
        boot_id = hb["host"].get("boot.id")
        now = time.monotonic()
        with self._lock:
            # Here too, not only at a scrape: a worker nobody scrapes (process.metrics_port
            # = 0) would otherwise hold every host it ever read. A pass over the hosts at
            # most every FORGET_EVERY_S, so not per heartbeat.
            if now - self._forgotten_at > FORGET_EVERY_S:
                self._forget(now)
            held = self._hosts.get(host_id)
            seq, newest_ms = hb.get("seq"), hb["ts"]
            if held is not None and held.boot_id == boot_id:
                if heartbeat_older(hb, held.seq, held.newest_ms):
                    return {}
                seq, newest_ms = heartbeat_newest(hb, held.seq, held.newest_ms)
            sent = hb.get("node", {})
            label = held.label if held is not None else f'host_id="{_escaped(host_id)}"'.encode()
            if held is not None and not held.left_out and sent.keys() == held.node.keys():
                # Most heartbeats name the readings the host's last one did, all kept:
                # so are these, as the same series (about 2 µs a heartbeat against 35 to
                # bound them again). Only a host with readings left out keeps being
                # bounded: holding its whole map to compare would let it hold a megabyte.
                node, names, series = sent, held.names, held.series
                left_out: dict[str, int] = {}
            else:
                # A host's names are kept across its boots: a boot id is the heartbeat's to say.
                names = held.names if held is not None else {kind: set() for kind in BOUNDS}
                node, left_out = bounded(sent, names)
                series = _series(label, node)
            for kind, n in hb.get("node_left_out", {}).items():
                if kind in BOUNDS and n:  # (another kind, a newer agent's: not counted, as in bounded)
                    left_out[kind] = left_out.get(kind, 0) + n
            self._hosts[host_id] = _Seen(
                now,
                ts_s,
                seq,
                newest_ms,
                hb.get("interval_s", DEFAULT_INTERVAL_S),
                node,
                hb.get("stopping", False),
                boot_id,
                names,
                left_out,
                label,
                series,
            )
        if left_out and (held is None or not held.left_out):
            log.warning(
                "host %.60r: node readings left out of its series (%s): at most %d disks and %d BPF maps "
                "at once, %d times as many names while held, names of printable ASCII up to %d characters, "
                "and %d readings a heartbeat",
                host_id,
                ", ".join(f"{n} {kind}" for kind, n in sorted(left_out.items())),
                MAX_DISKS,
                MAX_BPF_MAPS,
                NAMES_HELD_FACTOR,
                MAX_NAME_CHARS,
                MAX_NODE_READINGS,
            )
        return left_out

    def exposition(self) -> bytes:
        """Every series, in Prometheus' text format (0.0.4): what the worker's /metrics
        serves after its own counters (ktel/selfmetrics.py). The lines up to their
        values were made when the host's readings were last bounded (``_series``):
        here only the values are written. Built as prometheus_client builds a scrape,
        sample by sample, a worker holding 10,000 hosts spent about 2 s of CPU on every
        scrape (26 series a host), with the event loop starved of the interpreter
        meanwhile."""
        now = time.monotonic()
        with self._lock:
            self._forget(now)
            hosts = list(self._hosts.values())
        parts = []
        for family, (name, kind, text) in FAMILIES.items():
            parts.append(f"# HELP {name} {text}\n# TYPE {name} {kind}\n".encode())
            start = name.encode() + b"{"
            for s in hosts:
                if family == "up":
                    parts += (start, s.label, b"} 1.0\n" if s.alive(now) else b"} 0.0\n")
                elif family == "last" or (family == "stopped" and s.stopping):
                    parts += (start, s.label, b"} %r\n" % s.ts_s)
                else:
                    node = s.node
                    for line, key in s.series.get(family, ()):
                        value = node[key] / 1000 if family == "steal" else float(node[key])
                        parts += (line, b"%r\n" % value)
        return b"".join(parts)


def _escaped(value: str) -> str:
    """A label value as the text format writes it."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _series(label: bytes, node: dict[str, int]) -> dict[str, list[tuple[bytes, str]]]:
    """Each reading of ``node`` as a series of a family of FAMILIES, of a host whose
    ``host_id`` label is ``label``: the line up to its value, and the reading (bytes: a
    host id beyond Latin-1 would make a str of four bytes a character)."""
    host = label.decode()
    out: dict[str, list[tuple[bytes, str]]] = collections.defaultdict(list)
    for key in node:
        if (reading := _reading(key)) is None:
            continue
        family, _, parts = reading
        names = dict(zip(("device",) if family == "disks" else ("probe", "map"), parts, strict=False))
        # (labels in name order, as prometheus_client writes them)
        labels = "".join(f'{name}="{_escaped(value)}",' for name, value in sorted(names.items())) + host
        out[family].append((f"{FAMILIES[family][0]}{{{labels}}} ".encode(), key))
    return dict(out)
