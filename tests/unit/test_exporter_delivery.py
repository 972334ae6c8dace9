"""The exporters' shared rules (exporters/delivery.py): which answers are retried and
which refused, how a refused request is split, and the timestamp window."""

from __future__ import annotations

import logging

import grpc
import pytest

from exporters.delivery import (
    Misconfigured,
    NoReceiver,
    Transient,
    Unauthorized,
    Window,
    grpc_answer,
    http_answer,
    otlp_http_retried,
    remote_write_retried,
    send_split,
)
from ktel.retry import Permanent


@pytest.mark.parametrize("status", [200, 204])
def test_http_2xx_is_success(status):
    http_answer(status, "")


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_http_408_429_and_5xx_are_transient_for_remote_write(status):
    with pytest.raises(Transient, match=f"^HTTP {status}: busy$"):
        http_answer(status, " busy\n")
    with pytest.raises(Transient):
        http_answer(status, "busy", retried=remote_write_retried)  # (the default)


# OTLP/HTTP retries these four alone; every other failed status is a refusal.
OTLP_HTTP_RETRIED = [429, 502, 503, 504]
OTLP_HTTP_REFUSED = [400, 408, 409, 410, 413, 415, 422, 500, 501, 505, 507, 511, 599]


@pytest.mark.parametrize("status", OTLP_HTTP_RETRIED)
def test_otlp_http_429_502_503_504_are_transient_and_keep_their_retry_after(status):
    with pytest.raises(Transient, match=f"^HTTP {status}: busy$") as err:
        http_answer(status, "busy", 12.0, retried=otlp_http_retried)
    assert err.value.retry_after == 12.0
    assert not isinstance(err.value, (Unauthorized, NoReceiver))


@pytest.mark.parametrize("status", OTLP_HTTP_REFUSED)
def test_otlp_http_other_failures_are_refusals_even_with_a_retry_after(status):
    with pytest.raises(Permanent, match=f"^HTTP {status}: no$"):
        http_answer(status, "no", 12.0, retried=otlp_http_retried)


@pytest.mark.parametrize(
    ("status", "kind"), [(401, Unauthorized), (403, Unauthorized), (404, NoReceiver), (307, NoReceiver)]
)
def test_otlp_http_configuration_errors_stay_retried(status, kind):
    with pytest.raises(kind):
        http_answer(status, "x", retried=otlp_http_retried)


@pytest.mark.parametrize("status", [401, 403])
def test_http_401_and_403_are_configuration_errors_retried(status):
    with pytest.raises(Unauthorized, match=f"^HTTP {status}: who are you$"):
        http_answer(status, "who are you")
    assert issubclass(Unauthorized, Transient)  # retried, the data kept


@pytest.mark.parametrize("status", [301, 307, 308, 404, 405])
def test_http_no_receiver_at_the_url_is_a_configuration_error_retried(status):
    # Prometheus without --web.enable-remote-write-receiver answers 404: dead-lettering
    # every record until someone notices would empty the pipeline into ktel.dlq.
    with pytest.raises(NoReceiver, match=f"^HTTP {status}: not here$"):
        http_answer(status, "not here")
    assert issubclass(NoReceiver, Transient)


@pytest.mark.parametrize("status", [400, 413, 415, 422])
def test_http_other_answers_are_refusals(status):
    with pytest.raises(Permanent, match=f"^HTTP {status}: no$"):
        http_answer(status, "no")


# OTLP/gRPC: retried, whatever the status holds (the wait of a RetryInfo honoured).
TRANSIENT = [
    "CANCELLED",
    "DEADLINE_EXCEEDED",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNAVAILABLE",
    "DATA_LOSS",
]
# Refused, RetryInfo or not (RESOURCE_EXHAUSTED: without one, below).
REFUSED = [
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "FAILED_PRECONDITION",
    "INTERNAL",
]
# ktel's configuration, not the data: retried until it is fixed.
CONFIGURATION = {
    "UNAUTHENTICATED": Unauthorized,
    "PERMISSION_DENIED": Unauthorized,
    "UNIMPLEMENTED": NoReceiver,
}


