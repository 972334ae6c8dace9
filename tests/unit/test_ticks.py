"""The agent's clock (edge_agent/ticks.py): reads and seals on shared ticks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.ticks import SEAL_GRACE_S, HoldPolicy, SealClock, until_tick


def test_reads_fall_on_the_intervals_multiples():
    assert until_tick(0.5, 1000.2) == pytest.approx(0.3)
    assert until_tick(0.5, 1000.5) == pytest.approx(0.5)  # on a tick: the next one
    # Two threads that look at different moments of one interval wake at the same instant.
    assert 1000.1 + until_tick(0.5, 1000.1) == pytest.approx(1000.4 + until_tick(0.5, 1000.4))


def test_a_timed_read_is_sealed_on_its_tick_once_the_grace_is_over():
    clock = SealClock(0.5)
    tick = 2000.0
    assert not clock.due(tick + 0.001)  # the other probes' reads of this tick may still come
    assert clock.wait(tick + 0.001) == pytest.approx(SEAL_GRACE_S - 0.001)
    assert clock.due(tick + SEAL_GRACE_S + 1e-6)
    clock.sealed(tick + SEAL_GRACE_S + 1e-6)
    # A read a busy buffer woke in between waits for the next tick, not batch_max_ms from the seal.
    assert not clock.due(tick + 0.3)
    assert clock.wait(tick + 0.3) == pytest.approx(0.2 + SEAL_GRACE_S)
    assert clock.due(tick + 0.5 + SEAL_GRACE_S + 1e-6)


def test_a_seal_late_in_its_tick_does_not_hold_the_next_ticks_read():
    """The batch sealed at 0.49 s into a tick does not delay the read of the next tick by
    another interval (a seal batch_max_ms after the last one did)."""
    clock = SealClock(0.5)
    clock.sealed(3000.49)
    assert clock.due(3000.5 + SEAL_GRACE_S + 1e-6)


def test_the_grace_of_a_short_period_leaves_most_of_it():
    clock = SealClock(0.004)
    assert clock.grace == pytest.approx(0.001)
    assert clock.due(10.0015)


@given(
    st.floats(0.001, 1.0),
    st.lists(st.floats(0, 30), min_size=1, max_size=50).map(sorted),
    st.floats(1e3, 1e6),
)
def test_at_most_one_seal_per_tick_and_never_a_wait_past_the_next(period, offsets, start):
    clock = SealClock(period)
    seals: list[float] = []
    for now in (start + o for o in offsets):
        wait = clock.wait(now)
        assert 0 <= wait <= period + clock.grace + 1e-9
        assert clock.due(now) == (wait == 0)
        # and the seal does come: due once the wait is over (less than 1 µs of rounding).
        assert wait == 0 or clock.due(now + wait + 2e-6)
        if clock.due(now):
            clock.sealed(now)
            seals.append(now)
    ticks = [s // period for s in seals]
    assert len(ticks) == len(set(ticks))


def test_a_quiet_hosts_few_events_wait_for_more_up_to_the_hold():
    hold = HoldPolicy(min_events=10, hold_s=5.0)
    assert not hold.ready(0, 100.0)
    hold.taken(3, 100.0)  # the first events held since 100
    assert not hold.ready(3, 104.9)
    hold.taken(4, 104.0)  # more events do not make the oldest younger
    assert hold.ready(4, 105.0)  # the oldest waited the hold
    assert hold.ready(10, 100.1)  # enough events: at once
    hold.taken(0, 105.0)  # all sealed: the next hold starts with the next event
    hold.taken(1, 107.0)
    assert not hold.ready(1, 111.9) and hold.ready(1, 112.0)


def test_one_event_a_batch_is_every_ticks_seal():
    hold = HoldPolicy(min_events=1, hold_s=5.0)
    hold.taken(1, 100.0)
    assert hold.ready(1, 100.0)
