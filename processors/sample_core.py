"""Pure core of the sample stage: adaptive sampling with weights, and anomaly
detection that turns a host's probe fidelity up and down through ktel.control.

Keep policies, in order (the first that applies decides):

1. ``keep_kinds``: rare or error kinds (OOM kills, retransmits, drops) are
   always kept, with their weight unchanged.
2. ``keep_slow``: an event whose field is at or above its kind's threshold is
   kept, weight unchanged. No setting configures it: its one rule keeps kernel
   spans of status ERROR (``ktel_span`` with ``status`` 2), as tail samplers keep
   errors, and no event is kept for being slow (a DNS lookup, a span's duration).
   Kernel code's gauge readings (``ktel_metric`` of type gauge) are kept too: a
   gauge's value is its last reading, which no weight stands in for, and one
   sampled out would leave its series at the reading before, for good when it was
   the last.
3. Everything else is kept with probability ``p = baseline``, lowered further
   for a kind whose rate in the last window exceeded its budget
   (``budget_per_s``, this worker's share of the fleet-wide budget:
   p = min(baseline, budget / rate), the rate of events as they arrive, whatever
   their weights). A kept event's weight is divided by p, so a weighted count
   stays an unbiased estimate of the true count; an event whose weight would
   pass the wire's bound (``MAX_WEIGHT``) is kept as it is.

Decisions are deterministic per batch (the random stream is seeded with the
batch's host, boot and sequence number), so a batch re-processed after a crash
is sampled the same way.

Anomaly detection, per host: an EWMA of the host's (weighted) event rate per
window, over the time the window really took. Only full windows count: not
the one a host shows up in (first seen, back after a pause, or after a restart
or a rebalance of the worker), which holds its traffic only from its first
batch on, nor one without any batch (a pause, or its partition moved away),
which would drag the baseline down and make its return look like a spike.
A window whose rate exceeds ``spike_factor`` times the EWMA (and ``min_rate``)
marks the host anomalous and yields a command raising its probes to
``raised_sample_every`` for ``command_ttl_seconds`` (from when the agent applies
it); the EWMA does not learn from anomalous windows. The first window back
under the threshold yields a restore, which ends the raise: each agent's
configured rate (``agent.sample_every``) comes back. An agent that predates
restores applies the restore's ``normal_sample_every`` for ``command_ttl_seconds``
instead (ktel/wire/control.py). A spike that lasts as long as the raise holds is
the host's rate now: it becomes the baseline, with a restore.
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence, Set
from typing import TYPE_CHECKING, Any

from ktel.probes import HISTOGRAM_DELTA, KINDS, PROBE_OF_KIND
from ktel.wire import KTEL_METRIC, ControlCommand, RawBatch
from ktel.wire.control import sample_command_id
from ktel.wire.raw import MAX_WEIGHT
from processors.stage import FromConfig, Result, Stage, State

if TYPE_CHECKING:
    from ktel.config import SampleConfig

# A host silent for this many windows is forgotten by the anomaly detector.
IDLE_WINDOWS = 30

# Kinds the sampler always keeps, as their probes declare them (rare, or errors).
KEEP_KINDS = frozenset(k.name for k in KINDS.values() if k.keep)


def probes_of(kind_ids: set[int]) -> set[str]:
    """The probes that sent these kinds (fidelity commands name probes). Histogram
    deltas are summaries, not events: they are never sampled and do not count
    toward a host's event rate."""
    return {PROBE_OF_KIND[k] for k in kind_ids if k in PROBE_OF_KIND}


@dataclasses.dataclass(frozen=True)
class Options(FromConfig):
    keep_kinds: frozenset[str] = KEEP_KINDS
    # Kernel spans with status ERROR (2) are always kept, as tail samplers keep errors.
    keep_slow: dict[str, tuple[str, float]] = dataclasses.field(
        default_factory=lambda: {"ktel_span": ("status", 2)}
    )
    baseline: float = 1.0
    budget_per_s: dict[str, float] = dataclasses.field(default_factory=dict)
    window_seconds: float = 10.0
    ewma_alpha: float = 0.3
    spike_factor: float = 3.0
    min_rate: float = 10.0
    raised_sample_every: int = 1
    normal_sample_every: int = 1
    command_ttl_seconds: float = 300.0

    @classmethod
    def from_config(cls, section: Any) -> Options:
        opts = super().from_config(section)
        return dataclasses.replace(opts, keep_kinds=frozenset(opts.keep_kinds))  # the config's is a list


