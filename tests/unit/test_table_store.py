"""The on-disk copy of a stage's table (processors/table_store.py) where it can fail."""

import asyncio
import functools
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from faust.serializers import Registry, codecs
from faust.types import TP
from rocksdict import AccessType, Options, Rdict, WriteBatch

from ktel import config
from ktel.wire.codec import Unreadable
from processors import stages, table_store
from processors.table_store import (
    BARE_OFFSET_KEY,
    OFFSET_KEY,
    REFUSED,
    TABLE_CODEC,
    WRITTEN_KEY,
    DiskBackedStore,
    framed,
)
from tests.unit.test_changelog import Runner, recover, traffic
from tests.unit.test_stage_shells import RESOLVED


def test_a_copy_the_disk_refuses_ends_the_worker_before_a_later_offset_covers_the_hole(tmp_path, monkeypatch):
    # Two partitions' acknowledged records due; RocksDB refuses the first write (here a
    # copy opened read only; in life a full disk, an I/O error).
    Rdict(str(tmp_path / "p0"), Options(raw_mode=True)).close()
    store = DiskBackedStore.__new__(DiskBackedStore)  # (its copy alone: no Faust table)
    store._dbs = {
        0: Rdict(str(tmp_path / "p0"), Options(raw_mode=True), access_type=AccessType.read_only()),
        1: Rdict(str(tmp_path / "p1"), Options(raw_mode=True)),
    }
    store._acked = {}
    for partition, offset in ((0, 41), (1, 7)):
        batch = WriteBatch(raw_mode=True)
        batch.put(b'"h"', b"{}")
        store._acked[partition] = (batch, offset)
    ended: list[str] = []

    def end(line: str):
        ended.append(line)
        raise SystemExit(1)

    monkeypatch.setattr(table_store, "end", end)
    with pytest.raises(SystemExit):
        store._write_acked()
    assert "changelog partition 0 could not be written" in ended[0]
    assert "read only" in ended[0]
    assert store._dbs[1].get(OFFSET_KEY) is None  # nothing written past the refused one


def copy_alone(tmp_path) -> DiskBackedStore:
    """A store with its copy under ``tmp_path``, and no Faust table."""
    store = DiskBackedStore.__new__(DiskBackedStore)
    store._dbs, store._acked, store._copied, store._dropped = {}, {}, {}, set()
    store.table_name, store.data, store._key_partition = "host-state", {}, {}
    store.options = {"stage": "all"}
    # (its keys and values decoded as the stages' table has them: JSON)
    store.key_type = store.value_type = None
    store.key_serializer = store.value_serializer = "json"
    store.app = SimpleNamespace(conf=SimpleNamespace(tabledir=str(tmp_path)), serializers=Registry())
    return store


@pytest.mark.parametrize(("age_h", "kept"), [(1, True), (30, False), (None, False), ("damaged", False)])
def test_a_copy_too_old_to_have_seen_every_tombstone_is_read_again_from_the_changelog(
    tmp_path, monkeypatch, age_h, kept
):
    """A partition back after more than a day elsewhere: the other worker's tombstones
    may be compacted away, so the copy (which has not seen them) is dropped, and Faust,
    finding no offset, reads the changelog from its start. A copy of unknown age (an
    older ktel wrote it, or its time is damaged) goes the same way."""
    store = copy_alone(tmp_path)
    db = store._db(3)
    db[OFFSET_KEY] = b"41"
    if age_h == "damaged":
        db[WRITTEN_KEY] = b"\xff" * 100_000
    elif age_h is not None:
        db[WRITTEN_KEY] = str(time.time() - age_h * 3600).encode()
    store._load(3)
    assert store.persisted_offset(TP("host-state-changelog", 3)) == (41 if kept else None)


def acked(partition: int, offset: int) -> SimpleNamespace:
    """The metadata aiokafka gives an acknowledged record."""
    return SimpleNamespace(topic_partition=SimpleNamespace(partition=partition), offset=offset)


