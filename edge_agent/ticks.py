"""The agent's one clock: timed ring-buffer reads and batch seals on shared ticks.

Every probe's drain thread reads its ring buffer on the ticks of
``agent.read_interval_ms`` (multiples of it on the monotonic clock, the same
instants in every thread), and the collect loop seals on the ticks of
``agent.batch_max_ms``, a moment (``SEAL_GRACE_S``) after each, once the reads of
that tick are in. With the two settings equal (the default) each timed read is
sealed 10 ms after it, in one batch with the other probes' reads of that tick: a
batch and a read per interval, and an event waits at most one interval and the
grace on the node. A read later than the grace (a node too busy to run the
agent's thread in time) goes out one tick later.

Before, each probe's timer ran from its own last read, which gave a batch per
probe per interval, and a batch was sealed ``batch_max_ms`` after the last one,
which let a read just short of that age wait a whole further interval. The
monotonic clock counts from each host's boot, so the agents of a fleet do not all
send on the same instant.

A quiet host can hold its few events over ticks (``HoldPolicy``): a tick's seal is
passed over while the batch holds fewer than ``agent.batch_min_events`` events and its
oldest is younger than ``agent.batch_hold_ms``.
"""

from __future__ import annotations

# How long after a tick the collect loop seals: the drain threads' reads of that tick
# (each a wake-up of its thread and a pass over its ring buffer) are queued by then.
SEAL_GRACE_S = 0.01


def until_tick(period_s: float, now: float) -> float:
    """Seconds from ``now`` (time.monotonic()) to the next multiple of ``period_s``."""
    return period_s - now % period_s


class SealClock:
    """When the collect loop seals what it holds: once per tick of ``period_s``, from
    ``grace`` after the tick (``SEAL_GRACE_S``, at most a quarter of the period)."""

    def __init__(self, period_s: float):
        self.period = period_s
        self.grace = min(SEAL_GRACE_S, period_s / 4)
        self._sealed = -1.0  # the tick last sealed on (its index)

    def due(self, now: float) -> bool:
        """True if a seal is due at ``now``: none yet in this tick, and its grace over."""
        k = now // self.period
        return k > self._sealed and now - k * self.period >= self.grace

    def sealed(self, now: float) -> None:
        """A seal was made at ``now``: the next is due on the next tick."""
        self._sealed = now // self.period

    def wait(self, now: float) -> float:
        """Seconds from ``now`` until a seal is due (0 if it is)."""
        if self.due(now):
            return 0.0
        k = now // self.period
        tick = k if k > self._sealed else k + 1
        return max(tick * self.period + self.grace - now, 1e-6)  # (rounding at the grace's edge)


class HoldPolicy:
    """Whether the collect loop seals, on a tick, a batch that is not full: when it holds
    at least ``min_events`` events (agent.batch_min_events), or its oldest event was
    taken ``hold_s`` ago or more (agent.batch_hold_ms). A quiet host so sends one record
    of several events instead of one record per tick of one or two: the processors pay
    for records more than for events (docs/operating.md, "Sizing the processing
    workers"). With ``min_events`` 1 every tick seals what it holds."""

    def __init__(self, min_events: int, hold_s: float):
        self.min_events = min_events
        self.hold_s = hold_s
        self._since: float | None = None  # when the oldest event held was taken

    def taken(self, pending: int, now: float) -> None:
        """The collect loop holds ``pending`` events at ``now`` (0: it sealed them all)."""
        if not pending:
            self._since = None
        elif self._since is None:
            self._since = now

    def ready(self, pending: int, now: float) -> bool:
        """True if ``pending`` events (not a full batch) are to be sealed at ``now``."""
        if pending >= self.min_events:
            return True
        return self._since is not None and now - self._since >= self.hold_s
