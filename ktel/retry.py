"""The one retry helper: exponential backoff with full jitter, forever or until
a deadline, for every component that delivers somewhere (agent to Kafka,
exporters to their backends).

A caller classifies failures: ``Permanent`` ends the retries at once (the
caller dead-letters what it was sending); anything else is retried.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class Permanent(Exception):
    """A failure that retrying cannot fix (e.g. HTTP 400): give up on this item."""


@dataclass(frozen=True)
class Backoff:
    initial: float = 0.1
    maximum: float = 5.0
    multiplier: float = 2.0

    def delays(self):
        delay = self.initial
        while True:
            # Full jitter (AWS architecture blog): spreads a fleet's retries apart.
            yield random.uniform(0, delay)
            delay = min(self.maximum, delay * self.multiplier)


async def retry(
    attempt: Callable[[], Awaitable[T]],
    *,
    what: str,
    backoff: Backoff = Backoff(),
    on_retry: Callable[[BaseException], None] | None = None,
    quiet: bool = False,
) -> T:
    """Run ``attempt`` until it succeeds or raises ``Permanent``; ``quiet``: the
    caller reports the failures itself (each retry is logged at debug level only)."""
    for delay in backoff.delays():
        try:
            return await attempt()
        except Permanent:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if on_retry:
                on_retry(err)
            log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "%s failed (%s: %s); retrying in %.2fs",
                what,
                type(err).__name__,
                err,
                delay,
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")