def test_a_copy_takes_only_offsets_that_follow_on_and_is_dropped_at_a_record_it_lacks(tmp_path):
    """Another writer's record between the worker's own (offset 44 here): the copy,
    which never got it, is dropped rather than given an offset past it, takes nothing
    more of that partition, and copies again once the partition is assigned anew."""
    store = copy_alone(tmp_path)
    db = store._db(3)
    db[OFFSET_KEY], db[WRITTEN_KEY] = b"41", str(time.time()).encode()
    store._load(3)

    async def acks(*offsets: int) -> None:
        for offset in offsets:
            store.acknowledged(b'"h"', b"{}")(acked(3, offset))
        store._write_acked()

    asyncio.run(acks(42, 43))
    assert store.persisted_offset(TP("c", 3)) == 43
    asyncio.run(acks(45, 46))
    assert not store._path(3).exists()  # dropped at 45: 44 is not in it
    asyncio.run(acks(47))
    assert not store._path(3).exists()  # nothing more taken
    # Kept through a rebalance, the partition is read again from where Faust last did:
    # those records are not a copy (what it lacks is before them).
    assert store.persisted_offset(TP("c", 3)) is None
    message = SimpleNamespace(key=b'"h2"', value=b'{"v": 1}', partition=3, offset=47)
    store.apply_changelog_batch(
        [SimpleNamespace(message=message, key=message.key, value=message.value)], json.loads, json.loads
    )
    assert store.data["h2"] == {"v": 1}  # (in memory, as the worker holds it)
    assert not store._path(3).exists()
    store._load(3)  # assigned again: Faust reads the partition from the start, then
    asyncio.run(acks(48, 49))
    assert store.persisted_offset(TP("c", 3)) == 49


# Changelog records (key, value) as Kafka has them: a host's snapshot and a delta of it
# around records of other shapes than ktel writes, and a snapshot no stage could use.
GOOD = [
    (b'"h"', b'{"v": 1, "aggregate": {"last_ms": 5}}'),
    (b'["h", 2]', b'{"v": 2, "head": {"v": 2}, "set": [], "del": []}'),
]
MALFORMED = [  # (each key once: the copy holds a key's last record)
    (b'["h", 3]', b'"x"'),
    (b"[]", b"{}"),
    (b'["h", 4]', b'{"v": 3, "head": {}, "set": [[1, 2]], "del": []}'),
    (b'["h", 5]', b'{"v": 3, "head": 3, "set": [], "del": []}'),
    (b'["h", 6]', b'{"v": [], "head": {}, "set": [], "del": []}'),
    (b'{"h": 1}', b"{}"),
    (b"not json", b"{}"),
    (b'"g"', b"not json"),
    (b'"g2"', b"5"),
    (b'"g3"', b'{"aggregate": 5}'),
]
# (in offset order: bad delta keys before and after the good one)
RECORDS = [GOOD[0], *MALFORMED[:5], GOOD[1], *MALFORMED[5:]]


def refused() -> float:
    return REFUSED.labels("all")._value.get()


def test_the_copys_malformed_records_are_left_out_and_counted_and_the_rest_loaded(tmp_path):
    store = copy_alone(tmp_path)
    db = store._db(3)
    db[OFFSET_KEY], db[WRITTEN_KEY] = b"41", str(time.time()).encode()
    for offset, (key, value) in enumerate(RECORDS):
        db[key] = framed(offset, value)
    before = refused()
    store._load(3)
    assert store.data == {"h": {"v": 2}}
    assert store._key_partition == {"h": 3}
    assert refused() - before == len(MALFORMED)


def test_faust_recovery_folds_around_malformed_records_and_counts_them():
    """What Faust's recovery calls with a buffer of changelog events (its ``Table``, on
    the stages' store): a record it raised on stayed in the buffer, so every later
    one failed too and recovery never ended. The stand-in of a batch not expanded
    (ktel/kafka_batches.py) is counted with its reason."""
    app = faust.App("t", store=table_store.MEMORY_URL)
    table = app.Table("host-state", default=dict, partitions=4, options={"stage": "all"})
    stand_in = (None, Unreadable("a Kafka record batch not read (offsets 20 to 24): why"))
    # (decoded as Faust's changelog channel does, with the table's codec, which gives
    # what is not JSON as it came: Faust's recovery never took the offset of one it
    # could not decode, and waited for it)
    decode = functools.partial(codecs.loads, table_store.TABLE_CODEC)
    events = []
    for offset, (key, value) in enumerate([*RECORDS, stand_in]):
        message = SimpleNamespace(key=key, value=value, partition=1, offset=offset)
        events.append(SimpleNamespace(message=message, key=key and decode(key), value=decode(value)))
    before = refused()
    table.apply_changelog_batch(events)
    assert dict(table.data.data) == {"h": {"v": 2}}
    assert refused() - before == len(MALFORMED) + 1


