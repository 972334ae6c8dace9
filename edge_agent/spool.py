"""The agent's on-disk spool: every sealed batch is written here before it is sent.

Write-ahead, so that neither a broker outage nor an agent crash loses a sealed
batch. The publisher reads the spool in order and advances an acknowledged
cursor as Kafka acknowledges; fully acknowledged segments are deleted.

Layout: a directory of segment files ``<n>.seg`` (n increasing), each a
sequence of records::

    offset  size  field
    0       4     magic 0x4B54454C ("KTEL"), little endian
    4       4     payload length
    8       4     number of events in the payload (for drop accounting)
    12      4     CRC-32 of bytes 4..12 and the payload
    16      len   payload: the encoded raw batch (ktel.wire), as sent to Kafka

and ``ack``, the acknowledged cursor ``<segment> <offset>``, written after
acknowledgements: at most every ``ACK_WRITE_S`` seconds, when acknowledgements
cross a segment, and on close (not fsynced: losing it, or its last ACK_WRITE_S,
re-sends batches, which the processors drop by sequence number). It is
rewritten in place, padded to ``ACK_BYTES``, through a descriptor kept open:
one write of 48 bytes at offset 0 is whole or absent after the agent crashes
(and after a power loss on a disk that writes a sector whole), and creating a
file for each write (a temporary file renamed over it) would be a
file creation that the file_created probe reports, so that every batch
acknowledged would make the next one on a host that is otherwise idle. A
cursor that does not parse, or does not fit the segments on disk (a negative
number, past a segment's end, inside a record), counts as none: the backlog is
re-sent from its oldest segment.

Durability (``fsync``): ``always`` fsyncs every record before it counts as
spooled; ``interval`` (default) fsyncs what was written about
``fsync_interval`` seconds after it (``sync_due``, on the agent's every pass), once
for all written meanwhile; ``never`` leaves it to the kernel. A SIGKILL of the agent loses no
spooled record under any policy (the page cache outlives the process): it
loses only events still in the BPF ring buffer or decoded but not yet sealed,
at most a read interval of events (edge_agent/ticks.py). A power loss can also lose what was
written since the last fsync.

Reading back: the records appended by this process and not yet acknowledged are
also kept in memory (up to ``recent_max_bytes``), so the publisher sends a batch it
has just sealed without reading it back and checking its CRC again; the disk is read
for what a restart found there, and for a backlog larger than that bound. Either way
the same bytes are sent: those the spool wrote.

Damage: a record whose magic, length or CRC is wrong is skipped by scanning
forward for the next valid record; the skipped bytes are logged and counted
(``corrupt_bytes``), also in a segment a full spool drops unread. A torn tail (a
crash mid-write) is the same case at the end of a segment. The writer never appends
to a segment it did not create, so a damaged segment is only ever read. A segment
gone missing (removed by hand) is logged (at start, or when the spool next reads it)
and skipped; what it held is lost, what follows it is sent. With
every segment gone and the ack file left, new segments are numbered past the
cursor it holds, so that it cannot cover them.

A segment the disk refuses to read (EIO, a corrupt file system, the device gone:
``MEDIA_ERRORS``) raises ``SegmentUnreadable`` from ``read``, after handing out the
records read before the error; the publisher tries it again a few times (a transient error passes) and then
calls ``set_aside``: the segment is renamed ``<n>.seg.unreadable`` in the spool
directory, kept for an operator (nothing reads or deletes it after, a restart
neither), the bytes it held past what was read counted (``unreadable_bytes``), and the
reader goes on with the next segment. Read again and again, it failed the publisher at
every start, and nothing after it was sent. Its batches read before the error and still
being sent are lost if Kafka does not acknowledge them before the agent stops, as those
of a segment a full spool drops are (below). A full spool drops its oldest segment even
if the disk refuses to read the rest of it: counting what it reads, and the bytes past
that as unreadable (refusing every new batch instead would lose far more). A start
that the disk does not let look at a segment at all (its inode refused) sets it aside
the same way, logged with its size unknown (or deletes it, if the cursor, checked
against the segments it can read, is past it), and takes an ack file it refuses for
none: raised, they stopped the agent at every start.

Disk errors: a record the disk refuses (ENOSPC, EIO) is cut back off its
segment and ``append`` raises, so the caller counts the batch as lost; the
spool stays usable and takes records again once space returns. A disk with no
space at start (none for the segment to write, nor, at a first start, for the
directory) is the same case: the spool starts, its backlog can be sent, and
``append`` raises until the segment can be made. An ack file that cannot be
written is logged and left behind: the cost is re-sending.

Privacy: segments and the ack file are 0600 in a 0700 directory (existing ones
are tightened at start); they hold what the events name.

Bound: at most ``max_bytes`` on disk, the sizes of the spool's files: every segment
whole, also the acknowledged head of the oldest one, which stays on disk until an
acknowledgement crosses into the next segment (counting only what was not yet
acknowledged, the directory grew past the bound by up to a segment, an eighth of it),
and room for the ack and ``dropped-in-flight`` files (``FILES_BYTES``). A segment the
disk does not let the spool delete (logged) is not counted: it takes space besides.
When full, a segment acknowledged to its end is deleted first, which loses nothing;
then ``drop_newest`` refuses new batches and ``drop_oldest`` deletes the oldest
unacknowledged segment (its acknowledged head with it); either way the events lost
are counted (``dropped_events``), each once. The batches of a dropped segment that
the publisher has already read are being sent from its memory: they are lost only
if Kafka does not acknowledge them before the agent stops (or is killed), when
nothing holds them any more. Until then their number is
in the file ``dropped-in-flight`` (written at the drop and at each acknowledgement
of one of them, gone once all are), and the next start counts what it names as
dropped: a stop with them unacknowledged is one where Kafka is away, so neither
the last heartbeat nor a last scrape could carry the count, and a SIGKILL leaves
nothing else. (One acknowledged in the instant before a SIGKILL is counted though
delivered.)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import io
import itertools
import logging
import os
import struct
import time
from pathlib import Path
from typing import Literal

from zlib_ng import zlib_ng

from edge_agent.seqstore import no_space, private_dir

log = logging.getLogger("ktel.spool")

MAGIC = 0x4B54454C
HEADER = struct.Struct("<IIII")
MAX_RECORD = 64 * 1024 * 1024  # a length beyond this is damage, not a record
READ_CHUNK = 1 << 20
# The fewest segments a full spool spans, whatever its bound (Spool.segment_bytes).
SEGMENTS_AT_LEAST = 8
# How often, at most, the ack cursor is written: once per batch, writing it (then
# open, write, rename: ~0.7 ms here) was a tenth of the agent's time at 400 k events/s.
ACK_WRITE_S = 0.5
# How many batches (and events) a full spool dropped while the publisher was sending
# them are not yet acknowledged (module docstring).
IN_FLIGHT_FILE = "dropped-in-flight"
IN_FLIGHT_MAX_BYTES = 64  # (two numbers: a longer file is not one the spool wrote, read no further)
# The ack file's size: "<segment> <offset>" padded with spaces, then a newline. Two
# 20-digit numbers fit, so a shorter cursor overwrites every byte of a longer one.
ACK_BYTES = 48
# What the bound keeps for the files beside the segments (Spool.disk_bytes).
FILES_BYTES = ACK_BYTES + IN_FLIGHT_MAX_BYTES
# How much of the unacknowledged tail is also held in memory (Spool.read): more than
# the publisher has in flight (agent.MAX_IN_FLIGHT batches), seconds of a busy node.
RECENT_MAX_BYTES = 8 << 20
_MAGIC_BYTES = struct.pack("<I", MAGIC)
# The name a segment the disk refuses to read is given (Spool.set_aside): not a *.seg.
UNREADABLE_SUFFIX = ".unreadable"
# The errors of a read that say the segment's blocks cannot be had (the device's I/O
# error, a file system that found them corrupt or failing their checksum, the device
# gone): a segment that keeps raising one is set aside. Any other (out of file
# descriptors or memory, a permission changed) is the agent's own state, not the
# segment's, and raised as before: setting aside a sound segment for it would leave
# its batches unsent for good, where the restart that follows sends them.
MEDIA_ERRORS = frozenset((errno.EIO, errno.EUCLEAN, errno.EBADMSG, errno.ENXIO, errno.ENODEV))

FullPolicy = Literal["drop_newest", "drop_oldest"]
FsyncPolicy = Literal["always", "interval", "never"]


@dataclasses.dataclass(frozen=True, order=True)
class Cursor:
    segment: int
    offset: int


@dataclasses.dataclass(frozen=True)
class Record:
    start: Cursor
    next: Cursor
    n_events: int
    payload: bytes


class SegmentUnreadable(Exception):
    """The disk refuses to read a segment (EIO, ...): ``segment``, ``offset`` (where the
    read failed: the records before it were handed out), ``error``, ``path``."""

    def __init__(self, segment: int, offset: int, error: OSError, path: Path) -> None:
        super().__init__(f"spool segment {path} unreadable at byte {offset}: {error.strerror or error}")
        self.segment = segment
        self.offset = offset
        self.error = error
        self.path = path


def _crc(length: int, n_events: int, payload: bytes) -> int:
    # zlib-ng's CRC-32 is zlib's, computed with the CPU's carry-less multiply: about 4 µs
    # for a 300 KB batch against zlib's 60-150, the spool's checksum unchanged on disk.
    return zlib_ng.crc32(payload, zlib_ng.crc32(struct.pack("<II", length, n_events)))


class Spool:
    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = 1 << 30,
        segment_bytes: int = 16 << 20,
        full_policy: FullPolicy = "drop_oldest",
        fsync: FsyncPolicy = "interval",
        fsync_interval: float = 1.0,
        recent_max_bytes: int = RECENT_MAX_BYTES,
    ):
        self.dir = directory
        full: OSError | None = None  # the disk had no space for the spool at start
        try:
            private_dir(directory)
            for p in directory.iterdir():
                try:
                    os.chmod(p, 0o600)
                except OSError as err:
                    if err.errno not in MEDIA_ERRORS:
                        raise
                    # (a file whose inode the disk refuses: a segment is set aside below,
                    # one set aside before is only kept; raised, the agent never started)
                    log.error("spool file %s cannot be reached (%s)", p, err.strerror or err)
        except OSError as err:
            if not no_space(err):
                raise
            full = err  # a first start on a full disk: nothing spooled yet
        self.max_bytes = max_bytes
        # drop_oldest drops a segment at a time, never the one being written: a spool
        # bound to a few segments' size would drop the newest batches instead.
        room = max(0, max_bytes - FILES_BYTES)  # (what the segments have of the bound)
        self.segment_bytes = max(1, min(segment_bytes, room // SEGMENTS_AT_LEAST))
        self.full_policy = full_policy
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.dropped_events = 0
        self.dropped_batches = 0
        self.corrupt_bytes = 0
        self.unreadable_bytes = 0  # of segments set aside (set_aside), past what was read of them
        self._damaged: set[tuple[int, int]] = set()
        self._undeleted: set[int] = set()  # acknowledged or dropped segments unlink failed on
        self._missing: set[int] = set()  # segments found gone while running (logged once)
        # How far read() has handed records out: the publisher sends what it read, from
        # memory, whatever becomes of its segment (_drop_oldest_segment, set_aside).
        self._taken = Cursor(0, 0)
        # Those handed out and not yet acknowledged, in order: (end, events) each.
        self._handed: collections.deque[tuple[Cursor, int]] = collections.deque()
        # Records a full spool dropped after the publisher took them: (end, events) each,
        # in order, delivered when acknowledged; on disk for the next start to count
        # (module docstring).
        self._dropped_in_flight: collections.deque[tuple[Cursor, int]] = collections.deque()
        self._count_lost_in_flight()
        self._last_fsync = time.monotonic()
        self._unsynced = False  # records written since the last fsync
        self._ack = self._load_ack()
        self._ack_on_disk = self._ack
        self._ack_written = 0.0
        self._ack_failing = False
        self._ack_fd: int | None = None  # opened at the first write (_write_ack)
        on_disk = self._segments()
        sizes = {}
        unreachable: dict[int, OSError] = {}
        for seg in on_disk:
            try:
                sizes[seg] = self._path(seg).stat().st_size
            except OSError as err:
                if err.errno not in MEDIA_ERRORS:
                    raise
                unreachable[seg] = err
        # (a cursor is checked against the segments it can be: none, it is taken as it is)
        checked = bool(sizes)
        self._ack = self._checked(self._ack, sizes)
        # Forget segments wholly before the acknowledged cursor (a crash between ack and delete).
        for s in list(sizes):
            if s < self._ack.segment:
                self._unlink(s)
                del sizes[s]
        for seg, refused in unreachable.items():
            if checked and seg < self._ack.segment:
                self._unlink(seg)  # (acknowledged whole: nothing in it is lost)
            else:
                self._set_aside_at_start(seg, refused)
        segs = list(sizes)
        # Always a fresh segment for writing: never append after a possibly torn tail.
        # And never one the cursor read from disk points into, even with the segments
        # it named gone (deleted to free space, say): until the cursor is written again,
        # which takes an acknowledgement, a restart would take what it holds for
        # acknowledged and delete it.
        # (past one set aside at start too: its name may be left as it was)
        self._wseg = max(
            (on_disk[-1] + 1) if on_disk else 0, self._ack.segment + (1 if self._ack.offset else 0)
        )
        if not segs or self._ack.segment < segs[0]:
            self._ack = Cursor(segs[0] if segs else self._wseg, 0)
        aside = self._set_aside_segments()
        for before, after in itertools.pairwise(segs):
            # (those set aside are logged as they were: not as missing, they are on disk)
            if after != before + 1 and sum(before < s < after for s in aside) < after - before - 1:
                log.error(
                    "spool segments %d to %d are missing from %s: their batches are lost",
                    before + 1, after - 1, self.dir,
                )  # fmt: skip
        self._wfile: io.FileIO | None = None  # None while the disk has no space for it
        if full is None:
            try:
                self._wfile = self._open_write(self._wseg)
            except OSError as err:
                if not no_space(err):
                    raise
                full = err
        if full is not None:
            # Not a reason to stop: the backlog can still be sent (and its acknowledgement
            # frees space), and append refuses each batch (_writer), counted, until space returns.
            log.error(
                "spool %s: no space for a new segment (%s): batches are refused until there is",
                self.dir, full.strerror or full,
            )  # fmt: skip
        self._wsize = 0
        self._sizes = sizes
        self._sizes[self._wseg] = 0
        self._rfile: tuple[int, object] | None = None
        # Records appended since start, in order, not yet acknowledged: a contiguous run
        # that ends at the spool's end (emptied rather than left with a gap).
        self._recent: collections.deque[Record] = collections.deque()
        self._recent_bytes = 0
        self.recent_max_bytes = recent_max_bytes

    # ----------------------------------------------------------------- paths

    def _path(self, seg: int) -> Path:
        return self.dir / f"{seg:016d}.seg"

    def _open_write(self, seg: int) -> io.FileIO:
        # Unbuffered: a failed write leaves nothing queued in Python to be written later,
        # so cutting the segment back to its last whole record really undoes it.
        fd = os.open(self._path(seg), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return open(fd, "ab", buffering=0)

    def _writer(self) -> io.FileIO:
        """The segment being written, made now if the disk had no space for it (nor for
        the directory) at start; raises OSError while it still has none."""
        if self._wfile is None:
            private_dir(self.dir)
            self._wfile = self._open_write(self._wseg)
        return self._wfile

    def _segments(self) -> list[int]:
        return sorted(int(p.stem) for p in self.dir.glob("*.seg") if p.stem.isdigit())

    def _set_aside_segments(self) -> list[int]:
        return [
            int(n)
            for p in self.dir.glob(f"*.seg{UNREADABLE_SUFFIX}")
            if (n := p.name.split(".")[0]).isdigit()
        ]

    def _load_ack(self) -> Cursor:
        try:
            seg, off = (self.dir / "ack").read_text().split()
            return Cursor(int(seg), int(off))
        except (FileNotFoundError, ValueError):
            return Cursor(0, 0)
        except OSError as err:
            if err.errno not in MEDIA_ERRORS:
                raise
            # (none: the backlog is sent again, and the processors drop what they had)
            log.error("spool %s cannot be read (%s): taken as none", self.dir / "ack", err.strerror or err)
            return Cursor(0, 0)

    def _set_aside_at_start(self, seg: int, err: OSError) -> None:
        """A segment the disk does not let a start even look at (its inode refused): set
        aside as ``set_aside`` does a segment it refuses to read, though how much it held
        is not known (logged, not counted in unreadable_bytes)."""
        log.error(
            "spool segment %s cannot be reached (%s): set aside, %s; its batches are not sent",
            self._path(seg), err.strerror or err, self._renamed_aside(seg),
        )  # fmt: skip

    def _renamed_aside(self, seg: int) -> str:
        """Rename a segment set aside ``<n>.seg.unreadable``; what became of it, to log."""
        path = self._path(seg)
        aside = path.with_name(path.name + UNREADABLE_SUFFIX)
        try:
            os.rename(path, aside)
        except OSError as err:
            # Skipped all the same; a restart finds it again (and deletes it if the
            # acknowledgements passed it meanwhile).
            return f"left as it is, not renamed to {aside.name} ({err.strerror or err})"
        return f"kept as {aside}"

    def _checked(self, ack: Cursor, sizes: dict[int, int]) -> Cursor:
        """``ack`` if the segments on disk can follow from it, else none (Cursor(0, 0)):
        everything is sent again, and the processors drop what they had by sequence
        number. The spool writes a cursor inside a segment it holds, at a record's
        start or the segment's end, and deletes only the segments before it (so its
        segment is gone only if it is before every one left, or was the next one to
        write, empty). One past every segment on disk but that next one, into a
        segment missing between two on disk, or past its segment's end, is damage or a
        hand's edit, and taken as it is it would delete the unacknowledged backlog at
        start; a negative one made every read fail, and one inside a record lost it.
        A segment removed by hand under a good cursor costs re-sending, no more.
        ``sizes``: each segment's size, in order."""
        segs = list(sizes)
        if not segs:
            return ack  # every segment gone: new ones are numbered past it (module docstring)
        if (
            ack.segment < 0
            or ack.offset < 0
            or ack.segment > segs[-1] + 1
            or (ack.segment == segs[-1] + 1 and ack.offset > 0)
            or (segs[0] < ack.segment <= segs[-1] and ack.segment not in segs)
            or (ack.segment in sizes and not self._record_at(ack.segment, ack.offset, sizes[ack.segment]))
        ):
            log.error(
                "spool ack cursor %d %d does not fit the segments in %s (%d to %d): "
                "sending their batches again from the oldest",
                ack.segment, ack.offset, self.dir, segs[0], segs[-1],
            )  # fmt: skip
            return Cursor(0, 0)
        return ack

    def _record_at(self, seg: int, offset: int, size: int) -> bool:
        """Whether ``offset`` is where the spool could have put the cursor in ``seg``
        (``size`` bytes): its start, its end, or the start of an intact record (a cursor
        inside a record would skip it as damage, and one past the end would skip the
        segment), or the start of a record the segment's end cuts short: a crash in the
        write of the batch after the last one acknowledged (taken for damage, the
        restart sent the whole segment again)."""
        if offset in (0, size):
            return True
        if offset > size:
            return False
        try:
            with open(self._path(seg), "rb") as f:
                f.seek(offset)
                head = f.read(HEADER.size)
                if len(head) < HEADER.size:
                    return head[:4] == _MAGIC_BYTES[: len(head)]  # (a header cut short)
                magic, length, n_events, crc = HEADER.unpack(head)
                if magic != MAGIC or length > MAX_RECORD:
                    return False
                if offset + HEADER.size + length > size:
                    return True  # (cut short)
                body = f.read(length)
                return len(body) == length and _crc(length, n_events, body) == crc
        except OSError as err:
            # The disk refuses it (EIO): the cursor is taken as the spool wrote it, and the
            # publisher's read meets the trouble, tries again and sets the segment aside.
            # Raised here, it stopped the agent at every start.
            log.warning("spool segment %s: ack cursor not checked (%s)", self._path(seg), err.strerror or err)
            return True

    def _unlink(self, seg: int) -> None:
        """Delete an acknowledged or dropped segment; one that cannot be (a read-only or
        failing disk) is logged and tried again at the next deletion, and meanwhile
        only takes disk space: nothing reads it again."""
        try:
            self._path(seg).unlink(missing_ok=True)
        except OSError as err:
            if seg not in self._undeleted:
                log.error(
                    "spool segment %s cannot be deleted (%s): trying again later",
                    self._path(seg),
                    err.strerror or err,
                )
            self._undeleted.add(seg)
        else:
            self._undeleted.discard(seg)

    # ----------------------------------------------------------------- state

    @property
    def ack_cursor(self) -> Cursor:
        return self._ack

    @property
    def end(self) -> Cursor:
        return Cursor(self._wseg, self._wsize)

    def depth_bytes(self) -> int:
        return sum(self._sizes.values()) - self._ack.offset

    def disk_bytes(self) -> int:
        """What the bound counts of the spool's files (module docstring): every segment
        whole, not only its unacknowledged bytes (``depth_bytes``), and FILES_BYTES."""
        return sum(self._sizes.values()) + FILES_BYTES

    def empty(self) -> bool:
        """Nothing left to deliver: the spooled batches, and those a full spool dropped
        while they were being sent, acknowledged."""
        return (self._ack >= self.end or self.depth_bytes() <= 0) and not self._dropped_in_flight

    # ----------------------------------------------------------------- write

    def append(self, payload: bytes, n_events: int) -> bool:
        """Spool one sealed batch; False if it was dropped (spool full: drop_newest, or
        drop_oldest with only the segment being written left)."""
        size = HEADER.size + len(payload)
        while self.disk_bytes() + size > self.max_bytes:
            if self._wsize and self._ack >= Cursor(self._wseg, self._wsize):
                # The segment being written is acknowledged to its end (one batch larger
                # than a segment fills it alone): the next one is started, so that this one
                # is a segment acknowledged to its end, deleted below. Kept as the segment
                # being written, it took the bound's room from every batch after it, each
                # dropped though the spool had nothing left to deliver.
                self._rotate()
                continue
            # The oldest segment acknowledged to its end (an acknowledgement at a segment's
            # end does not delete it) goes under either policy: it loses nothing.
            acked_whole = self._ack.segment != self._wseg and self._ack.offset >= self._sizes.get(
                self._ack.segment, 0
            )
            if (self.full_policy == "drop_newest" and not acked_whole) or not self._drop_oldest_segment():
                self.dropped_events += n_events
                self.dropped_batches += 1
                return False
        if self._wsize and self._wsize + size > self.segment_bytes:
            self._rotate()
        wfile = self._writer()
        header = HEADER.pack(MAGIC, len(payload), n_events, _crc(len(payload), n_events, payload))
        now = time.monotonic()
        try:
            # One write to the page cache: from here a SIGKILL cannot lose it.
            written = os.writev(wfile.fileno(), (header, payload))
            if written != size:
                raise OSError(f"short write to {self._path(self._wseg)}: {written} of {size} bytes")
            if self.fsync == "always" or (
                self.fsync == "interval" and now - self._last_fsync >= self.fsync_interval
            ):
                os.fsync(wfile.fileno())
                self._last_fsync = now
            elif self.fsync == "interval":
                self._unsynced = True
        except OSError:
            # Undo the partial record (a full disk writes what fits): the segment ends
            # with whole records, and the space is free for the next try.
            os.ftruncate(wfile.fileno(), self._wsize)
            raise
        start = Cursor(self._wseg, self._wsize)
        self._wsize += size
        self._sizes[self._wseg] = self._wsize
        self._remember(Record(start, Cursor(self._wseg, self._wsize), n_events, payload))
        return True

    def sync_due(self) -> None:
        """With fsync ``interval``: fsync the records written since the last fsync once
        the interval has passed, whether or not another record comes (``append`` syncs
        only as records come: the last ones before a quiet spell would wait for the
        kernel's writeback, about 30 s, not ``fsync_interval``). Called on the agent's
        every pass (at least once a second). A failure is logged: the next append meets
        the disk's trouble and counts what it loses."""
        now = time.monotonic()
        if not self._unsynced or now - self._last_fsync < self.fsync_interval:
            return
        try:
            os.fsync(self._writer().fileno())
        except OSError as err:
            log.error("spool segment %s: fsync failed: %s", self._path(self._wseg), err)
        self._last_fsync = now
        self._unsynced = False

    def _remember(self, rec: Record) -> None:
        if self._recent_bytes + len(rec.payload) > self.recent_max_bytes:
            # The publisher is behind (a broker away): it reads the backlog from disk,
            # and this record starts a new run in memory once it has caught up.
            self._recent.clear()
            self._recent_bytes = 0
            if len(rec.payload) > self.recent_max_bytes:
                return
        self._recent.append(rec)
        self._recent_bytes += len(rec.payload)

    def _forget_before(self, cursor: Cursor) -> None:
        """Drop the records in memory that start before ``cursor`` (acknowledged or dropped)."""
        while self._recent and self._recent[0].start < cursor:
            self._recent_bytes -= len(self._recent.popleft().payload)

    def _from_memory(self, cursor: Cursor, limit: int) -> list[Record] | None:
        """The records at ``cursor`` if memory holds them from there: the one that
        starts at it, or the one after the record that ends at it (the end of a
        segment is the start of the next one's first record)."""
        if not self._recent or cursor < self._recent[0].start:
            return None  # a backlog from before (a restart, a broker away): on disk
        for i, rec in enumerate(self._recent):
            if rec.start == cursor:
                break
            if rec.next == cursor:
                i += 1
                break
        else:
            return None
        if i == len(self._recent):
            return []  # caught up
        return [self._recent[j] for j in range(i, min(i + limit, len(self._recent)))]

    def _rotate(self) -> None:
        wfile = self._writer()
        if self.fsync != "never":
            os.fsync(wfile.fileno())
            self._unsynced = False
        # The next segment is opened before anything changes: if that fails the spool
        # is as it was. The directory may have been removed under a running agent.
        private_dir(self.dir)
        nxt = self._open_write(self._wseg + 1)
        wfile.close()
        self._wfile = nxt
        self._wseg += 1
        self._wsize = 0
        self._sizes[self._wseg] = 0

    def _drop_oldest_segment(self) -> bool:
        oldest = self._ack.segment
        if oldest == self._wseg:
            return False  # only the segment being written is left: nothing to evict
        # Those the publisher already read it sends from memory: lost only if they are
        # never acknowledged (module docstring).
        in_flight = [(end, n) for end, n in self._handed if end.segment == oldest]
        events, batches = 0, 0
        start = self._ack.offset
        if self._taken.segment == oldest:
            start = max(start, self._taken.offset)
        elif self._taken.segment > oldest:
            start = self._sizes.get(oldest, 0)
        reached, unread = start, 0
        try:
            # (damage there is counted as a read past it counts it: nothing reads it after)
            for rec in self._scan(oldest, start):
                events += rec.n_events
                batches += 1
                reached = rec.next.offset
        except OSError as err:
            self._close_read()
            if err.errno not in MEDIA_ERRORS:
                raise
            # The disk refuses to read the rest: dropped all the same, or every new batch
            # would be dropped in its place while the outage lasts; its bytes past what was
            # read are counted as a segment set aside counts them.
            unread = max(0, self._sizes.get(oldest, 0) - reached)
            self.unreadable_bytes += unread
            log.error(
                "spool segment %s cannot be read (%s): dropped, its %d bytes from byte %d counted in "
                "ktel_agent_spool_unreadable_bytes_total",
                self._path(oldest), err.strerror or err, unread, reached,
            )  # fmt: skip
        self.dropped_events += events
        self.dropped_batches += batches
        if batches or in_flight or unread:  # (not a segment acknowledged to its end: nothing lost)
            log.error(
                "spool full (%d bytes): dropped its oldest %d batches (%d events), and %d being sent "
                "(counted if Kafka does not acknowledge them)",
                self.max_bytes, batches, events, len(in_flight),
            )  # fmt: skip
        if in_flight:
            self._lost_unless_acked(in_flight)
        self._delete_through(oldest)
        # The next segment there is: one may be missing (removed by hand, logged at start).
        self._ack = Cursor(min((s for s in self._sizes if s > oldest), default=self._wseg), 0)
        self._forget_before(self._ack)
        self._write_ack()
        return True

    # ------------------------------------------------------------------ read

    def _open_read(self, seg: int):
        if self._rfile is None or self._rfile[0] != seg:
            if self._rfile is not None:
                self._rfile[1].close()  # type: ignore[attr-defined]
                # Let go of before the open, which fails on a segment gone: the next read
                # of the closed one's segment would be handed it.
                self._rfile = None
            self._rfile = (seg, open(self._path(seg), "rb"))  # noqa: SIM115
        return self._rfile[1]

    def _close_read(self) -> None:
        if self._rfile is not None:
            rfile, self._rfile = self._rfile[1], None
            with contextlib.suppress(OSError):
                rfile.close()  # type: ignore[attr-defined]

    def _scan(self, seg: int, offset: int):
        """Valid records of one segment from offset, skipping (and counting) damage.

        Reads in chunks, so a long backlog costs one pass over the file. A segment
        gone missing since start (removed by hand) holds nothing: logged, and the
        reader and a drop move on to the next (every read and append failed on it).
        """
        try:
            f = self._open_read(seg)
        except FileNotFoundError:
            if seg not in self._missing:
                self._missing.add(seg)
                log.error("spool segment %s is missing: its batches are lost", self._path(seg))
            return
        f.seek(offset)  # type: ignore[attr-defined]
        buf, pos, base, eof = b"", 0, offset, False

        def fill(n: int) -> bool:
            """Make n bytes available at pos if the file has them."""
            nonlocal buf, pos, base, eof
            while len(buf) - pos < n and not eof:
                more = f.read(max(READ_CHUNK, n - (len(buf) - pos)))  # type: ignore[attr-defined]
                eof = not more
                buf, base, pos = buf[pos:] + more, base + pos, 0
            return len(buf) - pos >= n

        while fill(HEADER.size):
            magic, length, n_events, crc = HEADER.unpack_from(buf, pos)
            if magic == MAGIC and length <= MAX_RECORD and fill(HEADER.size + length):
                end = pos + HEADER.size + length
                payload = buf[pos + HEADER.size : end]
                if _crc(length, n_events, payload) == crc:
                    yield Record(Cursor(seg, base + pos), Cursor(seg, base + end), n_events, payload)
                    pos = end
                    continue
            # Damage: resynchronise on the next magic number.
            start = base + pos
            skipped = 0
            while True:
                nxt = buf.find(_MAGIC_BYTES, pos + 1)
                if nxt >= 0:
                    skipped += nxt - pos
                    pos = nxt
                    break
                keep = max(pos + 1, len(buf) - 3)  # a magic may straddle the chunk edge
                skipped += keep - pos
                pos = keep
                if not fill(len(buf) - pos + 1):
                    skipped += len(buf) - pos
                    pos = len(buf)
                    break
            self._damage(seg, start, skipped)
        if len(buf) - pos > 0:
            self._damage(seg, base + pos, len(buf) - pos)

    def _damage(self, seg: int, at: int, nbytes: int) -> None:
        # A damaged range is met again each time a read passes it: count it once.
        if (seg, at) in self._damaged:
            return
        self._damaged.add((seg, at))
        self.corrupt_bytes += nbytes
        log.error(
            "spool segment %s is damaged at byte %d: skipped %d bytes to the next intact record",
            self._path(seg), at, nbytes,
        )  # fmt: skip

    def read(self, cursor: Cursor, limit: int = 64) -> list[Record]:
        """Up to ``limit`` records at or after ``cursor``, in order ([] if caught up):
        taken to be sent (the spool's one reader is the publisher), so a full spool
        that drops them counts them only if they are not acknowledged."""
        out = self._read(cursor, limit)
        for rec in out:
            if rec.next > self._taken:  # (one read again is handed out once)
                self._handed.append((rec.next, rec.n_events))
                self._taken = rec.next
        return out

    def _read(self, cursor: Cursor, limit: int) -> list[Record]:
        if cursor.segment < self._ack.segment:  # the segment was dropped while we were reading it
            cursor = self._ack
        recent = self._from_memory(cursor, limit)
        if recent is not None:
            return recent
        out: list[Record] = []
        seg, off = cursor.segment, cursor.offset
        while len(out) < limit:
            if seg == self._wseg and off >= self._wsize:
                break
            if seg not in self._sizes:  # set aside (set_aside) while it was being read
                seg, off = min(s for s in self._sizes if s > seg), 0
                continue
            try:
                for rec in self._scan(seg, off):
                    out.append(rec)
                    off = rec.next.offset
                    if len(out) == limit:
                        return out
            except OSError as err:  # (a segment gone is not this: _scan skips it)
                self._close_read()  # (the next try opens it again)
                if err.errno not in MEDIA_ERRORS:
                    raise  # (the process's, not the segment's: a restart clears it)
                if out:
                    return out  # what was read before the error goes; the next read meets it
                raise SegmentUnreadable(seg, off, err, self._path(seg)) from err
            if seg == self._wseg:
                break
            # The next segment there is (one gone missing is skipped; logged at start).
            seg, off = min(s for s in self._sizes if s > seg), 0
        return out

    def set_aside(self, unreadable: SegmentUnreadable) -> None:
        """Take the segment the disk keeps refusing to read out of the spool: renamed
        ``<n>.seg.unreadable`` (kept, for an operator to look at or recover), its bytes
        from where the read failed counted in ``unreadable_bytes``, one line naming it.
        ``read`` goes on with the next segment. Raises OSError only if it is the segment
        being written and the next one cannot be started."""
        seg = unreadable.segment
        if seg not in self._sizes:
            return  # (already set aside, or acknowledged or dropped meanwhile)
        if seg == self._wseg:
            self._rotate()  # (no record goes after one the disk cannot read)
        if self._rfile is not None and self._rfile[0] == seg:
            self._close_read()
        lost = max(0, self._sizes.pop(seg) - unreadable.offset)
        self.unreadable_bytes += lost
        log.error(
            "spool segment %s cannot be read (%s): set aside, %s; its %d bytes from byte %d are not "
            "sent (ktel_agent_spool_unreadable_bytes_total)",
            self._path(seg), unreadable.error.strerror or unreadable.error, self._renamed_aside(seg),
            lost, unreadable.offset,
        )  # fmt: skip
        # Records of it read before the error are still being sent from memory; a restart
        # could not send them again, the segment being aside: lost unless acknowledged.
        in_flight = [(end, n) for end, n in self._handed if end.segment == seg]
        if in_flight:
            self._lost_unless_acked(in_flight)
        if self._ack.segment == seg:
            self._ack = Cursor(min(s for s in self._sizes if s > seg), 0)
            self._forget_before(self._ack)
            self._write_ack()

    # ------------------------------------------------------------------- ack

    def ack(self, upto: Cursor) -> None:
        """Everything before ``upto`` is acknowledged."""
        while self._handed and self._handed[0][0] <= upto:
            self._handed.popleft()
        if self._dropped_in_flight and self._dropped_in_flight[0][0] <= upto:
            while self._dropped_in_flight and self._dropped_in_flight[0][0] <= upto:
                self._dropped_in_flight.popleft()  # delivered: its segment's drop did not lose it
            self._save_in_flight()
        if upto <= self._ack:
            return
        if upto.segment not in self._sizes:
            # A record of a segment set aside (set_aside) after it was read: acknowledged
            # to the next segment, as set_aside does with a cursor in it. Left in it, the
            # cursor counted the bytes before it off the segments left (depth_bytes below
            # 0, which the workers refuse in a heartbeat) until one crossed into a later one.
            upto = Cursor(min(s for s in self._sizes if s > upto.segment), 0)
        self._forget_before(upto)
        crossed = upto.segment > self._ack.segment
        if crossed:
            self._delete_through(upto.segment - 1)
        self._ack = upto
        if crossed or time.monotonic() - self._ack_written >= ACK_WRITE_S:
            self._write_ack()

    def _delete_through(self, seg: int) -> None:
        for s in [s for s in self._sizes if s <= seg and s != self._wseg]:
            if self._rfile is not None and self._rfile[0] == s:
                self._rfile[1].close()  # type: ignore[attr-defined]
                self._rfile = None
            del self._sizes[s]
            self._unlink(s)
        for s in sorted(self._undeleted):
            self._unlink(s)

    def _write_ack(self) -> None:
        cur = self._ack
        line = f"{cur.segment} {cur.offset}".ljust(ACK_BYTES - 1) + "\n"
        try:
            if self._ack_fd is not None and os.fstat(self._ack_fd).st_nlink == 0:
                # The directory was removed under the agent (see _rotate): write where a restart looks.
                self._close_ack()
            if self._ack_fd is None:
                self._ack_fd = os.open(self.dir / "ack", os.O_WRONLY | os.O_CREAT, 0o600)
            written = os.pwrite(self._ack_fd, line.encode(), 0)
            if written != ACK_BYTES:
                raise OSError(f"short write to {self.dir / 'ack'}: {written} of {ACK_BYTES} bytes")
        except OSError as err:
            # Only an older cursor stays on disk: a restart re-sends what it acknowledged
            # since, and the processors drop those batches by their numbers. Logged once
            # per failing stretch, not at every write.
            if not self._ack_failing:
                log.warning("spool ack cursor not written (%s): kept in memory until it can be", err)
            self._ack_failing = True
        else:
            self._ack_failing = False
            self._ack_on_disk = cur
        self._ack_written = time.monotonic()

    def _close_ack(self) -> None:
        if self._ack_fd is not None:
            os.close(self._ack_fd)
            self._ack_fd = None

    def _lost_unless_acked(self, records: list[tuple[Cursor, int]]) -> None:
        """``records`` (end, events), being sent, are on disk no more: counted at the next
        start unless Kafka acknowledges them first (module docstring)."""
        known = set(self._dropped_in_flight)
        self._dropped_in_flight.extend(r for r in records if r not in known)
        # (in order, for ``ack``: a segment set aside can come before an older one dropped)
        self._dropped_in_flight = collections.deque(sorted(self._dropped_in_flight))
        self._save_in_flight()

    def _save_in_flight(self) -> None:
        """Write how many batches (and events) dropped while being sent are still not
        acknowledged, or remove the file when none is (module docstring)."""
        path = self.dir / IN_FLIGHT_FILE
        try:
            if not self._dropped_in_flight:
                path.unlink(missing_ok=True)
                return
            events = sum(n for _, n in self._dropped_in_flight)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "w") as f:
                f.write(f"{len(self._dropped_in_flight)} {events}\n")
            os.replace(tmp, path)
        except OSError as err:
            # (a full disk, say: a stop or a SIGKILL before their acknowledgements then
            # leaves them uncounted)
            log.warning("spool %s not written (%s)", path, err)

    def _count_lost_in_flight(self) -> None:
        """Count as dropped the batches an earlier run dropped while sending them and
        never saw acknowledged (``_save_in_flight``)."""
        path = self.dir / IN_FLIGHT_FILE
        try:
            with open(path, "rb") as f:
                data = f.read(IN_FLIGHT_MAX_BYTES + 1)
            if len(data) > IN_FLIGHT_MAX_BYTES:
                raise ValueError(f"over {IN_FLIGHT_MAX_BYTES} bytes")
            batches, events = (int(n) for n in data.split())
            if batches < 0 or events < 0:
                raise ValueError(f"{batches} batches, {events} events")
        except FileNotFoundError:
            return
        except (OSError, ValueError) as err:
            log.error("spool %s unreadable (%s): the batches it counted are not", path, err)
        else:
            self.dropped_batches += batches
            self.dropped_events += events
            log.error(
                "before this start, %d batches (%d events) left the spool while they were being sent "
                "(a full spool dropped them, or their segment was unreadable) and were not "
                "acknowledged before the agent stopped: lost",
                batches, events,
            )  # fmt: skip
        with contextlib.suppress(OSError):
            path.unlink()

    def close(self) -> None:
        if self._dropped_in_flight:
            log.error(
                "%d batches that left the spool while they were being sent (a full spool dropped "
                "them, or their segment was unreadable) are not acknowledged; the next start "
                "counts them as lost",
                len(self._dropped_in_flight),
            )
        if self._ack != self._ack_on_disk:
            self._write_ack()
        # Every file is closed, whatever fails first (the last fsync on a failing disk),
        # and the failure raised after.
        with contextlib.ExitStack() as closing:
            closing.callback(self._close_ack)
            if self._rfile is not None:
                closing.callback(self._rfile[1].close)  # type: ignore[attr-defined]
            if self._wfile is not None:
                closing.callback(self._wfile.close)
                if self.fsync != "never":
                    os.fsync(self._wfile.fileno())
