"""The one retry helper: exponential backoff with full jitter, forever or until
a deadline, for every component that delivers somewhere (agent to Kafka,
exporters to their backends).

A caller classifies failures: ``Permanent`` ends the retries at once (the
caller dead-letters what it was sending); anything else is retried. A ``Transient``
failure may say how long the other side asked to be left alone (``retry_after``: a
backend's HTTP Retry-After, a gRPC RetryInfo): the next attempt then waits at least
that, and at most ``MAX_RETRY_AFTER_S``, however long the backoff's own delay.

A caller that gives up at a time of its own (``asyncio.timeout``) says so with
``deadline``: a wait asked for that would make the next attempt at or after it is not
waited, ``AskedPastDeadline`` is raised at once, saying what was asked, since the caller
would give up before that attempt anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
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


class AskedPastDeadline(Exception):
    """The other side asked for a wait (``Transient.retry_after``) that ends past the
    ``deadline`` in force: not waited for. ``what``: what was retried; ``failure``: the
    answer that asked it; ``asked``: the wait asked for, in seconds; ``left``: the seconds
    that were left until the deadline."""

    def __init__(self, what: str, failure: Transient, asked: float, left: float) -> None:
        super().__init__(
            f"{what}: {failure} (asked to wait {asked:g}s, {max(left, 0.0):.1f}s before the deadline)"
        )
        self.what = what
        self.failure = failure
        self.asked = asked
        self.left = max(left, 0.0)


# The deadline in force (the running loop's time), or None: set by ``deadline``, seen by the
# retries of the tasks started within it too (each starts with a copy of the context).
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("ktel.retry.deadline", default=None)


@contextlib.contextmanager
def deadline(when: float) -> Iterator[None]:
    """Within it, a retry whose next attempt the other side asks to be made at or after
    ``when`` (the running loop's time, as ``asyncio.Timeout.when()`` gives it) raises
    ``AskedPastDeadline`` rather than wait; one within another keeps the earlier."""
    outer = _deadline.get()
    token = _deadline.set(when if outer is None else min(outer, when))
    try:
        yield
    finally:
        _deadline.reset(token)


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
    """Run ``attempt`` until it succeeds or raises ``Permanent``, or the other side asks
    for a wait past the ``deadline`` in force (``AskedPastDeadline``); ``quiet``: the
    caller reports the failures itself (each retry is logged at debug level only)."""
    for delay in backoff.delays():
        try:
            return await attempt()
        except (Permanent, AskedPastDeadline):  # (the latter: a retry within the attempt gave up)
            raise
        except asyncio.CancelledError:
            raise
        except Exception as err:
            said = ""
            if isinstance(err, Transient) and err.retry_after is not None:
                asked = err.retry_after
                delay = max(delay, min(asked, MAX_RETRY_AFTER_S))
                end = _deadline.get()
                if end is not None:
                    left = end - asyncio.get_running_loop().time()
                    if delay >= left:  # (the caller gives up before the next attempt)
                        raise AskedPastDeadline(what, err, asked, left) from err
                said = f" (asked to wait {asked:g}s" + (
                    f"; at most {MAX_RETRY_AFTER_S:g}s is waited)" if asked > MAX_RETRY_AFTER_S else ")"
                )
            if on_retry:
                on_retry(err)
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
