"""The node's SLI readings (edge_agent/node_stats.py) and their per-host export from
heartbeats (processors/fleet_metrics.py)."""

from __future__ import annotations

import asyncio
import errno
import pathlib
import time

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from edge_agent import node_stats, statelock
from edge_agent.agent import cancelled
from ktel.wire import decode_heartbeat, encode_heartbeat
from ktel.wire.control import MAX_NODE_READINGS
from processors import fleet_metrics
from processors.fleet_metrics import FleetMetrics
from tests.unit.test_agent_batches import make_agent

# From a 2-CPU KVM guest (cat /proc/stat), cut to the lines read and one other.
PROC_STAT = """\
cpu  4705 356 584 3699 23 23 0 42 0 0
cpu0 1393 280 283 1805 5 22 0 21 0 0
cpu1 3312 76 301 1894 18 1 0 21 0 0
ctxt 1990473
btime 1062191376
"""

# /proc/diskstats (Documentation/admin-guide/iostats.rst): a disk, its partition, a loop device.
DISKSTATS = """\
 254       0 vda 1 2 3 4 5 6 7 8 3 10 11 0 0 0 0 0 0
 254       1 vda1 1 2 3 4 5 6 7 8 2 10 11 0 0 0 0 0 0
   7       0 loop0 1 2 3 4 5 6 7 8 9 10 11 0 0 0 0 0 0
"""


def test_cpu_steal_and_context_switches_are_read_from_proc_stat():
    got = node_stats.cpu_stat(PROC_STAT)
    assert got == {"cpu_steal_ms": round(42 * node_stats.TICK_MS), "cpus": 2, "context_switches": 1990473}


def test_disk_queue_depth_is_read_for_whole_non_virtual_disks():
    assert node_stats.disks_in_flight(DISKSTATS, {"vda", "loop0"}) == {"disk_in_flight.vda": 3}


def test_hash_maps_are_found_in_bcc_declarations():
    source = """
BPF_HASH(start, u32, u64, 65536);
BPF_PERCPU_HASH(hist, struct key, struct ktel_hist, 8192);
BPF_TABLE("lru_hash", u64, struct pending_open, pending, KTEL_PENDING_MAX);
BPF_PERCPU_ARRAY(counters, u64, 4);
BPF_RINGBUF_OUTPUT(events, 8);
"""
    assert node_stats.hash_maps(source) == ["start", "hist", "pending"]


def test_map_usage_counts_keys_against_capacity():
    class Table(list):
        max_entries = 8

    assert node_stats.map_usage("process", [("parents", Table([1, 2, 3]))]) == {
        "map_entries.process.parents": 3,
        "map_max_entries.process.parents": 8,
    }


def samples(fleet: FleetMetrics) -> dict[tuple[str, tuple], float]:
    """What a scrape of the worker gets of ``fleet``, as Prometheus' own parser reads it."""
    families = list(text_string_to_metric_families(fleet.exposition().decode()))
    assert [f.name for f in families] == [
        "ktel_agent_up",
        "ktel_agent_last_heartbeat_timestamp_seconds",
        "ktel_agent_stopped_timestamp_seconds",
        "ktel_node_cpu_steal_seconds",
        "ktel_node_cpus",
        "ktel_node_context_switches",
        "ktel_node_disk_io_in_progress",
        "ktel_agent_bpf_map_entries",
        "ktel_agent_bpf_map_max_entries",
    ]
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in families for s in m.samples}
    assert len(got) == sum(len(m.samples) for m in families)  # (no series twice)
    return got


def heartbeat(node: dict[str, int]) -> dict:
    return {
        "ts": 1_700_000_000_500,
        "host": {"host.id": "h1"},
        "probes": {},
        "counters": {},
        "interval_s": 10.0,
        "node": node,
    }


