"""The one shape of every processing stage core, which processors/chain.py
composes and processors/stages.py runs on Faust.

A stage is an object built from its config section (its ``Options``, named
as the section names them, come from ``Options.from_config(section)``; tests
build them directly, also with parameters no config sets). It keeps its
per-host state in a JSON-able dict it is handed, and answers:

- ``on_batch(state, batch, now_ms)``: one batch of a host, with that host's
  state (mutated in place). The ``Result`` holds the batch it passes on (None:
  dropped, e.g. a duplicate) and what it emits.
- ``on_window(states, now_ms, share, reading)``: timer work every ``window_s`` seconds,
  due on its multiples since the epoch (None: no timer), over every host's state:
  the sample stage closes its rate window and sends fidelity commands, the
  aggregate stage emits its snapshots.
  ``share`` is the fraction of ktel.raw's partitions the worker holds. A
  stage whose state is not durable forgets a host by deleting it from ``states``.
  ``reading``: the hosts whose partition still holds records that were there when
  the worker took it (its backlog after a restart or a rebalance): their silence
  so far says nothing, so none of them is forgotten as silent.
- ``on_heartbeat(state, heartbeat)``, for a stage with ``heartbeats`` set (enrich):
  a ``Result`` without a batch, ``changed`` if the heartbeat changed the host's state.
- ``forget(host_id)``: the host left this worker; what the stage keeps of it in
  memory, outside ``states``, goes (the enrich stage's process count).

Where the state lives is the stage's ``durable``: True, in ``section`` of the
host's table value, which goes to the changelog whenever a batch's ``changed``
is set (of its big maps only the entries the stage reports in ``Result.touched``:
processors/changelog.py); False, in the worker's memory, relearnt after a restart or a
rebalance (the sample stage's rates, which timers change and Faust lets only
streams write to a table). ``now_ms`` is the worker's clock, for the stages
that keep time by it (sample); the others go by the batches' own times so the
same input always gives the same output.

A record the runner refuses after the stages ran (the host's table value would
grow past ``process.max_state_bytes``) must leave every piece of state as it
was: the runner puts the table value back, the chain a non-durable stage's
state, and a stage that keeps other state of its own (the sampler's rates, the
enrich process count) adds to its ``Result.undo`` how to take its change back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Set
from typing import Any, ClassVar, Self

from pydantic import BaseModel

from ktel.wire import ControlCommand, LogBatch, MetricSnapshot, RawBatch, SpanBatch

State = dict[str, Any]
# An entry's value before a record changed it, when it had none.
MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING"})()


def copied(value: Any) -> Any:
    """A copy of a piece of JSON-able state (dicts, lists and scalars), nothing shared
    but the scalars: ``copy.deepcopy`` for this shape, at a few times its speed (it
    runs for every batch, to put the state back for a refused record)."""
    if isinstance(value, dict):
        return {k: copied(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copied(v) for v in value]
    return value


class Touched(dict[tuple[str, ...], Any]):
    """The entries of a host's entry maps (processors/changelog.py) a record changed:
    path (from the stage's section, or from the host's value once the chain has them)
    -> the entry's value before, MISSING if it had none. The record's changelog
    delta carries these entries alone, and the runner puts them back for a record
    it refuses."""

    def touch(self, table: dict[str, Any], path: tuple[str, ...]) -> None:
        """The entry ``path[-1]`` of ``table`` (at ``path``) is about to change."""
        if path not in self:  # its value before the record, not before a later change
            was = table.get(path[-1], MISSING)
            self[path] = was if was is MISSING else copied(was)


@dataclasses.dataclass
class Result:
    """What a stage made of a batch or a window."""

    batch: RawBatch | None = None  # passed on to the next stage or topic; None: dropped
    changed: bool = False  # the host's state changed in a way worth a changelog record
    touched: Touched = dataclasses.field(default_factory=Touched)  # which entries (see Touched)
    # Why a stage refuses the batch (its state unchanged): the runner dead-letters it.
    refused: str | None = None
    # Hosts a stage is done with (gone silent): the runner deletes their table values.
    forget: list[str] = dataclasses.field(default_factory=list)
    snapshots: list[tuple[str, MetricSnapshot]] = dataclasses.field(default_factory=list)  # (host id, ...)
    spans: list[SpanBatch] = dataclasses.field(default_factory=list)
    logs: list[LogBatch] = dataclasses.field(default_factory=list)
    commands: list[ControlCommand] = dataclasses.field(default_factory=list)
    # Increments of the worker's self-metrics, by the names processors/stages.py
    # maps to them: duplicates, host_conflicts, sequence_reanchors, events, overflowed,
    # sampled_out, evicted_processes, evicted_containers, unchanged_series, processes
    # (a gauge: it may go down).
    counts: dict[str, float] = dataclasses.field(default_factory=dict)
    # The same per event kind: name -> {kind: increment} (sampler_emitted, sampler_kept).
    kind_counts: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    # How to take back what the stages changed outside the host's table value (the
    # worker's own state), for a record the runner refuses after all (revert).
    undo: list[Callable[[], None]] = dataclasses.field(default_factory=list)

    def then(self, later: Result) -> Result:
        """This result followed by a later stage's (which got this one's batch)."""
        # (per stage per batch, and most of a stage's fields are empty: each looked at once)
        self.batch = later.batch
        self.changed |= later.changed
        if later.touched:
            for path, before in later.touched.items():
                self.touched.setdefault(path, before)
        self.refused = self.refused or later.refused
        if later.forget:
            self.forget += later.forget
        if later.snapshots:
            self.snapshots += later.snapshots
        if later.spans:
            self.spans += later.spans
        if later.logs:
            self.logs += later.logs
        if later.commands:
            self.commands += later.commands
        for name, n in later.counts.items():
            self.counts[name] = self.counts.get(name, 0) + n
        for name, by_kind in later.kind_counts.items():
            mine = self.kind_counts.setdefault(name, {})
            for kind, n in by_kind.items():
                mine[kind] = mine.get(kind, 0) + n
        if later.undo:
            self.undo += later.undo
        return self

    def revert(self) -> None:
        """Put the worker's own state back as it was before the record (latest change first)."""
        for undo in reversed(self.undo):
            undo()
        self.undo.clear()