def test_every_grpc_failure_code_is_classified_here():
    listed = [*TRANSIENT, *REFUSED, *CONFIGURATION, "RESOURCE_EXHAUSTED"]
    assert sorted(listed) == sorted(c.name for c in grpc.StatusCode if c is not grpc.StatusCode.OK)


@pytest.mark.parametrize("code", TRANSIENT)
@pytest.mark.parametrize("wait", [None, 7.5])
def test_grpc_transient_codes(code, wait):
    with pytest.raises(Transient, match=f"^gRPC {code}: x$") as err:
        grpc_answer(grpc.StatusCode[code], "x", wait)
    assert err.value.retry_after == wait
    assert not isinstance(err.value, (Unauthorized, NoReceiver))


@pytest.mark.parametrize("code", REFUSED)
@pytest.mark.parametrize("wait", [None, 7.5])
def test_grpc_refused_codes(code, wait):
    with pytest.raises(Permanent, match=f"^gRPC {code}: x$"):
        grpc_answer(grpc.StatusCode[code], "x", wait)


@pytest.mark.parametrize("code", CONFIGURATION)
def test_grpc_configuration_errors_are_retried(code):
    with pytest.raises(CONFIGURATION[code], match=f"^gRPC {code}: x$"):
        grpc_answer(grpc.StatusCode[code], "x")


