"""How many hosts a processing worker holds, and whether it may take one more
(``process.max_hosts``).

Every record names its host, and a worker keeps state of each host it has seen (its
table value, the sampler's rates, the per-host self-metrics) until the host has been
silent for ``aggregate.host_ttl_seconds``. A writer sending records of ever new host
ids would grow that state until the worker is killed, and its restart would recover
the same hosts from the changelog. Past the cap, a record of a host the worker does
not hold goes to ktel.dlq instead (processors/stages.py); the hosts it holds keep
being processed.

The set of hosts held is counted again from the worker's state (``count``) when
that may have changed under it: after a rebalance, and when hosts are forgotten in
bulk. In between, a host is added once its first record was processed, so records
refused for another reason (a state bound, a bad sequence) hold no place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class HostCap:
    def __init__(
        self,
        limit: int,
        count: Callable[[], Iterable[str]],
        exported: Callable[[int], None] = lambda n: None,
    ):
        """``count``: the hosts the worker holds now; ``exported``: told the number
        held whenever it changes (the worker's gauge)."""
        self.limit = limit
        self._count = count
        self._exported = exported
        self._held: set[str] | None = None  # None: to be counted again

    def recount(self) -> None:
        """The worker's hosts may have changed (a rebalance, hosts forgotten): count
        them again before the next decision."""
        self._held = None

    def held(self) -> set[str]:
        if self._held is None:
            self._held = set(self._count())
            self._exported(len(self._held))
        return self._held

    def admits(self, host_id: str) -> bool:
        """Whether a record of ``host_id`` may be processed: a host held always is, a
        new one while fewer than ``limit`` are held."""
        held = self.held()
        return host_id in held or len(held) < self.limit

    def add(self, host_id: str) -> None:
        """A record of ``host_id`` was processed: the worker holds it now."""
        held = self.held()
        if host_id not in held:
            held.add(host_id)
            self._exported(len(held))

    def drop(self, host_id: str) -> None:
        """The worker forgot ``host_id``."""
        if self._held is not None and host_id in self._held:
            self._held.discard(host_id)
            self._exported(len(self._held))
