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
from collections.abc import Sequence
from typing import Any

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
