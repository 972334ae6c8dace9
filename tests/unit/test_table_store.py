"""The on-disk copy of a stage's table (processors/table_store.py) where it can fail."""

import time
from types import SimpleNamespace

import pytest
from faust.types import TP
from rocksdict import AccessType, Options, Rdict, WriteBatch

from processors import table_store
from processors.table_store import OFFSET_KEY, WRITTEN_KEY, DiskBackedStore


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


@pytest.mark.parametrize(("age_h", "kept"), [(1, True), (30, False), (None, False), ("damaged", False)])
def test_a_copy_too_old_to_have_seen_every_tombstone_is_read_again_from_the_changelog(
    tmp_path, monkeypatch, age_h, kept
):
    """A partition back after more than a day elsewhere: the other worker's tombstones
    may be compacted away, so the copy (which has not seen them) is dropped, and Faust,
    finding no offset, reads the changelog from its start. A copy of unknown age (an
    older ktel wrote it, or its time is damaged) goes the same way."""
    store = DiskBackedStore.__new__(DiskBackedStore)
    store._dbs, store.table_name = {}, "host-state"
    store.app = SimpleNamespace(conf=SimpleNamespace(tabledir=str(tmp_path)))
    store.data = {}
    db = store._db(3)
    db[OFFSET_KEY] = b"41"
    if age_h == "damaged":
        db[WRITTEN_KEY] = b"\xff" * 100_000
    elif age_h is not None:
        db[WRITTEN_KEY] = str(time.time() - age_h * 3600).encode()
    store._load(3)
    assert store.persisted_offset(TP("host-state-changelog", 3)) == (41 if kept else None)
