"""Shared test setup.

Under CI=true a skipped test is a failure: CI must not pass by skipping a
capability (real Kafka, real BPF, real Prometheus) that the machine should have.
So is a module skipped as it is collected, and an xfail, failing or passing: each
passes a run without checking what it checks.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from ktel import config, topics
from ktel.paths import TRACEFS
from ktel.stack.kafka import LocalKafka, ensure_kafka
from ktel.stack.proc import free_port
from ktel.stack.prometheus import LocalPrometheus

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _failed_under_ci(report, what: str) -> None:
    if hasattr(report, "wasxfail"):
        reason = report.wasxfail
    else:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"{what} under CI=true, which counts as a failure: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not IN_CI:
        return
    # An xfail, failing (reported as skipped) or passing, did not check what the test
    # checks: it fails as a skip does.
    if hasattr(report, "wasxfail"):
        _failed_under_ci(report, "xfail")
    elif report.skipped:
        _failed_under_ci(report, "skipped")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # A module skipped as it is collected (pytest.skip(allow_module_level=True), a
    # module-level importorskip) has no test report for the hook above to fail.
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped:
        _failed_under_ci(report, "skipped")


def need_bpf() -> None:
    """Skip (fail under CI) unless this process can load BPF programs."""
    if os.geteuid() != 0:
        pytest.skip("loading BPF programs needs root")
    if not (TRACEFS / "events/syscalls").is_dir():
        pytest.skip(f"tracefs with syscall tracepoints is not mounted at {TRACEFS}")
    try:
        import bcc  # noqa: F401
    except ImportError:
        pytest.skip("BCC is not importable (run deploy/setup.sh)")


@pytest.fixture(scope="session")
def kafka(tmp_path_factory):
    """A real single-node Kafka on free loopback ports, shared by the session."""
    ensure_kafka()
    broker = LocalKafka(tmp_path_factory.mktemp("kafka"), free_port(), free_port())
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def private_kafka(tmp_path):
    """A real single-node Kafka of one test's own, with ktel's topics: its consumer
    groups, tables and ktel.dlq start empty, and the test may stop and start it."""
    ensure_kafka()
    broker = LocalKafka(tmp_path / "kafka", free_port(), free_port())
    broker.start()
    try:
        cfg = config.Config(
            kafka=config.KafkaConfig(bootstrap=broker.bootstrap), agent=config.AgentConfig(host_id="t")
        )
        asyncio.run(topics.create_topics(broker.bootstrap, topics.specs(cfg)))
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory):
    prom = LocalPrometheus(tmp_path_factory.mktemp("prometheus"), free_port())
    prom.start()
    yield prom
    prom.stop()
