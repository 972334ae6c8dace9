"""How a host's table value goes to its stage's changelog: what a record changed,
not the whole value.

In memory a host's value stays one dict (the stage cores' shape). On the changelog
it is split:

- each entry of the big per-host maps (``ENTRY_MAPS``: the aggregate's series, the
  enrich stage's processes and containers of each boot) is a record of its own,
  keyed ``[host id, *path to its map, entry key]``, valued ``[entry, mark]``; a
  deleted entry is a tombstone of that key;
- the rest, the *head* (the dedupe record, scalars, host attributes), is one record
  keyed by the host id, as the whole value was.

A batch writes the entries it changed (``Result.touched``, filled by the cores where
they change the maps), then its head, to the one partition of its host from the one
producer, which keeps their order (aiokafka sends one request per partition at a
time and puts a retried one back in front). So the changelog holds every batch
whole, except at most the last of each host after a SIGKILL: some of its entries,
without its head and so without its dedupe record. That batch is read again (its
offset was not committed) and counted again, except for the entries already holding
it: a counted entry's ``mark`` is the batch that last changed it (``mark_of``), and
recovery keeps the marks of the counted maps (``APPLIED``, in the section, until its
host's next new batch) for the counting stage to skip (processors/aggregate_core.py).
The marks of batches the head holds are kept as well, since records come back in
any order (the on-disk copy in key order): the dedupe record drops those batches
before they reach the counting stage, so their marks are never looked at.

Sizes a stage reckons from its maps (``RECKONED``) are not written: recomputed from
the maps recovered, they cannot disagree with them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, MutableMapping
from typing import Any

from ktel.wire import RawBatch
from processors.dedupe_core import stream
from processors.stage import MISSING, Touched

Path = tuple[str, ...]
# The maps whose entries are records of their own ("*": each key at that level).
ENTRY_MAPS: tuple[Path, ...] = (
    ("aggregate", "series"),
    ("enrich", "boots", "*", "procs"),
    ("enrich", "boots", "*", "containers"),
)
# Those of them a stage counts into, whose entries' marks recovery keeps.
COUNTED_MAPS: tuple[Path, ...] = (("aggregate", "series"),)
# Where recovery keeps the marks of a section's counted entries: {entry key: mark}.
APPLIED = "applied"
RECKONED: tuple[Path, ...] = (("aggregate", "series_bytes"), ("enrich", "bytes"))
Mark = tuple[str, int, int | None]


def mark_of(batch: RawBatch) -> Mark:
    """Which batch a counted entry last took: its stream, its seq and, for a part of a
    split batch, its first event (the parts of one seq are counted apart)."""
    return (stream(batch), batch.seq, None if batch.part is None else batch.part[0])


def _tree(paths: tuple[Path, ...]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in paths:
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = None
    return tree


# What the head leaves out: None at a leaf.
NOT_HEAD = _tree((*ENTRY_MAPS, *RECKONED, *((p[0], APPLIED) for p in COUNTED_MAPS)))


def head(value: dict[str, Any]) -> dict[str, Any]:
    """The host's value without its entry maps, reckoned sizes and recovered marks
    (new dicts down to them; the rest shared with ``value``)."""
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
    """``onto`` (a head) with the entry maps and recovered marks of ``source`` (the
    host's value as it was)."""
    for pattern in ENTRY_MAPS:
        for path, table in maps(source, pattern):
            put(onto, path, table)
    for pattern in COUNTED_MAPS:
        applied = get(source, (pattern[0], APPLIED))
        if applied is not None:
            put(onto, (pattern[0], APPLIED), applied)
    return onto


def entry_key(host_id: str, path: Path) -> bytes:
    """The changelog key of the entry at ``path`` of the host's value: a JSON list,
    never equal to a head's key (a JSON string)."""
    return json.dumps([host_id, *path]).encode()


def entry_value(entry: Any, mark: Mark | None) -> tuple[bytes, int]:
    """The record of an entry (as the table's JSON serializer reads it), and the
    entry's size without its mark (what the host holds: ``size``)."""
    data = json.dumps(entry).encode()
    return b"[" + data + b"," + json.dumps(mark).encode() + b"]", len(data)


def size(host_id: str, path: Path, entry: Any) -> int:
    """What an entry takes of what its host may hold (process.max_state_bytes): its
    record's key and value, its mark aside (a few bytes, bounded)."""
    return len(entry_key(host_id, path)) + len(json.dumps(entry))


def counted(path: Path) -> bool:
    return any(len(path) == len(p) + 1 and path[: len(p)] == p for p in COUNTED_MAPS)


def fold(data: MutableMapping[Any, Any], key: Any, record: Any) -> Any:
    """Apply one changelog record to the hosts' values ``data`` (recovery; the records
    of one host in any order, but each key's in the order written); the host id it
    concerns. ``key`` as the table decodes it (an entry's a list, or a tuple)."""
    if not isinstance(key, list | tuple):
        if record is None:  # the host forgotten (its entries were tombstoned before)
            data.pop(key, None)
        else:
            data[key] = graft(record, data.get(key, {}))
        return key
    host_id, path = key[0], tuple(key[1:])
    value = data.setdefault(host_id, {})
    if record is None:
        delete(value, path)
        return host_id
    entry, mark = record
    put(value, path, entry)
    if counted(path):
        applied = value[path[0]].setdefault(APPLIED, {})
        if mark is None:  # written whole, by no batch (a heartbeat's first record here)
            applied.pop(path[-1], None)
        else:
            applied[path[-1]] = tuple(mark)
    return host_id


def records(
    host_id: str, value: dict[str, Any], touched: Touched, mark: Mark | None, before: int, rewrite: bool
) -> tuple[list[tuple[bytes, bytes | None]], int]:
    """The changelog records of the entries a record changed (``touched``), or of all
    of the host's entries if ``rewrite``, each marked with ``mark``; and what the
    entries take after it, given ``before``, what they took before it."""
    out: list[tuple[bytes, bytes | None]] = []
    total = before
    for path, old in touched.items():
        new = get(value, path, MISSING)
        if old is not MISSING:
            total -= size(host_id, path, old)
        if new is not MISSING:
            key = entry_key(host_id, path)
            data, n = entry_value(new, mark)
            out.append((key, data))
            total += len(key) + n
        elif old is not MISSING:
            out.append((entry_key(host_id, path), None))
    if rewrite:
        out += [
            (entry_key(host_id, p), entry_value(e, mark)[0]) for p, e in entries(value) if p not in touched
        ]
    return out, total


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
