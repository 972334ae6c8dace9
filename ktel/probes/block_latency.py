"""Probe block_latency: log2 histograms of block I/O latency (issue to completion) per
device and operation (block:block_rq_issue/block_rq_complete), kept in the kernel.

``KEY`` reads ``struct block_latency_key`` of bpf/block_latency.h.
"""

from __future__ import annotations

import struct
from typing import Any

from ktel.probes import Histogram, Layout, Probe
from ktel.probes.decode import block_device_name, split_dev

KEY = struct.Struct("<IB3x")
METRIC = "block_latency"
OPS = {"R": "read", "W": "write", "D": "discard", "F": "flush"}


def labels(key: bytes) -> dict[str, Any]:
    dev, op = KEY.unpack(key)
    major, minor = split_dev(dev)
    return {
        "device": block_device_name(major, minor),
        "device.major": major,
        "device.minor": minor,
        "op": OPS.get(chr(op), "other"),
    }


PROBE = Probe(
    name="block_latency",
    summary="histograms of block I/O latency per device and operation, kept in the kernel",
    tracepoints=("block/block_rq_issue", "block/block_rq_complete"),
    histograms=(Histogram("hist", METRIC, labels),),
    layouts=(Layout("block_latency.h", "block_latency_key", KEY, ("dev", "op"), event=False),),
)
