"""Labels of the block_latency probe's histograms (bpf/block_latency.{h,bpf.c}).

``KEY`` mirrors ``struct block_latency_key`` in bpf/block_latency.h;
tests/unit/test_probe_layout.py compiles the header and checks they agree.
"""

from __future__ import annotations

import functools
import struct
from typing import Any

KEY = struct.Struct("<IB3x")
METRIC = "block_latency"
MINORBITS = 20  # the kernel's dev_t: major << 20 | minor (include/linux/kdev_t.h)
OPS = {"R": "read", "W": "write", "D": "discard", "F": "flush"}


@functools.lru_cache(maxsize=256)
def device_name(major: int, minor: int) -> str:
    """The disk's name (e.g. "vda") from sysfs, or "major:minor" if it is gone."""
    try:
        with open(f"/sys/dev/block/{major}:{minor}/uevent") as f:
            for line in f:
                if line.startswith("DEVNAME="):
                    return line.strip().split("=", 1)[1]
    except OSError:
        pass
    return f"{major}:{minor}"


def split_dev(dev: int) -> tuple[int, int]:
    return dev >> MINORBITS, dev & ((1 << MINORBITS) - 1)


def labels(key: bytes) -> dict[str, Any]:
    dev, op = KEY.unpack(key)
    major, minor = split_dev(dev)
    return {
        "device": device_name(major, minor),
        "device.major": major,
        "device.minor": minor,
        "op": OPS.get(chr(op), "other"),
    }