HOSTILE = [
    b"\xff not JSON",
    b'{"__faust": {"ns": "no.such.Model"}}',
    b'{"__faust": {"ns": []}}',
    b"[" * 100_000,  # (nested past Python's recursion limit)
    Unreadable("a Kafka record batch not read (offsets 1 to 2): why"),
]


@pytest.mark.parametrize("data", HOSTILE)
def test_a_changelog_record_ktel_never_writes_decodes_as_it_came_through_the_stages_table(tmp_path, data):
    """Faust's recovery skips a changelog record it cannot decode without taking its
    offset, and waits for it for good: the stages' table (HostTable) decodes every key
    and value, giving what it cannot as it came, for ``fold`` to leave out and count."""
    cfg = config.Config(
        agent=config.AgentConfig(host_id="t"),
        process=config.ProcessConfig(data_dir=tmp_path / "data"),
        kafka=RESOLVED,
    )
    app = stages.make_app(cfg, "all")
    table = app.tables["host-state"]
    changelog = table.changelog_topic
    assert (changelog.key_serializer, changelog.value_serializer) == (TABLE_CODEC, TABLE_CODEC)
    assert app.serializers.loads_key(None, data, serializer=changelog.key_serializer) is data
    assert app.serializers.loads_value(None, data, serializer=changelog.value_serializer) is data
    # What ktel writes still decodes, and is written as Faust's JSON codec writes it.
    value = {"aggregate": {"series": {"a": 1.0}}}
    assert codecs.dumps(table.value_serializer, value) == codecs.dumps("json", value)
    assert app.serializers.loads_key(None, b'"h1"', serializer=changelog.key_serializer) == "h1"


def test_a_record_acknowledged_once_its_partition_is_revoked_is_not_copied(tmp_path):
    """A changelog record this worker sent before losing the partition, acknowledged
    after: another worker may have written the partition in between (offsets 43 and 44
    here), which this copy never sees. Taken, it would give the copy an offset past
    them, and the worker, assigned the partition again, would read the changelog from
    past them and recover without them."""
    store = copy_alone(tmp_path)
    store.table = SimpleNamespace(changelog_topic=SimpleNamespace(topics={"c"}))
    db = store._db(3)
    db[OFFSET_KEY], db[WRITTEN_KEY] = b"41", str(time.time()).encode()
    store._load(3)

    async def rebalance_then_late_ack() -> None:
        store.acknowledged(b'"h"', b'{"v": 1}')(acked(3, 42))
        await store.on_rebalance(set(), {TP("c", 3)}, set())
        store.acknowledged(b'"h"', b'{"v": 2}')(acked(3, 45))
        store._write_acked()

    asyncio.run(rebalance_then_late_ack())
    store._load(3)  # assigned again
    assert store.persisted_offset(TP("c", 3)) == 42


class Killed(BaseException):
    """The worker SIGKILLed (nothing after it runs)."""


def test_a_worker_killed_while_dropping_its_copy_starts_again(tmp_path, monkeypatch):
    """A copy too old is dropped at load, its files deleted one by one, and the worker
    may be killed midway. With its CURRENT file gone (or the MANIFEST it names) and
    the rest there, RocksDB refuses to open the directory ("Corruption: While creating
    a new Db, wal_dir contains existing log file"), and the worker failed on it at every
    start."""
    store = copy_alone(tmp_path)
    db = store._db(3)
    db[OFFSET_KEY], db[WRITTEN_KEY] = b"41", str(time.time() - 30 * 3600).encode()
    store._close(3)

    def killed_midway(path: Any, ignore_errors: bool = False) -> None:
        current = Path(path) / "CURRENT"
        if current.exists():
            current.unlink()
            raise Killed

    monkeypatch.setattr(table_store.shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):
        copy_alone(tmp_path)._load(3)
    monkeypatch.undo()
    restarted = copy_alone(tmp_path)
    restarted._load(3)
    assert restarted.persisted_offset(TP("host-state-changelog", 3)) is None


