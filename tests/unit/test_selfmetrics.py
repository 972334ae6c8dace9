"""The self-metrics server: /metrics, /healthz, and /readyz answering each process's check."""

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from ktel import selfmetrics
from ktel.stack.proc import free_port


@pytest.fixture
def server():
    registry = CollectorRegistry()
    Counter("ktel_test_things", "things", registry=registry).inc(3)
    port = free_port()
    selfmetrics.serve(port, "127.0.0.1", registry)
    yield f"http://127.0.0.1:{port}"
    selfmetrics.ready_when(lambda: "starting")


def test_health_and_metrics(server):
    assert httpx.get(f"{server}/healthz").text == "ok\n"
    assert "ktel_test_things_total 3.0" in httpx.get(f"{server}/metrics").text


def test_readyz_follows_the_check(server):
    state = {"why": "no partition of ktel.metrics assigned"}
    selfmetrics.ready_when(lambda: state["why"])
    answer = httpx.get(f"{server}/readyz")
    assert answer.status_code == 503
    assert answer.text == "not ready: no partition of ktel.metrics assigned\n"
    state["why"] = None
    answer = httpx.get(f"{server}/readyz")
    assert (answer.status_code, answer.text) == (200, "ready\n")


def test_a_broken_check_is_not_ready_with_why(server):
    selfmetrics.ready_when(lambda: 1 / 0)
    answer = httpx.get(f"{server}/readyz")
    assert answer.status_code == 503
    assert "ZeroDivisionError" in answer.text


def test_port_zero_serves_nothing():
    selfmetrics.serve(0, "127.0.0.1")  # returns without binding anything
