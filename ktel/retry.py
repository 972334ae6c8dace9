"""The one retry helper: exponential backoff with full jitter, forever or until
a deadline, for every component that delivers somewhere (agent to Kafka,
exporters to their backends).

A caller classifies failures: ``Permanent`` ends the retries at once (the
caller dead-letters what it was sending); anything else is retried. A ``Transient``
failure may say how long the other side asked to be left alone (``retry_after``: a
backend's HTTP Retry-After, a gRPC RetryInfo): the next attempt then waits at least
that, and at most ``MAX_RETRY_AFTER_S``, however long the backoff's own delay.
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


# The longest wait a failure's retry_after is honoured for. A backend throttles for
# seconds to a minute or two; a Retry-After of hours, or an HTTP-date far off (a wrong
# clock on either side, a proxy's maintenance page), would hold delivery back for that
# long while the backend may take data again much sooner: it is asked again after this.
MAX_RETRY_AFTER_S = 300.0


class Permanent(Exception):
    """A failure that retrying cannot fix (e.g. HTTP 400): give up on this item."""


class Transient(Exception):
    """A failure to retry. ``retry_after``: the wait the other side asked for before the
    next attempt, in seconds, or None when it said nothing."""

    def __init__(self, *args: object, retry_after: float | None = None) -> None:
        super().__init__(*args)
        self.retry_after = retry_after


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
            asked = err.retry_after if isinstance(err, Transient) else None
            said = ""
            if asked is not None:
                delay = max(delay, min(asked, MAX_RETRY_AFTER_S))
                said = f" (asked to wait {asked:g}s" + (
                    f"; at most {MAX_RETRY_AFTER_S:g}s is waited)" if asked > MAX_RETRY_AFTER_S else ")"
                )
            log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "%s failed (%s: %s); retrying in %.2fs%s",
                what,
                type(err).__name__,
                err,
                delay,
                said,
            )
            await _sleep(delay)
    raise AssertionError("unreachable")


# The retries' one wait, by name: a test records the waits through it without waiting them.
_sleep = asyncio.sleep