def test_a_host_is_up_while_heartbeats_arrive_and_its_readings_are_exported():
    fleet = FleetMetrics(forget_after_s=3600)
    node = {
        "cpu_steal_ms": 1500,
        "cpus": 4,
        "context_switches": 7,
        "disk_in_flight.vda": 2,
        "map_entries.process.parents": 3,
        "map_max_entries.process.parents": 8,
    }
    fleet.observe("h1", heartbeat(node))  # type: ignore[arg-type]
    got = samples(fleet)
    h = (("host_id", "h1"),)
    assert got[("ktel_agent_up", h)] == 1.0
    assert got[("ktel_agent_last_heartbeat_timestamp_seconds", h)] == 1_700_000_000.5
    assert got[("ktel_node_cpu_steal_seconds_total", h)] == 1.5
    assert got[("ktel_node_cpus", h)] == 4  # steal / CPUs: a fraction of the node's CPU time
    assert got[("ktel_node_context_switches_total", h)] == 7
    assert got[("ktel_node_disk_io_in_progress", (("device", "vda"), *h))] == 2
    m = (("host_id", "h1"), ("map", "parents"), ("probe", "process"))
    assert got[("ktel_agent_bpf_map_entries", m)] == 3
    assert got[("ktel_agent_bpf_map_max_entries", m)] == 8


def test_names_and_host_ids_written_to_be_misread_are_read_back_as_they_were_sent():
    """The worker writes its scrape's lines itself: a host id or a name holding a quote,
    a backslash or a newline must not end its label early or start a line of its own."""
    fleet = FleetMetrics(forget_after_s=3600)
    host = 'h"} 1\nktel_agent_up{host_id="forged\\'
    node = {"cpus": 2, 'disk_in_flight.a"b\\c': 3, 'map_entries.p"q.m\\n': 4}
    fleet.observe(host, {**heartbeat(node), "host": {"host.id": host}})  # type: ignore[arg-type]
    got = samples(fleet)
    assert got[("ktel_agent_up", (("host_id", host),))] == 1.0
    assert got[("ktel_node_cpus", (("host_id", host),))] == 2
    assert got[("ktel_node_disk_io_in_progress", (("device", 'a"b\\c'), ("host_id", host)))] == 3
    assert got[("ktel_agent_bpf_map_entries", (("host_id", host), ("map", "m\\n"), ("probe", 'p"q')))] == 4
    assert len([k for k in got if k[0] == "ktel_agent_up"]) == 1


def test_a_reading_named_like_another_with_a_dot_after_it_makes_no_second_series():
    """``cpus.`` is not ``cpus``: taken as one, the host had two series of one name and
    labels, of which Prometheus keeps one."""
    fleet = FleetMetrics(forget_after_s=3600)
    fleet.observe("h1", heartbeat({"cpus": 8, "cpus.": 9999, "context_switches.": 1}))  # type: ignore[arg-type]
    got = samples(fleet)  # (which fails on a series twice)
    assert got[("ktel_node_cpus", (("host_id", "h1"),))] == 8
    assert not any(name == "ktel_node_context_switches_total" for name, _ in got)


def test_a_host_whose_heartbeats_stop_is_down_then_forgotten(monkeypatch):
    fleet = FleetMetrics(forget_after_s=100)
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    fleet.observe("h1", heartbeat({}))  # type: ignore[arg-type]
    clock[0] += 30  # three intervals: still up
    assert samples(fleet)[("ktel_agent_up", (("host_id", "h1"),))] == 1.0
    clock[0] += 1
    assert samples(fleet)[("ktel_agent_up", (("host_id", "h1"),))] == 0.0
    clock[0] += 70
    assert ("ktel_agent_up", (("host_id", "h1"),)) not in samples(fleet)


def test_a_silent_host_is_let_go_with_no_scrape(monkeypatch):
    """A worker nobody scrapes (process.metrics_port = 0) lets go of hosts too, as it
    reads other hosts' heartbeats, else it would hold every host it ever read."""
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    fleet = FleetMetrics(forget_after_s=100)
    fleet.observe("gone", heartbeat({}))  # type: ignore[arg-type]
    clock[0] += 20
    fleet.observe("late", heartbeat({}))  # type: ignore[arg-type]
    clock[0] += 81  # "gone" silent for 101 s, "late" for 81
    fleet.observe("h1", heartbeat({}))  # type: ignore[arg-type]
    assert set(fleet._hosts) == {"late", "h1"}
    # At most one pass over the hosts every FORGET_EVERY_S, not one per heartbeat.
    clock[0] += 30  # "late" silent for 111 s
    fleet.observe("h2", heartbeat({}))  # type: ignore[arg-type]
    assert set(fleet._hosts) == {"late", "h1", "h2"}
    clock[0] += fleet_metrics.FORGET_EVERY_S - 29
    fleet.observe("h2", heartbeat({}))  # type: ignore[arg-type]
    assert set(fleet._hosts) == {"h1", "h2"}


