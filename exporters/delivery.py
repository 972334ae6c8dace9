"""What every exporter does with a backend's answer and with a timestamp it cannot
trust: the pure rules, shared by remote-write, OTLP and the pull endpoint.

Answers fall in these classes (docs/design.md, principle 11):

- success: HTTP 2xx, gRPC OK;
- transient: no answer at all (connection refused or reset, timeout: gRPC says
  UNAVAILABLE or DEADLINE_EXCEEDED) for every exporter, and the answers with which
  the backend says it may take the same request later. Each protocol names those
  itself: remote-write retries HTTP 408, 429 and every 5xx (``remote_write_retried``);
  OTLP only HTTP 429, 502, 503 and 504 (``otlp_http_retried``), and gRPC UNAVAILABLE,
  DEADLINE_EXCEEDED, ABORTED, CANCELLED, OUT_OF_RANGE, DATA_LOSS and
  RESOURCE_EXHAUSTED when its status holds a RetryInfo (the backend's word that it
  will recover, as a throttling one gives). ``Transient`` is raised and the shared
  retry helper sends the same request again until the backend takes it. A backend
  that says when to come back (an HTTP Retry-After, ``retry_after``; a gRPC status
  whose details hold a RetryInfo, ``grpc_retry_after``: how remote-write 2.0 and OTLP
  let a receiver throttle its senders) is not sent the request again before that, up
  to ``ktel.retry.MAX_RETRY_AFTER_S``;
- unauthorized: HTTP 401 and 403, gRPC UNAUTHENTICATED and PERMISSION_DENIED: the
  backend refuses ktel's credentials, not the data, so it is a configuration error
  and no item is to blame: ``Unauthorized`` (a ``Transient``) is raised, the data
  is kept and retried until the configuration is fixed, and ``Misconfigured`` logs
  one line naming the settings to check (not one per retry);
- no receiver: HTTP 404, 405 and 3xx (a redirect is not followed: it would send the
  data where ktel was not told to), gRPC UNIMPLEMENTED: nothing at ktel's URL takes
  this data (a wrong path or port, Prometheus without its remote-write receiver, an
  ingress mid-rollout), again a configuration error and no item's fault:
  ``NoReceiver`` (a ``Transient``), logged and retried the same way;
- refused: every other answer: any other 4xx (413 and the Collector's "request body
  too large" included; for OTLP 408 too), for OTLP any 5xx but 502, 503 and 504, gRPC
  INVALID_ARGUMENT, FAILED_PRECONDITION, NOT_FOUND, ALREADY_EXISTS, INTERNAL,
  UNKNOWN, and RESOURCE_EXHAUSTED without a RetryInfo (a quota spent, or a message
  larger than the backend's limit): ``Permanent`` is raised, since the backend says
  the same request will not succeed, and it is never sent again as it was.

A backend refuses a whole request for one item it cannot take (one bad sample, one
span too large), so a refused request is split in halves and each half sent on its
own (``send_split``), down to single items; only an item refused on its own is
dead-lettered, with the backend's answer. One bad item among n costs about
2·log2(n) extra requests, and nothing else is lost with it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status as RpcStatus

from ktel.retry import Permanent, Transient, retry

T = TypeVar("T")


class Unauthorized(Transient):
    """The backend refuses ktel's credentials: retried until the configuration is fixed."""


class NoReceiver(Transient):
    """Nothing at ktel's URL takes the data: retried until the configuration is fixed."""


def bearer(token_file: Path, setting: str) -> str:
    """The Authorization header of the token in ``token_file``, read now, so a rotated
    token is used from the next request on. A file that cannot be read (mid-rotation,
    say) or that holds more than one token on one line is ``Unauthorized``: retried,
    with the one line that names the setting, and never with the file's text in it."""
    try:
        token = token_file.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise Unauthorized(f"cannot read {setting} {token_file}: {why}") from None
    if not token or not all(c.isprintable() and not c.isspace() for c in token):
        raise Unauthorized(
            f"{setting} {token_file} must hold one token on one line, without spaces or control characters"
        )
    return f"Bearer {token}"


def remote_write_retried(status: int) -> bool:
    """Whether remote-write sends a request again after this failed HTTP status: a
    Prometheus receiver answers 5xx for what it may take later (500 too: Prometheus 2
    without native histograms enabled), 429 and 408 when it is busy."""
    return status in (408, 429) or status >= 500


