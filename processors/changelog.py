"""How a host's table value goes to its stage's changelog: one record per batch, of
what the batch changed, not of the whole value.

In memory a host's value stays one dict (the stage cores' shape), with a write
version ``v``. On the changelog a host has two kinds of records:

- a *snapshot*: the whole value, keyed by the host id (as a whole value always was:
  a value an older ktel wrote is a snapshot of version 0);
- a *delta*: what one record changed, keyed ``[host id, v % SLOTS]``:
  ``{"v": v, "head": <the value without its entry maps>, "set": [[path, entry], ...],
  "del": [path, ...]}``, the new values of the entries of its big maps it changed
  (``ENTRY_MAPS``: the aggregate's series, the enrich stage's processes and
  containers; ``Result.touched``, filled by the cores where they change them) and
  the rest of the value whole, which is small.

A record that changes a host writes one delta, or a snapshot when ``SLOTS``
versions have passed since the last one (``Persisted`` in processors/stages.py), or
when the delta would take no less than the value. So the deltas since the last
snapshot each have a key of their own, compaction keeps every one of them, and a
host's recovery reads its snapshot and at most ``SLOTS - 1`` deltas, each smaller. A record is one
Kafka record, written whole or not at all, as the whole value was: a SIGKILL leaves
a batch either on the changelog with its dedupe record or not at all. (Not one
record per changed entry, with the dedupe record last: that costs a record per
entry, and records, not bytes, are most of a changelog write's cost; and a batch
cut short between them would be partly counted, so each entry would need the batch
that last changed it, and the fused mode's sample stage, which keeps no table, could
sample the batch read again otherwise, counting into some series one sampling of it
and into the others another.) In fused mode a batch read again is either dropped as
counted or counted whole, of whichever sampling.

Recovery (``fold``) reads a changelog in offset order, Faust's from Kafka and the
worker's from its on-disk copy alike (processors/table_store.py): a snapshot replaces
the host's value; a delta one version past the value is applied to it, any other is
one from before the snapshot, and left out. Offset order, not a host's snapshot then
its deltas by version: a delta of an earlier incarnation of the host (forgotten by a
worker killed between the tombstone of its snapshot and those of its deltas) comes
before the new incarnation's snapshot, where it is left out, even when its version
follows on from it. Each value folded has the enrich stage's exits put in
time order (``enrich_core.order_exits``): an older ktel queued them as they came,
and the stage's expiry relies on that order.

A changelog is read back as any topic is, untrusted (a processor bug, a mixed-version
deployment, another writer): ``fold`` never raises. A key that is neither a host id
nor ``[host id, slot]``, and a delta of another shape, are left out (the host keeps
its value, and the deltas after it, no longer one version past it, are left out as
from before a snapshot, until the next snapshot); a snapshot the runner or the stages
could not use (``problem``) drops the host's value, as if the host were new. A value
left in the table that failed a window would fail it after every restart too, the
worker recovering the same value; one left in Faust's recovery would stop it for good
(it logs the exception and applies the same buffer again with every later record).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any

from processors import aggregate_core, enrich_core
from processors.stage import MISSING, Touched

Path = tuple[str, ...]
# The maps whose entries a delta carries one by one ("*": each key at that level).
ENTRY_MAPS: tuple[Path, ...] = (
    ("aggregate", "series"),
    ("enrich", "boots", "*", "procs"),
    ("enrich", "boots", "*", "containers"),
)
# Versions between two snapshots of a host: its delta keys.
SLOTS = 16
VERSION = "v"
# What the runner and the stages take a host's value to hold, where it holds anything
# (``problem``): besides its sections, a map at each level of ENTRY_MAPS and at the
# dedupe record's (a counting stage's guard keeps it in that stage's section), and a
# number where a window computes with one.
MAPS: tuple[Path, ...] = (
    *dict.fromkeys(pattern[:n] for pattern in ENTRY_MAPS for n in range(2, len(pattern) + 1)),
    ("*", "seen"),
    ("*", "parts"),
)
NUMBERS: tuple[Path, ...] = (("aggregate", "last_ms"), ("aggregate", "series_bytes"), ("enrich", "bytes"))


def _tree(paths: tuple[Path, ...]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in paths:
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = None
    return tree


NOT_HEAD = _tree(ENTRY_MAPS)  # None at a leaf: left out


def version(value: dict[str, Any]) -> int:
    return int(value.get(VERSION, 0))


def head(value: dict[str, Any]) -> dict[str, Any]:
    """The host's value without its entry maps (new dicts down to them; the rest
    shared with ``value``)."""
    return _strip(value, NOT_HEAD)


def _strip(value: dict[str, Any], tree: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, item in value.items():
        sub = tree.get(key, tree.get("*", ...))
        if sub is ...:
            out[key] = item
        elif sub is not None and isinstance(item, dict):
            out[key] = _strip(item, sub)
    return out


def maps(value: dict[str, Any], pattern: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Each map of ``value`` at ``pattern``, with its path."""

    def walk(node: Any, at: int, path: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
        if not isinstance(node, dict):
            return
        if at == len(pattern):
            yield path, node
            return
        names = node.keys() if pattern[at] == "*" else (pattern[at],) if pattern[at] in node else ()
        for name in list(names):
            yield from walk(node[name], at + 1, (*path, name))

    return walk(value, 0, ())


def entries(value: dict[str, Any]) -> Iterator[tuple[Path, Any]]:
    """Every entry of the host's entry maps: its path (to its map, then its key) and value."""
    for pattern in ENTRY_MAPS:
        for path, table in maps(value, pattern):
            for key, entry in table.items():
                yield (*path, key), entry


def get(value: dict[str, Any], path: Path, default: Any = None) -> Any:
    node: Any = value
    for name in path:
        if not isinstance(node, dict) or name not in node:
            return default
        node = node[name]
    return node


def put(value: dict[str, Any], path: Path, entry: Any) -> None:
    """Set the entry at ``path``, making the dicts above it as needed."""
    node = value
    for name in path[:-1]:
        node = node.setdefault(name, {})
    node[path[-1]] = entry


def delete(value: dict[str, Any], path: Path) -> None:
    table = get(value, path[:-1])
    if isinstance(table, dict):
        table.pop(path[-1], None)


def graft(onto: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """``onto`` (a head) with the entry maps of ``source`` (the host's value as it was),
    those whose map above the head still holds: one it lacks went with it (a boot the
    enrich stage forgot for a newer one, or one a refused record had made). Put back,
    it came back as a boot of empty tables, newest of the host's, and the next new boot
    took the place of two of its boots where the worker that wrote the delta had one."""
    for pattern in ENTRY_MAPS:
        for path, table in maps(source, pattern):
            above = get(onto, path[:-1])
            if isinstance(above, dict):
                above[path[-1]] = table
    return onto


def delta_key(host_id: str, v: int) -> bytes:
    """The changelog key of a host's delta of version ``v``: a JSON list, never equal
    to a snapshot's key (a JSON string)."""
    return json.dumps([host_id, v % SLOTS]).encode()


def delta(value: dict[str, Any], touched: Touched, its_head: dict[str, Any]) -> dict[str, Any]:
    """The delta record of a record that changed ``touched`` of ``value`` (which holds
    its new version); ``its_head``: ``head(value)``, which the caller has made already."""
    changed = [(path, get(value, path, MISSING)) for path in touched]
    return {
        VERSION: version(value),
        "head": its_head,
        "set": [[path, entry] for path, entry in changed if entry is not MISSING],
        "del": [path for path, entry in changed if entry is MISSING and touched[path] is not MISSING],
    }


def encoded_len(items: list[Any]) -> int:
    """``sum(len(json.dumps(x)) for x in items)``, in one encode: a list encodes as its
    items' encodings joined by ", " in brackets, 2 characters more an item. (A batch
    touches tens of entries, and one encode each was a third of the changelog write.)"""
    return len(json.dumps(items)) - 2 * len(items) if items else 0


def sizes(host_id: str, entries: Iterable[tuple[Path, Any]]) -> int:
    """What entries take of what their host may hold (process.max_state_bytes), as a
    snapshot carries them: at most each one's path and its value, encoded."""
    listed = list(entries)
    return encoded_len([[host_id, *path] for path, _ in listed]) + encoded_len([e for _, e in listed])


def entries_size(host_id: str, value: dict[str, Any], touched: Touched, before: int) -> int:
    """What the host's entries take after a record that changed ``touched``, given
    ``before``, what they took before it (``sizes``)."""
    added, removed, now, was = [], [], [], []
    for path, old in touched.items():
        new = get(value, path, MISSING)
        if old is MISSING:
            if new is not MISSING:
                added.append((path, new))
        elif new is MISSING:
            removed.append((path, old))
        else:  # (an entry changed in place: its path's part of the size stays)
            now.append(new)
            was.append(old)
    return before + sizes(host_id, added) - sizes(host_id, removed) + encoded_len(now) - encoded_len(was)


def restored(before: dict[str, Any], value: dict[str, Any], touched: Touched) -> dict[str, Any]:
    """The host's value as it was before a record: its head then (``before``), its
    entry maps now (``value``'s), with the entries the record changed put back."""
    out = graft(before, value)
    for path, old in touched.items():
        if old is MISSING:
            delete(out, path)
        else:
            put(out, path, old)
    return out


def is_delta(key: Any) -> bool:
    """A changelog key as the table decodes it (a delta's a list, or a tuple)."""
    return isinstance(key, list | tuple)


def _nodes(value: Any, pattern: Path) -> Iterator[tuple[Path, Any]]:
    """What ``value`` holds at ``pattern`` (below maps only), whatever it is, with its path."""

    def walk(node: Any, at: int, path: Path) -> Iterator[tuple[Path, Any]]:
        if at == len(pattern):
            yield path, node
        elif isinstance(node, dict):
            names = node.keys() if pattern[at] == "*" else (pattern[at],) if pattern[at] in node else ()
            for name in names:
                yield from walk(node[name], at + 1, (*path, name))

    return walk(value, 0, ())


def _is_version(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def problem(value: Any) -> str | None:
    """Why a host's value (or a delta's head) read back from the changelog is one the
    runner or the stages could not use (None: it is one they can): not a map, a version
    that is not an integer, a section, one of ``MAPS`` or ``NUMBERS`` of another sort.
    Down to those levels only: below them a stage takes what it finds (an entry it
    fails on stops the worker at that record, which is then dead-lettered: processors/stop.py),
    but for the aggregate's series (``entry_problem``), which every window reads."""
    if not isinstance(value, dict):
        return f"a value that is not a map but {type(value).__name__}"
    if not _is_version(value.get(VERSION, 0)):
        return f"version {value[VERSION]!r:.40}, not an integer"
    for name, section in value.items():
        if name != VERSION and not isinstance(section, dict):
            return f"section {name!r:.40} is {type(section).__name__}, not a map"
    for pattern in MAPS:
        for path, node in _nodes(value, pattern):
            if not isinstance(node, dict):
                return f"{list(path)!r:.100} is {type(node).__name__}, not a map"
    for path in NUMBERS:
        number = get(value, path, 0)
        if not aggregate_core.finite(number):
            return f"{list(path)!r:.100} is {number!r:.40}, not a number"
    return None


def entry_problem(path: Path, entry: Any) -> str | None:
    """Why an entry of the host's entry maps read back is one a window could not use
    (None: it is one it can): the aggregate's series, each of which every window reads."""
    if path[:2] == ("aggregate", "series") and not aggregate_core.usable(path[-1], entry):
        return f"series {path[-1]!r:.100}: {entry!r:.100} is not a counter, gauge or histogram"
    return None


def _entry_path(path: Any) -> bool:
    """Whether ``path`` (decoded) names an entry of an entry map."""
    return (
        isinstance(path, list | tuple)
        and all(isinstance(name, str) for name in path)
        and any(
            len(path) == len(pattern) + 1
            and all(p in ("*", name) for p, name in zip(pattern, path[:-1], strict=True))
            for pattern in ENTRY_MAPS
        )
    )


def _snapshot_problem(record: Any) -> str | None:
    why = problem(record)
    if why is None:
        why = next((w for path, entry in entries(record) if (w := entry_problem(path, entry))), None)
    return why


def _delta_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"a delta that is not a map but {type(record).__name__}"
    if not _is_version(record.get(VERSION)):
        return f"a delta of version {record.get(VERSION)!r:.40}, not an integer"
    # (entries and all: one in a head, where none should be, stays where its value has no map)
    if (why := _snapshot_problem(record.get("head"))) is not None:
        return f"a delta's head: {why}"
    sets, dels = record.get("set"), record.get("del")
    if not (
        isinstance(sets, list)
        and all(isinstance(s, list) and len(s) == 2 and _entry_path(s[0]) for s in sets)
    ):
        return f"a delta's set {sets!r:.100} is not a list of [entry path, entry]"
    if not (isinstance(dels, list) and all(_entry_path(path) for path in dels)):
        return f"a delta's del {dels!r:.100} is not a list of entry paths"
    return next((w for path, entry in sets if (w := entry_problem(tuple(path), entry))), None)


def fold(data: MutableMapping[Any, Any], key: Any, record: Any) -> tuple[Any, str | None]:
    """Apply one changelog record to the hosts' values ``data`` (recovery, in the
    changelog's offset order): the host id it concerns
    (None: its key names none), and why it was left out (None: it was not; see the
    module doc)."""
    if isinstance(key, str):
        if record is None:  # the host forgotten (its deltas' tombstones follow)
            data.pop(key, None)
        elif (why := _snapshot_problem(record)) is not None:
            data.pop(key, None)  # (as if the host were new)
            return key, f"a snapshot the stages could not use, the host's value dropped: {why}"
        else:
            data[key] = record
            enrich_core.order_exits(get(record, ("enrich",)))
        return key, None
    if not (is_delta(key) and len(key) == 2 and isinstance(key[0], str) and _is_version(key[1])):
        return None, f"key {key!r:.100}, neither a host id nor [host id, slot]"
    host_id = key[0]
    if record is None:
        return host_id, None
    if (why := _delta_problem(record)) is not None:
        return host_id, f"{why}, left out"
    if key[1] != record[VERSION] % SLOTS or version(record["head"]) != record[VERSION]:
        # (ktel writes neither. One under another key outlives the host's tombstones,
        # which name its slots, to be folded onto a later incarnation of it; one whose
        # head has another version leaves the value at that one, its next deltas out.)
        v, its_head = record[VERSION], version(record["head"])
        return (
            host_id,
            f"a delta of version {v!r:.40} under slot {key[1]!r:.40}, its head's {its_head!r:.40}, left out",
        )
    value = data.get(host_id)
    if value is None or record[VERSION] != version(value) + 1:
        return host_id, None  # from before the host's snapshot
    new = graft(record["head"], value)
    for path, entry in record["set"]:
        put(new, tuple(path), entry)
    for path in record["del"]:
        delete(new, tuple(path))
    data[host_id] = new
    enrich_core.order_exits(get(new, ("enrich",)))  # (a head carries the exits whole)
    return host_id, None