def test_a_host_whose_heartbeats_come_less_often_than_the_ttl_stays_while_it_is_up(monkeypatch):
    """agent.heartbeat_seconds above aggregate.host_ttl_seconds: the host is up for three
    of its intervals, and is not forgotten (out of ktel_agent_up, as if down) between two
    heartbeats; once it is down, it is let go. A heartbeat's interval keeps its host at
    most for three of the longest an agent may set."""
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    fleet = FleetMetrics(forget_after_s=100)
    fleet.observe("h1", heartbeat({}) | {"interval_s": 600.0})  # type: ignore[arg-type]
    clock[0] += 500  # past forget_after_s, within its interval
    assert samples(fleet)[("ktel_agent_up", (("host_id", "h1"),))] == 1.0
    clock[0] += 1301  # past three intervals: down, and let go
    assert ("ktel_agent_up", (("host_id", "h1"),)) not in samples(fleet)
    fleet.observe("forged", heartbeat({}) | {"interval_s": 1e12})  # type: ignore[arg-type]
    clock[0] += 3 * fleet_metrics.MAX_INTERVAL_S + 1
    assert ("ktel_agent_up", (("host_id", "forged"),)) not in samples(fleet)


def test_an_agent_stopped_on_purpose_is_down_with_the_time_it_said_so():
    """Its last heartbeat says it stopped (a signal): down at once, and the time of that
    heartbeat exported, which keeps the alert on silent hosts quiet for it; a later
    heartbeat of a new run is up again and no longer stopped."""
    fleet = FleetMetrics(forget_after_s=3600)
    h = (("host_id", "h1"),)
    fleet.observe("h1", {**heartbeat({}), "stopping": True})  # type: ignore[typeddict-unknown-key]
    got = samples(fleet)
    assert got[("ktel_agent_up", h)] == 0.0
    assert (
        got[("ktel_agent_stopped_timestamp_seconds", h)]
        == got[("ktel_agent_last_heartbeat_timestamp_seconds", h)]
        == 1_700_000_000.5
    )
    fleet.observe("h1", {**heartbeat({}), "ts": 1_700_000_100_000})  # type: ignore[arg-type]
    got = samples(fleet)
    assert got[("ktel_agent_up", h)] == 1.0
    assert ("ktel_agent_stopped_timestamp_seconds", h) not in got


def test_an_older_heartbeat_of_the_same_boot_changes_nothing(monkeypatch):
    """One re-read or re-driven after a newer one (ktel dlq --redrive) would set a host
    that went silent up again and its time and counters back; of another boot it is taken."""
    fleet = FleetMetrics(forget_after_s=3600)
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    h = (("host_id", "h1"),)
    newer = {**heartbeat({"context_switches": 9}), "host": {"host.id": "h1", "boot.id": "b1"}}
    fleet.observe("h1", newer)  # type: ignore[arg-type]
    clock[0] += 31  # silent for over three intervals: down
    older = {**newer, "ts": newer["ts"] - 60_000, "node": {"context_switches": 5}}
    fleet.observe("h1", older)  # type: ignore[arg-type]
    got = samples(fleet)
    assert got[("ktel_agent_up", h)] == 0.0
    assert got[("ktel_agent_last_heartbeat_timestamp_seconds", h)] == 1_700_000_000.5
    assert got[("ktel_node_context_switches_total", h)] == 9
    fleet.observe("h1", {**older, "host": {"host.id": "h1", "boot.id": "b2"}})  # type: ignore[arg-type]
    got = samples(fleet)
    assert got[("ktel_agent_up", h)] == 1.0
    assert got[("ktel_node_context_switches_total", h)] == 5