def test_a_copy_the_disk_refuses_during_recovery_ends_the_worker(tmp_path, monkeypatch):
    """Raised in Faust's recovery, which logs it and applies the same records again with
    every later one, the error left the worker recovering for good, never ready."""
    Rdict(str(tmp_path / "p3"), Options(raw_mode=True)).close()
    store = copy_alone(tmp_path)
    store._dbs[3] = Rdict(str(tmp_path / "p3"), Options(raw_mode=True), access_type=AccessType.read_only())
    ended: list[str] = []

    def end(line: str):
        ended.append(line)
        raise SystemExit(1)

    monkeypatch.setattr(table_store, "end", end)
    message = SimpleNamespace(key=b'"h"', value=b'{"v": 1}', partition=3, offset=7, timestamp=time.time())
    with pytest.raises(SystemExit):
        store.apply_changelog_batch(
            [SimpleNamespace(message=message, key=message.key, value=message.value)], json.loads, json.loads
        )
    assert "changelog partition 3 could not be written" in ended[0]


def recovered(
    store: DiskBackedStore,
    partition: int,
    records: list[tuple[bytes, bytes | None]],
    written: float | None = None,
    first: int = 0,
) -> None:
    """Changelog records (key, value; None: a tombstone) of ``partition`` from its offset
    ``first``, written at ``written`` (s since the epoch; None: now), as Faust's recovery
    gives them to the store (which copies them)."""
    events: list[Any] = []  # (Faust's events, as far as the store reads them)
    at = time.time() if written is None else written
    decode = functools.partial(codecs.loads, TABLE_CODEC)  # (as the table's changelog channel)
    for offset, (key, value) in enumerate(records, first):
        message = SimpleNamespace(key=key, value=value, partition=partition, offset=offset, timestamp=at)
        key_in, value_in = key and decode(key), value and decode(value)
        events.append(SimpleNamespace(message=message, key=key_in, value=value_in))
    store.apply_changelog_batch(events, lambda k: k, lambda v: v)  # (the table's: no key or value type)


def encoded(log: list[tuple]) -> list[tuple[bytes, bytes | None]]:
    """Changelog records as the table decodes them (key, value), as Kafka has them."""
    return [(json.dumps(k).encode(), None if v is None else json.dumps(v).encode()) for k, v in log]


# A host's changelog: its snapshot and a delta, its snapshot's tombstone (the worker
# killed before its deltas'), and the host back afresh at version 1. The copy holds the
# new snapshot and the old delta, whose version follows on from it.
FORGOTTEN_AND_BACK = [
    (b'"h"', b'{"v": 1, "aggregate": {"last_ms": 1}}'),
    (b'["h", 2]', b'{"v": 2, "head": {"v": 2, "aggregate": {"last_ms": 2}}, "set": [], "del": []}'),
    (b'"h"', None),
    (b'"h"', b'{"v": 1, "aggregate": {"last_ms": 9}}'),
]


@pytest.mark.parametrize("written_by", ["recovery", "acknowledgements"])
def test_a_delta_of_a_forgotten_hosts_earlier_incarnation_is_not_folded_onto_the_next_from_the_copy(
    tmp_path, written_by
):
    """In the changelog the old delta comes before the new snapshot, and recovery from
    Kafka leaves it out; the copy read back a host's snapshot then its deltas by
    version, and folded it onto the new snapshot."""
    store = copy_alone(tmp_path)
    store._load(3)
    if written_by == "recovery":
        recovered(store, 3, FORGOTTEN_AND_BACK)
    else:

        async def acks() -> None:
            for offset, (key, value) in enumerate(FORGOTTEN_AND_BACK):
                store.acknowledged(key, value)(acked(3, offset))
            store._write_acked()

        asyncio.run(acks())
    store._close(3)
    restarted = copy_alone(tmp_path)
    restarted._load(3)
    assert restarted.data == {"h": {"v": 1, "aggregate": {"last_ms": 9}}}
    assert restarted.persisted_offset(TP("host-state-changelog", 3)) == 3


