"""``ktel status``: the fleet at a glance, from what Kafka holds.

Hosts come from ``ktel.heartbeats``: every record of the last ``--since`` seconds is
read (a group-less consumer from ``offsets_for_times``, up to the end offsets at the
start), and each host's newest heartbeat stands for it. Records are keyed by host id
and a host's stay in one partition, in order (until the topic gains partitions: then
the partition of its latest record by timestamp is taken as its newest), so only the
newest record of each key is decoded (an older one only where a newer one does not decode, or names another
host than its key). A host whose newest heartbeat
is older than ``--stale-after`` is stale: it is highlighted, and the command exits 1. So
is one whose newest heartbeat is stamped more than ``--stale-after`` ahead of this clock
(``clock_ahead``).
A host silent for longer than ``--since`` is not seen at all, so ``--since`` should
be well above ``--stale-after``.

Stages and exporters come from their consumer groups (every group whose id starts
with ``ktel-``): state and members from the group coordinator, and the lag, the
records not yet committed, as the partitions' end offsets minus the group's
committed offsets (a partition of a topic it consumes without a commit: all its records).

``--json`` prints one object of the shape ``SCHEMA`` (a JSON Schema) describes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import KafkaError
from opentelemetry.semconv._incubating.attributes.host_attributes import HOST_ID, HOST_NAME
from opentelemetry.semconv._incubating.attributes.os_attributes import OS_VERSION
from rich.console import Console
from rich.console import Group as Stack
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ktel.config import Config
from ktel.kafka_client import AUTHORIZATION_ERRORS, Kafka, client_kwargs, explain, settings
from ktel.retry import Permanent, retry
from ktel.wire import Heartbeat, WireError, decode_heartbeat

log = logging.getLogger("ktel.status")
EXIT_OK, EXIT_STALE, EXIT_UNREADABLE = 0, 1, 2

_HOST = {
    "type": "object",
    "required": [
        "host_id",
        "host_name",
        "kernel",
        "agent_version",
        "last_heartbeat_ms",
        "age_s",
        "stale",
        "clock_ahead",
        "probes_loaded",
        "probes_failed",
        "ringbuf_drops_per_s",
        "spool_depth_bytes",
        "sampling_overrides",
    ],
    "properties": {
        "host_id": {"type": "string"},
        "host_name": {"type": "string", "description": "host.name (empty if the agent sent none)"},
        "kernel": {"type": "string", "description": "os.version: the kernel release"},
        "agent_version": {"type": "string"},
        "last_heartbeat_ms": {"type": "integer", "description": "the newest heartbeat's ts, ms since epoch"},
        "age_s": {
            "type": "number",
            "description": "seconds since that heartbeat, by this clock (0 for one stamped ahead of it)",
        },
        "stale": {"type": "boolean", "description": "age_s > stale_after_s, or clock_ahead"},
        "clock_ahead": {
            "type": "boolean",
            "description": "the heartbeat's ts is more than stale_after_s ahead of this clock",
        },
        "probes_loaded": {"type": "array", "items": {"type": "string"}},
        "probes_failed": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "probe -> why the agent could not load it",
        },
        "ringbuf_drops_per_s": {
            "type": "number",
            "description": "events lost to full ring buffers per second, all probes, over the last interval",
        },
        "spool_depth_bytes": {
            "type": "integer",
            "description": "sealed batches Kafka has not yet acknowledged",
        },
        "sampling_overrides": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["sample_every", "command"],
                "properties": {"sample_every": {"type": "integer"}, "command": {"type": "string"}},
            },
            "description": "probe -> the control command in force and the sampling (1 in N) it set",
        },
    },
}
_GROUP = {
    "type": "object",
    "required": ["group", "state", "members", "lag", "lag_by_topic"],
    "properties": {
        "group": {
            "type": "string",
            "description": "consumer group id: ktel-<stage> or ktel-export-<exporter>",
        },
        "state": {
            "type": "string",
            "description": "the coordinator's: Stable, PreparingRebalance, Empty, ...",
        },
        "members": {"type": "integer"},
        "lag": {"type": "integer", "description": "records not yet committed, all partitions"},
        "lag_by_topic": {"type": "object", "additionalProperties": {"type": "integer"}},
    },
}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "ktel status --json",
    "type": "object",
    "required": [
        "v",
        "now_ms",
        "since_s",
        "stale_after_s",
        "hosts",
        "stale_hosts",
        "unseen_hosts",
        "groups",
        "bad_heartbeats",
    ],
    "properties": {
        "v": {"const": 1},
        "now_ms": {"type": "integer", "description": "when the status was taken, ms since epoch"},
        "since_s": {"type": "number", "description": "how far back heartbeats were read"},
        "stale_after_s": {"type": "number"},
        "hosts": {"type": "array", "items": _HOST, "description": "sorted by host_name, then host_id"},
        "stale_hosts": {
            "type": "array",
            "items": {"type": "string"},
            "description": "their host ids, and the unseen hosts'",
        },
        "unseen_hosts": {
            "type": "array",
            "items": {"type": "string"},
            "description": "hosts asked for (--host) with no heartbeat in the last since_s: stale too",
        },
        "groups": {"type": "array", "items": _GROUP, "description": "sorted by group"},
        "bad_heartbeats": {
            "type": "integer",
            "description": "records of ktel.heartbeats newer than their host's newest good one that "
            "did not decode or named another host than their key",
        },
    },
}


# A consumer group: id, state, members, {topic partition: (committed offset, end offset)}; a
# partition of a topic it consumes that it has not committed in: its first offset as committed.
Group = tuple[str, str, int, dict[TopicPartition, tuple[int, int]]]


@dataclass(frozen=True)
class Read:
    """What Kafka held: each host's newest heartbeat, the records of ktel.heartbeats
    that did not decode, and the ktel consumer groups."""

    heartbeats: dict[str, Heartbeat]
    bad_heartbeats: int
    groups: list[Group]


def host_row(hb: Heartbeat, now_ms: int, stale_after_s: float) -> dict[str, Any]:
    host = hb["host"]
    probes = hb["probes"]
    age_s = max(0.0, (now_ms - hb["ts"]) / 1000)
    # A heartbeat stamped ahead of this clock (the agent's clock ahead, or a record
    # written with a forged time) has no age to tell, and was never stale: its host, dead
    # or not, looked fresh until this clock caught up with the stamp, for good with one
    # far ahead. Ahead by up to stale_after_s it counts as just sent (so a dead host is
    # found stale at most that much late); further ahead, its host is stale.
    clock_ahead = (hb["ts"] - now_ms) / 1000 > stale_after_s
    return {
        "host_id": host[HOST_ID],
        "host_name": host.get(HOST_NAME, ""),
        "kernel": host.get(OS_VERSION, ""),
        "agent_version": host.get("ktel.agent.version", ""),
        "last_heartbeat_ms": hb["ts"],
        "age_s": round(age_s, 3),
        "stale": age_s > stale_after_s or clock_ahead,
        "clock_ahead": clock_ahead,
        "probes_loaded": sorted(p for p, s in probes.items() if s["loaded"]),
        "probes_failed": {p: s.get("reason", "") for p, s in sorted(probes.items()) if not s["loaded"]},
        "ringbuf_drops_per_s": _finite(
            sum(v for k, v in hb.get("rates", {}).items() if k.startswith("ringbuf_drops."))
        ),
        "spool_depth_bytes": hb.get("spool", {}).get("depth_bytes", 0),
        "sampling_overrides": {
            p: {"sample_every": s.get("sample_every", 1), "command": s["command"]}
            for p, s in sorted(probes.items())
            if s.get("command")
        },
    }


def _finite(x: float) -> float:
    # Each rate is finite (the wire refuses others), but two near the largest double add
    # up to inf, which --json printed as Infinity, not JSON: `jq` refused the whole fleet's
    # status for one host's heartbeat.
    return max(-sys.float_info.max, min(x, sys.float_info.max))


def group_row(
    group: str, state: str, members: int, offsets: dict[TopicPartition, tuple[int, int]]
) -> dict[str, Any]:
    by_topic: dict[str, int] = {}
    for tp, (committed, end) in offsets.items():
        by_topic[tp.topic] = by_topic.get(tp.topic, 0) + max(0, end - committed)
    return {
        "group": group,
        "state": state,
        "members": members,
        "lag": sum(by_topic.values()),
        "lag_by_topic": dict(sorted(by_topic.items())),
    }


def summarize(
    read: Read, now_ms: int, since_s: float, stale_after_s: float, asked: set[str] | None = None
) -> dict[str, Any]:
    """The status document (``SCHEMA``) of what was read, for the hosts ``asked`` for
    (--host; None: every host seen); pure."""
    hosts = sorted(
        (host_row(hb, now_ms, stale_after_s) for hb in read.heartbeats.values()),
        key=lambda h: (h["host_name"], h["host_id"]),
    )
    # A host asked for by name and silent for longer than --since has no heartbeat to
    # show, but is as stale as can be: left out, it made `ktel status --host` exit 0.
    unseen = sorted((asked or set()) - set(read.heartbeats))
    return {
        "v": 1,
        "now_ms": now_ms,
        "since_s": since_s,
        "stale_after_s": stale_after_s,
        "hosts": hosts,
        "stale_hosts": [h["host_id"] for h in hosts if h["stale"]] + unseen,
        "unseen_hosts": unseen,
        "groups": sorted((group_row(*g) for g in read.groups), key=lambda g: g["group"]),
        "bad_heartbeats": read.bad_heartbeats,
    }


# A key's records of ktel.heartbeats: each partition's, in offset order, as (the time
# Kafka stamped, the value). A key's records are in several partitions once the topic
# has gained some (docs/operating.md, "Adding partitions").
Partitions = list[list[tuple[int, bytes]]]


def newest(
    by_key: Mapping[bytes, Partitions], hosts: set[str] | None = None
) -> tuple[dict[str, Heartbeat], int]:
    """Each host's newest heartbeat (only of ``hosts`` if given): of its key's records,
    in each partition the last that decodes and names the host its key is, and of those
    the one stamped latest. A record that is no heartbeat decides nothing: the partition
    of a host's older heartbeats, its last record one such, would otherwise stand for
    the host, stale. And how many records after a partition's last good one did not
    decode or named another host than their key (the processing stages refuse those too:
    a key must be its host id's bytes)."""
    out: dict[str, Heartbeat] = {}
    bad = 0
    for key, partitions in by_key.items():
        try:
            host_id: str | None = key.decode()
        except UnicodeDecodeError:
            host_id = None  # (no heartbeat names it)
        if hosts is not None and host_id not in hosts:
            continue
        latest: tuple[int, Heartbeat] | None = None
        for records in partitions:
            for ts, value in reversed(records):
                try:
                    hb = decode_heartbeat(value)
                except WireError:
                    bad += 1
                    continue
                if hb["host"][HOST_ID] != host_id:
                    bad += 1
                    continue
                if latest is None or ts > latest[0]:
                    latest = (ts, hb)
                break
        if host_id is not None and latest is not None:
            out[host_id] = latest[1]
    return out, bad


async def read(kafka: Kafka, since_s: float, hosts: set[str] | None = None) -> Read:
    """Read the heartbeats of the last ``since_s`` seconds and the ktel groups' offsets."""
    consumer = AIOKafkaConsumer(**client_kwargs(kafka), group_id=None, enable_auto_commit=False)
    admin = AIOKafkaAdminClient(**client_kwargs(kafka))
    try:
        await consumer.start()
        await admin.start()
        names = settings(kafka).topics
        heartbeats, bad = newest(await _heartbeats(consumer, admin, names.heartbeats, since_s), hosts)
        # The groups of this pipeline: <prefix>ktel-<stage> and <prefix>ktel-export-<exporter>.
        return Read(heartbeats, bad, await _groups(consumer, admin, names.group(""), names.topic("")))
    finally:
        await consumer.stop()
        await admin.close()


async def _partitions(admin: AIOKafkaAdminClient, topics: list[str]) -> list[TopicPartition]:
    # A group-less consumer knows no topic's partitions until asked; the admin client asks.
    # Every topic: asking for a missing one by name can make the broker create it.
    described = await admin.describe_topics()
    return sorted(
        TopicPartition(t["topic"], p["partition"])
        for t in described
        if t["topic"] in topics and t["error_code"] == 0
        for p in t["partitions"]
    )


async def _heartbeats(
    consumer: AIOKafkaConsumer, admin: AIOKafkaAdminClient, topic: str, since_s: float
) -> dict[bytes, Partitions]:
    """The records of ``topic`` of the last ``since_s`` seconds by key, each key's by
    partition (``Partitions``)."""
    parts = await _partitions(admin, [topic])
    if not parts:
        if any(t["topic"] == topic for t in await admin.describe_topics()):
            # (listed with an error: a leader moving, the topic being made; asked again)
            raise KafkaError(f"topic {topic} has no partition to read yet")
        # Not listed: reported as no hosts, every one fresh, a check of `ktel status`
        # would never fire. (A principal sees only the topics it may describe.)
        raise NoTopic(
            f"topic {topic} is not on this Kafka, or this principal may not describe it: check "
            "kafka.bootstrap and kafka.prefix, and grant the status role with `ktel acls`"
        )
    consumer.assign(parts)
    ends = await consumer.end_offsets(parts)
    # A --since past the epoch (an operator's "all of it") reads from the first record:
    # Kafka takes no time before it, and aiokafka refuses one with ValueError.
    start_ms = int(max(0.0, time.time() * 1000 - since_s * 1000))
    found = await consumer.offsets_for_times({tp: start_ms for tp in parts})
    for tp in parts:
        hit = found.get(tp)
        consumer.seek(tp, hit.offset if hit is not None else ends[tp])
    # key -> partition -> its records in offset order
    by_key: dict[bytes, dict[int, list[tuple[int, bytes]]]] = {}
    # Up to the end offsets at the start: a fleet's heartbeats never stop coming.
    progress = {tp: time.monotonic() for tp in parts}  # when each last brought records (or was checked)
    while unread := [tp for tp in parts if await consumer.position(tp) < ends[tp]]:
        fetched = await consumer.getmany(timeout_ms=1000)
        now = time.monotonic()
        for tp, records in fetched.items():
            if records:
                progress[tp] = now
            for rec in records:
                if rec.offset < ends[tp]:  # a newer one waits for the next refresh
                    key = by_key.setdefault(rec.key or b"", {})
                    key.setdefault(tp.partition, []).append((rec.timestamp, rec.value or b""))
        if stalled := [tp for tp in unread if now - progress[tp] >= STALLED_S]:
            await _ends_moved_back(consumer, topic, stalled, ends)
            progress.update(dict.fromkeys(stalled, now))
    return {key: list(held.values()) for key, held in by_key.items()}


# How long a partition short of the end the read waits for may bring nothing before its
# end is asked again (_ends_moved_back): a getmany's wait, so that a large backlog read in
# many fetches is not slowed by a request at each.
STALLED_S = 1.0


async def _ends_moved_back(
    consumer: AIOKafkaConsumer, topic: str, stalled: list[TopicPartition], ends: dict[TopicPartition, int]
) -> None:
    """Lower ``ends`` to the end a partition of ``stalled`` (one that brought nothing for
    STALLED_S while short of its end) has now if that is below it: its log was cut back (an unclean leader
    election: the new leader lacked its last records), so its position, fetched to the new
    end (or reset there, out of range), never reached the end taken at the start, and the
    read waited for records that were gone until --timeout, then said Kafka gave no status.
    Such a partition is read to its end. (An end does not move back otherwise: asking
    changes nothing.)"""
    now = await consumer.end_offsets(stalled)
    for tp in stalled:
        if now[tp] < ends[tp]:
            log.warning(
                "%s[%d] ends at offset %d, below the %d it ended at when the read began (its "
                "last records are gone from Kafka: an unclean leader election?): read to its end",
                topic, tp.partition, now[tp], ends[tp],
            )  # fmt: skip
            ends[tp] = now[tp]


async def _groups(
    consumer: AIOKafkaConsumer, admin: AIOKafkaAdminClient, prefix: str, ours: str = "ktel."
) -> list[Group]:
    """The groups named ``prefix``..., each with its lag on the topics it has committed in
    and the pipeline's topics (named ``ours``...) its members are assigned."""
    ids = sorted(g[0] for g in await admin.list_consumer_groups() if g[0].startswith(prefix))
    if not ids:
        return []
    described = {}
    assigned: dict[str, set[str]] = {}
    for group in ids:
        # One group per request: aiokafka 0.14 decodes a DescribeGroups v3 answer with
        # the v2 layout, which lacks each group's authorized_operations, so every group
        # after the first in one answer is misread ("Buffer underrun decoding string")
        # and the connection dropped; the answer's one group decodes right.
        for resp in await admin.describe_consumer_groups([group]):
            for g in resp.to_object()["groups"]:
                described[g["group"]] = (g["state"], len(g["members"]))
                assigned[g["group"]] = _assigned_topics(g["members"], ours)
    commits = {
        group: {
            tp: meta.offset
            for tp, meta in (await admin.list_consumer_group_offsets(group)).items()
            if meta.offset >= 0
        }
        for group in ids
    }
    # A group is assigned every partition of a topic it consumes, and ktel's groups read
    # a partition they have not committed in from its beginning ("earliest"): one they
    # have committed in no record of yet (one the topic gained, one the group has not
    # reached a commit in) holds all its records as lag, not none.
    # A group that has never committed (an exporter whose backend was down since it was
    # deployed, a worker failing on its first record) has its whole backlog as lag: the
    # topics its members are assigned say what it reads.
    consumed = sorted(
        {tp.topic for committed in commits.values() for tp in committed}.union(*assigned.values())
    )
    partitions = await _partitions(admin, consumed) if consumed else []
    out: list[Group] = []
    for group in ids:
        committed = commits[group]
        topics = {tp.topic for tp in committed} | assigned.get(group, set())
        parts = sorted({*committed, *(tp for tp in partitions if tp.topic in topics)})
        uncommitted = [tp for tp in parts if tp not in committed]
        starts = await consumer.beginning_offsets(uncommitted) if uncommitted else {}
        ends = await consumer.end_offsets(parts) if parts else {}
        state, members = described.get(group, ("Unknown", 0))
        offsets = {tp: (committed[tp] if tp in committed else starts[tp], ends[tp]) for tp in parts}
        out.append((group, state, members, offsets))
    return out


def _assigned_topics(members: list[dict[str, Any]], ours: str) -> set[str]:
    """The topics named ``ours``... a group's members are assigned (not a Faust worker's
    changelogs, which its group never commits in). An assignment that does not decode (a
    client of another protocol in the group) names none."""
    topics: set[str] = set()
    for member in members:
        try:
            assignment = ConsumerProtocolMemberAssignment.decode(member.get("member_assignment") or b"")
        except Exception:  # noqa: BLE001  (any way a stranger's bytes fail to decode)
            continue
        topics.update(t for t, _ in assignment.assignment if isinstance(t, str) and t.startswith(ours))
    return topics


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


# Control characters but the newline (which the cells' own lists use): C0, DEL and C1.
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def _plain(*cells: str) -> list[Text]:
    # Cells as they are: a string cell is rich markup, and what a heartbeat or a group id
    # holds is anyone's writing ("[/]" in a host name stopped every table with MarkupError,
    # "[kprobe/x]" in a probe's failure vanished as a style). Its control characters are
    # escaped (\x1b): rich passes an ESC through, so a terminal escape in a host name
    # cleared the operator's screen or retitled the window.
    return [Text(_CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", c)) for c in cells]


def tables(status: dict[str, Any]) -> list[Table]:
    """The status document as terminal tables: hosts (stale ones in red), then groups."""
    hosts = Table(
        title=f"hosts: {len(status['hosts']) + len(status['unseen_hosts'])}, "
        f"stale: {len(status['stale_hosts'])} "
        f"(no heartbeat for {status['stale_after_s']:g}s)",
        title_justify="left",
    )
    for column in (
        "host",
        "host id",
        "kernel",
        "agent",
        "last heartbeat",
        "probes",
        "failed probes",
        "rb drops/s",
        "spool",
        "sampling overrides",
    ):
        hosts.add_column(column, overflow="fold")
    for h in status["hosts"]:
        last = _age(h["age_s"]) + " ago"
        if h["clock_ahead"]:
            last = f"STALE: clock {_age((h['last_heartbeat_ms'] - status['now_ms']) / 1000)} ahead"
        elif h["stale"]:
            last = f"STALE {last}"
        hosts.add_row(
            *_plain(
                h["host_name"],
                h["host_id"],
                h["kernel"],
                h["agent_version"],
                last,
                ", ".join(h["probes_loaded"]),
                "\n".join(f"{p}: {why}" for p, why in h["probes_failed"].items()),
                f"{h['ringbuf_drops_per_s']:g}",
                f"{h['spool_depth_bytes']} B",
                ", ".join(
                    f"{p} 1/{o['sample_every']} ({o['command']})" for p, o in h["sampling_overrides"].items()
                ),
            ),
            style="bold red" if h["stale"] else None,
        )
    for host_id in status["unseen_hosts"]:
        never = f"STALE: none in the last {_age(status['since_s'])}"
        hosts.add_row(*_plain("", host_id, "", "", never, "", "", "", "", ""), style="bold red")
    groups = Table(title="stages and exporters (consumer groups)", title_justify="left")
    for column in ("group", "state", "members", "lag", "lag by topic"):
        groups.add_column(column, overflow="fold")
    for g in status["groups"]:
        groups.add_row(
            *_plain(
                g["group"],
                g["state"],
                str(g["members"]),
                str(g["lag"]),
                ", ".join(f"{t} {n}" for t, n in g["lag_by_topic"].items()),
            ),
            style="yellow" if g["members"] == 0 else None,
        )
    return [hosts, groups]


class Unreadable(Exception):
    """Kafka gave no status within --timeout; ``args[0]``: the last failure, if any."""


class NoTopic(Permanent):
    """The heartbeats topic cannot be seen (a wrong cluster or prefix, or no Describe on
    it): waiting would not change it."""


class Refused(Permanent):
    """Kafka let the client in and refused it a read (its ACLs): waiting would not change
    it, and the wait was the whole --timeout before saying so."""


async def _read_or_refused(kafka: Kafka, since_s: float, hosts: set[str] | None) -> Read:
    try:
        return await read(kafka, since_s, hosts)
    except AUTHORIZATION_ERRORS as err:
        raise Refused() from err


async def _once(cfg: Config, args: argparse.Namespace, stale_after_s: float) -> dict[str, Any]:
    hosts = set(args.host) if args.host else None
    failures: list[BaseException] = []
    try:
        # Retried within the timeout: a coordinator moving or a broker restarting
        # should not end a --watch, but a one-shot status must not hang.
        async with asyncio.timeout(args.timeout):
            got = await retry(
                lambda: _read_or_refused(cfg.kafka, args.since, hosts),
                what=f"read the fleet's status from Kafka at {cfg.kafka.bootstrap}",
                on_retry=failures.append,
            )
    except TimeoutError:
        raise Unreadable(failures[-1] if failures else None) from None
    except NoTopic as err:
        raise Unreadable(err) from None
    except Refused as err:
        raise Unreadable(err.__cause__) from None
    # Ages as of when the heartbeats were read, not as of the start of a read that may
    # have taken seconds (a fleet's 900 s of heartbeats, retries while a broker restarts),
    # which made them look that much younger.
    now_ms = time.time_ns() // 1_000_000
    return summarize(got, now_ms, args.since, stale_after_s, hosts)


async def _run(cfg: Config, args: argparse.Namespace) -> int:
    stale_after_s = args.stale_after if args.stale_after is not None else 3 * cfg.agent.heartbeat_seconds
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A character the output's encoding has no bytes for (a locale not UTF-8), which a
        # heartbeat's host name may hold, is written escaped (\u2603), as stderr does,
        # rather than ending the status with UnicodeEncodeError.
        sys.stdout.reconfigure(errors="backslashreplace")
    # Piped or redirected: wide lines rather than cut columns (rich's default is 80).
    console = Console() if sys.stdout.isatty() else Console(width=250)
    if args.watch is None:
        status = await _once(cfg, args, stale_after_s)
        try:
            if args.json:
                print(json.dumps(status))
            else:
                console.print(*tables(status))
            sys.stdout.flush()
        except BrokenPipeError:
            _output_closed()
        return EXIT_STALE if status["stale_hosts"] else EXIT_OK
    # Ctrl-C (or SIGTERM) sets ``stop``, which the loop watches itself, rather than
    # cancelling the task: Python 3.11's wait_for, which aiokafka uses, can swallow a
    # cancellation that meets its own completion, and a --watch then ran on (seen once
    # under load in tests/integration/test_status.py).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stopped = asyncio.ensure_future(stop.wait())
    code = EXIT_OK
    # Live redraws the tables in place; JSON goes out one object a line.
    live = contextlib.nullcontext() if args.json else Live(console=console, auto_refresh=False)
    try:
        with live:
            while True:
                refresh = asyncio.ensure_future(_once(cfg, args, stale_after_s))
                await asyncio.wait({refresh, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if stop.is_set():  # the exit status is the last refresh's
                    refresh.cancel()
                    # (its clients closed, within --timeout even if the cancellation is lost)
                    await asyncio.wait({refresh}, timeout=args.timeout)
                    return code
                status = refresh.result()
                code = EXIT_STALE if status["stale_hosts"] else EXIT_OK
                if args.json:
                    print(json.dumps(status), flush=True)
                else:
                    assert isinstance(live, Live)
                    live.update(Stack(*tables(status)), refresh=True)
                await asyncio.wait({stopped}, timeout=args.watch)
                if stop.is_set():
                    return code
    except BrokenPipeError:
        # What reads the output has gone (`ktel status --watch --json | head -1`): the
        # watch ends as at Ctrl-C, with the status of the refresh being written.
        _output_closed()
        return code


def _output_closed() -> None:
    # Python's own flush of stdout at exit would fail again and print a traceback.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(cfg: Config, args: argparse.Namespace) -> int:
    """``ktel status``: 0 when every host listed is fresh, 1 when one is stale, 2 when
    Kafka could not be read; with --watch, as of the last refresh before Ctrl-C."""
    try:
        return asyncio.run(_run(cfg, args))
    except KeyboardInterrupt:
        return EXIT_OK
    except Unreadable as err:
        last = err.args[0]
        if last is None:
            why = f"Kafka at {cfg.kafka.bootstrap} gave no answer within {args.timeout:g}s (--timeout)"
        elif isinstance(last, NoTopic):
            why = f"Kafka at {cfg.kafka.bootstrap}: {last}"
        else:
            why = asyncio.run(explain(last, cfg.kafka))
        log.error("ktel status: %s", why)  # a log line: JSON too with service.log_format = "json"
        return EXIT_UNREADABLE
