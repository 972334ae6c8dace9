"""Reading a BPF ring buffer in bulk, from its memory-mapped pages.

BCC's ``ring_buffer_poll`` calls a Python function through ctypes for every
record (about 1 µs each on these machines: the agent's former ceiling). The
kernel's ring-buffer ABI lets a reader map the buffer and take every committed
record in one pass instead (include/uapi/linux/bpf.h, kernel/bpf/ringbuf.c)::

    map offset 0, one page, read-write   consumer_pos (u64): how far the reader got
    map offset 1 page, one page, read-only  producer_pos (u64): how far producers reserved
    then max_entries bytes, read-only,   the data, mapped twice in a row, so a record
    mapped twice                         that wraps around the end is contiguous
    a record                             u32 len (bit 31 BUSY: reserved, not yet
                                         committed; bit 30 DISCARD), u32 pgoff, len
                                         bytes, padded to a multiple of 8

A pass reads producer_pos, walks the record headers from consumer_pos up to the
first busy record, copies each run of committed records of one size as one
``bytes`` (headers included: a decoder skips them with its struct format), then
stores the new consumer_pos. The header walk is done a run at a time: the len
words of the records that may follow are read with one strided memoryview copy
and compared with the expected words in one bytes comparison, so the per-record
cost is a few bytes of memcmp, not a Python step. The look-ahead starts small and
doubles while the words match, so records of alternating sizes (the process
probe's exec and exit) cost a short look each, not a look to the end of the backlog.

Memory order: libbpf reads producer_pos and each len with acquire loads and
stores consumer_pos with a release store. On x86-64 (TSO) plain loads and stores
give exactly that, and an aligned 8-byte store is atomic. Other architectures
need barriers Python cannot issue, so there the agent keeps BCC's callback reader
(``BULK_READ``) and hands its records over in the same framed form.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import platform
import select
import struct

from ktel.probes.decode import Run, stride

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
_LEN = struct.Struct("<I")
_POS = struct.Struct("<Q")
_FIRST_LOOK = 16  # records looked ahead first, doubled while they match

# Where plain loads and stores order as the ring buffer's ABI needs.
BULK_READ = platform.machine() in ("x86_64", "AMD64")


class RingReader:
    """Reads a BPF_MAP_TYPE_RINGBUF map (by its fd) through its mapped pages."""

    def __init__(self, map_fd: int, max_entries: int):
        page = mmap.PAGESIZE
        if max_entries <= 0 or max_entries & (max_entries - 1) or max_entries % page:
            raise ValueError(f"a ring buffer's size is a power-of-two number of pages, not {max_entries}")
        self.size = max_entries
        self._mask = max_entries - 1
        rw, ro = mmap.PROT_READ | mmap.PROT_WRITE, mmap.PROT_READ
        # Undone if a later step fails (the caller then reads through BCC): a mapping
        # left behind would keep the map alive after the probe is detached.
        with contextlib.ExitStack() as undo:
            self._epoll = undo.enter_context(select.epoll())
            # Edge-triggered: a wait ends on the kernel's next wake-up, not whenever records
            # are there (the probes ask for wake-ups only when their buffer is filling).
            self._epoll.register(map_fd, select.EPOLLIN | select.EPOLLET)
            # wake() ends a wait from another thread: a reader asleep until its next tick
            # (up to agent.read_interval_ms) would otherwise hold up the agent's stop.
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            undo.callback(os.close, self._wake_fd)
            self._epoll.register(self._wake_fd, select.EPOLLIN)
            self._cons_map = undo.enter_context(mmap.mmap(map_fd, page, mmap.MAP_SHARED, rw, offset=0))
            self._prod_map = undo.enter_context(
                mmap.mmap(map_fd, page + 2 * max_entries, mmap.MAP_SHARED, ro, offset=page)
            )
            undo.pop_all()
        # An aligned 8-byte store through ctypes: the kernel never sees a torn consumer_pos.
        self._cons = ctypes.c_uint64.from_buffer(self._cons_map)
        self._view = memoryview(self._prod_map)
        self._data = page  # where the data starts in _prod_map

    def wait(self, timeout_s: float) -> bool:
        """Wait until the kernel wakes the reader, wake() is called or the time is up;
        True if the kernel woke it."""
        woke = False
        for fd, _ in self._epoll.poll(timeout_s):
            if fd == self._wake_fd:
                with contextlib.suppress(BlockingIOError):  # another wait took it
                    os.eventfd_read(fd)
            else:
                woke = True
        return woke

    def wake(self) -> None:
        """End the current (or next) wait() at once; safe from any thread."""
        os.eventfd_write(self._wake_fd, 1)

    def read(self, max_bytes: int | None = None) -> list[Run]:
        """Take the committed records, as runs of records of one size, in order: all
        of them, or about ``max_bytes`` of them (at least one record if max_bytes > 0)."""
        cons = pos = self._cons.value
        prod = _POS.unpack_from(self._prod_map, 0)[0]
        end = prod if max_bytes is None else min(prod, pos + max_bytes)
        mm, view, base, mask = self._prod_map, self._view, self._data, self._mask
        runs: list[Run] = []
        while pos < end:
            start = base + (pos & mask)
            word = _LEN.unpack_from(mm, start)[0]
            if word & BUSY_BIT:
                break
            size = word & ~DISCARD_BIT
            step = stride(size)
            if word & DISCARD_BIT:
                pos += step
                continue
            # How many records of this size follow, committed, up to producer_pos
            # (and within max_bytes, but at least this one).
            most = max((end - pos) // step, 1)
            n, look = 1, _FIRST_LOOK
            while n < most:
                k = min(look, most - n)
                at = start + n * step  # (a stride is a multiple of 8: the len words are a strided u32 view)
                got = view[at : at + k * step].cast("I")[:: step // 4].tobytes()
                want = _LEN.pack(size) * k
                if got != want:
                    n += _common_prefix(got, want) // 4
                    break
                n += k
                look *= 2
            runs.append((size, mm[start : start + n * step]))
            pos += n * step
        if pos != cons:
            self._cons.value = pos
        return runs

    def close(self) -> None:
        self._epoll.close()
        os.close(self._wake_fd)
        del self._cons
        self._view.release()
        self._cons_map.close()
        self._prod_map.close()


def _common_prefix(a: bytes, b: bytes) -> int:
    """Length of the longest common prefix of two equally long bytes."""
    lo, hi = 0, len(a)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
