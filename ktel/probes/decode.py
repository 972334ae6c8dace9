"""What the probes' decoders share: the framing of ring-buffer records, C strings,
and the kernel's encodings of devices, syscalls, addresses and taint flags.

A decoder turns the bytes one BPF program wrote into a wire event. It runs in
the agent, once per event, so everything here is either a tight loop over a
run of records or cached per distinct value.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

import msgpack

# The ring buffer's 8-byte record header: len (with the kernel's BUSY and DISCARD
# bits), pgoff (include/uapi/linux/bpf.h, kernel/bpf/ringbuf.c).
HEADER = struct.Struct("<II")
HEADER_SIZE = HEADER.size

# A run: (size, data). ``data`` holds records of ``size`` bytes each, as the ring
# buffer frames them: an 8-byte header, the record, padding to a multiple of 8.
Run = tuple[int, bytes]


# One packer for every event the agent packs: its pack() holds the GIL throughout, so
# threads cannot interleave in its buffer.
_PACKER = msgpack.Packer(use_bin_type=True)


def pack_event(event: Sequence[Any]) -> bytes:
    """An event as it lies in a raw batch's ``events`` array: the bytes
    ktel/wire/codec.py's msgpack gives it there (ktel/wire/raw.py, encode_packed)."""
    return _PACKER.pack(event)