@pytest.mark.parametrize("wait", [0.0, 2.0])
def test_grpc_resource_exhausted_with_a_retry_info_is_throttling_retried(wait):
    # (a RetryInfo of no delay still says the backend will recover: wait is 0, not None)
    with pytest.raises(Transient, match="^gRPC RESOURCE_EXHAUSTED: slow down$") as err:
        grpc_answer(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", wait)
    assert err.value.retry_after == wait


@pytest.mark.parametrize("details", ["quota exceeded", "", None])
def test_grpc_resource_exhausted_without_a_retry_info_is_a_refusal(details):
    with pytest.raises(Permanent, match="^gRPC RESOURCE_EXHAUSTED: "):
        grpc_answer(grpc.StatusCode.RESOURCE_EXHAUSTED, details)


def test_a_configuration_problem_is_logged_once_naming_the_settings_and_once_when_fixed(caplog):
    log = logging.getLogger("ktel.test.misconfigured")
    alarm = Misconfigured(
        log,
        "remote-write to https://r",
        credentials="remote_write.basic_auth_*",
        receiver="remote_write.url",
        tls="remote_write.tls_*",
    )
    with caplog.at_level(logging.INFO, logger=log.name):
        for _ in range(5):
            alarm.failed(Unauthorized("HTTP 401: Unauthorized"))
        alarm.failed(Transient("HTTP 503: busy"))  # not a configuration problem: nothing
        alarm.failed(Permanent("HTTP 400: bad sample with ssl in it"))  # bad data: nothing
        alarm.succeeded()
        alarm.succeeded()
        for _ in range(3):
            alarm.failed(OSError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"))
        alarm.failed(NoReceiver("HTTP 404: remote write receiver needs to be enabled"))
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        (
            "ERROR",
            "remote-write to https://r: it refuses ktel's credentials: check remote_write.basic_auth_* "
            "(HTTP 401: Unauthorized); the data is kept and sent again until it is taken",
        ),
        ("INFO", "remote-write to https://r takes the data again (credentials fixed)"),
        (
            "ERROR",
            "remote-write to https://r: the TLS handshake failed: check remote_write.tls_* "
            "([SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed); the data is kept and sent "
            "again until it is taken",
        ),
        (
            "ERROR",
            "remote-write to https://r: nothing there takes the data: check remote_write.url (HTTP 404: "
            "remote write receiver needs to be enabled); the data is kept and sent again until it is taken",
        ),
    ]


def test_grpc_message_too_large_is_a_refusal_not_throttling():
    too_large = "grpc: received message larger than max (5 vs. 4)"
    for wait in (None, 1.0):  # the same request is as large again, whatever the status holds
        with pytest.raises(Permanent, match="larger than max"):
            grpc_answer(grpc.StatusCode.RESOURCE_EXHAUSTED, too_large, wait)


class Backend:
    """Refuses any request holding a refused item; fails the first request transiently."""

    def __init__(self, refused: set[int]) -> None:
        self.refused = refused
        self.requests: list[list[int]] = []
        self.dead: list[tuple[int, str]] = []

    async def send(self, items):
        self.requests.append(list(items))
        if len(self.requests) == 1:
            raise Transient("busy")
        bad = self.refused.intersection(items)
        if bad:
            raise Permanent(f"refused {sorted(bad)}")

    async def dead_letter(self, item, reason):
        self.dead.append((item, reason))

    def delivered(self) -> list[int]:
        ok = [r for i, r in enumerate(self.requests) if i > 0 and not self.refused.intersection(r)]
        return [x for r in ok for x in r]


async def test_a_refused_request_is_split_until_only_the_refused_items_are_left():
    backend = Backend({5, 6})
    await send_split(list(range(8)), backend.send, backend.dead_letter, what="test")
    assert backend.delivered() == [0, 1, 2, 3, 4, 7]  # in order, each once
    assert backend.dead == [(5, "refused [5]"), (6, "refused [6]")]
    assert backend.requests == [
        [0, 1, 2, 3, 4, 5, 6, 7],  # transient: the same request again
        [0, 1, 2, 3, 4, 5, 6, 7],
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [4, 5],
        [4],
        [5],
        [6, 7],
        [6],
        [7],
    ]


async def test_a_known_refusal_is_not_sent_again_whole():
    backend = Backend({1})
    backend.requests.append([])  # no transient failure this time
    await send_split([0, 1], backend.send, backend.dead_letter, what="test", refusal="refused [1]")
    assert backend.requests[1:] == [[0], [1]]
    assert backend.dead == [(1, "refused [1]")]


NOW = 1_700_000_000 * 10**9
WINDOW = Window(max_age_seconds=3600, max_future_seconds=600, setting="remote_write")


@pytest.mark.parametrize("offset_s", [-3600, -1, 0, 1, 600])
def test_timestamps_inside_the_window_pass(offset_s):
    assert WINDOW.problem(NOW + offset_s * 10**9, NOW) is None


def test_far_future_and_old_timestamps_are_named_with_the_setting():
    future = WINDOW.problem((2**63 - 1) * 10**6, NOW)  # the 2^63-1 ms snapshot
    assert future is not None and "ahead of the exporter's clock" in future
    assert "remote_write.max_future_seconds = 600" in future
    assert "601 s ahead" in (WINDOW.problem(NOW + 601 * 10**9, NOW) or "")
    old = WINDOW.problem(NOW - 3601 * 10**9, NOW)
    assert old is not None and "3601 s old" in old and "remote_write.max_age_seconds = 3600" in old
    assert WINDOW.problem(0, NOW) is not None


def test_a_bearer_token_file_gives_one_header_and_never_shows_its_text(tmp_path):
    from exporters.delivery import Unauthorized, bearer

    token = tmp_path / "token"
    token.write_text("s3cr3t-token\n")
    assert bearer(token, "otlp.bearer_token_file") == "Bearer s3cr3t-token"
    # Two lines (a Secret written with a trailing line of its own, say): an HTTP client
    # would refuse the header and put its value in the error it logs.
    token.write_text("s3cr3t-token\nsecond-line\n")
    with pytest.raises(Unauthorized) as err:
        bearer(token, "otlp.bearer_token_file")
    assert "otlp.bearer_token_file" in str(err.value) and "s3cr3t" not in str(err.value)
    token.write_bytes(b"\xffs3cr3t")
    with pytest.raises(Unauthorized, match="not UTF-8") as err:
        bearer(token, "remote_write.bearer_token_file")
    assert "s3cr3t" not in str(err.value)
    token.unlink()
    with pytest.raises(Unauthorized, match="cannot read remote_write.bearer_token_file"):
        bearer(token, "remote_write.bearer_token_file")
