"""Stages composed into what one worker runs: ``ktel process <name>``.

``PROCESSES`` is the one list of those names and the stages each runs, in
order. A ``Chain`` runs its stages on a batch one after the other, each on
the batch the one before passed on, and stops at a stage that drops it. It
hands each stage its state: a durable stage's section of the host's table
value, else the host's entry in the worker's memory. A chain with a stage
that keeps counts (aggregate) starts with a ``Dedupe`` guarding that stage's
section, so a batch it has seen reaches no stage, and the record of it and the
counts are in one table value (why: processors/stages.py).

The Faust runner (processors/stages.py) and the golden tests drive the same
chains.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence, Set
from typing import Any

from ktel.config import Config
from ktel.wire import RawBatch
from processors.aggregate_core import Aggregate
from processors.dedupe_core import Dedupe
from processors.enrich_core import Enrich
from processors.sample_core import Sample
from processors.stage import Result, Stage, State, Touched, copied

PROCESSES = {
    "dedupe": ("dedupe",),
    "enrich": ("enrich",),
    "sample": ("sample",),
    "aggregate": ("aggregate",),
    "all": ("enrich", "sample", "aggregate"),  # fused: one worker from ktel.raw
}


class Chain:
    def __init__(self, stages: Sequence[Stage]):
        counting = [s for s in stages if s.counts_batches]
        guard: list[Stage] = [Dedupe(guards=counting[-1].section)] if counting else []
        self.stages = guard + list(stages)
        # Whether it keeps a table, and reads heartbeats into it.
        self.durable = any(s.durable for s in self.stages)
        self.heartbeats = any(s.heartbeats for s in self.stages)
        self.memory: dict[str, dict[str, State]] = {s.section: {} for s in self.stages if not s.durable}

    def on_batch(self, value: State, batch: RawBatch, now_ms: int) -> Result:
        """``value``: the host's table value (mutated in place); ``Result.revert``
        puts back what the stages changed elsewhere."""
        result = Result(batch)
        for stage in self.stages:
            if result.batch is None:
                break
            if not stage.durable:
                result.undo.append(self._restorer(stage, batch.host_id))
            result.then(
                self._rooted(
                    stage, stage.on_batch(self._state(stage, value, batch.host_id), result.batch, now_ms)
                )
            )
        return result

    def on_heartbeat(self, value: State, host_id: str, heartbeat: dict[str, Any]) -> Result:
        """What the heartbeat did; ``changed``: it changed the host's table value (mutated
        in place)."""
        result = Result()
        for stage in self.stages:
            if stage.heartbeats:
                result.then(
                    self._rooted(stage, stage.on_heartbeat(self._state(stage, value, host_id), heartbeat))
                )
        return result

    def forget(self, host_id: str) -> Result:
        """The host left this worker: every stage's memory of it goes (``Stage.forget``)."""
        result = Result()
        for stage in self.stages:
            result.then(stage.forget(host_id))
        for states in self.memory.values():
            states.pop(host_id, None)
        return result

    def timed(self) -> list[Stage]:
        """The stages with timer work."""
        return [s for s in self.stages if s.window_s is not None]

    def on_window(
        self,
        stage: Stage,
        table: Mapping[str, State],
        now_ms: int,
        share: float,
        reading: Set[str] = frozenset(),
    ) -> Result:
        """``table``: every host's table value (read only: only a stream may write it);
        ``reading``: see ``Stage.on_window``."""
        if stage.durable:
            states = {host: value.get(stage.section, {}) for host, value in table.items()}
        else:
            states = self.memory[stage.section]
        return stage.on_window(states, now_ms, share, reading)

    def _restorer(self, stage: Stage, host_id: str) -> Callable[[], None]:
        """How to put a non-durable stage's state of the host back as it is now."""
        states = self.memory[stage.section]
        was = copied(states.get(host_id))

        def restore() -> None:
            if was is None:
                states.pop(host_id, None)  # (a host it had not seen: its window work must not see it)
            else:
                states[host_id] = was

        return restore

    def _rooted(self, stage: Stage, result: Result) -> Result:
        """``result`` with the entries it touched named from the host's value, not the
        stage's section."""
        if result.touched:
            result.touched = Touched({(stage.section, *path): v for path, v in result.touched.items()})
        return result

    def _state(self, stage: Stage, value: State, host_id: str) -> State:
        if stage.durable:
            return value.setdefault(stage.section, {})
        return self.memory[stage.section].setdefault(host_id, {})


def build(process: str, cfg: Config) -> Chain:
    """The chain of ``ktel process <process>``, its stages built from their config sections."""
    make: dict[str, Callable[[], Stage]] = {
        "dedupe": Dedupe,
        "enrich": lambda: Enrich.from_config(cfg.enrich, cfg.process.max_state_bytes),
        # (alone, its output goes to the aggregate's guard through a topic)
        "sample": lambda: Sample.from_config(cfg.sample, parts_whole=process == "sample"),
        "aggregate": lambda: Aggregate.from_config(cfg.aggregate, cfg.process.max_state_bytes),
    }
    return Chain([make[name]() for name in PROCESSES[process]])