def test_the_copy_gives_back_what_folding_the_changelog_in_offset_order_gives(tmp_path):
    """At every point of a host's changelog: snapshots and deltas over several
    snapshots, the host forgotten (only its snapshot's tombstone written) and back
    afresh, its new deltas in the slots of the old."""
    old, new = Runner().run(traffic(20)), Runner().run(traffic(20))
    log = old.log + [("h1", None)] + new.log
    for n in range(1, len(log) + 1):
        store = copy_alone(tmp_path / str(n))
        store._load(0)
        recovered(store, 0, encoded(log[:n]))
        store._close(0)
        restarted = copy_alone(tmp_path / str(n))
        restarted._load(0)
        assert restarted.data == recover(log[:n]), n


@pytest.mark.parametrize("newer_too", [False, True])
def test_a_copy_an_older_ktel_wrote_is_read_again_from_the_changelog(tmp_path, newer_too):
    """Its values bare, without their offsets, its records cannot be folded in the
    changelog's order. (``newer_too``: a copy this ktel wrote, then an older one: it
    found no offset of its own, and wrote its records bare besides.)"""
    store = copy_alone(tmp_path)
    db = store._db(3)
    if newer_too:
        db[OFFSET_KEY] = b"2"
        db[b'"h"'] = framed(2, b'{"v": 1}')
    db[BARE_OFFSET_KEY], db[WRITTEN_KEY] = b"3", str(time.time()).encode()
    db[b'"g"'] = b'{"v": 1}'
    store._load(3)
    assert store.data == {}
    assert store.persisted_offset(TP("host-state-changelog", 3)) is None
    assert not any(store._db(3).keys())


def test_the_copy_takes_only_the_offset_of_a_changelog_record_whose_key_is_not_json(tmp_path):
    """A key that is not JSON is none ktel writes: left out, it is not copied either,
    so none can stand for the copy's own keys (one equal to BARE_OFFSET_KEY would have
    the copy dropped at every load)."""
    store = copy_alone(tmp_path)
    store._db(3)
    records = [(b'"h"', b'{"v": 1}'), (BARE_OFFSET_KEY, b"{}"), (b"not json", b"{}"), (None, b"")]
    recovered(store, 3, records)
    assert set(store._db(3).keys()) == {b'"h"', OFFSET_KEY, WRITTEN_KEY}
    assert store._db(3)[OFFSET_KEY] == b"3"
    store._close(3)
    store.data.clear()
    store._load(3)
    assert store.data == {"h": {"v": 1}}
    assert store.persisted_offset(TP("host-state-changelog", 3)) == 3


@pytest.mark.parametrize(("written_h", "kept"), [(0, True), (19, False)])
def test_a_copy_recovery_left_midway_is_as_old_as_the_records_it_read(tmp_path, monkeypatch, written_h, kept):
    """A worker back after 19 h reads its partition's tail from its copy's offset, and is
    killed (or loses the partition) midway: its copy has the records up to there, written
    19 h ago, and not those after, among them the tombstone of host "h" written then
    too. Loaded 6 h later, the copy was taken as 6 h old; the tombstone, 25 h old, past
    the changelog's delete.retention.ms, may be compacted away, and "h" came back from
    the copy. A copy of records written lately is kept as before."""
    now = time.time()
    store = copy_alone(tmp_path)
    db = store._db(3)
    db[OFFSET_KEY], db[WRITTEN_KEY] = b"0", str(now - 19 * 3600).encode()
    db[b'"h"'] = framed(0, b'{"v": 1}')
    store._load(3)
    # (the tombstone, at offset 3, is where this recovery stopped)
    recovered(store, 3, [(b'"g"', b'{"v": 1}'), (b'"g2"', b'{"v": 1}')], now - written_h * 3600, first=1)
    store._close(3)
    monkeypatch.setattr(table_store.time, "time", lambda: now + 6 * 3600)
    restarted = copy_alone(tmp_path)
    restarted._load(3)
    if kept:
        assert restarted.persisted_offset(TP("host-state-changelog", 3)) == 2
        assert restarted.data.keys() == {"h", "g", "g2"}
    else:  # (the changelog read from its start, where the tombstone is, if Kafka still has it)
        assert restarted.persisted_offset(TP("host-state-changelog", 3)) is None
        assert restarted.data == {}