def otlp_http_retried(status: int) -> bool:
    """Whether OTLP/HTTP sends a request again after this failed HTTP status. OTLP
    reserves these four for "later": too many requests, and a proxy or backend
    unavailable or timing out in front of one that is up. A backend that answers
    anything else (a 500 included) says the request will fail again, and OTLP asks
    its senders not to send it again."""
    return status in (429, 502, 503, 504)


# What an answer's text keeps of the backend's (a dead letter's reason, a log line): an
# error page can be any size.
REFUSAL_CHARS = 500


def http_answer(
    status: int,
    message: str,
    wait: float | None = None,
    *,
    retried: Callable[[int], bool] = remote_write_retried,
    limit: int = REFUSAL_CHARS,
) -> None:
    """Classify an HTTP answer: returns on 2xx, else raises Transient or Permanent.
    ``wait``: what its Retry-After asked for (``retry_after``), honoured on a transient
    answer; ``retried``: which failed statuses the protocol retries (``remote_write_retried``,
    ``otlp_http_retried``), after the configuration errors; ``limit``: as ``http_refusal``."""
    if 200 <= status < 300:
        return
    answer = http_refusal(status, message, limit)
    if status in (401, 403):
        raise Unauthorized(answer)
    if status in (404, 405) or 300 <= status < 400:
        raise NoReceiver(answer)
    if retried(status):
        raise Transient(answer, retry_after=wait)
    raise Permanent(answer)


def http_refusal(status: int, message: str, limit: int = REFUSAL_CHARS) -> str:
    """The text of a failed HTTP answer, as ``http_answer`` raises it and dead letters give
    it: its first ``limit`` characters."""
    return f"HTTP {status}: {message.strip()[:limit]}"


