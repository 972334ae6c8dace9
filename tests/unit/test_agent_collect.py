"""The agent's collect loop seals on its clock (edge_agent/ticks.py, SealClock): a
batch that is not full is sealed only when the clock says a seal is due (once a
tick of agent.batch_max_ms, after the grace), and, below agent.batch_min_events, only
once its oldest event has waited agent.batch_hold_ms (HoldPolicy); every event once
and in order, and the rest when it stops. A probe stand-in queues the events (the real probes' drain
threads are in tests/integration); the assertions are about which seals the clock
allowed, never about how long anything took."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

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


def collecting(tmp_path, monkeypatch, **settings):
    """An agent with a probe stand-in, its clock recorded, and the batches it seals."""
    RecordedClock.instances.clear()
    monkeypatch.setattr(agent_mod, "SealClock", RecordedClock)
    agent = make_agent(tmp_path, **settings)
    batches: list[list[int]] = []
    monkeypatch.setattr(
        agent,
        "spool_batch",
        lambda events, weights: (
            batches.append([int.from_bytes(e, "little") for e in events])
            if len(weights) == len(events)
            else pytest.fail(f"{len(weights)} weights for {len(events)} events")
        ),
    )
    probe = QueuedProbe()
    agent.loaded = {"file_created": probe}  # type: ignore[dict-item]
    return agent, probe, batches


async def test_a_batch_is_sealed_only_when_the_clock_says_so(tmp_path, monkeypatch):
    agent, probe, batches = collecting(tmp_path, monkeypatch, batch_max_ms=100, batch_max_events=1000)
    stop = asyncio.Event()
    with contextlib.closing(agent.spool):
        collecting_ = asyncio.ensure_future(agent.collect(stop))
        await asyncio.sleep(0)  # (collect hooks on_queued)
        for n in range(12):
            probe.queue(n)
            await asyncio.sleep(0.03)
        stop.set()
        await collecting_

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


async def test_a_quiet_hosts_events_wait_for_batch_min_events(tmp_path, monkeypatch):
    """batch_min_events 5, a long hold: on the ticks, batches of fewer wait; none is
    sealed before it has 5 but the one made on stopping."""
    agent, probe, batches = collecting(
        tmp_path,
        monkeypatch,
        batch_max_ms=50,
        batch_max_events=1000,
        batch_min_events=5,
        batch_hold_ms=60_000,
    )
    stop = asyncio.Event()
    with contextlib.closing(agent.spool):
        running = asyncio.ensure_future(agent.collect(stop))
        await asyncio.sleep(0)
        for n in range(12):
            probe.queue(n)
            await asyncio.sleep(0.03)  # several ticks of 50 ms between some of them
        stop.set()
        await running
    [clock] = RecordedClock.instances
    assert [n for b in batches for n in b] == list(range(12))
    assert batches[:-1] and all(len(b) >= 5 for b in batches[:-1])  # the last: sealed on stopping
    assert len(clock.seals) > len(batches)  # ticks passed over while fewer than 5 waited


async def test_each_batch_below_batch_min_events_waits_the_hold_from_its_own_first_event(
    tmp_path, monkeypatch
):
    """batch_min_events 3, batch_max_events 4, a hold of 0.3 s. One event, held; more
    events 0.1 s later make a full batch of 4, sealed at once, and leave one, which waits
    the hold from its own take, not from the first event's; then one more after that
    seal waits the hold again. The loop reads a clock the test moves, and each step
    waits for a pass of the loop at that time: a stalled machine delays the steps but
    cannot make a hold run out early. Weights stay one per event."""
    agent, probe, batches = collecting(
        tmp_path, monkeypatch, batch_max_ms=50, batch_max_events=4, batch_min_events=3, batch_hold_ms=300
    )
    clock = MovedClock(1000.0)
    monkeypatch.setattr(agent_mod, "time", clock)
    passes = 0
    drain_once = agent.drain_once

    def counted(pending, weights):
        nonlocal passes
        drain_once(pending, weights)
        passes += 1

    monkeypatch.setattr(agent, "drain_once", counted)

    async def at(t: float, *ns: int) -> list[list[int]]:
        """Move the clock to ``t`` s from the start, queue ``ns`` (or only wake the loop),
        and return the batches sealed once a pass of the loop has run after that."""
        clock.now = 1000.0 + t
        seen = passes
        for n in ns:
            probe.queue(n)
        if not ns:
            probe.on_queued()
        while passes <= seen:
            await asyncio.sleep(0.001)
        return [list(b) for b in batches]

    stop = asyncio.Event()
    with contextlib.closing(agent.spool):
        running = asyncio.ensure_future(agent.collect(stop))
        await asyncio.sleep(0)
        assert await at(0.0, 0) == []
        assert await at(0.1, 1, 2, 3, 4) == [[0, 1, 2, 3]]  # full: at once
        assert await at(0.35) == [[0, 1, 2, 3]]  # [4] held 0.25 s (0.35 from event 0)
        assert await at(0.42) == [[0, 1, 2, 3], [4]]
        assert await at(0.5, 5) == [[0, 1, 2, 3], [4]]
        assert await at(0.75) == [[0, 1, 2, 3], [4]]
        assert await at(0.82) == [[0, 1, 2, 3], [4], [5]]
        stop.set()
        await running
    assert batches == [[0, 1, 2, 3], [4], [5]]  # nothing left for the stop


class MovedClock:
    """The time module as the collect loop sees it, its monotonic clock set by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)
