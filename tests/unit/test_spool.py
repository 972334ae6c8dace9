import contextlib
import errno
import logging
import os
import stat
import struct
import types
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edge_agent import spool as spool_mod
from edge_agent.spool import FILES_BYTES, HEADER, IN_FLIGHT_FILE, MAGIC, SegmentUnreadable, Spool
from ktel import config
from ktel.config import SPOOL_OVERHEAD_BYTES


def payload(i: int, size: int = 100) -> bytes:
    return (f"batch-{i:06d}-".encode() * size)[:size]


def read_all(spool: Spool) -> list[bytes]:
    out, cur = [], spool.ack_cursor
    while recs := spool.read(cur, limit=7):
        out += [r.payload for r in recs]
        cur = recs[-1].next
    return out


def read_back(directory: Path, **opts) -> list[bytes]:
    """The batches a restart finds in ``directory``: a spool opened there, read, closed."""
    with contextlib.closing(Spool(directory, **opts)) as sp:
        return read_all(sp)


def dir_bytes(directory: Path) -> int:
    """What a spool's directory holds: the sizes of its files (``du --apparent-size``)."""
    return sum(p.stat().st_size for p in directory.iterdir())


def killed(spool: Spool) -> None:
    """What a SIGKILL leaves of ``spool``: its files closed by the kernel, nothing more
    written (close() writes the cursor and syncs)."""
    for f in (spool._wfile, spool._rfile[1] if spool._rfile else None):
        if f is not None:
            f.close()  # type: ignore[attr-defined]
    spool._close_ack()


def test_records_come_back_in_order_across_segments_and_reopen(tmp_path):
    sp = Spool(tmp_path, segment_bytes=1000)
    for i in range(50):
        assert sp.append(payload(i), n_events=3)
    assert read_all(sp) == [payload(i) for i in range(50)]
    assert len(list(tmp_path.glob("*.seg"))) > 5
    sp.close()
    # A restart reads the same backlog.
    assert read_back(tmp_path, segment_bytes=1000) == [payload(i) for i in range(50)]


def test_ack_deletes_segments_and_survives_restart(tmp_path):
    sp = Spool(tmp_path, segment_bytes=1000)
    for i in range(30):
        sp.append(payload(i), 1)
    recs = []
    cur = sp.ack_cursor
    while batch := sp.read(cur):
        recs += batch
        cur = batch[-1].next
    before = len(list(tmp_path.glob("*.seg")))
    sp.ack(recs[19].next)
    assert len(list(tmp_path.glob("*.seg"))) < before
    sp.close()
    again = Spool(tmp_path, segment_bytes=1000)
    assert read_all(again) == [payload(i) for i in range(20, 30)]
    # New appends come after the backlog.
    again.append(payload(99), 1)
    assert read_all(again)[-1] == payload(99)
    again.close()


def test_a_backlog_spooled_after_the_segments_were_deleted_survives_the_next_restart(tmp_path):
    # The segments deleted under a cursor still on disk (to free space, say): the batches
    # spooled next, with the broker away, must not be taken for acknowledged at the
    # restart after, though the cursor was not written since.
    sp = Spool(tmp_path, segment_bytes=1000)
    for i in range(30):
        sp.append(payload(i), 1)
    recs = read_records(sp)
    sp.ack(recs[-1].next)
    sp.close()
    assert (tmp_path / "ack").read_text().split() != ["0", "0"]
    for seg in tmp_path.glob("*.seg"):
        seg.unlink()
    again = Spool(tmp_path, segment_bytes=1000)
    for i in range(100, 130):
        again.append(payload(i), 1)
    killed(again)  # (nothing acknowledged, nothing closed)
    assert read_back(tmp_path, segment_bytes=1000) == [payload(i) for i in range(100, 130)]


def test_a_missing_segment_is_skipped_and_logged_not_read(tmp_path, caplog):
    sp = Spool(tmp_path, segment_bytes=1000)
    for i in range(50):
        sp.append(payload(i), 1)
    sp.close()
    middle = sorted(tmp_path.glob("*.seg"))[2]
    held = {payload(i) for i in range(50) if payload(i) in middle.read_bytes()}
    middle.unlink()
    again = Spool(tmp_path, segment_bytes=1000)
    assert read_all(again) == [payload(i) for i in range(50) if payload(i) not in held]
    assert held and f"spool segments {int(middle.stem)} to {int(middle.stem)} are missing" in caplog.text
    again.close()


def test_the_ack_cursor_is_rewritten_in_place_and_read_back(tmp_path, monkeypatch):
    # A file created per acknowledgement is an event of the file_created probe: on an
    # idle host each batch acknowledged would make the next one.
    monkeypatch.setattr("edge_agent.spool.ACK_WRITE_S", 0.0)
    sp = Spool(tmp_path, segment_bytes=2000)
    for i in range(30):
        sp.append(payload(i), 1)
    recs = read_records(sp)
    sp.ack(recs[0].next)
    inode = (tmp_path / "ack").stat().st_ino
    opened: list = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a: opened.append(path) or real_open(path, *a))
    written = []
    for rec in recs[1:20]:  # across a segment: a shorter cursor after longer ones
        sp.ack(rec.next)
        written.append((tmp_path / "ack").read_text())
        assert written[-1].split() == [str(rec.next.segment), str(rec.next.offset)]
    assert any(len(a.split()[1]) > len(b.split()[1]) for a, b in zip(written, written[1:], strict=False))
    assert opened == [] and (tmp_path / "ack").stat().st_ino == inode
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".seg"] == ["ack"]
    sp.close()
    assert read_back(tmp_path, segment_bytes=2000) == [payload(i) for i in range(20, 30)]
    # An ack file of the earlier format ("<segment> <offset>\n", renamed into place) is read.
    (tmp_path / "ack").write_text(f"{recs[24].next.segment} {recs[24].next.offset}\n")
    assert read_back(tmp_path, segment_bytes=2000) == [payload(i) for i in range(25, 30)]


def read_records(spool: Spool) -> list:
    out, cur = [], spool.ack_cursor
    while recs := spool.read(cur):
        out += recs
        cur = recs[-1].next
    return out


