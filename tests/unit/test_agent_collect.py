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
        lambda events, weights: batches.append([int.from_bytes(e, "little") for e in events]),
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
    seal waits the hold again. A batch's hold counts from when the loop took its first
    event, which is after the test queued it: so each batch that was not full, and not
    sealed on stopping, went at least 0.3 s after its first event was queued. Weights
    stay one per event."""
    agent, probe, _ = collecting(
        tmp_path, monkeypatch, batch_max_ms=50, batch_max_events=4, batch_min_events=3, batch_hold_ms=300
    )
    queued: dict[int, float] = {}
    sealed: list[tuple[list[int], float]] = []

    def spool_batch(events, weights):
        assert len(weights) == len(events)
        sealed.append(([int.from_bytes(e, "little") for e in events], time.monotonic()))

    monkeypatch.setattr(agent, "spool_batch", spool_batch)

    def queue(*ns: int) -> None:
        for n in ns:
            queued[n] = time.monotonic()
            probe.queue(n)

    async def until(count: int) -> None:
        for _ in range(500):  # (up to 5 s on a loaded machine)
            if len(sealed) >= count:
                return
            await asyncio.sleep(0.01)

    stop = asyncio.Event()
    with contextlib.closing(agent.spool):
        running = asyncio.ensure_future(agent.collect(stop))
        await asyncio.sleep(0)
        queue(0)
        await asyncio.sleep(0.1)
        queue(1, 2, 3, 4)
        await until(2)
        queue(5)
        await until(3)
        before_stop = len(sealed)
        stop.set()
        await running
    assert [b for b, _ in sealed] == [[0, 1, 2, 3], [4], [5]]
    assert before_stop == 3  # none of them waited for the stop
    for events, at in sealed[1:]:
        assert at - queued[events[0]] >= 0.3, (events, at - queued[events[0]])
