"""Pure core of the dedupe stage: drop a batch whose (host, boot, incarnation, seq)
was seen.

State per host (a JSON-able dict in the stage's Faust table)::

    {"seen": {stream: [[lo, hi], ...]},                 # processors/seen.py; bounded, newest last
     "parts": {stream: {str(seq): [[lo, hi], ...]}}}    # events seen of split batches

A stream is one numbering of one agent: its boot id, and its incarnation when the
batch carries one (``boot/incarnation``). An agent whose state was lost numbers
from 0 again under a new incarnation (edge_agent/seqstore.py): a new stream, not
duplicates of the old one's batches. A batch without an incarnation (an agent
from before them) is in the stream of its boot alone, as it always was.

A part (``part``: a batch Kafka refused as too large, split by the agent,
edge_agent/agent.py) keeps its batch's seq and says which of its events it holds.
The events of a seq already seen are duplicates; otherwise the events seen of
that seq are kept as closed intervals of event indexes, a part passes on only
those it adds (a re-sent batch may be split otherwise the second time, or come
whole: then it counts as a part holding every event), and once every event of
the batch was seen the seq joins the stream's intervals.

Batches are untrusted (docs/design.md, principle 11). One whose sequence number
is more than ``MAX_SEQUENCE_GAP`` past the highest its stream has sent is refused:
counted as seen, it would make every real batch up to it a "duplicate". An agent
skips at most one block of numbers per restart (edge_agent/seqstore.py), so a
real gap that large takes thousands of restarts that sent nothing, or an outage
long enough that the agent's full spool dropped that many batches (their numbers
were used when they were sealed). Then every batch after is as far past, and
refusing them all would refuse the host for good: the next batch of the stream
after a refused one, past it and within ``MAX_SEQUENCE_GAP`` of it, re-anchors the
stream there (counted: ``sequence_reanchors``). The refused batch stays refused
(each Dedupe on a batch's way refuses one); one forged number alone still changes
nothing. What was refused is remembered in the worker's memory, not the host's
state: a worker restart between the two costs one more batch refused.

A batch of a stream that is not the host's newest, while that one is live, means
two machines send under one host id (a cloned /etc/machine-id): counted as a host
conflict; both keep their own dedupe record and both are counted.

Every stage that keeps counts runs this check on its own input too, in the
same table value as its counts, so that a batch re-delivered after a crash is
neither lost nor counted twice (its input is at-least-once): a ``Dedupe``
guarding that stage's section (processors/chain.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ktel.wire import RawBatch
from processors import seen
from processors.stage import Result, Stage, State

# Old streams (boots, incarnations) of a host are forgotten beyond this many (their
# batches are long done).
MAX_BOOTS = 4
# The most a stream's sequence may jump past its highest so far (see the module doc).
MAX_SEQUENCE_GAP = 4096 << 12
# Split batches of a stream whose parts are still arriving; beyond it the oldest is
# forgotten, and what of it arrives later counts again. Splits are rare (a batch
# above the broker's message limit) and their parts are sent one after the other.
MAX_SPLIT = 16
# Hosts whose last refused batch (too far past) a Dedupe remembers (a re-anchor needs it).
MAX_REFUSED_HOSTS = 4096


def stream(batch: RawBatch) -> str:
    return batch.boot_id if batch.incarnation is None else f"{batch.boot_id}/{batch.incarnation}"


def first_time(state: dict[str, Any], batch: RawBatch, exact: bool = True) -> RawBatch | None:
    """Record the batch; what of it was not seen before (None: it is a duplicate).
    ``state`` is mutated in place. ``exact``: a part passes on only its events not
    seen before; else it passes on as the run of its events from the first of those
    to the last, as a part again (see ``Dedupe``)."""
    key = stream(batch)
    by_stream = state.setdefault("seen", {})
    intervals = by_stream.setdefault(key, [])
    while len(by_stream) > MAX_BOOTS:
        old = next(iter(by_stream))  # dicts keep insertion order: oldest first
        del by_stream[old]
        state.get("parts", {}).pop(old, None)
    if batch.part is None and str(batch.seq) not in state.get("parts", {}).get(key, ()):
        return batch if seen.add(intervals, batch.seq) else None
    if seen.contains(intervals, batch.seq):
        return None
    # (a whole batch some parts of which came before: a part holding all of it)
    first, total = batch.part or (0, len(batch.events))
    splits = state.setdefault("parts", {}).setdefault(key, {})
    got = splits.setdefault(str(batch.seq), [])
    new = [i for i in range(len(batch.events)) if not seen.contains(got, first + i)]
    for i in new:
        seen.add(got, first + i, max_intervals=total)  # never closes a hole: those events are unseen
    if got == [[0, total - 1]]:
        del splits[str(batch.seq)]
        seen.add(intervals, batch.seq)
    while len(splits) > MAX_SPLIT:
        del splits[next(iter(splits))]
    if not splits:
        del state["parts"][key]
    if not new:
        return None
    if len(new) == len(batch.events):
        return batch
    weights = batch.weights
    if exact:
        return batch.keeping(
            [batch.events[i] for i in new], None if weights is None else [weights[i] for i in new]
        )
    lo, hi = new[0], new[-1] + 1
    run = batch.keeping(batch.events[lo:hi], None if weights is None else weights[lo:hi])
    return dataclasses.replace(run, part=[first + lo, total])


class Dedupe(Stage):
    name = "dedupe"

    def __init__(self, guards: str | None = None):
        """``guards``: the section of the table value its record goes in, that of the
        stage whose counts it guards (processors/chain.py); None: the dedupe stage of
        split mode, whose own section it is.

        A guard passes on exactly the events of a part not seen before. The dedupe
        stage passes on a part's run of events from the first not seen to the last,
        as a part: stages after it index a part's events by where they lie in it
        (the counting stage's guard dedupes them again), and events picked out one
        by one no longer lie where their part says."""
        self.section = guards or self.name
        self.exact = guards is not None
        # host id -> (stream, seq) of its last batch refused as too far past.
        self.last_refused: dict[str, tuple[str, int]] = {}

    def on_batch(self, state: State, batch: RawBatch, now_ms: int) -> Result:
        key = stream(batch)
        by_stream = state.get("seen", {})
        intervals = by_stream.get(key)
        reanchored: Result | None = None
        if intervals and batch.seq > intervals[-1][1] + MAX_SEQUENCE_GAP:
            host = batch.host_id
            last = self.last_refused.pop(host, None)
            if last is None or last[0] != key or not last[1] < batch.seq <= last[1] + MAX_SEQUENCE_GAP:
                self.last_refused[host] = (key, batch.seq)
                while len(self.last_refused) > MAX_REFUSED_HOSTS:
                    del self.last_refused[next(iter(self.last_refused))]
                return Result(
                    None,
                    refused=f"raw batch: sequence {batch.seq} is more than {MAX_SEQUENCE_GAP} past the "
                    f"highest its host and boot sent ({intervals[-1][1]}); the stream re-anchors if "
                    "its next batch follows this one",
                )
            # Taken: a new interval far past the old ones (the numbers between were dropped unsent).
            refusal = {host: last}
            reanchored = Result(
                counts={"sequence_reanchors": 1}, undo=[lambda: self.last_refused.update(refusal)]
            )
        result = self._first_time(state, batch, key, by_stream, intervals)
        return result if reanchored is None else reanchored.then(result)

    def _first_time(
        self, state: State, batch: RawBatch, key: str, by_stream: dict, intervals: list | None
    ) -> Result:
        out_of_turn = intervals is not None and next(reversed(by_stream)) != key
        fresh = first_time(state, batch, self.exact)
        if fresh is not None:
            if out_of_turn:
                # Its stream becomes the newest: two live ones alternating count every switch.
                state["seen"][key] = state["seen"].pop(key)
                return Result(fresh, changed=True, counts={"host_conflicts": 1})
            return Result(fresh, changed=True)
        # Written back all the same: the dedupe record may have been trimmed.
        return Result(None, changed=True, counts={"duplicates": 1})

    def forget(self, host_id: str) -> Result:
        self.last_refused.pop(host_id, None)
        return Result()