def test_a_boots_heartbeats_are_ordered_by_their_number_not_by_a_clock_set_back(monkeypatch):
    """A node's clock set back an hour (NTP, a VM restored): its next heartbeats are
    taken, the time shown theirs, where ordered by ``ts`` they kept the host down for
    the hour; one re-read or re-driven from before is still ignored. An older agent's
    heartbeats, without ``seq``, are ordered by ``ts`` as before."""
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    h = (("host_id", "h1"),)
    before = {**heartbeat({"context_switches": 9}), "host": {"host.id": "h1", "boot.id": "b1"}}
    hour_ago = before["ts"] - 3_600_000
    for numbered in (True, False):
        fleet = FleetMetrics(forget_after_s=7200)
        fleet.observe("h1", {**before, **({"seq": 100} if numbered else {})})  # type: ignore[arg-type]
        clock[0] += 31  # (three intervals: down, unless the next is taken)
        after = {**before, "ts": hour_ago + 10_000, "node": {"context_switches": 12}}
        fleet.observe("h1", {**after, **({"seq": 200} if numbered else {})})  # type: ignore[arg-type]
        got = samples(fleet)
        if not numbered:
            assert got[("ktel_agent_up", h)] == 0.0  # (the hole: the hour ignored)
            assert got[("ktel_node_context_switches_total", h)] == 9
            continue
        assert got[("ktel_agent_up", h)] == 1.0
        assert got[("ktel_agent_last_heartbeat_timestamp_seconds", h)] == (hour_ago + 10_000) / 1000
        assert got[("ktel_node_context_switches_total", h)] == 12
        clock[0] += 31
        fleet.observe("h1", {**after, "ts": hour_ago + 20_000, "seq": 300})  # type: ignore[arg-type]
        assert samples(fleet)[("ktel_agent_up", h)] == 1.0
        clock[0] += 31
        # Re-read: the heartbeat of before the clock was set back, and the last one again.
        fleet.observe("h1", {**before, "seq": 100})  # type: ignore[arg-type]
        fleet.observe("h1", {**after, "ts": hour_ago + 20_000, "seq": 300})  # type: ignore[arg-type]
        got = samples(fleet)
        assert got[("ktel_agent_up", h)] == 0.0
        assert got[("ktel_agent_last_heartbeat_timestamp_seconds", h)] == (hour_ago + 20_000) / 1000
        assert got[("ktel_node_context_switches_total", h)] == 12
        # A VM restored from a snapshot with its memory: its numbers go back with it,
        # its wall clock, set right, past every heartbeat's before.
        fleet.observe("h1", {**before, "ts": before["ts"] + 60_000, "seq": 150})  # type: ignore[arg-type]
        assert samples(fleet)[("ktel_agent_up", h)] == 1.0


def disks(got: dict[tuple[str, tuple], float]) -> list[str]:
    return sorted(dict(labels)["device"] for name, labels in got if name == "ktel_node_disk_io_in_progress")


def maps(got: dict[tuple[str, tuple], float], name: str = "ktel_agent_bpf_map_entries") -> list[str]:
    return sorted(f"{dict(labels)['probe']}.{dict(labels)['map']}" for n, labels in got if n == name)