class Sampler:
    """Per-worker sampling state: the per-kind rates of the last window."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.kind_p: dict[int, float] = {}
        self.window_counts: dict[int, float] = defaultdict(float)
        self.kept = 0
        self.sampled_out = 0
        self.keep_ids = {k.id for k in KINDS.values() if k.name in opts.keep_kinds} | {HISTOGRAM_DELTA.id}
        # kind id -> (index of the field in the event array, threshold)
        self.slow = {
            k.id: (k.index(field), threshold)
            for k in KINDS.values()
            if k.name in opts.keep_slow
            for field, threshold in [opts.keep_slow[k.name]]
        }

    def sample(self, batch: RawBatch, keep_all: bool = False) -> RawBatch:
        """The kept events of a batch, with their weights; ``keep_all``: every event
        kept, counted in the window's rates all the same."""
        opts = self.opts
        rng: random.Random | None = None  # (seeded when first needed: most batches sample nothing out)
        weights_in = batch.weights or [1.0] * len(batch.events)
        keep_ids, slow = self.keep_ids, self.slow
        metric_id, metric_type = KTEL_METRIC.id, KTEL_METRIC.index("type")
        events, weights = [], []
        for ev, w in zip(batch.events, weights_in, strict=True):
            kind = ev[0]
            # The events that arrive, not their weights: the budget is what the pipeline
            # handles, and one event claiming to stand for 2**53 (any client can write
            # the topics) would sample the kind down for every host of the worker.
            self.window_counts[kind] += 1
            if (
                keep_all
                or kind in keep_ids
                or (kind in slow and ev[slow[kind][0]] >= slow[kind][1])
                or (kind == metric_id and ev[metric_type] == "gauge")
            ):
                p = 1.0
            else:
                p = self.kind_p.get(kind, opts.baseline)
                if w / p > MAX_WEIGHT:
                    p = 1.0  # (kept as it is: a weight past the wire's bound would refuse the batch)
                if p < 1.0:
                    if rng is None:
                        seed = hashlib.blake2b(f"{batch.host_id}/{batch.boot_id}/{batch.seq}".encode())
                        rng = random.Random(seed.digest())
                    if rng.random() >= p:
                        self.sampled_out += 1
                        continue
            events.append(ev)
            weights.append(w / p)
        self.kept += len(events)
        uniform = weights.count(1.0) == len(weights)
        return batch.keeping(events, None if uniform else weights)

    def undoer(self) -> Callable[[], None]:
        """How to put the window's rates and the tallies back as they are now."""
        counts, kept, sampled_out = dict(self.window_counts), self.kept, self.sampled_out

        def undo() -> None:
            self.window_counts = defaultdict(float, counts)
            self.kept, self.sampled_out = kept, sampled_out

        return undo

    def end_window(self, share: float = 1.0) -> None:
        """Recompute per-kind keep probabilities from the window's rates.

        ``share``: the fraction of the fleet's partitions this worker holds, so
        the workers together spend the fleet-wide budget.
        """
        opts = self.opts
        self.kind_p = {}
        for kind_id, count in self.window_counts.items():
            kind = KINDS.get(kind_id)
            budget = opts.budget_per_s.get(kind.name) if kind else None
            rate = count / opts.window_seconds
            # A window closed holding no partition (mid-rebalance: share 0) has no budget
            # to spend, and rates of partitions no longer held: a keep probability of 0
            # would divide the weights of the kind's next events by 0.
            if budget is not None and share > 0 and rate > budget * share:
                self.kind_p[kind_id] = min(opts.baseline, budget * share / rate)
        self.window_counts.clear()


