"""The on-disk copy of a stage's table (processors/table_store.py) where it can fail."""

import pytest
from rocksdict import AccessType, Options, Rdict, WriteBatch

from processors import table_store
from processors.table_store import OFFSET_KEY, DiskBackedStore


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