def test_a_host_naming_more_disks_and_maps_than_a_node_has_exports_the_bound_and_counts_the_rest():
    """Whoever writes ktel.heartbeats names these series: a heartbeat the decoder takes
    may hold 1,024 of them. The rest of the heartbeat is exported, the first names in
    order kept, the readings left out returned to be counted."""
    fleet = FleetMetrics(forget_after_s=3600)
    n_disks, n_maps = fleet_metrics.MAX_DISKS + 5, fleet_metrics.MAX_BPF_MAPS + 3
    node = {"cpus": 4, **{f"disk_in_flight.sd{i:03}": i for i in range(n_disks)}}
    for i in range(n_maps):
        node |= {f"map_entries.p{i:03}.m": 1, f"map_max_entries.p{i:03}.m": 8}
    assert fleet.observe("h1", heartbeat(node)) == {"disks": 5, "bpf_maps": 6}  # type: ignore[arg-type]
    got = samples(fleet)
    assert disks(got) == [f"sd{i:03}" for i in range(fleet_metrics.MAX_DISKS)]
    want = [f"p{i:03}.m" for i in range(fleet_metrics.MAX_BPF_MAPS)]
    assert maps(got) == maps(got, "ktel_agent_bpf_map_max_entries") == want
    assert got[("ktel_node_cpus", (("host_id", "h1"),))] == 4
    assert got[("ktel_agent_up", (("host_id", "h1"),))] == 1.0


def test_the_same_readings_again_are_exported_with_their_new_values_and_counted_again():
    """A heartbeat naming what the host's last one did (most of them) takes the last
    one's decision of what to keep, not a new one; its values are its own, and what it
    leaves out is counted with it."""
    fleet = FleetMetrics(forget_after_s=3600)
    n_disks = fleet_metrics.MAX_DISKS + 2
    for value in (1, 7):
        node = {"cpus": value, **{f"disk_in_flight.sd{i:03}": value for i in range(n_disks)}}
        assert fleet.observe("h1", heartbeat(node)) == {"disks": 2}  # type: ignore[arg-type]
        got = samples(fleet)
        assert disks(got) == [f"sd{i:03}" for i in range(fleet_metrics.MAX_DISKS)]
        exported = {v for (name, _), v in got.items() if name == "ktel_node_disk_io_in_progress"}
        assert exported == {value}
        assert got[("ktel_node_cpus", (("host_id", "h1"),))] == value
    # Within the bounds: the heartbeat's own readings, whole.
    for value in (2, 3):
        assert (
            fleet.observe("h2", {**heartbeat({"disk_in_flight.vda": value}), "host": {"host.id": "h2"}}) == {}
        )  # type: ignore[arg-type]
        assert (
            samples(fleet)[("ktel_node_disk_io_in_progress", (("device", "vda"), ("host_id", "h2")))] == value
        )


def test_a_host_renaming_its_disks_every_heartbeat_gets_no_new_series_past_its_names():
    """Each heartbeat within the bound, but other names every time: Prometheus would get
    new series on every scrape. The names a host went through while held are bounded;
    the ones it had keep being exported, a disk added or replaced within the bound too."""
    fleet = FleetMetrics(forget_after_s=3600)
    held = fleet_metrics.NAMES_HELD_FACTOR * fleet_metrics.MAX_DISKS
    seen: set[str] = set()
    for beat in range(held):
        node = {"disk_in_flight.sda": 1, f"disk_in_flight.dm-{beat}": 2}
        left_out = fleet.observe("h1", heartbeat(node))  # type: ignore[arg-type]
        assert left_out == ({"disks": 1} if beat == held - 1 else {})
        seen.update(disks(samples(fleet)))
    assert len(seen) == held  # sda and dm-0 .. dm-(held - 2)
    node = {"disk_in_flight.sda": 1, "disk_in_flight.dm-0": 2}
    assert fleet.observe("h1", heartbeat(node)) == {}  # type: ignore[arg-type]
    assert disks(samples(fleet)) == ["dm-0", "sda"]


def test_illegible_names_are_not_exported_and_are_counted():
    """A label value is printable ASCII without spaces, at most MAX_NAME_CHARS: not a
    control character (which the exposition format passes as is), not empty (no label)."""
    fleet = FleetMetrics(forget_after_s=3600)
    long = "x" * (fleet_metrics.MAX_NAME_CHARS + 1)
    node = {
        "disk_in_flight.vda": 1,
        "disk_in_flight.": 1,
        "disk_in_flight": 1,
        "disk_in_flight.sd\x1b[2Ja": 1,
        "disk_in_flight.a\nb": 1,
        "disk_in_flight.a b": 1,
        "disk_in_flight.dísk": 1,
        f"disk_in_flight.{long}": 1,
        "map_entries.process.parents": 3,
        "map_entries.process": 3,
        f"map_max_entries.{long}.m": 3,
        "map_entries.p.m\x00": 3,
        "some_future_reading.x": 5,  # a newer agent's: neither exported nor counted
    }
    assert fleet.observe("h1", heartbeat(node)) == {"disks": 7, "bpf_maps": 3}  # type: ignore[arg-type]
    got = samples(fleet)
    assert disks(got) == ["vda"]
    assert maps(got) == ["process.parents"] and maps(got, "ktel_agent_bpf_map_max_entries") == []


