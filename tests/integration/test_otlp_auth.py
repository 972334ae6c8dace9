"""The OTLP exporter against a real Collector that requires a bearer token on its
receiver (the bearertokenauth extension), over gRPC and over HTTP: a wrong token in
``otlp.bearer_token_file`` is one error line naming that setting, nothing dropped,
dead-lettered or committed past; the token fixed in its file (no restart) delivers
every span, log record and data point once."""

from __future__ import annotations

import logging
import uuid

import pytest
import requests
from prometheus_client import REGISTRY

from ktel.stack.otelcol import LocalCollector
from ktel.stack.proc import free_port
from tests.integration.agent_harness import committed_offsets
from tests.integration.test_otlp_tls import (
    PROTOCOLS,
    arrived,
    endpoint,
    expected,
    exporting,
    publish,
    setup,
    wait_for,
    wait_until_committed,
)

pytestmark = pytest.mark.kafka

TOKEN = uuid.uuid4().hex


@pytest.fixture(scope="module")
def auth_collector(tmp_path_factory):
    with LocalCollector(
        tmp_path_factory.mktemp("otelcol-auth"), free_port(), free_port(), bearer_token=TOKEN
    ) as col:
        yield col


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def refusals() -> float:
    signals = ("spans", "logs", "metrics")
    return sum(counter("ktel_exporter_otlp_failed_exports_total", signal=s) for s in signals)


def test_the_collector_refuses_a_request_without_the_token(auth_collector):
    """What the exporter's tests rely on: this Collector really checks the token."""
    url = f"{auth_collector.http_endpoint}/v1/logs"
    headers = {"Content-Type": "application/x-protobuf"}
    assert requests.post(url, data=b"", headers=headers, timeout=30).status_code == 401
    wrong = {**headers, "Authorization": "Bearer not-the-token"}
    assert requests.post(url, data=b"", headers=wrong, timeout=30).status_code == 401
    right = {**headers, "Authorization": f"Bearer {TOKEN}"}
    assert requests.post(url, data=b"", headers=right, timeout=30).status_code == 200


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_wrong_token_is_one_log_line_keeps_the_data_and_the_fixed_file_delivers_it(
    kafka, auth_collector, protocol, tmp_path, caplog
):
    collector = auth_collector
    token_file = tmp_path / "token"
    token_file.write_text("not-the-token\n")
    run, cfg, group = await setup(
        kafka, protocol, endpoint(collector, protocol), bearer_token_file=str(token_file)
    )
    offsets = await publish(kafka.bootstrap, run)
    before = await committed_offsets(kafka.bootstrap, group)
    letters = counter("ktel_exporter_dead_letters_total", exporter="otlp")
    refused_before = refusals()
    caplog.set_level(logging.INFO, logger="ktel.export.otlp")

    async with exporting(cfg, group) as task:
        # Each signal refused more than once, the exporter still up.
        await wait_for(lambda: refusals() >= refused_before + 6)
        assert not task.done()
        assert arrived(collector, run) == ([], [], [])
        assert counter("ktel_exporter_dead_letters_total", exporter="otlp") == letters
        assert await committed_offsets(kafka.bootstrap, group) == before  # nothing committed past them

        token_file.write_text(TOKEN + "\n")  # fixed in the file: no restart
        await wait_for(lambda: arrived(collector, run) == expected(run))
        await wait_until_committed(kafka.bootstrap, group, offsets)
    assert arrived(collector, run) == expected(run)  # each once
    assert counter("ktel_exporter_dead_letters_total", exporter="otlp") == letters

    lines = [r for r in caplog.records if r.name == "ktel.export.otlp"]
    errors = [r.getMessage() for r in lines if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    hint = f"refuses ktel's credentials: check the token in otlp.bearer_token_file ({token_file})"
    assert hint in errors[0]
    assert ("gRPC UNAUTHENTICATED" if protocol == "grpc" else "HTTP 401") in errors[0]
    assert any("takes the data again (credentials fixed)" in r.getMessage() for r in lines)
    assert TOKEN not in caplog.text and "not-the-token" not in caplog.text
