"""Pure core of the dedupe stage: drop a batch whose (host, boot, seq) was seen.

State per host (a JSON-able dict in the stage's Faust table)::

    {"seen": {boot_id: [[lo, hi], ...]}}    # processors/seen.py; bounded, newest boot last

Batches are untrusted (docs/design.md, principle 11). One whose sequence number
is more than ``MAX_SEQUENCE_GAP`` past the highest its boot has sent is refused:
counted as seen, it would make every real batch up to it a "duplicate". An agent
skips at most one block of numbers per restart (edge_agent/seqstore.py), so a
real gap that large takes thousands of restarts that sent nothing. A batch of a
boot that is not the host's newest, while that one is live, means two machines
send under one host id (a cloned /etc/machine-id): counted as a host conflict;
both keep their own dedupe record and both are counted.

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
# The most a boot's sequence may jump past its highest so far (see the module doc).
MAX_SEQUENCE_GAP = 4096 << 12


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
        by_boot = state.get("seen", {})
        intervals = by_boot.get(batch.boot_id)
        if intervals and batch.seq > intervals[-1][1] + MAX_SEQUENCE_GAP:
            return Result(
                None,
                refused=f"raw batch: sequence {batch.seq} is more than {MAX_SEQUENCE_GAP} past the "
                f"highest its host and boot sent ({intervals[-1][1]})",
            )
        newest = next(reversed(by_boot), None)
        out_of_turn = intervals is not None and newest != batch.boot_id
        if first_time(state, batch):
            if out_of_turn:
                # Its boot becomes the newest: two live boots alternating count every switch.
                state["seen"][batch.boot_id] = state["seen"].pop(batch.boot_id)
                return Result(batch, changed=True, counts={"host_conflicts": 1})
            return Result(batch, changed=True)
        # Written back all the same: the dedupe record may have been trimmed.
        return Result(None, changed=True, counts={"duplicates": 1})