class Stage:
    name: ClassVar[str]  # its `ktel process` name
    durable: ClassVar[bool] = True
    heartbeats: ClassVar[bool] = False
    # It keeps counts, so a chain drops the batches it has seen before they reach
    # it, with the record of them in its section (processors/chain.py).
    counts_batches: ClassVar[bool] = False
    # Where in the host's table value its state is (a durable stage's): its name,
    # unless it guards another stage's state (processors/chain.py).
    section: str
    window_s: float | None = None

    def __init__(self) -> None:
        self.section = self.name

    def on_batch(self, state: State, batch: RawBatch, now_ms: int) -> Result:
        raise NotImplementedError

    def on_window(
        self, states: dict[str, State], now_ms: int, share: float, reading: Set[str] = frozenset()
    ) -> Result:
        return Result()

    def on_heartbeat(self, state: State, heartbeat: dict[str, Any]) -> Result:
        return Result()

    def forget(self, host_id: str) -> Result:
        """The host is gone from this worker (forgotten, or its partition another
        worker's): what the stage keeps of it in memory goes, and what that takes off
        its counts is in the ``Result``."""
        return Result()


class FromConfig:
    """Mixin of a core's Options dataclass: ``from_config`` takes every field the
    config section has under the same name, and leaves the rest at their defaults."""

    @classmethod
    def from_config(cls, section: BaseModel) -> Self:
        given = type(section).model_fields
        shared: dict[str, Any] = {
            f.name: getattr(section, f.name)
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.name in given
        }
        return cls(**shared)
