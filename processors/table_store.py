"""The stages' table stores: ``FoldingStore`` (``process.table_store = "memory"``), the
hosts' state in memory, as with Faust's ``memory://``, but with each changelog record
folded into its host's value (processors/changelog.py: a snapshot, or a delta of it);
``DiskBackedStore`` (``"rocksdict"``), the same plus an on-disk copy of the changelog,
so a restarted worker reads only the changelog's tail instead of all of it.

The copy holds, per changelog partition (one RocksDB under the stage's data
directory), exactly the changelog records Kafka has acknowledged (those of the last
``ACKED_WRITE_S`` excepted): each key's last record, its value with the record's
offset (``framed``), and the offset of the partition's last record, written together.
Faust's own RocksDB store writes a value when the stage sets it, before Kafka has
it; a worker killed in between would restart with state the changelog never got (the
batch counted, its outputs never sent), and would drop the batch as already seen
when it reads it again. Here the disk never runs ahead of the changelog, so a
restart from it is the same as a restart from the changelog alone (docs/design.md, "What a SIGKILL costs").

A restart folds the copy's records in offset order, as Faust's recovery reads the
changelog's, so the copy gives the hosts' values the changelog would. (Read in key
order, a host's snapshot then its deltas by version, it did not: a host forgotten by
a worker killed between the tombstone of its snapshot and those of its deltas, and
back afresh, had a delta of its earlier incarnation whose version followed on from
its new snapshot folded onto it, where the changelog has that delta before the
snapshot and ``fold`` leaves it out.)

The copy takes a partition's records only while their offsets follow on from its
own: the worker's records, one after the other. A record it did not write in
between (another worker's: one that lost the partition in a rebalance but still
ran, which Kafka does not fence off) is missing from the copy, and an offset past it
would hide that; the worker drops the partition's copy there and takes no more of
it, so its next start reads that changelog partition from the start, as it holds.
(Faust's producer is not idempotent, so a send Kafka took twice, its first
acknowledgement lost, looks the same: rare, and it costs only that full read.)
Nor is a copy kept whose last offset its changelog partition no longer holds (the
topic made again, or truncated): it is dropped when the partition is assigned.

The state stays in memory because the stages change each host's value in place,
in the stream and in their window timers (processors/stages.py).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import faust
from faust.serializers import codecs
from faust.stores import STORES, memory
from faust.types import TP, EventT
from prometheus_client import Counter
from rocksdict import AccessType, Options, Rdict, WriteBatch

from ktel.logs import Once
from ktel.wire.codec import Unreadable
from processors.changelog import fold
from processors.stop import end

log = logging.getLogger("ktel.process")

REFUSED = Counter(
    "ktel_processor_changelog_records_refused",
    "changelog records (or their on-disk copies) recovery left out: a key or record of another "
    "shape than ktel writes, or a snapshot the stages could not use (its host then starts afresh)",
    ["stage"],
)
# Records left out, logged each once, and no more than Once's bound: a writer of a
# changelog may write ever new ones.
_warned = Once()

MEMORY_URL = "ktel-memory://"
STORES.aliases["ktel-memory"] = f"{__name__}:FoldingStore"
URL = "ktel-rocksdict://"
STORES.aliases["ktel-rocksdict"] = f"{__name__}:DiskBackedStore"


class _TableJson(codecs.json):
    """Faust's JSON codec, but a changelog key or value that is not JSON (a writer's
    garbage, or the stand-in of a batch not expanded: ktel/kafka_batches.py) is given as
    it came instead of raising. Faust's recovery logs a record it cannot decode and never
    takes its offset, so one last on its partition kept recovery waiting for it for good;
    given as it came, it reaches the store, whose ``fold`` leaves it out and counts it.
    So is a map naming a Faust model (``__faust``), which ktel never writes: Faust would
    try to make the model, and raise."""

    def _loads(self, s: bytes) -> Any:
        try:
            obj = super()._loads(s)
        except (ValueError, RecursionError):  # (not JSON, not UTF-8; nested too deep)
            return s
        return s if isinstance(obj, dict) and "__faust" in obj else obj


TABLE_CODEC = "ktel-json"
codecs.register(TABLE_CODEC, _TableJson())


class HostTable(faust.Table):
    """The stages' table (processors/stages.py): Faust's, with its changelog's keys and
    values (JSON, Faust's default for them) decoded by TABLE_CODEC."""

    def _serializer_from_type(self, typ: Any) -> Any:
        serializer = super()._serializer_from_type(typ)
        return TABLE_CODEC if serializer == "json" else serializer


# The offset of the copy's last record (never a table key: the copy takes only keys
# that are JSON, ``DiskBackedStore.apply_changelog_batch``). Its key
# is not the one of an older ktel's copies, whose values were bare (BARE_OFFSET_KEY):
# an older ktel finds no offset in a copy of framed values, and reads the changelog
# from its start; a copy holding BARE_OFFSET_KEY is dropped (``_drop_if_untrusted``).
OFFSET_KEY = b"\x00ktel:changelog-offset:framed"
BARE_OFFSET_KEY = b"\x00ktel:changelog-offset"
WRITTEN_KEY = b"\x00ktel:written-at"  # when the copy's last record was written (s since the epoch)
# A copy older than this is dropped and the partition read from the changelog's start:
# the changelog's tombstones (a host forgotten) stay readable for its topic's
# delete.retention.ms, Kafka's default 24 h, and a copy that missed one would bring
# the host back, with deltas of its old incarnation that a new one could match.
MAX_COPY_AGE_S = 20 * 3600
# How long acknowledged changelog records wait to be copied, gathered (DiskBackedStore).
ACKED_WRITE_S = 0.2


def _age(written: bytes | None) -> float | None:
    """Seconds since a copy's WRITTEN_KEY, or None: missing, or not a time (damaged)."""
    try:
        return None if written is None else time.time() - float(written)
    except ValueError:
        return None


def framed(offset: int, value: bytes) -> bytes:
    """What the copy holds of a changelog record's value: its offset (8 bytes, big-endian),
    then the value as Kafka has it."""
    return offset.to_bytes(8, "big") + value


def unframed(stored: bytes) -> tuple[int, bytes]:
    """A record's offset and value from what the copy holds of it (``framed``)."""
    return int.from_bytes(stored[:8], "big"), stored[8:]


def _decoded(decode: Callable[[bytes], Any], data: bytes) -> Any:
    try:
        return decode(data)
    except Exception:  # (Faust's codecs raise what their decoder does)
        return data


class FoldingStore(memory.Store):
    """(The table's ``options``: ``{"stage": <its stage>}``, for the stage's self-metrics.)"""

    def apply_changelog_batch(
        self, batch: Iterable[EventT], to_key: Callable[[Any], Any], to_value: Callable[[Any], Any]
    ) -> None:
        for event in batch:
            message = event.message
            if type(message.value) is Unreadable:  # (keyed None: no host to name)
                self._left_out(None, message.value.reason, message.partition)
                continue
            value = None if message.value is None else to_value(event.value)
            self._fold(to_key(event.key), value, message.partition)

    def _left_out(self, host_id: Any, why: str, partition: int) -> None:
        REFUSED.labels((self.options or {}).get("stage", "")).inc()
        if _warned(why):
            log.warning(
                "changelog partition %d: a record of host %.60r left out of recovery (counted in "
                "ktel_processor_changelog_records_refused_total): %s",
                partition,
                host_id,
                why,
            )

    def _fold(self, key: Any, value: Any, partition: int) -> None:
        """Fold one record of changelog partition ``partition`` into the hosts' values: one
        that ``fold`` leaves out is counted and logged, and recovery goes on (Faust's, which
        an exception stops for good, as the load of the on-disk copy)."""
        try:
            host_id, why = fold(self.data, key, value)
        except Exception as err:  # (one raised here would stop Faust's recovery for good)
            host_id, why = None, f"fold failed on it ({type(err).__name__}: {err})"
        if why is not None:
            self._left_out(host_id, why, partition)
        if host_id is None:
            return
        if host_id in self.data:
            self._key_partition[host_id] = partition
        else:
            self._key_partition.pop(host_id, None)


class DiskBackedStore(FoldingStore):
    def __post_init__(self) -> None:
        super().__post_init__()
        self._dbs: dict[int, Rdict] = {}
        # Per partition, the records Kafka acknowledged that the copy has yet to take,
        # and the offset of the last (see ``acknowledged``).
        self._acked: dict[int, tuple[WriteBatch, int]] = {}
        # Per partition, the offset of the last record the copy holds or has queued
        # (none known: the next is taken as it comes); and the partitions whose copy was
        # dropped at a record missing from it, until they are assigned again.
        self._copied: dict[int, int] = {}
        self._dropped: set[int] = set()

    # ------------------------------------------------------------ the disk copy

    def _path(self, partition: int) -> Path:
        return Path(self.app.conf.tabledir) / f"{self.table_name}-{partition}.rdict"

    def _db(self, partition: int) -> Rdict:
        db = self._dbs.get(partition)
        if db is None:
            path = self._path(partition)
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self._removed(partition), ignore_errors=True)  # (a kill's leftover)
            # Raw: keys and values are the changelog's bytes, as Kafka has them.
            db = self._dbs[partition] = Rdict(
                str(path), Options(raw_mode=True), access_type=AccessType.read_write()
            )
        return db

    def _load(self, partition: int) -> None:
        """Put a partition's copy into memory, before Faust reads the changelog's tail: its
        records folded in offset order, as Faust's recovery reads them from the changelog."""
        self._drop_if_untrusted(partition)
        self._dropped.discard(partition)
        self._copied.pop(partition, None)
        offset = self._db(partition).get(OFFSET_KEY)
        if offset is not None:
            self._copied[partition] = int(offset)
        records = [
            (*unframed(stored), key)
            for key, stored in self._db(partition).items()
            if key not in (OFFSET_KEY, WRITTEN_KEY)
        ]
        records.sort(reverse=True)
        while records:  # (popped as folded: the raw values go as the hosts' values come)
            _, value, key = records.pop()
            # (raw mode: bytes; one that does not decode stays bytes, which fold leaves out)
            k, v = _decoded(self._decode_key, key), _decoded(self._decode_value, value)  # type: ignore[arg-type]
            self._fold(k, v, partition)

    def _drop_if_untrusted(self, partition: int) -> None:
        """Drop the partition's copy if its last record was written too long ago
        (``MAX_COPY_AGE_S``, ``_write``), or when is unknown (damaged), or if an older
        ktel wrote any of it (its values bare, their offsets unknown: ``BARE_OFFSET_KEY``):
        recovery then reads all of the changelog."""
        db = self._db(partition)
        if db.get(BARE_OFFSET_KEY) is not None:
            why = "one an older ktel wrote, its records without their offsets"
        elif db.get(OFFSET_KEY) is None:
            return  # empty
        elif (age := _age(db.get(WRITTEN_KEY))) is not None and age <= MAX_COPY_AGE_S:
            return
        else:
            why = "of unknown age" if age is None else f"{age / 3600:.1f} h old"
        log.info(
            "table copy %s is %s: reading changelog partition %d from its start instead",
            self._path(partition),
            why,
            partition,
        )
        self._remove(partition)

    def _removed(self, partition: int) -> Path:
        """Where a partition's copy is being deleted (``_remove``)."""
        return self._path(partition).with_name(f"{self._path(partition).name}.removed")

    def _remove(self, partition: int) -> None:
        """Delete the partition's copy. Renamed first, which is atomic: a worker killed
        midway through deleting its files left a directory RocksDB refuses to open (its
        CURRENT file gone, or the MANIFEST it names, and the rest there), and failed on it
        at every start. What a kill leaves of the renamed one goes at the next open."""
        self._close(partition)
        removed = self._removed(partition)
        shutil.rmtree(removed, ignore_errors=True)
        try:
            self._path(partition).rename(removed)
        except FileNotFoundError:
            return
        shutil.rmtree(removed, ignore_errors=True)

    def _close(self, partition: int) -> None:
        db = self._dbs.pop(partition, None)
        if db is not None:
            db.close()

    def acknowledged(self, key: bytes, value: bytes | None) -> Callable[[Any], None]:
        """What a changelog send calls with the record's metadata once Kafka has it:
        queues the record for the copy, which takes what was queued every
        ``ACKED_WRITE_S``, in one write per partition. A write per record cost the worker
        about 30 µs a record at 10,000 hosts, and one per produce request as much: on a
        worker that keeps up, aiokafka sends each record or two on its own request
        (bench/RESULTS.md). A worker killed before the write restarts from the copy's
        older offset and reads the rest from the changelog."""

        def copy(meta: Any) -> None:
            partition, offset = meta.topic_partition.partition, meta.offset
            if partition in self._dropped or partition not in self._dbs:
                # (Not in _dbs: revoked since the send, its copy closed and its last
                # offset forgotten. Another worker may have written it since, which a
                # copy taking this record would hide: the copy stays at its offset, and
                # the next load reads the rest from the changelog.)
                return
            last = self._copied.get(partition)
            if last is not None and offset != last + 1:
                self._drop(partition, last, offset)
                return
            self._copied[partition] = offset
            if not self._acked:
                asyncio.get_running_loop().call_later(ACKED_WRITE_S, self._write_acked)
            batch = self._acked[partition][0] if partition in self._acked else WriteBatch(raw_mode=True)
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, framed(offset, value))
            self._acked[partition] = (batch, offset)  # (a partition's acks come in offset order)

        return copy

    def _drop(self, partition: int, last: int, offset: int) -> None:
        """The worker's record at ``offset`` follows the copy's ``last``: the records
        between are another writer's, and not in the copy. Drop it (the worker's state
        in memory stays as it is)."""
        log.warning(
            "changelog partition %d: this worker's record is at offset %d, its last before at "
            "%d: another worker wrote in between (one that lost the partition but still ran?), or "
            "Kafka took a send twice. Its on-disk copy %s is dropped: the next start reads the "
            "partition from the start",
            partition,
            offset,
            last,
            self._path(partition),
        )
        # Until the partition is assigned anew, when Faust reads it from the start.
        self._dropped.add(partition)
        self._acked.pop(partition, None)
        self._copied.pop(partition, None)
        self._remove(partition)

    def _write_acked(self) -> None:
        acked, self._acked = self._acked, {}
        for partition, (batch, offset) in acked.items():
            self._write(partition, batch, offset)

    def _write(self, partition: int, batch: WriteBatch, offset: int, written: float | None = None) -> None:
        """Write ``batch``, the partition's records up to ``offset``, to its copy, with
        that offset, and when the record at ``offset`` was written (None: now, a record
        this worker wrote; never later than now).

        Not when it was copied: a copy recovery left midway (the worker killed, or the
        partition revoked, while it read the changelog's tail) holds the records up to
        where it read, and misses the tombstones after them, as old as those records.
        Taken as new, a copy a worker restarting in recovery for a day kept writing was
        never too old, and once Kafka had compacted those tombstones away it brought
        back the hosts they forgot."""
        now = time.time()
        batch.put(OFFSET_KEY, str(offset).encode())
        batch.put(WRITTEN_KEY, str(now if written is None else min(now, written)).encode())
        try:
            self._db(partition).write(batch)
        except Exception as err:  # (rocksdict raises RocksDB's errors as plain Exception)
            # Going on would leave a hole: these records missing, and the next write's
            # offset past them. A restart reads the copy as it was and the changelog's
            # tail from there. (Raised in Faust's recovery, it would stop that for good:
            # FoldingStore._fold.)
            end(
                f"ktel process: stopping: the on-disk copy of changelog partition {partition} "
                f"could not be written ({type(err).__name__}: {err}); restart the worker (its "
                "supervisor does): it reads the changelog from the copy's last complete offset"
            )

    # ---------------------------------------------------------- Faust's store API

    def persisted_offset(self, tp: TP) -> int | None:
        if tp.partition in self._dropped:
            return None
        raw = self._db(tp.partition).get(OFFSET_KEY)
        return int(raw) if raw is not None else None

    def apply_changelog_batch(
        self, batch: Iterable[EventT], to_key: Callable[[Any], Any], to_value: Callable[[Any], Any]
    ) -> None:
        events = list(batch)
        super().apply_changelog_batch(events, to_key, to_value)
        writes: dict[int, WriteBatch] = {}
        last: dict[int, int] = {}
        # When the last record of each partition was written (Kafka's timestamp, in s):
        # what the copy's age is counted from (``_write``).
        written: dict[int, float] = {}
        for event in events:
            msg = event.message
            if msg.partition in self._dropped:
                # Kept through a rebalance, Faust reads it again from where it last did:
                # written, those records would be a copy with a hole before them.
                continue
            wb = writes.setdefault(msg.partition, WriteBatch(raw_mode=True))
            # (A key that is not JSON, or none: ktel writes neither, and fold left it out
            # above; the copy takes only its offset, never a key of its own.)
            if msg.key is not None and not isinstance(event.key, bytes):
                if msg.value is None:
                    wb.delete(msg.key)
                else:
                    wb.put(msg.key, framed(msg.offset, msg.value))
            if msg.offset > last.get(msg.partition, -1):
                # (one without a time, as at the epoch: the copy is dropped at its next load)
                last[msg.partition], written[msg.partition] = msg.offset, msg.timestamp or 0.0
        for partition, wb in writes.items():
            self._copied[partition] = last[partition]
            self._write(partition, wb, last[partition], written[partition])

    async def on_rebalance(
        self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP], generation_id: int = 0
    ) -> None:
        mine = self.table.changelog_topic.topics
        self._write_acked()
        for tp in revoked:
            if tp.topic in mine:
                self._close(tp.partition)
                self._copied.pop(tp.partition, None)
        loading = [tp for tp in newly_assigned if tp.topic in mine]
        if loading:
            await self._drop_if_ahead(loading)
        for tp in loading:
            self._load(tp.partition)

    async def _drop_if_ahead(self, tps: list[TP]) -> None:
        """Drop the copy of each partition whose changelog ends before the copy's last
        record: the topic was deleted and made again, or a broker that became leader
        without the last records (unclean leader election) truncated it. Faust would stop
        on it (ConsistencyError) at every start until the copy was deleted by hand; the
        changelog is what Kafka holds, so the partition is read from its start instead,
        and its hosts have what the changelog still has of them."""
        try:
            ends = await self.app.consumer.highwaters(*tps)
        except Exception as err:  # (Faust's recovery asks the same next, and says why)
            log.warning(
                "changelog end offsets not read (%s: %s): the on-disk copies are not checked "
                "against them, and one ahead of its changelog stops recovery (ConsistencyError)",
                type(err).__name__,
                err,
            )
            return
        for tp in tps:
            offset, end = self._db(tp.partition).get(OFFSET_KEY), ends.get(tp)
            if offset is None or end is None or int(offset) < end:
                continue
            log.warning(
                "table copy %s holds changelog partition %d up to offset %d, but the changelog "
                "holds only offsets below %d (the topic was made again, or a broker that became "
                "leader without its last records truncated it): the copy is dropped and the "
                "partition read from its start",
                self._path(tp.partition),
                tp.partition,
                int(offset),
                end,
            )
            self._remove(tp.partition)

    async def stop(self) -> None:
        self._write_acked()
        for partition in list(self._dbs):
            self._close(partition)
        await super().stop()

    def reset_state(self) -> None:
        self._acked.clear()
        self._copied.clear()
        for partition in list(self._dbs):
            self._close(partition)
        shutil.rmtree(Path(self.app.conf.tabledir), ignore_errors=True)
