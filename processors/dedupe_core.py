"""Pure core of the dedupe stage: drop a batch whose (host, boot, seq) was seen.

State per host (a JSON-able dict in the stage's Faust table)::

    {"seen": {boot_id: [[lo, hi], ...]}}    # processors/seen.py; bounded

Every stage that keeps counts runs this check on its own input too, in the
same table value as its counts, so that a batch re-delivered after a crash is
neither lost nor counted twice (its input is at-least-once): a ``Dedupe``
guarding that stage's section (processors/chain.py).
"""

from __future__ import annotations

from typing import Any

from ktel.wire import RawBatch
from processors import seen
from processors.stage import Result, Stage, State

# Old boots of a host are forgotten beyond this many (their batches are long done).
MAX_BOOTS = 4


def first_time(state: dict[str, Any], batch: RawBatch) -> bool:
    """Record the batch; False if it is a duplicate (state mutated in place)."""
    by_boot = state.setdefault("seen", {})
    intervals = by_boot.setdefault(batch.boot_id, [])
    if not seen.add(intervals, batch.seq):
        return False
    while len(by_boot) > MAX_BOOTS:
        del by_boot[next(iter(by_boot))]  # dicts keep insertion order: oldest first
    return True


class Dedupe(Stage):
    name = "dedupe"

    def __init__(self, guards: str = name):
        """``guards``: the section of the table value its record goes in."""
        self.section = guards

    def on_batch(self, state: State, batch: RawBatch, now_ms: int) -> Result:
        if first_time(state, batch):
            return Result(batch, changed=True)
        # Written back all the same: the dedupe record may have been trimmed.
        return Result(None, changed=True, counts={"duplicates": 1})