def test_a_forgotten_host_starts_again_with_no_names_held(monkeypatch):
    fleet = FleetMetrics(forget_after_s=100)
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    held = fleet_metrics.NAMES_HELD_FACTOR * fleet_metrics.MAX_DISKS
    for beat in range(held):
        fleet.observe("h1", heartbeat({f"disk_in_flight.d{beat}": 1}))  # type: ignore[arg-type]
    assert fleet.observe("h1", heartbeat({"disk_in_flight.new": 1})) == {"disks": 1}  # type: ignore[arg-type]
    clock[0] += 101
    samples(fleet)  # forgets it
    assert fleet.observe("h1", heartbeat({"disk_in_flight.new": 1})) == {}  # type: ignore[arg-type]
    assert disks(samples(fleet)) == ["new"]


async def test_a_host_is_up_from_its_agents_first_heartbeat_until_three_of_its_intervals(
    tmp_path, monkeypatch
):
    """The agent's heartbeats as it sends them (Agent.send_heartbeats), read by a worker:
    its first heartbeat, sent as soon as Kafka is reached (a fraction of a second after
    the probes loaded), keeps the host up until the next is due, not a second or three."""
    agent = make_agent(tmp_path)  # agent.heartbeat_seconds: its default, 10 s
    sent: list[bytes] = []
    first = asyncio.Event()

    class Producer:  # Kafka, taking each heartbeat at once
        async def send_and_wait(self, topic: str, payload: bytes, key: bytes) -> None:
            sent.append(payload)
            first.set()

    agent.producer = Producer()  # type: ignore[assignment]
    agent.started = time.monotonic() - 0.2  # (as run() sets it; Kafka connected 0.2 s later)
    beats = asyncio.create_task(agent.send_heartbeats())
    sending = asyncio.ensure_future(first.wait())
    try:
        await asyncio.wait({beats, sending}, return_when=asyncio.FIRST_COMPLETED)
        assert first.is_set(), beats.exception()  # (else the heartbeats failed before the first)
    finally:
        sending.cancel()
        # (as the agent stops it: a cancellation can be lost as its send completes)
        assert await cancelled([beats], 1.0) == set()
        agent.spool.close()
        statelock.release(agent.state_lock)
    hb = decode_heartbeat(sent[0])
    interval = agent.cfg.agent.heartbeat_seconds

    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    fleet = FleetMetrics(forget_after_s=3600)
    fleet.observe("h", hb)
    up = ("ktel_agent_up", (("host_id", "h"),))
    clock[0] += interval / 2  # the next heartbeat not due yet
    assert samples(fleet)[up] == 1.0
    clock[0] += fleet_metrics.MISSED_HEARTBEATS * interval - interval / 2  # three intervals: still up
    assert samples(fleet)[up] == 1.0
    clock[0] += 1
    assert samples(fleet)[up] == 0.0


