"""ktel's log2 histograms as base-2 exponential buckets: Prometheus native histograms
(schema 0) and OpenTelemetry exponential histograms (scale 0).

The kernel's histograms (bpf/ktel_hist.h) count whole nanoseconds: slot i holds
values v with 2^i <= v < 2^(i+1), slot 0 holds 0 and 1, and the last slot every v
from 2^(slots-1) up. A duration truncated to whole nanoseconds lands in slot i
exactly when the duration t itself is in [2^i, 2^(i+1)). Exponential buckets are
closed at the top: Prometheus' schema-0 bucket k is (2^(k-1), 2^k], OpenTelemetry's
scale-0 bucket k is (2^k, 2^(k+1)]. So, exactly (the intervals differ only in their
two end points, a single duration each):

- slot i >= 1 -> Prometheus bucket i + 1, OpenTelemetry bucket i;
- slot 0, [0, 2) -> the zero bucket, with a zero threshold of 2: [0, 2];
- the last slot, every duration from 2^(slots-1) ns (about 9 minutes with 40 slots)
  up, -> the bucket above 2^(slots-1): exponential buckets have no +Inf bucket, so
  anything longer than 2^slots ns is counted there too.

The power-of-two bounds are the kernel's, in its unit. The aggregate exports latency
in seconds (``*_seconds``, bounds 2^(i+1) * 1e-9), and no power of two in seconds
falls on a power of two in nanoseconds, so those go out in nanoseconds, renamed
``*_nanoseconds``: re-bucketing into powers of two of a second would move counts
between buckets. A histogram with other bounds than the kernel's (in its unit, or in
seconds for a ``*_seconds`` name) has no exact exponential form and keeps its explicit
buckets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ktel.wire import log2_bounds

# The zero bucket holds the kernel's slot 0: values below 2 (and 2 itself, a single point).
ZERO_THRESHOLD = 2.0
SECONDS, NANOSECONDS = "_seconds", "_nanoseconds"
# A native histogram's buckets go out as differences of neighbouring counts, each an
# int64 (prompb ``positive_deltas``, sint64). The wire takes counts up to 2^64 - 1, and
# a difference past int64 wraps into a negative bucket, which Prometheus refuses with
# a 500 that is retried for ever. A histogram counting more than this (only a hostile
# or broken host's) keeps its explicit buckets, whose counts go out as floats.
INT64_MAX = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class Exponential:
    """A histogram in base-2 exponential buckets, in the kernel's unit.

    ``counts[j]`` counts values in (2^(offset+j), 2^(offset+j+1)] (OpenTelemetry's
    bucket ``offset + j``, Prometheus' ``offset + j + 1``); leading and trailing
    empty buckets are left out."""

    name: str
    unit: str  # "ns" when converted from seconds, else "" (the name's own unit)
    count: int
    sum: float
    zero_count: int
    offset: int
    counts: list[int]


def exponential(name: str, h: dict[str, Any]) -> Exponential | None:
    """The histogram's exact exponential form, or None when its bounds are not log2
    bounds, it counts more than INT64_MAX, or its sum in nanoseconds is past a double."""
    counts, bounds = h["counts"], h["bounds"]
    slots = len(counts)
    if slots < 2 or h["count"] > INT64_MAX:
        return None
    if bounds == log2_bounds(slots):
        unit, total = "", h["sum"]
    elif name.endswith(SECONDS) and bounds == log2_bounds(slots, 1e-9):
        name, unit, total = name.removesuffix(SECONDS) + NANOSECONDS, "ns", h["sum"] * 1e9
        if not math.isfinite(total):
            # (a sum of seconds beyond about 1.8e299, only a hostile or broken host's, is
            # no double in nanoseconds: it would go out as +Inf)
            return None
    else:
        return None
    first = next((i for i in range(1, slots) if counts[i]), slots)
    last = max((i for i in range(1, slots) if counts[i]), default=first - 1)
    return Exponential(name, unit, h["count"], total, counts[0], first, list(counts[first : last + 1]))