class Sample(Stage):
    """The stage: the Sampler on each batch; each window, its per-kind rates and
    every host's anomaly state (``observe_host``) closed.

    Per host, in the worker (not durable: timers close the windows, and Faust
    lets only a stream write to a table; a restart or a rebalance relearns a
    host's baseline in a few windows): what ``observe_host`` keeps, and
    ``probes`` (those the host's events came from, which its commands name)
    and ``seen_ms`` (its last batch, by the worker's clock).
    """

    name = "sample"
    durable = False

    def __init__(self, opts: Options, parts_whole: bool = False):
        """``parts_whole``: a part of a split batch (``RawBatch.part``) passes on with
        every event, as in split mode: the aggregate's guard, on the other side of a
        topic, finds a part's events by where they lie in it, which sampling out some
        would shift (fused, the guard comes first, and the sampler samples parts too).
        Parts are rare: the batches Kafka refused as too large."""
        super().__init__()
        self.sampler = Sampler(opts)
        self.window_s = opts.window_seconds
        self.parts_whole = parts_whole

    @classmethod
    def from_config(cls, section: SampleConfig, parts_whole: bool = False) -> Sample:
        return cls(Options.from_config(section), parts_whole)

    def on_batch(self, state: State, batch: RawBatch, now_ms: int) -> Result:
        events = sum(batch.weights) if batch.weights else len(batch.events)
        state["count"] = state.get("count", 0.0) + events
        probes = probes_of({ev[0] for ev in batch.events})
        if "probes" not in state or not probes.issubset(state["probes"]):
            state["probes"] = sorted(probes.union(state.get("probes", ())))
        state["seen_ms"] = now_ms
        undo = self.sampler.undoer()
        kept = self.sampler.sample(batch, keep_all=self.parts_whole and batch.part is not None)
        emitted = by_kind(batch.events)
        return Result(
            kept,
            counts={"sampled_out": len(batch.events) - len(kept.events)},
            # (a batch kept whole is the batch itself: its kinds counted once)
            kind_counts={
                "sampler_emitted": emitted,
                "sampler_kept": emitted if kept is batch else by_kind(kept.events),
            },
            undo=[undo],
        )

    def on_window(
        self, states: dict[str, State], now_ms: int, share: float, reading: Set[str] = frozenset()
    ) -> Result:
        self.sampler.end_window(share=share)
        out = Result()
        opts = self.sampler.opts
        for host_id, state in list(states.items()):
            if now_ms - state["seen_ms"] > IDLE_WINDOWS * opts.window_seconds * 1000:
                del states[host_id]  # gone quiet, or its partition moved to another worker
                continue
            out.commands += observe_host(state, host_id, state["probes"], now_ms, opts)
        return out


KIND_OF = operator.itemgetter(0)  # an event's kind id


def by_kind(events: Sequence[Sequence[Any]]) -> dict[str, float]:
    """Events per kind name (SLI M12: the sampler's kept / emitted ratio per kind)."""
    # Counted in C (Counter over map): a generator would cost a third of the sampling.
    return {KINDS[kind].name: n for kind, n in Counter(map(KIND_OF, events)).items()}


def observe_host(
    state: dict[str, Any], host_id: str, probes: list[str], now_ms: int, opts: Options
) -> list[ControlCommand]:
    """Close one window of a host's anomaly state; returns the commands to send.

    ``state`` (mutated) holds ``count`` (weighted events since the last close),
    ``closed_ms`` (that close), ``sending`` (the host sent in that window, so
    was sending when this one began), ``ewma``, ``anomalous`` and
    ``raised_until`` (ms).
    """
    count, state["count"] = state.get("count", 0.0), 0.0
    closed_ms, state["closed_ms"] = state.get("closed_ms"), now_ms
    was_sending, state["sending"] = state.get("sending", False), count > 0
    if closed_ms is None or not was_sending or count == 0 or now_ms <= closed_ms:
        return []  # not a full window (see the module doc)
    # Over the time that passed: a timer that fires late (a busy worker) puts
    # more than one window's events into this one.
    rate = count / ((now_ms - closed_ms) / 1000)
    ewma = state.get("ewma")
    ttl_ms = int(opts.command_ttl_seconds * 1000)

    def command(every: int, what: str) -> list[ControlCommand]:
        # ttl_ms holds from when each agent applies the command, whatever its clock;
        # until_ms is for agents that predate ttl_ms (ktel/wire/control.py). A restore
        # ends the raise; agents that predate restores apply its rate for the TTL.
        return [
            ControlCommand(
                sample_command_id(what, host_id, p, now_ms),
                host_id,
                p,
                every,
                now_ms + ttl_ms,
                ttl_ms,
                restore=what == "restore",
            )
            for p in probes
        ]

    if ewma is None:
        state["ewma"] = rate
        return []
    spike = rate > opts.spike_factor * ewma and rate > opts.min_rate
    if spike and not state.get("anomalous"):
        state["anomalous"], state["raised_until"] = True, now_ms + ttl_ms
        return command(opts.raised_sample_every, "raise")
    if spike and state["raised_until"] - now_ms > opts.window_seconds * 1000 * 2:
        return []  # still raised
    # Back under the threshold; or spiking as long as the raise holds, which makes
    # it the host's rate now (else the baseline would never learn it, nor the
    # raise end).
    commands = command(opts.normal_sample_every, "restore") if state.get("anomalous") else []
    state["anomalous"], state["raised_until"] = False, 0
    state["ewma"] = rate if spike else opts.ewma_alpha * rate + (1 - opts.ewma_alpha) * ewma
    return commands