def test_a_node_with_more_disks_than_a_heartbeat_takes_still_sends_heartbeats(tmp_path, monkeypatch):
    """A storage node's disks (multipath LUNs: a few hundred, each seen on four paths)
    can outnumber the node readings a heartbeat takes (ktel/wire/control.py): the agent
    sends as many as fit, its CPU readings with them, and its heartbeats still decode.
    The workers count as left out every disk not exported, those the agent had no room
    for as those past their own bound (fleet_metrics.bounded)."""
    names = [f"sd{i:05d}" for i in range(1500)]
    diskstats = "".join(f" 8 {i} {name} 1 2 3 4 5 6 7 8 1 10 11\n" for i, name in enumerate(names))

    monkeypatch.setattr(
        node_stats,
        "PROC_SOURCES",
        {
            "/proc/stat": lambda: node_stats.cpu_stat(PROC_STAT),
            "/proc/diskstats": lambda: node_stats.disks_in_flight(diskstats, set(names)),
        },
    )
    agent = make_agent(tmp_path)
    try:
        hb, _ = agent.heartbeat(1.0, {}, [], *agent.node_readings())
    finally:
        agent.spool.close()
        statelock.release(agent.state_lock)
    received = decode_heartbeat(encode_heartbeat(hb))
    sent = received["node"]
    assert sent["cpus"] == 2 and sent["context_switches"] == 1990473
    disks = sorted(k for k in sent if k.startswith("disk_in_flight."))
    # the same disks from one heartbeat to the next: the first by name
    assert disks == [f"disk_in_flight.{name}" for name in names[: len(disks)]]
    assert len(disks) == MAX_NODE_READINGS - 3
    assert received["node_left_out"] == {"disks": len(names) - len(disks)}
    fleet = FleetMetrics(forget_after_s=3600)
    assert fleet.observe("h", received) == {"disks": len(names) - fleet_metrics.MAX_DISKS}
    exported = [k for k in samples(fleet) if k[0] == "ktel_node_disk_io_in_progress"]
    assert len(exported) == fleet_metrics.MAX_DISKS


def test_the_disks_an_agent_left_out_are_counted_also_when_the_worker_keeps_all_it_sent():
    """A worker's bound may be above what the heartbeat kept (an agent whose other
    readings took most of it): the disks the agent left out are counted all the same,
    every heartbeat, as the worker's own are."""
    fleet = FleetMetrics(forget_after_s=3600)
    hb = {**heartbeat({"disk_in_flight.sda": 1}), "node_left_out": {"disks": 5, "tapes": 2}}
    for ts in (1, 2):  # the second as the first: same readings, the worker's quick path
        assert fleet.observe("h1", {**hb, "ts": hb["ts"] + ts}) == {"disks": 5}  # type: ignore[arg-type]


async def test_a_source_of_node_readings_that_cannot_be_read_leaves_its_readings_out_not_the_heartbeat(
    tmp_path, monkeypatch, caplog
):
    """/proc/diskstats failing to read (EIO) cost the heartbeat task, and so every later
    heartbeat: its readings are left out, logged once while it fails, and counted each
    heartbeat; the node's other readings go as ever."""
    failing = {"/proc/diskstats"}
    read_text = pathlib.Path.read_text

    def flaky(path: pathlib.Path, *args, **kwargs) -> str:
        if str(path) in failing:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return read_text(path, *args, **kwargs)

    def errors() -> float:
        labels = {"source": "/proc/diskstats"}
        return REGISTRY.get_sample_value("ktel_agent_node_read_errors_total", labels) or 0.0

    monkeypatch.setattr(pathlib.Path, "read_text", flaky)
    monkeypatch.setattr(node_stats, "disks_in_flight", lambda text, disks: {"disk_in_flight.vda": 3})
    sent: list[bytes] = []

    class Producer:  # Kafka, taking each heartbeat at once
        async def send_and_wait(self, topic: str, payload: bytes, key: bytes) -> None:
            sent.append(payload)

    agent = make_agent(tmp_path)
    agent.producer = Producer()  # type: ignore[assignment]
    before = errors()
    try:
        for _ in range(2):
            await agent.beat(1.0)
        failing.clear()
        await agent.beat(1.0)
    finally:
        agent.spool.close()
        statelock.release(agent.state_lock)
    nodes = [decode_heartbeat(payload)["node"] for payload in sent]
    assert len(nodes) == 3
    assert all("context_switches" in node for node in nodes)
    assert ["disk_in_flight.vda" in node for node in nodes] == [False, False, True]
    assert errors() == before + 2
    said = [r.getMessage() for r in caplog.records if "/proc/diskstats" in r.getMessage()]
    assert len(said) == 2 and "Input/output error" in said[0] and "read again" in said[1]
