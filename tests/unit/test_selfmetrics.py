"""The self-metrics server: /metrics, /healthz, and /readyz answering each process's check."""

import socket
import threading

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from ktel import selfmetrics
from ktel.stack.proc import free_port


@pytest.fixture
def server():
    registry = CollectorRegistry()
    Counter("ktel_test_things", "things", registry=registry).inc(3)
    port = free_port()
    selfmetrics.serve(port, "127.0.0.1", "x.metrics_port", registry)
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
    selfmetrics.serve(0, "127.0.0.1", "x.metrics_port")  # returns without binding anything


def test_a_port_taken_names_the_setting(server):
    port = int(server.rsplit(":", 1)[1])
    with pytest.raises(
        SystemExit, match=r"cannot serve self-metrics on 127.0.0.1:\d+ .*set otlp.metrics_port"
    ):
        selfmetrics.serve(port, "127.0.0.1", "otlp.metrics_port")


def test_ipv6_bind(server):
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as err:
        pytest.skip(f"no IPv6 loopback here: {err}")
    port = free_port()
    selfmetrics.serve(port, "::1", "x.metrics_port")
    assert httpx.get(f"http://[::1]:{port}/healthz").status_code == 200


def worker(*, rebalancing=False, assigned=(), in_recovery=False, recovered=True):
    """What a processing worker's readiness reads of its Faust app."""
    from types import SimpleNamespace

    from aiokafka import TopicPartition

    completed = SimpleNamespace(is_set=lambda: recovered)
    return SimpleNamespace(
        rebalancing=rebalancing,
        in_recovery=in_recovery,
        assignor=SimpleNamespace(assigned_actives=lambda: {TopicPartition(t, 0) for t in assigned}),
        tables=SimpleNamespace(recovery=SimpleNamespace(completed=completed)),
    )


def test_a_processing_worker_is_ready_assigned_and_recovered():
    from processors.stages import readiness

    assert readiness(worker(rebalancing=True, assigned=["ktel.raw"]), "ktel.raw") == "rebalancing"
    # Only the heartbeats' partitions: the stage has nothing of its source to work on.
    assert readiness(worker(assigned=["ktel.heartbeats"]), "ktel.raw") == "no partition of ktel.raw assigned"
    assert readiness(worker(assigned=["ktel.raw"], recovered=False), "ktel.raw") == (
        "recovering tables from their changelogs"
    )
    assert readiness(worker(assigned=["ktel.raw"], in_recovery=True), "ktel.raw") is not None
    assert readiness(worker(assigned=["ktel.raw"]), "ktel.raw") is None


def test_series_already_rendered_follow_the_registrys_with_or_without_gzip():
    """A worker's fleet series (processors/fleet_metrics.py) come rendered: /metrics is
    the registry's series, then those, one exposition whichever encoding is asked for."""
    registry = CollectorRegistry()
    Counter("ktel_test_things", "things", registry=registry).inc(3)
    rendered = b'# HELP ktel_agent_up up\n# TYPE ktel_agent_up gauge\nktel_agent_up{host_id="h"} 1.0\n'
    port = free_port()
    selfmetrics.serve(port, "127.0.0.1", "x.metrics_port", registry, extra=lambda: rendered)
    for encoding in ("gzip", "identity"):
        answer = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Accept-Encoding": encoding})
        assert answer.headers.get("content-encoding", "identity") == encoding  # (httpx decodes it)
        families = {f.name: f for f in text_string_to_metric_families(answer.text)}
        assert families["ktel_test_things"].samples[0].value == 3
        assert [(s.labels, s.value) for s in families["ktel_agent_up"].samples] == [({"host_id": "h"}, 1.0)]
    head = httpx.head(f"http://127.0.0.1:{port}/metrics")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert httpx.post(f"http://127.0.0.1:{port}/metrics").status_code == 405
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").text == "ok\n"


class Blocking:
    """A collector whose collect waits until released, counting the scrapes inside it."""

    def __init__(self) -> None:
        self.inside = self.most = 0
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def collect(self):
        self.inside += 1
        self.most = max(self.most, self.inside)
        self.entered.release()
        self.release.wait()
        self.inside -= 1
        return []


def test_one_scrape_is_made_at_a_time_and_health_does_not_wait_for_it():
    """A scrape makes its whole text in memory (the pull endpoint's up to
    pull.max_series_bytes with its series held): two at once, as two Prometheus servers
    scrape, took twice that. A second scrape waits for the first; /healthz does not."""
    registry = CollectorRegistry()
    collector = Blocking()
    registry.register(collector)
    app = selfmetrics.app(registry)
    scrape = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""}
    scrapes = [threading.Thread(target=app, args=(scrape, lambda *_: None)) for _ in range(2)]
    scrapes[0].start()
    assert collector.entered.acquire(timeout=30)
    scrapes[1].start()
    assert b"".join(app({"PATH_INFO": "/healthz"}, lambda *_: None)) == b"ok\n"
    # (given a second to get in: it does at once without the lock; no time is asserted)
    second_inside = collector.entered.acquire(timeout=1)
    collector.release.set()
    for t in scrapes:
        t.join(30)
    assert not second_inside and collector.most == 1
    assert collector.entered.acquire(timeout=30)  # (then it was made)
