"""Which batch sequence numbers of one agent stream were already counted.

Kept as sorted, disjoint, closed intervals ``[[lo, hi], ...]`` so that the
usual case (batches arrive in order) is one interval however long the stream
runs, and the state fits in one small changelog message. Out-of-order
arrivals (a re-sent batch after a broker outage) add a few intervals that
merge back as the holes fill.

Invariant: at most ``max_intervals`` intervals. When a new hole would exceed
it, the oldest hole is closed (its numbers are treated as seen). Holes are
normal: an agent restart skips the rest of its reserved block of numbers
(edge_agent/seqstore.py) and a hole that old will not be filled. The cost of
closing a hole that *would* be filled later is dropping a late batch as a
duplicate, which is counted (ktel_processor_duplicate_batches_total).
"""

from __future__ import annotations

import bisect

MAX_INTERVALS = 32


def add(intervals: list[list[int]], seq: int, max_intervals: int = MAX_INTERVALS) -> bool:
    """Record ``seq``; returns False if it was already seen (a duplicate).

    Mutates ``intervals`` in place.
    """
    i = bisect.bisect_right(intervals, [seq, float("inf")])  # first interval with lo > seq
    if i > 0 and intervals[i - 1][1] >= seq:
        return False
    joins_left = i > 0 and intervals[i - 1][1] == seq - 1
    joins_right = i < len(intervals) and intervals[i][0] == seq + 1
    if joins_left and joins_right:
        intervals[i - 1][1] = intervals[i][1]
        del intervals[i]
    elif joins_left:
        intervals[i - 1][1] = seq
    elif joins_right:
        intervals[i][0] = seq
    else:
        intervals.insert(i, [seq, seq])
        if len(intervals) > max_intervals:
            # Close the oldest hole: merge the first two intervals.
            intervals[1][0] = intervals[0][0]
            del intervals[0]
    return True


def contains(intervals: list[list[int]], seq: int) -> bool:
    i = bisect.bisect_right(intervals, [seq, float("inf")])
    return i > 0 and intervals[i - 1][1] >= seq