def test_truncated_and_corrupted_segments_keep_every_intact_record(tmp_path, caplog):
    sp = Spool(tmp_path, segment_bytes=10_000)
    for i in range(40):
        sp.append(payload(i), n_events=5)
    sp.close()
    segs = sorted(tmp_path.glob("*.seg"))
    rec = HEADER.size + 100
    # Corrupt record 3 of the first segment in its payload, and record 5 in its header.
    data = bytearray(segs[0].read_bytes())
    data[3 * rec + 40] ^= 0xFF
    data[5 * rec + 1] ^= 0xFF
    segs[0].write_bytes(bytes(data))
    # Tear the last segment's tail mid-record (a crash mid-write).
    last = segs[-1].read_bytes()
    segs[-1].write_bytes(last[: len(last) - 30])

    again = Spool(tmp_path, segment_bytes=10_000)
    got = read_all(again)
    per_seg = 10_000 // rec
    lost = {3, 5, (len(segs) - 1) * per_seg + (len(last) // rec) - 1}
    assert got == [payload(i) for i in range(40) if i not in lost]
    assert again.corrupt_bytes == 2 * rec + (rec - 30)
    assert "is damaged at byte" in caplog.text
    again.close()


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
def test_a_full_spool_takes_no_more_than_its_bound_on_disk(tmp_path, policy):
    """Acknowledged bytes too: the head of the oldest segment stays on disk until an
    acknowledgement crosses into the next segment."""
    rec = HEADER.size + 100
    bound = 32 * rec + FILES_BYTES
    sp = Spool(tmp_path, max_bytes=bound, segment_bytes=4 * rec, full_policy=policy)
    assert all(sp.append(payload(i), n_events=5) for i in range(32))  # full: 8 segments of 4
    # Kafka acknowledges all but the last batch of the oldest segment.
    sp.ack(sp.read(sp.ack_cursor, limit=3)[-1].next)
    assert (tmp_path / "ack").exists()
    for i in range(32, 48):
        sp.append(payload(i), n_events=5)
        assert dir_bytes(tmp_path) <= bound
    got = read_all(sp)
    if policy == "drop_newest":
        assert got == [payload(i) for i in range(3, 32)]
    else:  # the oldest go, the unacknowledged batch of the first segment with them
        assert got == [payload(i) for i in range(48 - len(got), 48)] and len(got) >= 28
    assert sp.dropped_batches == 48 - 3 - len(got)
    assert sp.dropped_events == 5 * sp.dropped_batches
    sp.close()
    assert dir_bytes(tmp_path) <= bound


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
def test_a_full_spool_deletes_a_segment_acknowledged_to_its_end_and_drops_nothing(tmp_path, policy):
    """A cursor at a segment's end leaves the segment on disk until the next
    acknowledgement: the bound counts it, and a full spool deletes it first."""
    rec = HEADER.size + 100
    bound = 32 * rec + FILES_BYTES
    sp = Spool(tmp_path, max_bytes=bound, segment_bytes=4 * rec, full_policy=policy)
    assert all(sp.append(payload(i), n_events=5) for i in range(32))
    sp.ack(sp.read(sp.ack_cursor, limit=4)[-1].next)  # the oldest segment, to its end
    assert len(list(tmp_path.glob("*.seg"))) == 8
    assert sp.append(payload(32), n_events=5)
    assert (sp.dropped_batches, sp.dropped_events) == (0, 0)
    assert read_all(sp) == [payload(i) for i in range(4, 33)]
    assert dir_bytes(tmp_path) <= bound
    sp.close()


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
def test_full_spool_drops_by_policy_and_counts_events(tmp_path, policy):
    rec = HEADER.size + 100
    sp = Spool(tmp_path, max_bytes=10 * rec + FILES_BYTES, segment_bytes=2 * rec, full_policy=policy)
    results = [sp.append(payload(i), n_events=7) for i in range(15)]
    got = read_all(sp)
    if policy == "drop_newest":
        assert results == [True] * 10 + [False] * 5
        assert got == [payload(i) for i in range(10)]
    else:
        assert all(results)
        assert got == [payload(i) for i in range(len(got) and 15 - len(got), 15)]
    assert sp.dropped_events == 7 * (15 - len(got))
    assert sp.dropped_batches == 15 - len(got)
    assert sp.depth_bytes() <= 10 * rec
    sp.close()


def test_batches_in_flight_when_their_segment_is_dropped_are_counted_only_if_never_acknowledged(tmp_path):
    """drop_oldest deletes the oldest segment while the publisher has read some of its
    batches and is sending them (from memory): acknowledged, they were delivered, not
    dropped; never acknowledged (the agent stopped first), they are lost, and the next
    start counts them. Each batch is delivered, counted as dropped, or still spooled: once."""
    rec = HEADER.size + 100
    opts = {"max_bytes": 16 * rec + FILES_BYTES, "segment_bytes": 2 * rec, "full_policy": "drop_oldest"}
    sp = Spool(tmp_path, **opts)
    assert all(sp.append(payload(i), n_events=7) for i in range(16))  # full: 8 segments of 2
    sent = sp.read(sp.ack_cursor, limit=3)  # batches 0 and 1 (segment 0), 2 (segment 1)
    assert sp.append(payload(16), n_events=7)  # drops segment 0: both its batches in flight
    assert (sp.dropped_batches, sp.dropped_events) == (0, 0)
    assert sp.append(payload(17), n_events=7) and sp.append(payload(18), n_events=7)
    # The second of these dropped segment 1: batch 2 in flight, batch 3 not yet sent.
    assert (sp.dropped_batches, sp.dropped_events) == (1, 7)
    assert (tmp_path / IN_FLIGHT_FILE).read_text().split() == ["3", "21"]
    assert not sp.empty()  # (what a stop waits for)
    for r in sent:  # Kafka acknowledges what was in flight
        sp.ack(r.next)
    assert (sp.dropped_batches, sp.dropped_events) == (1, 7)
    assert not (tmp_path / IN_FLIGHT_FILE).exists()
    more = sp.read(sent[-1].next, limit=2)  # batches 4 and 5 (segment 2) sent next
    assert [r.payload for r in more] == [payload(4), payload(5)]
    assert sp.append(payload(19), n_events=7) and sp.append(payload(20), n_events=7)  # drops segment 2
    assert (sp.dropped_batches, sp.dropped_events) == (1, 7)
    sp.close()  # stopped before Kafka acknowledged them: lost
    again = Spool(tmp_path, **opts)
    assert (again.dropped_batches, again.dropped_events) == (2, 14)  # counted by the next start
    assert read_all(again) == [payload(i) for i in range(6, 21)]
    again.close()
    with contextlib.closing(Spool(tmp_path, **opts)) as last:
        assert last.dropped_batches == 0  # and only by it


def test_batches_in_flight_when_their_segment_was_dropped_are_counted_after_a_sigkill(tmp_path):
    """No close: the agent was killed with batches a full spool dropped while they were
    being sent still unacknowledged. The next start counts them; one acknowledged before
    the kill is not."""
    rec = HEADER.size + 100
    opts = {"max_bytes": 4 * rec + FILES_BYTES, "segment_bytes": rec, "full_policy": "drop_oldest"}
    sp = Spool(tmp_path, **opts)
    assert all(sp.append(payload(i), n_events=3) for i in range(4))
    sent = sp.read(sp.ack_cursor, limit=2)  # batches 0 and 1, each a segment
    assert sp.append(payload(4), n_events=3) and sp.append(payload(5), n_events=3)  # drop both
    sp.ack(sent[0].next)  # batch 0 delivered, then SIGKILL
    killed(sp)
    again = Spool(tmp_path, **opts)
    assert (again.dropped_batches, again.dropped_events) == (1, 3)
    assert read_all(again) == [payload(i) for i in range(2, 6)]
    again.close()


@pytest.mark.parametrize("damage", [b"two batches\n", b"-3 21\n", b"1 " + b"9" * 100_000])
def test_a_damaged_count_of_batches_lost_in_flight_is_reported_not_counted(tmp_path, damage, caplog):
    """The file is the spool's own, but a disk or a hand can damage it: a start reports
    it, counts nothing of it, removes it, and runs."""
    (tmp_path / IN_FLIGHT_FILE).write_bytes(damage)
    sp = Spool(tmp_path)
    assert (sp.dropped_batches, sp.dropped_events) == (0, 0)
    assert "unreadable" in caplog.text and not (tmp_path / IN_FLIGHT_FILE).exists()
    assert sp.append(payload(0), n_events=1) and read_all(sp) == [payload(0)]
    sp.close()


def test_a_spool_bound_below_a_segment_still_drops_its_oldest(tmp_path):
    # spool_max_mb can be 1, below the 16 MiB segment the spool is written in.
    rec = HEADER.size + 100
    sp = Spool(tmp_path, max_bytes=40 * rec, full_policy="drop_oldest")
    assert all(sp.append(payload(i), n_events=1) for i in range(100))
    got = read_all(sp)
    assert got[-1] == payload(99) and len(got) >= 30
    assert sp.dropped_batches == 100 - len(got)
    sp.close()


def test_the_last_records_before_a_quiet_spell_are_synced_on_the_interval(tmp_path, monkeypatch):
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    now = [1000.0]  # (the spool's clock, moved by the test: a pause of the test's own does not count)
    monkeypatch.setattr(spool_mod, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    sp = Spool(tmp_path, fsync="interval", fsync_interval=0.05)
    sp.append(payload(0), 1)  # within the interval of the start: not synced yet
    sp.sync_due()
    assert synced == []
    now[0] += 0.06
    sp.sync_due()  # no record since, but one unsynced: synced now
    sp.sync_due()
    assert len(synced) == 1
    never = Spool(tmp_path / "never", fsync="never", fsync_interval=0.0)
    never.append(payload(1), 1)
    never.sync_due()
    assert len(synced) == 1
    sp.close()
    never.close()


def test_spool_files_are_private_even_if_they_were_not(tmp_path):
    d = tmp_path / "spool"
    sp = Spool(d)
    sp.append(b"x" * 10, 1)
    sp.close()
    os.chmod(d, 0o755)
    for p in d.iterdir():
        os.chmod(p, 0o644)
    sp = Spool(d, segment_bytes=64)
    for _ in range(4):  # new segments too
        sp.append(b"y" * 40, 1)
    sp.ack(sp.end)
    sp.close()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()}
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert "ack" in modes and set(modes.values()) == {0o600}, modes


def test_a_refused_write_leaves_no_partial_record_and_the_spool_goes_on(tmp_path, monkeypatch):
    sp = Spool(tmp_path / "spool", fsync="always")
    assert sp.append(b"first", 1)
    real_fsync = os.fsync

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        sp.append(b"lost" * 100, 4)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert sp.append(b"second", 2)
    assert [(r.payload, r.n_events) for r in sp.read(sp.ack_cursor)] == [(b"first", 1), (b"second", 2)]
    sp.close()
    again = Spool(tmp_path / "spool")  # and on disk, as a restart reads it
    assert [(r.payload, r.n_events) for r in again.read(again.ack_cursor)] == [(b"first", 1), (b"second", 2)]
    assert sp.corrupt_bytes == again.corrupt_bytes == 0
    again.close()


@pytest.mark.parametrize("first_start", [False, True])
def test_a_full_disk_at_start_refuses_batches_until_space_returns(tmp_path, monkeypatch, first_start):
    """No space for the first segment (nor, at a first start, for the spool directory):
    the spool starts all the same, sends the backlog it has, refuses each batch as a
    disk filling while it runs does (append raises; the agent counts the batch), and
    takes batches again once space returns."""
    d = tmp_path / "spool"
    backlog = [] if first_start else [payload(i) for i in range(3)]
    if backlog:
        sp = Spool(d)
        for p in backlog:
            sp.append(p, 1)
        sp.close()

    def no_space(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    real_open, real_mkdir = os.open, os.mkdir
    monkeypatch.setattr(
        os, "mkdir", lambda path, *a: (real_mkdir if os.path.isdir(path) else no_space)(path, *a)
    )
    monkeypatch.setattr(
        os, "open", lambda path, flags, *a: (no_space if flags & os.O_CREAT else real_open)(path, flags, *a)
    )
    sp = Spool(d)
    assert read_all(sp) == backlog
    for _ in range(2):
        with pytest.raises(OSError):
            sp.append(b"lost", 1)
    monkeypatch.undo()
    assert sp.append(b"kept", 1)
    assert read_all(sp) == [*backlog, b"kept"]
    sp.close()
    assert read_back(d) == [*backlog, b"kept"]


def test_records_appended_by_this_process_are_read_back_from_memory(tmp_path):
    sp = Spool(tmp_path, segment_bytes=1000)
    for i in range(20):  # three segments
        sp.append(payload(i), 1)
    for seg in tmp_path.glob("*.seg"):  # what is on disk is not read again by this process
        seg.write_bytes(b"\0" * seg.stat().st_size)
    assert read_all(sp) == [payload(i) for i in range(20)]
    assert sp.corrupt_bytes == 0
    sp.close()
    assert read_back(tmp_path, segment_bytes=1000) == []  # (the zeros are all a restart finds)


APPEND = st.tuples(st.just("append"), st.integers(1, 400))
OPS = st.lists(  # appends three times as often as the rest: the spool fills, and drops
    st.one_of(APPEND, APPEND, APPEND, st.tuples(st.just("read"), st.integers(1, 5)), st.just(("ack", 0))),
    min_size=10,
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(ops=[("append", 300)] * 20, recent=5000, policy="drop_oldest")  # drops what memory holds
@given(
    ops=OPS,
    recent=st.sampled_from([1, 300, 1000, 5000]),
    policy=st.sampled_from(["drop_newest", "drop_oldest"]),
)
def test_what_memory_serves_is_what_the_disk_holds(tmp_path_factory, ops, recent, policy):
    """Any appends, reads and acknowledgements give the same records, cursors and drops
    with the tail in memory (bounds small enough to overflow) as from disk alone."""
    runs = []
    for memory in (recent, 0):
        sp = Spool(
            tmp_path_factory.mktemp("spool"),
            max_bytes=2000,
            segment_bytes=700,
            full_policy=policy,
            recent_max_bytes=memory,
        )
        seen, cur = [], sp.ack_cursor
        for i, (op, arg) in enumerate(ops):
            if op == "append":
                seen.append(sp.append(payload(i, arg), arg % 7))
            elif op == "read":
                recs = sp.read(cur, limit=arg)
                seen += [(r.start, r.next, r.n_events, r.payload) for r in recs]
                cur = recs[-1].next if recs else cur
            else:
                sp.ack(cur)
            # Memory holds no more than its bound, and nothing acknowledged or dropped.
            assert sp._recent_bytes <= memory
            assert all(r.start >= sp.ack_cursor for r in sp._recent)
        seen.append((sp.dropped_events, sp.dropped_batches, sp.corrupt_bytes, sp.ack_cursor))
        sp.close()
        runs.append(seen)
    assert runs[0] == runs[1]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(  # a drop of the segment of a batch in flight, then its acknowledgement
    ops=[("append", 1)] * 4
    + [("append", 249)]
    + [("append", 400)] * 3
    + [("read", 1), ("append", 287), ("ack", 0)],
    policy="drop_oldest",
)
@given(ops=OPS, policy=st.sampled_from(["drop_newest", "drop_oldest"]))
def test_every_batch_is_delivered_counted_as_dropped_or_still_spooled_once(tmp_path_factory, ops, policy):
    """A publisher's reads, sends and acknowledgements against a spool that fills and
    drops: after a stop, each batch appended was acknowledged, counted as dropped, or is
    in the spool for the next start, and only one of these."""
    d = tmp_path_factory.mktemp("spool")
    sp = Spool(d, max_bytes=2000, segment_bytes=700, full_policy=policy)
    events = {}  # payload: events, of every batch appended
    sent, delivered, cur = [], [], sp.ack_cursor
    for i, (op, arg) in enumerate(ops):
        if op == "append":
            events[payload(i, 13 + arg)] = 1 + i % 5  # (its number in every payload)
            sp.append(payload(i, 13 + arg), 1 + i % 5)
        elif op == "read":
            recs = sp.read(cur, limit=arg)
            sent += [r.payload for r in recs]
            cur = recs[-1].next if recs else cur
        else:  # everything sent is acknowledged, in order
            sp.ack(cur)
            delivered, sent = delivered + sent, []
        assert dir_bytes(d) <= 2000
    sp.close()
    nxt = Spool(d, max_bytes=2000, segment_bytes=700)  # (it counts what the stop left in flight)
    kept = read_all(nxt)
    nxt.close()
    assert not set(delivered) & set(kept) and len(set(delivered)) == len(delivered)
    assert len(delivered) + sp.dropped_batches + nxt.dropped_batches + len(kept) == len(events)
    dropped = sp.dropped_events + nxt.dropped_events
    assert sum(events[p] for p in delivered + kept) + dropped == sum(events.values())


def test_a_spool_written_before_zlib_ng_is_read_the_same(tmp_path):
    """The spool's checksum is zlib's CRC-32 (now computed by zlib-ng): a record an older
    agent wrote, checksummed with zlib, is read back after an upgrade, and a record with
    a wrong checksum is not."""

    def record(body: bytes, n_events: int, crc_of=lambda b: b) -> bytes:
        crc = zlib.crc32(crc_of(body), zlib.crc32(struct.pack("<II", len(body), n_events)))
        return HEADER.pack(MAGIC, len(body), n_events, crc) + body

    good, bad = payload(1, 5000), payload(2, 5000)
    (tmp_path / f"{0:016d}.seg").write_bytes(record(good, 3) + record(bad, 4, crc_of=lambda b: b + b"x"))
    sp = Spool(tmp_path)
    assert read_all(sp) == [good] and sp.corrupt_bytes > 0
    sp.close()


def test_a_segment_that_cannot_be_deleted_stops_nothing_and_is_deleted_later(tmp_path, monkeypatch, caplog):
    """A read-only or failing disk refuses an acknowledged segment's unlink: publishing
    goes on, a full spool's drop is counted once, and the segment goes once it can."""
    rec = HEADER.size + 100
    sp = Spool(tmp_path, max_bytes=10 * rec + FILES_BYTES, segment_bytes=2 * rec, full_policy="drop_oldest")
    real_unlink = Path.unlink
    refusing = True

    def unlink(self, *args, **kwargs):
        if refusing and self.suffix == ".seg":
            raise OSError(30, "Read-only file system")
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    assert all(sp.append(payload(i), n_events=7) for i in range(15))  # drops its oldest on the way
    got = read_all(sp)
    assert got == [payload(i) for i in range(15 - len(got), 15)]
    assert (sp.dropped_batches, sp.dropped_events) == (15 - len(got), 7 * (15 - len(got)))  # once each
    recs = read_records(sp)
    sp.ack(recs[-2].next)  # across segments: their unlinks fail too
    assert "cannot be deleted (Read-only file system): trying again later" in caplog.text
    assert len(list(tmp_path.glob("*.seg"))) > 2
    refusing = False
    sp.append(payload(99), n_events=1)
    sp.ack(read_records(sp)[-1].next)
    assert read_all(sp) == []
    assert len(list(tmp_path.glob("*.seg"))) == 1  # only the segment being written
    sp.close()


def test_dropping_the_oldest_segment_moves_on_to_the_next_one_there_is(tmp_path):
    """A segment removed by hand behind the oldest: the drop does not point the spool at
    it (every read and append then failed on the missing file)."""
    rec = HEADER.size + 100
    sp = Spool(tmp_path, max_bytes=10 * rec + FILES_BYTES, segment_bytes=2 * rec, full_policy="drop_oldest")
    for i in range(8):
        sp.append(payload(i), n_events=1)
    sp.close()
    segs = sorted(tmp_path.glob("*.seg"))
    segs[1].unlink()
    again = Spool(
        tmp_path, max_bytes=10 * rec + FILES_BYTES, segment_bytes=2 * rec, full_policy="drop_oldest"
    )
    assert all(again.append(payload(i), n_events=1) for i in range(100, 110))
    got = read_all(again)
    assert got[-10:] == [payload(i) for i in range(100, 110)]
    again.close()


@pytest.mark.parametrize("cursor", ["999999 0", "{first} 999999", "{first} -5", "{first} {mid}"])
def test_an_ack_cursor_that_does_not_fit_the_segments_deletes_nothing(tmp_path, caplog, cursor):
    """Damage or a hand's edit: a cursor past every segment, or past its segment's end,
    taken as it is would delete the unacknowledged backlog at start; a negative one
    failed every read, one inside a record lost that record. Everything is
    sent again instead (the processors drop what they had by sequence number)."""
    sp = Spool(tmp_path, segment_bytes=1000)
    for i in range(30):
        sp.append(payload(i), 1)
    sp.ack(read_records(sp)[4].next)
    mid = read_records(sp)[0].start.offset + 7  # inside the first unacknowledged record
    sp.close()
    first = int(sorted(tmp_path.glob("*.seg"))[0].stem)
    (tmp_path / "ack").write_text(cursor.format(first=first, mid=mid).ljust(47) + "\n")
    again = Spool(tmp_path, segment_bytes=1000)
    got = read_all(again)
    assert got[-25:] == [payload(i) for i in range(5, 30)]  # (and what came before it in its segment)
    assert "does not fit the segments" in caplog.text
    again.close()


@pytest.mark.parametrize("cursor", ["{gap} 0", "{gap} 116", "{after} 116"])
def test_an_ack_cursor_into_a_segment_that_is_not_there_deletes_nothing(tmp_path, caplog, cursor):
    """The spool's cursor is in a segment on disk, or before them all (deleted under
    it), or at the start of the next one to write: one into a segment missing between
    two on disk, or into one past the last, would delete the backlog before it."""
    sp = Spool(tmp_path, segment_bytes=1000)  # 8 batches a segment
    for i in range(30):
        sp.append(payload(i), 1)
    sp.ack(read_records(sp)[4].next)
    sp.close()
    segs = sorted(tmp_path.glob("*.seg"))
    assert len(segs) == 4
    segs[2].unlink()  # removed by hand: batches 16 to 23
    at = cursor.format(gap=int(segs[2].stem), after=int(segs[-1].stem) + 1)
    (tmp_path / "ack").write_text(at.ljust(47) + "\n")
    again = Spool(tmp_path, segment_bytes=1000)
    assert read_all(again) == [payload(i) for i in [*range(16), *range(24, 30)]]
    assert "does not fit the segments" in caplog.text
    again.close()


@pytest.mark.parametrize("which", [0, 1])
def test_a_segment_removed_while_running_is_skipped_by_reads_and_drops(tmp_path, caplog, which):
    """Removed by hand under a running agent (the oldest, or one after it): reads from
    disk and a full spool's drops move on to the next segment (every one failed on it)."""
    rec = HEADER.size + 100
    sp = Spool(
        tmp_path,
        max_bytes=10 * rec + FILES_BYTES,
        segment_bytes=2 * rec,
        full_policy="drop_oldest",
        recent_max_bytes=0,
    )
    for i in range(8):
        sp.append(payload(i), n_events=1)
    gone = sorted(tmp_path.glob("*.seg"))[which]
    gone.unlink()
    held = [i for i in range(8) if i != which]  # a batch a segment (the bound's eighth)
    assert read_all(sp) == [payload(i) for i in held]
    assert f"spool segment {gone} is missing: its batches are lost" in caplog.text
    assert all(sp.append(payload(i), n_events=1) for i in range(100, 110))
    got = read_all(sp)
    assert got[-10:] == [payload(i) for i in range(100, 110)]
    assert set(got[:-10]) <= {payload(i) for i in held}
    assert caplog.text.count("is missing") == 1  # once, however often it is passed
    sp.close()


def test_a_read_that_finds_the_segment_being_written_gone_leaves_the_next_read_working(tmp_path, caplog):
    """The spool's directory removed under a running agent whose publisher reads a backlog
    from disk: the read that found the segment being written gone had closed the one
    before, and handed that closed file to the next read (ValueError: the publisher, and
    the agent with it, stopped)."""
    rec = HEADER.size + 100
    sp = Spool(tmp_path, segment_bytes=2 * rec, recent_max_bytes=0)  # (every read from disk)
    for i in range(5):  # two full segments, and the one being written
        sp.append(payload(i), n_events=1)
    written = sorted(tmp_path.glob("*.seg"))[-1]
    written.unlink()
    assert read_all(sp) == [payload(i) for i in range(4)]
    assert f"spool segment {written} is missing" in caplog.text
    sp.close()


def test_a_stop_whose_last_sync_fails_still_closes_every_file(tmp_path, monkeypatch):
    """A failing disk refuses the stop's fsync: the failure is raised, and the segment
    being written, the one being read and the cursor's file are closed all the same."""
    before = sorted(os.listdir("/proc/self/fd"))
    sp = Spool(tmp_path, segment_bytes=1000, recent_max_bytes=0)  # (read from disk: a file open)
    for i in range(20):
        sp.append(payload(i), n_events=1)
    sp.ack(read_records(sp)[3].next)  # (the cursor's file open)

    def failing(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError):
        sp.close()
    assert sorted(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
def test_a_spool_bound_below_two_batches_takes_the_next_once_the_last_is_acknowledged(tmp_path, policy):
    """A batch larger than a segment fills the segment being written alone; once Kafka
    has it, that segment holds nothing to deliver and the next batch takes its place
    (agent.spool_max_mb 1 with batches of agent.batch_max_bytes' default, 1 MiB)."""
    big = 600
    rec = HEADER.size + big
    sp = Spool(tmp_path, max_bytes=rec + rec // 2 + FILES_BYTES, full_policy=policy)
    for i in range(4):
        assert sp.append(payload(i, big), n_events=5)
        [got] = sp.read(sp.ack_cursor, limit=1)
        assert got.payload == payload(i, big)
        sp.ack(got.next)
        assert dir_bytes(tmp_path) <= sp.max_bytes
    assert (sp.dropped_batches, sp.dropped_events) == (0, 0)
    sp.close()
    assert read_back(tmp_path) == []


def test_a_spool_takes_a_batch_of_the_most_the_config_lets_it_be(tmp_path):
    """agent.spool_max_mb is held to hold a batch of agent.batch_max_bytes, spooled uncompressed
    (ktel/config.py counts what the spool takes besides it): a spool that could not would drop
    every such batch, however empty."""
    agent = config.AgentConfig(
        host_id="h", compression="none", spool_max_mb=1, batch_max_bytes=(1 << 20) - SPOOL_OVERHEAD_BYTES
    )
    sp = Spool(tmp_path, max_bytes=agent.spool_max_mb << 20)
    assert sp.append(payload(0, agent.batch_max_bytes), n_events=1)
    with pytest.raises(ValueError, match="cannot hold a batch"):
        agent.model_validate({**agent.model_dump(), "batch_max_bytes": agent.batch_max_bytes + 1})
    sp.ack(sp.end)
    assert not sp.append(payload(1, agent.batch_max_bytes + 1), n_events=1)
    sp.close()


@pytest.mark.parametrize("torn", [5, HEADER.size + 40])  # cut in its header, in its payload
def test_an_ack_cursor_at_a_record_torn_by_a_crash_is_kept(tmp_path, caplog, monkeypatch, torn):
    """A SIGKILL in the write of the batch after the last one acknowledged leaves a torn
    record where the cursor points: the cursor is the spool's, at the end of its last
    whole record, and what it acknowledged is not sent again."""
    monkeypatch.setattr("edge_agent.spool.ACK_WRITE_S", 0.0)
    sp = Spool(tmp_path, segment_bytes=10_000)
    for i in range(10):
        sp.append(payload(i), 1)
    sp.ack(read_records(sp)[-1].next)
    killed(sp)
    seg = sorted(tmp_path.glob("*.seg"))[-1]
    whole = HEADER.pack(MAGIC, 100, 1, zlib.crc32(payload(10), zlib.crc32(struct.pack("<II", 100, 1))))
    with seg.open("ab") as f:
        f.write((whole + payload(10))[:torn])  # (the write cut short)
    again = Spool(tmp_path, segment_bytes=10_000)
    assert read_all(again) == []
    assert "does not fit the segments" not in caplog.text
    again.append(payload(11), 1)
    assert read_all(again) == [payload(11)]
    again.close()


def test_damage_in_a_segment_a_full_spool_drops_unread_is_counted(tmp_path, caplog):
    """A torn tail (a crash mid-write) in the backlog, dropped by drop_oldest before the
    publisher read it (the broker still away): its bytes are lost like the batches
    around them, and counted as damage, as a read past them counts them."""
    rec = HEADER.size + 100
    opts = {"max_bytes": 10 * rec + FILES_BYTES, "segment_bytes": 2 * rec}
    sp = Spool(tmp_path, **opts)
    for i in range(2):
        sp.append(payload(i), n_events=1)
    killed(sp)
    seg = sorted(tmp_path.glob("*.seg"))[0]
    with seg.open("ab") as f:
        f.write(seg.read_bytes()[: rec - 30])  # (the write of a third batch cut short)
    again = Spool(tmp_path, **opts)
    for i in range(2, 30):
        again.append(payload(i), n_events=1)
    assert not seg.exists() and again.dropped_batches >= 2
    assert again.corrupt_bytes == rec - 30
    again.close()


def test_a_segment_the_disk_refuses_to_read_is_raised_then_set_aside_and_kept(tmp_path, monkeypatch):
    """The ack cursor's segment, which a start checks the cursor in, is refused (EIO):
    the start raised it, and the agent stopped at every start. It starts; a read raises
    SegmentUnreadable where the read is; set aside, the segment is kept under its
    set-aside name, what it held past the cursor counted, and reads (a restart's too)
    go on with the next segment."""
    sp = Spool(tmp_path, segment_bytes=250)  # (2 records of 116 bytes a segment)
    for i in range(6):
        assert sp.append(payload(i), n_events=1)
    [first] = sp.read(sp.ack_cursor, limit=1)
    sp.ack(first.next)  # (a cursor inside segment 0, which a start checks)
    sp.close()
    bad = tmp_path / "0000000000000000.seg"
    held = bad.read_bytes()
    real_open = open

    def opened(path, *args, **kwargs):
        if not isinstance(path, int) and Path(path) == bad:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(spool_mod, "open", opened, raising=False)
    again = Spool(tmp_path)
    with pytest.raises(SegmentUnreadable) as refused:
        again.read(again.ack_cursor)
    assert (refused.value.segment, refused.value.offset) == (0, first.next.offset)
    again.set_aside(refused.value)
    assert again.unreadable_bytes == len(held) - first.next.offset
    assert read_all(again) == [payload(i) for i in range(2, 6)]
    again.close()
    aside = tmp_path / "0000000000000000.seg.unreadable"
    assert not bad.exists() and aside.read_bytes() == held
    assert read_back(tmp_path) == [payload(i) for i in range(2, 6)]
    assert aside.read_bytes() == held


def refuse_reads(monkeypatch, bad: Path, after: int) -> None:
    """The disk refuses (EIO) every read of the segment ``bad`` after its first ``after``,
    each read one record of ``payload``'s default size."""
    monkeypatch.setattr(spool_mod, "READ_CHUNK", HEADER.size + 100)
    left = [after]
    real_open = open

    class Refusing:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            if left[0] <= 0:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            left[0] -= 1
            return self.f.read(n)

        def seek(self, *args):
            return self.f.seek(*args)

        def close(self):
            self.f.close()

    def opened(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        return Refusing(f) if not isinstance(path, int) and Path(path) == bad else f

    monkeypatch.setattr(spool_mod, "open", opened, raising=False)


def test_acknowledgements_of_a_segment_set_aside_leave_no_cursor_in_it(tmp_path, monkeypatch):
    """The disk refuses a segment past its first record, which the publisher had read and
    sent: set aside while the ack cursor was still in the segment before, the cursor then
    went into it with that record's acknowledgement and stayed there until one crossed
    into a later segment. Counted off the segments left, the bytes before it made
    depth_bytes negative (ktel_agent_spool_bytes, and the heartbeat's spool depth, which
    the workers refuse below 0) and the spool empty with a batch in it."""
    sp = Spool(tmp_path, segment_bytes=250)  # (2 records of 116 bytes a segment)
    for i in range(4):
        assert sp.append(payload(i), n_events=1)
    sp.close()
    refuse_reads(monkeypatch, tmp_path / "0000000000000001.seg", after=1)  # (its first record read)
    again = Spool(tmp_path)
    got = again.read(again.ack_cursor, limit=10)
    assert [r.payload for r in got] == [payload(0), payload(1), payload(2)]
    with pytest.raises(SegmentUnreadable) as refused:
        again.read(got[-1].next)
    again.set_aside(refused.value)
    for rec in got:  # (acknowledged after: they were in flight)
        again.ack(rec.next)
    assert again.depth_bytes() == 0 and again.empty()
    assert again.append(payload(4), n_events=1)
    assert again.depth_bytes() == HEADER.size + len(payload(4)) and not again.empty()
    assert [r.payload for r in again.read(got[-1].next)] == [payload(4)]
    again.close()
    assert read_back(tmp_path) == [payload(4)]


@pytest.mark.parametrize("acknowledged", [True, False])
def test_batches_in_flight_when_their_segment_is_set_aside_are_counted_only_if_never_acknowledged(
    tmp_path, monkeypatch, acknowledged
):
    """The publisher read a segment's first batch, then the disk refused the rest, and the
    segment was set aside while that batch was still being sent (from memory). The
    cursor moved past the segment, so a restart could not send it again: acknowledged,
    it was delivered; not (the agent stopped first, Kafka away), it is lost, and the next
    start counts it, as it does a batch a full spool dropped while it was being sent."""
    sp = Spool(tmp_path, segment_bytes=250)  # (2 records of 116 bytes a segment)
    for i in range(4):
        assert sp.append(payload(i), n_events=5)
    sp.close()
    refuse_reads(monkeypatch, tmp_path / "0000000000000000.seg", after=1)
    again = Spool(tmp_path)
    [sent] = again.read(again.ack_cursor, limit=10)  # (the rest refused)
    with pytest.raises(SegmentUnreadable) as refused:
        again.read(sent.next)
    again.set_aside(refused.value)
    assert (tmp_path / IN_FLIGHT_FILE).read_text().split() == ["1", "5"]
    if acknowledged:
        again.ack(sent.next)
        assert not (tmp_path / IN_FLIGHT_FILE).exists()
    again.close()
    with contextlib.closing(Spool(tmp_path)) as restarted:
        assert (restarted.dropped_batches, restarted.dropped_events) == ((0, 0) if acknowledged else (1, 5))
        assert read_all(restarted) == [payload(2), payload(3)]


def test_a_full_spool_drops_its_oldest_segment_though_the_disk_refuses_to_read_it(tmp_path, monkeypatch):
    """drop_oldest reads the oldest segment to count what it drops. The disk refused
    the rest of it: the drop raised, so every new batch was dropped in its place (and
    counted as a disk refusing writes) while the outage lasted, and each try noted the
    batches in flight again. Now the segment is dropped all the same, what was read of
    it counted as before and the bytes past that as unreadable."""
    rec = HEADER.size + 100
    opts = {"max_bytes": 16 * rec + FILES_BYTES, "segment_bytes": 2 * rec, "full_policy": "drop_oldest"}
    sp = Spool(tmp_path, **opts)
    assert all(sp.append(payload(i), n_events=7) for i in range(16))  # full: 8 segments of 2
    sp.close()
    refuse_reads(monkeypatch, tmp_path / "0000000000000000.seg", after=1)
    again = Spool(tmp_path, **opts)
    [sent] = again.read(again.ack_cursor, limit=1)  # batch 0, in flight
    assert again.append(payload(16), n_events=7)  # drops segment 0: batch 1 refused
    assert again.unreadable_bytes == rec
    assert (again.dropped_batches, again.dropped_events) == (0, 0)
    assert (tmp_path / IN_FLIGHT_FILE).read_text().split() == ["1", "7"]
    assert again.append(payload(17), n_events=7) and again.append(payload(18), n_events=7)  # drops segment 1
    assert (again.dropped_batches, again.dropped_events) == (2, 14)
    assert (tmp_path / IN_FLIGHT_FILE).read_text().split() == ["1", "7"]  # (noted once)
    again.ack(sent.next)
    assert not (tmp_path / IN_FLIGHT_FILE).exists()
    again.close()
    with contextlib.closing(Spool(tmp_path, **opts)) as restarted:
        assert restarted.dropped_batches == 0
        assert read_all(restarted) == [payload(i) for i in range(4, 19)]


def test_a_segment_whose_inode_the_disk_refuses_is_set_aside_at_start_and_the_rest_sent(
    tmp_path, monkeypatch
):
    """The disk refuses even to look at one segment (a damaged inode: chmod and stat fail
    with EIO), and the ack file: a start raised, and the agent stopped at every start.
    It starts: the segment set aside (renamed, its size unknown), the cursor taken as
    none, the other segments sent; and a later start, the disk refusing the file under
    its set-aside name too, starts as well."""
    sp = Spool(tmp_path, segment_bytes=250)  # (2 records of 116 bytes a segment)
    for i in range(6):
        assert sp.append(payload(i), n_events=1)
    sp.close()
    refused = {
        tmp_path / "0000000000000001.seg",
        tmp_path / "0000000000000001.seg.unreadable",
        tmp_path / "ack",
    }

    def eio(path):
        if Path(path) in refused:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

    chmod, stat, read_text = os.chmod, Path.stat, Path.read_text
    monkeypatch.setattr(spool_mod.os, "chmod", lambda p, *a, **k: eio(p) or chmod(p, *a, **k))
    monkeypatch.setattr(Path, "stat", lambda p, *a, **k: eio(p) or stat(p, *a, **k))
    monkeypatch.setattr(Path, "read_text", lambda p, *a, **k: eio(p) or read_text(p, *a, **k))
    with contextlib.closing(Spool(tmp_path)) as again:
        assert read_all(again) == [payload(i) for i in (0, 1, 4, 5)]
    assert os.path.exists(tmp_path / "0000000000000001.seg.unreadable")  # (not through Path.stat)
    assert not os.path.exists(tmp_path / "0000000000000001.seg")
    assert read_back(tmp_path) == [payload(i) for i in (0, 1, 4, 5)]


def test_an_acknowledged_segment_whose_inode_the_disk_refuses_is_deleted_not_set_aside(tmp_path, monkeypatch):
    """The agent stopped after its cursor crossed into segment 2 and before it deleted the
    segments before it; at the start the disk refuses segment 0's inode. Kafka has every
    batch of it: it is deleted, not kept aside as a segment of batches not sent."""
    sp = Spool(tmp_path, segment_bytes=250)  # (2 records of 116 bytes a segment)
    for i in range(6):
        assert sp.append(payload(i), n_events=1)
    sp.close()
    (tmp_path / "ack").write_text("2 0".ljust(spool_mod.ACK_BYTES - 1) + "\n")  # (0 and 1 acknowledged)
    bad = tmp_path / "0000000000000000.seg"
    stat = Path.stat

    def refused(path, *args, **kwargs):
        if path == bad:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", refused)
    with contextlib.closing(Spool(tmp_path)) as again:
        assert read_all(again) == [payload(4), payload(5)]
    assert not os.path.exists(bad) and not os.path.exists(str(bad) + ".unreadable")


def test_segments_whose_inodes_the_disk_refuses_are_not_deleted_on_a_cursor_nothing_checked(
    tmp_path, monkeypatch
):
    """Every segment's inode refused and the ack file damaged past them: with no segment
    to check the cursor against, it says nothing about them, and they are set aside,
    not deleted as acknowledged."""
    sp = Spool(tmp_path, segment_bytes=250)  # (2 records of 116 bytes a segment)
    for i in range(4):
        assert sp.append(payload(i), n_events=1)
    sp.close()
    (tmp_path / "ack").write_text("999 0".ljust(spool_mod.ACK_BYTES - 1) + "\n")
    stat = Path.stat

    def refused(path, *args, **kwargs):
        if path.suffix == ".seg":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", refused)
    Spool(tmp_path).close()
    assert sorted(p.name for p in tmp_path.glob("*.unreadable")) == [
        "0000000000000000.seg.unreadable",
        "0000000000000001.seg.unreadable",
    ]


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENOMEM, errno.EACCES])
def test_a_read_error_of_the_agent_not_the_disk_is_raised_and_sets_nothing_aside(tmp_path, monkeypatch, code):
    """Out of file descriptors or memory, or a permission changed, is the agent's state, not
    the segment's: taken as the disk refusing it, a sound segment was set aside after the
    publisher's tries, its batches never sent; raised as it is, the agent stops and its
    restart sends them."""
    sp = Spool(tmp_path, segment_bytes=250)  # (2 records of 116 bytes a segment)
    for i in range(4):
        assert sp.append(payload(i), n_events=1)
    sp.close()
    seg = tmp_path / "0000000000000000.seg"
    real_open = open

    def opened(path, *args, **kwargs):
        if not isinstance(path, int) and Path(path) == seg:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(spool_mod, "open", opened, raising=False)
    again = Spool(tmp_path)
    with pytest.raises(OSError) as raised:
        again.read(again.ack_cursor)
    assert not isinstance(raised.value, SegmentUnreadable) and raised.value.errno == code
    again.close()
    monkeypatch.undo()
    assert read_back(tmp_path) == [payload(i) for i in range(4)]


def test_a_segment_set_aside_between_two_is_not_logged_missing_at_the_next_start(
    tmp_path, monkeypatch, caplog
):
    """A segment set aside leaves a gap in the numbers of those a start finds, which it
    logged as segments missing, their batches lost: it is on disk, under its set-aside
    name, and was logged so when set aside."""
    sp = Spool(tmp_path, segment_bytes=250)  # (2 records of 116 bytes a segment)
    for i in range(6):
        assert sp.append(payload(i), n_events=1)
    sp.close()
    bad = tmp_path / "0000000000000001.seg"
    real_open = open

    def opened(path, *args, **kwargs):
        if not isinstance(path, int) and Path(path) == bad:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(spool_mod, "open", opened, raising=False)
    sp = Spool(tmp_path)
    assert [r.payload for r in sp.read(sp.ack_cursor)] == [payload(0), payload(1)]
    with pytest.raises(SegmentUnreadable) as refused:
        sp.read(sp.read(sp.ack_cursor)[-1].next)
    sp.set_aside(refused.value)
    sp.close()
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert read_back(tmp_path) == [payload(i) for i in (0, 1, 4, 5)]
    assert "missing" not in caplog.text
    assert (tmp_path / "0000000000000001.seg.unreadable").exists()
