"""Pure core of the enrich stage: OpenTelemetry resource attributes on raw batches.

A batch leaves this stage with the wire's ``res`` and ``proc`` fields set
(ktel/wire/raw.py): ``res`` is the host's resource from its agent's latest
heartbeat, ``proc`` what is known of each process the batch's events name,
from the process probe's exec and exit events, and of its cgroup's container
and pod from the latest heartbeat of the batch's boot and from the metadata
feed (which wins where both name an attribute: it is the operator's).
What is not known is absent: nothing is guessed, and a pid never seen gets no
entry at all.

State per host (JSON-able, one value of the stage's Faust table)::

    {"boots": {boot_id: {                # at most dedupe_core.MAX_BOOTS, oldest first
        "hb": int,                       # the highest ts (ms) of its heartbeats taken
        "seq": int,                      # and the highest seq (absent: none carried one)
        "host": {attr: value},           # the latest taken's "host" map
        "containers": {str(cgroup id): {attr: value}},   # what its heartbeats listed,
                                         # those no longer listed first
        "procs": {str(pid): {            # least recently named first
            "ppid": int, "comm": str, "exe": str, "uid": int, "cg": int,
            "exit": int}}}},             # sent_ns of the batch that carried its exit
     "exits": [[boot_id, str(pid), sent_ns], ...],   # exits awaiting their grace, in sent_ns
                                         # order, one a process (see bound)
     "current": boot_id,                 # the host's current boot (current_boot)
     "bytes": int}                       # at least what the rest takes encoded (see bound)

A record's changelog delta carries the processes and containers it changed
(``touched``), not the others (processors/changelog.py).

Host attributes, processes and containers are kept per boot: pids and cgroup
ids start again at every boot and a reboot may change the kernel (``os.version``),
so a batch an agent spooled before a reboot and sends after it must not get the
new boot's attributes; it gets its own boot's, and a batch of a boot no heartbeat
told of gets no host, container or pod attributes of the agent's. The metadata
feed's lines are per boot as well (``load_metadata``): a line naming a boot
applies to that boot's batches alone, and a line naming none to the batches of
the host's current boot, the boot of its latest heartbeat, alone. A process
entry's fields are each present only when known.

An exit does not remove its process at once: the agent drains each probe's
ring buffer on its own, so a file created just before the exit can arrive in
a later batch than the exit. A batch sealed up to ``exit_grace_seconds`` after the
exit's batch still sees the process; a batch sealed later does not (with a
grace of 0: only the exit's own batch sees it). Time here is the batches'
``sent_ns``, not the worker's clock, so the same input always gives the same
output. The exits wait in the order of their batches' ``sent_ns``, whatever order
the batches came in, so that an exit stamped far ahead (a clock set back since,
or a forged time) holds back no other exit's expiry; a section a worker recovers from the
changelog is put in that order (``order_exits``).

The process and container tables are bounded per host, over all boots (``bound``),
so that a host exec'ing or listing far more than fits keeps its state persistable
and its batches counted: at most ``max_processes`` processes and MAX_CONTAINERS
containers, and at most ``max_table_bytes`` for the whole section encoded
(``TABLE_SHARE`` of ``process.max_state_bytes``, see ``Enrich.from_config``). Past a bound the least
recently named process of the oldest boot goes first, then, past the bytes
still, the oldest boot's containers (those no longer listed first); each is
counted as an eviction of its table; queued exits with nothing left to remove (a
process that exited again, or exec'd, since) go before any of them, and an exit
sent again within a batch is queued once. Events of an evicted process are still
passed on and counted, without its attributes: a process named again after its
eviction is unknown.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
from collections.abc import Set
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry.semconv._incubating.attributes.container_attributes import CONTAINER_ID
from opentelemetry.semconv._incubating.attributes.host_attributes import HOST_ID
from opentelemetry.semconv._incubating.attributes.k8s_attributes import K8S_POD_UID
from opentelemetry.semconv._incubating.attributes.process_attributes import (
    PROCESS_EXECUTABLE_NAME,
    PROCESS_EXECUTABLE_PATH,
    PROCESS_PARENT_PID,
    PROCESS_PID,
    PROCESS_REAL_USER_ID,
)

from ktel.schema import ATTR_CHARS
from ktel.wire import PID_INDEXES, PROCESS_EXEC, PROCESS_EXIT, RawBatch
from ktel.wire.control import heartbeat_newest, heartbeat_older
from ktel.wire.signals import ATTRS
from processors.dedupe_core import MAX_BOOTS
from processors.stage import FromConfig, Result, Stage, State, Touched

if TYPE_CHECKING:
    from ktel.config import EnrichConfig

log = logging.getLogger("ktel.process")

# host.id -> boot.id (None: the line named none) -> cgroup.id -> container and pod
# attributes; see load_metadata.
Metadata = dict[str, dict[str | None, dict[int, dict[str, str]]]]

# Attribute namespaces the metadata feed may set (OpenTelemetry semantic conventions).
FEED_NAMESPACES = ("container.", "k8s.")
# The attributes one feed line may set: what enrich sends on must be what the next reader
# takes, and a span's or log's resource holds at most ATTRS.max_items (128), of which a
# host's heartbeat (32), the process (6) and its container as the agent tells it (16) may
# take 54.
FEED_MAX_ATTRS = 64
# Container and pod cgroups kept per host, over all boots.
MAX_CONTAINERS = 1024
# The share of process.max_state_bytes the section may take encoded: the aggregate's
# series take at most 1/2 (processors/aggregate_core.py), and the last 1/8 is left to
# the dedupe record and the keys around the sections.
TABLE_SHARE = 3 / 8
# The keys a batch of a new boot may add ("boots", "procs", "exits" and their syntax).
NEW_KEYS_BYTES = 64
# How often the stage looks whether its metadata file changed (a stat).
FEED_CHECK_SECONDS = 5.0


@dataclasses.dataclass(frozen=True)
class Options(FromConfig):
    max_processes: int = 2048
    exit_grace_seconds: float = 5.0
    max_table_bytes: int = int(900_000 * TABLE_SHARE)  # of the default process.max_state_bytes


@dataclasses.dataclass
class Evicted:
    """Entries dropped by the bounds (``bound``), not by their exit or end."""

    processes: int = 0
    containers: int = 0

    def counts(self) -> dict[str, float]:
        """As Result.counts names them."""
        return {"evicted_processes": self.processes, "evicted_containers": self.containers}


@dataclasses.dataclass
class Outcome:
    batch: RawBatch
    changed: bool = False  # the state changed in a way worth persisting (not just LRU order)
    touched: Touched = dataclasses.field(default_factory=Touched)  # the processes and containers it changed
    evicted: Evicted = dataclasses.field(default_factory=Evicted)
    processes: int = 0  # processes known for this host after the batch


class Enrich(Stage):
    """The stage: ``enrich`` on each batch, ``observe_heartbeat`` on each heartbeat,
    and the metadata file looked at every FEED_CHECK_SECONDS."""

    name = "enrich"
    heartbeats = True

    def __init__(self, opts: Options, feed: MetadataFile):
        super().__init__()
        self.opts, self.feed = opts, feed
        self.window_s = FEED_CHECK_SECONDS if feed.path is not None else None
        # Processes known per host, for the gauge (the table is not safe to walk from
        # the metrics server's thread).
        self.known: dict[str, int] = {}
        self.reload_feed()  # before the first batch, so a configured feed applies from the start

    @classmethod
    def from_config(cls, section: EnrichConfig, max_state_bytes: int) -> Enrich:
        opts = dataclasses.replace(
            Options.from_config(section), max_table_bytes=int(max_state_bytes * TABLE_SHARE)
        )
        return cls(opts, MetadataFile(section.metadata_file))

    def on_batch(self, state: State, batch: RawBatch, now_ms: int) -> Result:
        out = enrich(state, batch, self.feed.feed, self.opts)
        # Only the LRU order changed otherwise: not worth a changelog record.
        result = Result(out.batch, changed=out.changed, touched=out.touched, counts=out.evicted.counts())
        self._known(batch.host_id, out.processes, result)
        return result

    def on_window(
        self, states: dict[str, State], now_ms: int, share: float, reading: Set[str] = frozenset()
    ) -> Result:
        self.reload_feed()
        return Result()

    def on_heartbeat(self, state: State, heartbeat: dict[str, Any]) -> Result:
        touched = Touched()
        if not observe_heartbeat(state, heartbeat, touched):
            return Result()
        result = Result(
            changed=True, touched=touched, counts=bound(state, self.opts, touched=touched).counts()
        )
        self._known(heartbeat["host"]["host.id"], known_processes(state), result)
        return result

    def forget(self, host_id: str) -> Result:
        return Result(counts={"processes": -self.known.pop(host_id, 0)})

    def _known(self, host_id: str, processes: int, result: Result) -> None:
        """The host's processes are ``processes`` now: the gauge's increment in
        ``result``, with how to put the count back if the record is refused after all."""
        was = self.known.get(host_id)
        self.known[host_id] = processes
        result.counts["processes"] = processes - (was or 0)

        def undo() -> None:
            if was is None:
                self.known.pop(host_id, None)
            else:
                self.known[host_id] = was

        result.undo.append(undo)

    def reload_feed(self) -> None:
        errors = self.feed.refresh()
        if errors is not None:
            for err in errors:
                log.warning("metadata feed: %s", err)
            log.info("metadata feed %s: %d cgroups", self.feed.path, self.feed.entries)


def observe_heartbeat(
    state: dict[str, Any], heartbeat: dict[str, Any], touched: Touched | None = None
) -> bool:
    """Take a decoded heartbeat's host, container and pod attributes; False if
    it changed nothing. The containers it changes are added to ``touched``.

    A heartbeat older than those already taken of its boot (redelivered) is ignored,
    so the latest always wins: older by its ``seq``, or by its ``ts`` for an agent
    that sends none (ktel.wire.control.heartbeat_older), so that a clock set back
    freezes nothing. One of a boot not taken before is taken, and its boot is the
    host's current one from then on (``current_boot``). One without ``boot.id``
    cannot be matched to batches, so it is ignored too.
    """
    host = heartbeat["host"]
    boot_id = host.get("boot.id")
    if not isinstance(boot_id, str):
        return False
    touched = Touched() if touched is None else touched
    boot = _boot(state, boot_id, touched)
    if "hb" in boot and heartbeat_older(heartbeat, boot.get("seq"), boot["hb"]):
        return False
    # The current boot (see current_boot) as changed here is a change to persist, and
    # so is a boot's first seq, which ``bytes`` does not count yet.
    current = current_boot(state)
    if current != boot_id and (
        "hb" not in boot or current is None or heartbeat["ts"] >= state["boots"][current]["hb"]
    ):
        current = boot_id
    persist = state.get("current") != current or ("seq" in heartbeat and "seq" not in boot)
    state["current"] = current
    seq, boot["hb"] = heartbeat_newest(heartbeat, boot.get("seq"), boot.get("hb", -1))
    if seq is not None:
        boot["seq"] = seq
    attrs = {k: v for k, v in host.items() if isinstance(v, str | int | float | bool)}
    listed = {
        str(cg): {k: v for k, v in ca.items() if k.startswith(FEED_NAMESPACES)}
        for cg, ca in heartbeat.get("containers", [])
    }
    kept = boot.get("containers", {})
    # A cgroup the heartbeat no longer lists is gone, but its last events may
    # still be on their way (ktel.raw can lag the heartbeats; a spool can hold
    # hours), so it stays, first in line for the bound. A cgroup id is not
    # reused within a boot, so a kept entry cannot name another cgroup.
    merged = {cg: a for cg, a in kept.items() if cg not in listed} | listed
    if (boot.get("host"), kept) == (attrs, merged) and not persist:
        # Most heartbeats: the same attributes, later. Taken in memory (an older one
        # after it is still ignored) but no change: the host's table value reaches its
        # changelog with its next change, not at every heartbeat of every host (at
        # 10,000 hosts and the agents' 10 s, 1,000 changelog records a second). A worker
        # that recovers the value has an older "hb" and "seq" with the same attributes:
        # they only order heartbeats, and none between the two said anything else.
        return False
    boot["host"] = attrs
    for cg, container in listed.items():
        if kept.get(cg) != container:
            touched.touch(kept, ("boots", boot_id, "containers", cg))
    if merged:
        boot["containers"] = merged
    return True


def enrich(state: dict[str, Any], batch: RawBatch, feed: Metadata, opts: Options) -> Outcome:
    """The batch with ``resource`` and ``processes`` set; ``state`` is updated in place.

    Exec and exit events of the batch are applied before its attributes are
    looked up, so every event of the batch sees its processes' attributes.
    """
    out = Outcome(batch)
    out.changed = _expire_exits(state, batch.sent_ns, opts, out.touched)
    out.changed |= batch.boot_id not in state.get("boots", {})  # (a boot's first batch)
    boot = _boot(state, batch.boot_id, out.touched)
    procs: dict[str, dict[str, Any]] = boot.setdefault("procs", {})
    at = ("boots", batch.boot_id, "procs")
    named: set[int] = set()
    queued: set[int] = set()  # the pids whose exit this batch queued
    exec_id, exit_id = PROCESS_EXEC.id, PROCESS_EXIT.id
    # At least what the events below add to the section encoded: each entry they
    # set and each exit they queue, whole, and the keys a new boot brings.
    grown = encoded_size(batch.boot_id) + NEW_KEYS_BYTES
    for ev in batch.events:
        kind = ev[0]
        for i in PID_INDEXES.get(kind, ()):
            named.add(ev[i])
        if kind == exec_id:
            _ts, pid, _tid, ppid, uid, cg, comm, filename = ev[1:]
            out.touched.touch(procs, (*at, str(pid)))
            procs.pop(str(pid), None)  # a new program (or a reused pid): nothing of the old one holds
            entry = procs[str(pid)] = _known(ppid=ppid, comm=comm, exe=filename, uid=uid, cg=cg)
            grown += _entry_size(str(pid), entry) + 1  # (and its comma)
            out.changed = True
        elif kind == exit_id:
            _ts, pid, _tid, ppid, uid, cg, _comm = ev[1:8]
            # The exit's comm is its last thread's, which may not be the program's name.
            out.touched.touch(procs, (*at, str(pid)))
            entry = procs.setdefault(str(pid), {})
            for name, value in _known(ppid=ppid, uid=uid, cg=cg).items():
                entry.setdefault(name, value)  # what the exec said stays
            # The exit already queued for this pid at this time serves again: an exit
            # repeated (or the pid exec'd and exited again) within the batch must not
            # queue one more each time, past max_processes and the bytes bound.
            if pid not in queued and entry.get("exit") != batch.sent_ns:
                queued.add(pid)
                grown += _queue_exit(state, [batch.boot_id, str(pid), batch.sent_ns]) + 1
            entry["exit"] = batch.sent_ns
            grown += _entry_size(str(pid), entry) + 1
            out.changed = True

    # Bounded before the lookup: the batch then names at most max_processes known
    # processes, which the next stage's decoder takes (ktel.wire.raw.PROCESSES); a
    # batch of more execs than that would otherwise be refused there.
    if out.changed:  # (naming known processes only reorders them: nothing grows)
        out.evicted = bound(state, opts, grown, out.touched)
    host_feed = feed.get(batch.host_id, {})
    # The feed's lines of this boot, then those naming no boot if it is the host's current
    # one: a cgroup id of another boot may be another container's (see load_metadata).
    boot_feeds = [host_feed.get(batch.boot_id, {})]
    if None in host_feed and batch.boot_id == current_boot(state):
        boot_feeds.append(host_feed[None])
    host_containers = boot.get("containers", {})
    processes: dict[str, dict[str, Any]] = {}
    for pid in sorted(p for p in named if isinstance(p, int)):
        known = procs.pop(str(pid), None)
        if known is None:
            continue
        procs[str(pid)] = known  # re-inserted last: the most recently named
        processes[str(pid)] = _attributes(pid, known, host_containers, boot_feeds)
    resource = {**boot.get("host", {}), HOST_ID: batch.host_id}
    out.batch = dataclasses.replace(batch, resource=resource, processes=processes)
    out.processes = known_processes(state)
    return out


def known_processes(state: dict[str, Any]) -> int:
    return sum(len(b.get("procs", {})) for b in state.get("boots", {}).values())


def current_boot(state: dict[str, Any]) -> str | None:
    """The boot of the host's latest heartbeat, the one its agent runs now as far as
    this stage knows; None before any heartbeat. A boot only batches told of (spooled
    before its first heartbeat was taken) has none, so is never current.

    A boot's first heartbeat taken makes it current whatever its ``ts``: ordered by
    ``ts``, the agent's clock set back across a reboot kept the boot before current
    until the new boot's heartbeats passed its last. A later heartbeat of another boot
    held (one of the boot before, late or re-driven from ktel.dlq) makes its boot
    current again only if stamped no earlier than the current boot's latest, so that
    a boot's first heartbeat re-driven after its boot was forgotten gives way to the
    next of the host's own (``observe_heartbeat``). A state an older ktel wrote has
    no ``current``: its boot is the one of the highest ``hb``."""
    current = state.get("current")
    if isinstance(current, str) and "hb" in state.get("boots", {}).get(current, {}):
        return current
    current, latest = None, -1
    for boot_id, boot in state.get("boots", {}).items():
        hb = boot.get("hb")
        if isinstance(hb, int) and hb >= latest:
            current, latest = boot_id, hb
    return current


def _boot(state: dict[str, Any], boot_id: str, touched: Touched) -> dict[str, Any]:
    boots = state.setdefault("boots", {})
    boot = boots.get(boot_id)
    if boot is None:
        boot = boots[boot_id] = {}
        while len(boots) > MAX_BOOTS:
            old = next(iter(boots))  # dicts keep insertion order: oldest first
            for table in ("procs", "containers"):
                entries = boots[old].get(table, {})
                for key in entries:
                    touched.touch(entries, ("boots", old, table, key))
            del boots[old]
    return boot


def _known(**fields: Any) -> dict[str, Any]:
    """The fields the kernel really told: 0 is the probe's "unknown" for ppid and
    cgroup, "" for names, and only an absolute exec filename is a path."""
    out = {}
    for name, value in fields.items():
        if name == "exe" and not (isinstance(value, str) and value.startswith("/")):
            continue
        if value is None or value == "" or (name in ("ppid", "cg") and value == 0):
            continue
        out[name] = value
    return out


def _attributes(
    pid: int,
    entry: dict[str, Any],
    host_containers: dict[str, dict[str, str]],
    boot_feeds: list[dict[int, dict[str, str]]],
) -> dict[str, Any]:
    """A process entry as OpenTelemetry process attributes, with its container and pod:
    ``host_containers`` the agent's of the batch's boot, ``boot_feeds`` the feed's lines
    that apply to it, the first naming its cgroup taken."""
    attrs: dict[str, Any] = {PROCESS_PID: pid}
    for field, attr in (
        ("ppid", PROCESS_PARENT_PID),
        ("comm", PROCESS_EXECUTABLE_NAME),
        ("exe", PROCESS_EXECUTABLE_PATH),
        # bpf_get_current_uid_gid() gives the real uid (cred->uid).
        ("uid", PROCESS_REAL_USER_ID),
        # Not a semantic convention; the same name as the histograms' cgroup label.
        ("cg", "cgroup.id"),
    ):
        if field in entry:
            attrs[attr] = entry[field]
    if "cg" in entry:
        told = host_containers.get(str(entry["cg"]), {})
        fed = next((f[entry["cg"]] for f in boot_feeds if entry["cg"] in f), {})
        # The feed names another container or pod: nothing the agent told of its own holds.
        for key, namespace in ((CONTAINER_ID, "container."), (K8S_POD_UID, "k8s.")):
            if key in fed and fed[key] != told.get(key):
                told = {k: v for k, v in told.items() if not k.startswith(namespace)}
        attrs.update(told)
        attrs.update(fed)
    return attrs


def _queue_exit(state: dict[str, Any], queued: list[Any]) -> int:
    """Queue an exit for its grace, in its place by time; returns what it takes encoded."""
    exits = state.setdefault("exits", [])
    if exits and exits[-1][2] > queued[2]:
        # A batch sealed before one already queued (from a spool, a clock set back, or one
        # stamped far ahead before it): expiry walks the queue in order and stops at the
        # first exit not due, so this one goes before the later ones, not behind them.
        bisect.insort(exits, queued, key=_exit_time)
    else:
        exits.append(queued)
    return encoded_size(queued)


def _exit_time(queued: list[Any]) -> int:
    return int(queued[2])


def order_exits(section: Any) -> None:
    """Put the exit queue of a host's section read back from its changelog (or its
    on-disk copy: ``changelog.fold``) in time order, as ``_queue_exit`` keeps it.

    A section an older ktel saved holds its exits as their batches came: one stamped
    far ahead at the front held back the expiry of every exit behind it until
    max_processes took it. Only what ktel queues, ``[boot_id, str(pid), sent_ns]``,
    stays: anything else awaits no process, and expiry, which cannot compare it, would
    fail on every later batch of the host, or stop at it for good (a NaN); a process whose
    exit it was goes by the bounds as any other. Only for a value read back (a recovery,
    or a standby replica following the changelog), never in a batch's processing: a pass
    over the queue, and the sort only for a queue out of order.
    """
    if not isinstance(section, dict) or "exits" not in section:
        return
    exits = section["exits"]
    if isinstance(exits, list) and _in_order(exits):
        return
    kept = [q for q in exits if _queueable(q)] if isinstance(exits, list) else []
    section["exits"] = sorted(kept, key=_exit_time)  # ("bytes" stays an upper bound: this only takes away)


def _queueable(queued: Any) -> bool:
    """Whether ``queued`` has the shape of an exit ktel queues."""
    if not (isinstance(queued, list) and len(queued) == 3):
        return False
    boot_id, pid, exit_ns = queued
    return (
        isinstance(boot_id, str)
        and isinstance(pid, str)
        and isinstance(exit_ns, int)
        and not isinstance(exit_ns, bool)
    )


def _in_order(exits: list[Any]) -> bool:
    last = None
    for queued in exits:
        if not _queueable(queued) or (last is not None and queued[2] < last):
            return False
        last = queued[2]
    return True


def _expire_exits(state: dict[str, Any], now_ns: int, opts: Options, touched: Touched) -> bool:
    exits = state.get("exits", [])
    stale = 0
    if len(exits) > opts.max_processes:
        # Exits with nothing left to remove go first, not exits still in their grace
        # ("bytes" stays an upper bound: this only takes away).
        before = len(exits)
        _keep_pending_exits(state)
        exits = state["exits"]
        stale = before - len(exits)
    grace_ns = int(opts.exit_grace_seconds * 1e9)
    boots = state.get("boots", {})
    n = 0
    # Over the bound, the oldest exits go before their grace: a burst of short
    # processes must not grow the state past what max_processes allows.
    while n < len(exits) and (exits[n][2] + grace_ns < now_ns or len(exits) - n > opts.max_processes):
        boot_id, pid, exit_ns = exits[n]
        # Only if this exit is still the entry's: an exec may have reused the pid since.
        if _exit_pending(boots, boot_id, pid, exit_ns):
            procs = boots[boot_id]["procs"]
            touched.touch(procs, ("boots", boot_id, "procs", pid))
            del procs[pid]
        n += 1
    if n:
        del exits[:n]
    return n > 0 or stale > 0


def bound(
    state: dict[str, Any], opts: Options, grown: int | None = None, touched: Touched | None = None
) -> Evicted:
    """Evict what is past the bounds (see the module doc) from a host's state; what
    it evicts is added to ``touched``.

    ``grown``: at most how many bytes the section grew since it was last bounded,
    when known. Its size is kept in ``bytes``, at least what the rest of the section
    takes encoded (removals only make it more so), so a batch that cannot have
    grown the section past its bytes bound need not encode it to know.
    """
    boots = state.get("boots", {})
    evicted = Evicted()
    excess = known_processes(state) - opts.max_processes
    excess_containers = sum(len(b.get("containers", {})) for b in boots.values()) - MAX_CONTAINERS
    size = state.pop("bytes", None)
    if size is None or grown is None or size + grown > opts.max_table_bytes:
        size = encoded_size(state)
    else:
        size += grown
    touched = Touched() if touched is None else touched
    if size > opts.max_table_bytes:
        # Exits with nothing left to remove (their process exited again, or exec'd, since)
        # keep nothing: they go before any process or container.
        size -= _keep_pending_exits(state)
    for table in ("procs", "containers"):
        for boot_id, boot in boots.items():  # oldest boot first
            entries = boot.get(table, {})
            order = None
            while entries and (
                size > opts.max_table_bytes or (excess if table == "procs" else excess_containers) > 0
            ):
                if order is None:
                    # Dicts keep insertion order: least recent first. One walk of the keys,
                    # not one from the front per eviction, which passes every slot emptied
                    # before it (a batch naming 100,000 processes took seconds).
                    order = iter(list(entries))
                key = next(order)
                touched.touch(entries, ("boots", boot_id, table, key))
                size -= _entry_size(key, entries.pop(key))
                if table == "procs":
                    excess -= 1
                    evicted.processes += 1
                else:
                    excess_containers -= 1
                    evicted.containers += 1
    if evicted.processes:
        # Exits awaiting their grace whose process went: nothing left for them to remove.
        size -= _keep_pending_exits(state)
    state["bytes"] = size
    return evicted


def _entry_size(key: str, value: Any) -> int:
    """What an entry of a table takes encoded without its comma: at most what
    removing it saves, and what adding it costs but that comma."""
    return encoded_size(key) + 1 + encoded_size(value)


def _keep_pending_exits(state: dict[str, Any]) -> int:
    """Keep, of the queued exits, one for each process still awaiting it; returns the
    bytes the others took encoded."""
    exits = state.get("exits")
    if not exits:
        return 0
    boots = state.get("boots", {})
    kept, saved, seen = [], 0, set()
    for queued in exits:
        boot_id, pid, exit_ns = queued
        if (boot_id, pid) not in seen and _exit_pending(boots, boot_id, pid, exit_ns):
            seen.add((boot_id, pid))
            kept.append(queued)
        else:
            saved += encoded_size(queued) + 1  # (and its comma)
    state["exits"] = kept
    return saved - (saved > 0 and not kept)  # (the last one left had no comma)


def _exit_pending(boots: dict[str, Any], boot_id: str, pid: str, exit_ns: int) -> bool:
    return boots.get(boot_id, {}).get("procs", {}).get(pid, {}).get("exit") == exit_ns


def encoded_size(value: Any) -> int:
    """Its length JSON-encoded as the table's changelog record carries it (ASCII
    escapes: at least its UTF-8 length)."""
    return len(json.dumps(value, separators=(",", ":")))


# ----------------------------------------------------------------- metadata feed
#
# The feed is a file rather than a Kafka topic: whatever knows the containers
# (a DaemonSet listing pods through the CRI, a cron job, a config manager) can
# write it without a Kafka client, every worker of the stage reads all of it
# whatever partitions it holds (a topic would need a global table), and it is
# small (one line per container cgroup). It is reloaded when it changes, so
# the writer should replace it atomically (write a temporary file, rename).


def load_metadata(text: str) -> tuple[Metadata, list[str]]:
    """Parse the feed: JSON lines, each one cgroup of one host::

        {"host.id": "4c1f...", "boot.id": "8d2e...", "cgroup.id": 12345,
         "container.id": "9f86d0...", "k8s.pod.name": "web-0",
         "k8s.namespace.name": "shop", "k8s.pod.uid": "..."}

    cgroup ids (cgroup v2 directory inodes) are only unique within one boot of one
    host: they start again at every boot, where the same id may be another
    container's. Hence ``host.id`` on every line, and ``boot.id``, the boot the
    cgroup id is of, as the host's heartbeats and batches carry it
    (/proc/sys/kernel/random/boot_id without its dashes): the line applies to
    that boot's batches alone. A line without ``boot.id`` applies to the batches of
    the host's current boot (``current_boot``) alone, as what its writer saw of
    the host now: a batch its agent spooled before a reboot and sent after it
    gets no attributes of it (nor of a line naming the new boot), and a feed
    written before a reboot and not yet written again applies to the new boot
    until it is. A writer that knows the boot (it reads the node's boot_id when
    it reads its cgroups) names it, and may keep the lines of the boot before
    for what its agent still has to send. Attributes other than ``container.*`` and
    ``k8s.*`` strings are refused, and so is a line of more than ``FEED_MAX_ATTRS`` or
    with a name or value longer than an attribute on the wire takes. Blank lines and lines starting with ``#``
    are skipped. Returns the mapping and one message per refused line (the
    other lines still apply).
    """
    feed: Metadata = {}
    errors: list[str] = []
    # Lines end at "\n" alone: str.splitlines also ends one at U+2028, U+2029 and U+0085,
    # which JSON takes unescaped in a string (an annotation's text), breaking its line in two.
    for n, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            errors.append(f"line {n}: not JSON ({err})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"line {n}: not a JSON object")
            continue
        host, cg = obj.pop(HOST_ID, None), obj.pop("cgroup.id", None)
        boot = obj.pop("boot.id", None)
        if not isinstance(host, str) or not host:
            errors.append(f"line {n}: no host.id string")
            continue
        if boot is not None and not (isinstance(boot, str) and boot and "-" not in boot):
            # A boot_id as the kernel gives it would match no batch, silently.
            errors.append(
                f"line {n}: boot.id is a boot's id as its heartbeats carry it: a non-empty "
                "string, /proc/sys/kernel/random/boot_id without its dashes"
            )
            continue
        if not isinstance(cg, int) or isinstance(cg, bool) or cg <= 0:
            errors.append(f"line {n}: no positive integer cgroup.id")
            continue
        bad = [k for k, v in obj.items() if not (k.startswith(FEED_NAMESPACES) and isinstance(v, str))]
        if bad:
            errors.append(f"line {n}: {', '.join(bad)}: only container.* and k8s.* strings are taken")
            continue
        # (a pod's annotation, as k8s.pod.annotation.*, may be far longer than a batch takes)
        long = [k for k, v in obj.items() if len(k) > ATTRS.key_len or len(v) > ATTR_CHARS]
        if long:
            errors.append(
                f"line {n}: {', '.join(f'{k:.100}' for k in long)}: an attribute's name is at most "
                f"{ATTRS.key_len} characters and its value at most {ATTR_CHARS}"
            )
            continue
        if len(obj) > FEED_MAX_ATTRS:
            errors.append(f"line {n}: {len(obj)} attributes, past the {FEED_MAX_ATTRS} a line may set")
            continue
        feed.setdefault(host, {}).setdefault(boot, {})[cg] = obj
    return feed, errors


def feed_entries(feed: Metadata) -> int:
    """The lines the feed took (the last of several for one cgroup of one boot)."""
    return sum(len(cgroups) for boots in feed.values() for cgroups in boots.values())


class MetadataFile:
    """The feed file, re-read when its identity or size or mtime changes."""

    def __init__(self, path: Path | None):
        self.path = path
        self.feed: Metadata = {}
        self._stamp: tuple[int, int, int] | None = None

    def refresh(self) -> list[str] | None:
        """Reload if the file changed: None if it did not, else the refused lines.

        A missing file is an empty feed (it may not be written yet); an
        unreadable one keeps the previous feed.
        """
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except FileNotFoundError:
            if self._stamp is None and not self.feed:
                return None
            self.feed, self._stamp = {}, None
            return [f"{self.path}: missing, the feed is empty until it appears"]
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._stamp:
            return None
        try:
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            return [f"{self.path}: unreadable, keeping the previous feed ({err})"]
        self.feed, errors = load_metadata(text)
        self._stamp = stamp
        return errors

    @property
    def entries(self) -> int:
        return feed_entries(self.feed)
