"""The agent's collect loop seals on its clock (edge_agent/ticks.py, SealClock): a
batch that is not full is sealed only when the clock says a seal is due (once a
tick of agent.batch_max_ms, after the grace), every event once and in order, and
the rest when it stops. A probe stand-in queues the events (the real probes' drain
threads are in tests/integration); the assertions are about which seals the clock
allowed, never about how long anything took."""

from __future__ import annotations

import asyncio
import contextlib

from edge_agent import agent as agent_mod
from edge_agent.ticks import SealClock
from ktel.probes.decode import PackedEvents, frame
from tests.unit.test_agent_batches import make_agent


class QueuedProbe:
    """What the collect loop asks of a loaded probe; each run holds one record, the
    event's number, and packs to it."""

    def __init__(self) -> None:
        self.runs: list = []
        self.on_queued = None

    def queue(self, n: int) -> None:
        self.runs.append(frame(n.to_bytes(8, "little")))
        self.on_queued()

    def maybe_snapshot(self) -> list:
        return []

    def take(self) -> list:
        runs, self.runs = self.runs, []
        return runs

    def pack(self, runs: list, out: PackedEvents) -> None:
        out.extend(data[8:16] for _size, data in runs)

    def stop_draining(self) -> None:
        pass

    def close(self) -> None:
        pass


class RecordedClock(SealClock):
    instances: list[RecordedClock] = []

    def __init__(self, period_s: float) -> None:
        super().__init__(period_s)
        self.allowed: set[float] = set()  # the instants due() said yes to
        self.seals: list[float] = []
        RecordedClock.instances.append(self)

    def due(self, now: float) -> bool:
        yes = super().due(now)
        if yes:
            self.allowed.add(now)
        return yes

    def sealed(self, now: float) -> None:
        self.seals.append(now)
        super().sealed(now)


async def test_a_batch_is_sealed_only_when_the_clock_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(agent_mod, "SealClock", RecordedClock)
    agent = make_agent(tmp_path, batch_max_ms=100, batch_max_events=1000)
    batches: list[list[int]] = []
    monkeypatch.setattr(
        agent,
        "spool_batch",
        lambda events, weights: batches.append([int.from_bytes(e, "little") for e in events]),
    )
    probe = QueuedProbe()
    agent.loaded = {"file_created": probe}  # type: ignore[dict-item]
    stop = asyncio.Event()
    with contextlib.closing(agent.spool):
        collecting = asyncio.ensure_future(agent.collect(stop))
        await asyncio.sleep(0)  # (collect hooks on_queued)
        for n in range(12):
            probe.queue(n)
            await asyncio.sleep(0.03)
        stop.set()
        await collecting

    [clock] = RecordedClock.instances
    # Every event once, in order, and each batch a seal (none was full).
    assert [n for b in batches for n in b] == list(range(12))
    assert len(clock.seals) == len(batches)
    # All but the last, made on stopping, were seals the clock allowed: one a tick,
    # each after its tick's grace.
    timed = clock.seals[:-1]
    assert timed, "no batch was sealed on the clock while events came"
    assert set(timed) <= clock.allowed
    ticks = [now // clock.period for now in timed]
    assert ticks == sorted(set(ticks))
    assert all(now % clock.period >= clock.grace for now in timed)