class PackedEvents(Sequence[bytes]):
    """Wire events, each packed (``pack_event``), end to end in one buffer, with each
    one's size: how the agent holds events from the ring buffer to a sealed batch,
    whose events array is this buffer as it is (ktel/wire/raw.py, encode_packed).

    One buffer rather than a ``bytes`` per event: packing a tick's events and joining
    them at the seal were about a fifth of the agent's CPU at 10,000 events a second,
    and making, joining and freeing thousands of small ``bytes`` a good part of that
    (bench/RESULTS.md, "Where the agent's CPU goes"). The compiled packer appends to
    ``data`` and ``sizes`` directly (ktel/probes/file_created_pack.c)."""

    __slots__ = ("data", "sizes")

    def __init__(self, events: Iterable[bytes] = ()):
        self.data = bytearray()
        self.sizes = array("I")  # 4 bytes an item on every platform ktel runs on (checked below)
        self.extend(events)

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self) -> Iterator[bytes]:
        """Each event's bytes (for tests and slow paths: the agent never needs them one by one)."""
        at = 0
        for n in self.sizes:
            yield bytes(self.data[at : at + n])
            at += n

    @overload
    def __getitem__(self, i: int) -> bytes: ...
    @overload
    def __getitem__(self, i: slice) -> PackedEvents: ...
    def __getitem__(self, i: int | slice) -> bytes | PackedEvents:
        """An event's bytes, or a copy of a run of them (a slow path: the sizes before it are added up)."""
        if isinstance(i, slice):
            lo, hi, step = i.indices(len(self))
            if step != 1:
                raise ValueError("PackedEvents slices are contiguous")
            return self.split(lo)[1].split(max(hi - lo, 0))[0]
        lo = range(len(self))[i]  # IndexError past either end, negative i from the end
        at = sum(self.sizes[:lo])
        return bytes(self.data[at : at + self.sizes[lo]])

    def append(self, event: bytes) -> None:
        self.data += event
        self.sizes.append(len(event))

    def extend(self, events: Iterable[bytes]) -> None:
        for event in events:
            self.append(event)

    def split(self, n: int) -> tuple[PackedEvents, PackedEvents]:
        """Copies of the first ``n`` events and of the rest."""
        cut = sum(self.sizes[:n])
        first, rest = PackedEvents(), PackedEvents()
        first.data, first.sizes = self.data[:cut], self.sizes[:n]
        rest.data, rest.sizes = self.data[cut:], self.sizes[n:]
        return first, rest

    def take(self, n: int) -> PackedEvents:
        """The first ``n`` events, moved out of this one."""
        taken = PackedEvents()
        if n >= len(self):
            taken.data, self.data = self.data, taken.data
            taken.sizes, self.sizes = self.sizes, taken.sizes
            return taken
        cut = sum(self.sizes[:n])
        taken.data, taken.sizes = self.data[:cut], self.sizes[:n]
        del self.data[:cut], self.sizes[:n]  # (a bytearray drops its head without moving the rest)
        return taken

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` events only."""
        del self.data[sum(self.sizes[:n]) :], self.sizes[n:]


if array("I").itemsize != 4:
    raise ImportError("PackedEvents.sizes needs 4-byte items: file_created_pack.c appends uint32_t")


def c_string(field: bytes) -> str:
    """A NUL-terminated char array of a record as text (what follows the NUL is
    not the record's: the kernel may leave it uninitialised)."""
    return field.partition(b"\0")[0].decode("utf-8", "backslashreplace")


def stride(size: int) -> int:
    """Bytes one record of ``size`` bytes takes in the ring buffer (and in a run)."""
    return (size + HEADER_SIZE + 7) & ~7


def frame(record: bytes) -> Run:
    """One record (e.g. from BCC's callback) as a run of one."""
    size = len(record)
    return size, HEADER.pack(size, 0) + record + bytes(stride(size) - HEADER_SIZE - size)


def count(runs: list[Run]) -> int:
    """Records in ``runs``."""
    return sum(len(data) // stride(size) for size, data in runs)


def records(run: Run) -> list[bytes]:
    """A run's records, one bytes each (the slow path: decoders without a bulk form)."""
    size, data = run
    step = stride(size)
    return [data[o + HEADER_SIZE : o + HEADER_SIZE + size] for o in range(0, len(data), step)]


# ---------------------------------------------------------------- devices

MINORBITS = 20  # the kernel's dev_t: major << 20 | minor (include/linux/kdev_t.h)


def split_dev(dev: int) -> tuple[int, int]:
    """A kernel dev_t as (major, minor)."""
    return dev >> MINORBITS, dev & ((1 << MINORBITS) - 1)


@functools.lru_cache(maxsize=256)
def block_device_name(major: int, minor: int) -> str:
    """The disk's name (e.g. "vda") from sysfs, or "major:minor" if it is gone."""
    try:
        with open(f"/sys/dev/block/{major}:{minor}/uevent") as f:
            for line in f:
                if line.startswith("DEVNAME="):
                    return line.strip().split("=", 1)[1]
    except OSError:
        pass
    return f"{major}:{minor}"


# ---------------------------------------------------------------- syscalls


@functools.lru_cache(maxsize=1024)
def syscall_name(nr: int) -> str:
    """The syscall's name on this architecture (BCC's table), or "" if unknown."""
    try:
        from bcc.syscall import syscall_name as bcc_name  # the agent has BCC; unit tests may not
    except ImportError:
        return ""
    name = bcc_name(nr).decode()
    return "" if name.startswith("[unknown") else name


# ---------------------------------------------------------------- addresses

AF_INET = 2


def inet_address(family: int, raw: bytes) -> str:
    """A socket address's text form: the first 4 bytes for AF_INET, else all 16 (IPv6)."""
    if family == AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw))


# ---------------------------------------------------------------- taint flags

# The kernel's taint letters by bit (kernel/panic.c taint_flags; stable since v4.x,
# RANDSTRUCT 'T' added in v5.18, TEST 'N' in v5.19). A module's taints use the
# same bits: 'O' out-of-tree, 'E' unsigned, 'P' proprietary, 'C' staging, 'F' forced.
TAINT_LETTERS = "PFSRMBUDAWCIOELKXTN"


def taint_letters(taints: int) -> str:
    """The letters of the set taint bits, in bit order ("OE": out-of-tree and unsigned)."""
    return "".join(c for i, c in enumerate(TAINT_LETTERS) if taints >> i & 1)