def undecodable(content_encoding: str | None, err: BaseException) -> str:
    """The text of an answer whose body is not in the Content-Encoding it names (a plain
    error page said to be gzip): the answer is classified by its status all the same, and
    its text says why it holds nothing more. ``err``: the HTTP client's error, told by its
    first cause (zlib's, say), in the same words whichever client read the body."""
    while (cause := err.__cause__ or err.__context__) is not None:
        err = cause
    return f"(a body not in its Content-Encoding {content_encoding or ''!r:.50}: {err})"


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """The wait an HTTP Retry-After header asks for, in seconds (RFC 9110: a number of
    seconds, or an HTTP-date, ``now`` being the epoch's seconds), or None when there is
    none or it is not one of those. A date already past asks for no wait."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):
        # (OverflowError: a year past what a C int holds. Raised here, it failed the
        # attempt whatever the status, a 2xx too, and the request was sent for ever.)
        return None
    if when.tzinfo is None:  # (an HTTP-date is in GMT, which the "-0000" form leaves unsaid)
        when = when.replace(tzinfo=UTC)
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


def grpc_retry_after(err: grpc.RpcError) -> float | None:
    """The wait a failed gRPC call's status asks for, in seconds: the retry_delay of a
    google.rpc.RetryInfo among its details (the ``grpc-status-details-bin`` trailer, as
    OTLP/gRPC's throttling sends it), or None."""
    # The error of a call is also the call (grpc.Call), with its trailers; a bare
    # RpcError (raised by an interceptor, say) has none.
    trailing = getattr(err, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key != "grpc-status-details-bin":
            continue
        try:
            status = RpcStatus.FromString(value)
        except (DecodeError, TypeError):
            return None
        for detail in status.details:
            if detail.Is(RetryInfo.DESCRIPTOR):
                info = RetryInfo()
                try:
                    detail.Unpack(info)
                except DecodeError:
                    # (raised here, it failed the attempt whatever the status said, and a
                    # refusal was sent again for ever instead of split and dead-lettered)
                    return None
                delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
                return max(delay, 0.0)
    return None


# What OTLP/gRPC retries: the call ended before the backend answered (CANCELLED,
# DEADLINE_EXCEEDED, UNAVAILABLE, which gRPC also says of a connection refused or
# lost), or the backend says the same request may succeed later. INTERNAL and UNKNOWN
# are a backend's failure it does not expect to pass, and are not retried.
_GRPC_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def grpc_answer(code: grpc.StatusCode, details: str | None, wait: float | None = None) -> None:
    """Classify a failed OTLP/gRPC call: raises Transient or Permanent. ``wait``: what
    its status's RetryInfo asked for (``grpc_retry_after``), None when it holds none;
    honoured on a transient answer."""
    answer = f"gRPC {code.name}: {(details or '').strip()[:500]}"
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        raise Unauthorized(answer)
    if code is grpc.StatusCode.UNIMPLEMENTED:
        raise NoReceiver(answer)
    if code in _GRPC_TRANSIENT:
        raise Transient(answer, retry_after=wait)
    # RESOURCE_EXHAUSTED says both "slow down" and "never" (a quota spent, a message
    # above the backend's size limit): only a RetryInfo tells the first, the backend
    # saying when it expects to take data again. A message "larger than max" is as
    # large when sent again, whatever its status holds.
    if (
        code is grpc.StatusCode.RESOURCE_EXHAUSTED
        and wait is not None
        and "larger than max" not in (details or "")
    ):
        raise Transient(answer, retry_after=wait)
    raise Permanent(answer)


def tls_failed(err: BaseException) -> bool:
    """Whether a failure to reach a backend is its TLS handshake (a certificate not
    trusted or not sent): Python's ssl, gRPC and requests each say so in their message."""
    text = str(err).lower()
    return any(word in text for word in ("certificate", "ssl", "handshake"))


class Misconfigured:
    """Logs once when a backend starts refusing ktel's configuration (its credentials,
    its URL, or the TLS handshake), naming the settings to check, and once when it takes
    the data again: a refusal lasts until someone fixes a setting, and the retry
    helper's line per attempt does not say which."""

    def __init__(
        self, log: logging.Logger, backend: str, *, credentials: str, receiver: str, tls: str
    ) -> None:
        self.log = log
        self.backend = backend
        self.hints = {
            "credentials": f"it refuses ktel's credentials: check {credentials}",
            "receiver": f"nothing there takes the data: check {receiver}",
            "tls": f"the TLS handshake failed: check {tls}",
        }
        self.problem: str | None = None

    def failed(self, err: BaseException) -> None:
        """Called with each failed attempt."""
        if isinstance(err, Unauthorized):
            problem = "credentials"
        elif isinstance(err, NoReceiver):
            problem = "receiver"
        elif not isinstance(err, Permanent) and tls_failed(err):
            problem = "tls"
        else:
            return
        if problem != self.problem:
            self.problem = problem
            self.log.error(
                "%s: %s (%s); the data is kept and sent again until it is taken",
                self.backend,
                self.hints[problem],
                str(err)[:300],
            )

    def succeeded(self) -> None:
        """Called with each acknowledged request."""
        if self.problem is not None:
            self.log.info("%s takes the data again (%s fixed)", self.backend, self.problem)
            self.problem = None


async def send_split(
    items: Sequence[T],
    send: Callable[[Sequence[T]], Awaitable[None]],
    refused: Callable[[T, str], Awaitable[None]],
    *,
    what: str,
    refusal: str | None = None,
) -> None:
    """Send ``items`` in one request (``send``), retrying transient failures; if the
    backend refuses it, send each half the same way, in order; an item refused alone
    goes to ``refused`` with the backend's answer. ``refusal``: that answer, when the
    caller already sent these items together and was refused."""
    if refusal is None:
        try:
            await retry(lambda: send(items), what=what)
            return
        except Permanent as err:
            refusal = str(err)
    if len(items) == 1:
        await refused(items[0], refusal)
        return
    mid = len(items) // 2
    await send_split(items[:mid], send, refused, what=what)
    await send_split(items[mid:], send, refused, what=what)


@dataclass(frozen=True)
class Window:
    """The timestamps an exporter sends on, relative to its own clock: a backend
    stores a sample from the far future and then refuses everything older than it
    (Prometheus: every sample more than an hour older), and refuses the far past;
    either way one record must not decide what happens to the others."""

    max_age_seconds: float
    max_future_seconds: float
    setting: str  # the config section, for the reason

    def problem(self, ts_ns: int, now_ns: int) -> str | None:
        """Why ``ts_ns`` (ns since the epoch) is outside the window, or None."""
        ahead = (ts_ns - now_ns) / 1e9
        if ahead > self.max_future_seconds:
            return (
                f"timestamp {ts_ns / 1e9:.3f} s since the epoch is {ahead:.0f} s ahead of the exporter's "
                f"clock (more than {self.setting}.max_future_seconds = {self.max_future_seconds:g})"
            )
        if -ahead > self.max_age_seconds:
            return (
                f"timestamp {ts_ns / 1e9:.3f} s since the epoch is {-ahead:.0f} s old by the exporter's "
                f"clock (more than {self.setting}.max_age_seconds = {self.max_age_seconds:g})"
            )
        return None
