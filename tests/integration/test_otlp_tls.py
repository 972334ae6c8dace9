"""The OTLP exporter against a real Collector that wants TLS, and one that also wants a
client certificate (mutual TLS), over gRPC and over HTTP; and against one whose
certificate it cannot trust (a wrong CA): one line naming the settings, nothing dropped
or dead-lettered, everything delivered once the exporter has the right CA.
Certificates are made with openssl at test time (ktel/stack/certs.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import pytest
import requests
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY

from exporters import otlp
from ktel import config, topics
from ktel.stack import certs
from ktel.stack.otelcol import LocalCollector
from ktel.stack.proc import free_port
from ktel.topics import create_topics
from ktel.wire import (
    LOGS_TOPIC,
    METRICS_TOPIC,
    SPANS_TOPIC,
    LogBatch,
    MetricSnapshot,
    SpanBatch,
    encode_logs,
    encode_snapshot,
    encode_spans,
)
from tests.integration.agent_harness import committed_offsets
from tests.integration.test_otlp_collector import exporter_group

pytestmark = pytest.mark.kafka

PROTOCOLS = ["grpc", "http/protobuf"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> tuple[certs.Pair, certs.Pair, certs.Pair, certs.Pair]:
    """(CA, the Collectors' certificate, the exporter's client certificate, another CA)."""
    d = tmp_path_factory.mktemp("pki")
    ca = certs.make_ca(d)
    return ca, certs.issue(ca, d, "collector"), certs.issue(ca, d, "exporter"), certs.make_ca(d, "other-ca")


@pytest.fixture(scope="module")
def tls_collector(tmp_path_factory, pki):
    _, server, _, _ = pki
    d = tmp_path_factory.mktemp("otelcol-tls")
    with LocalCollector(d, free_port(), free_port(), tls=server) as col:
        yield col


@pytest.fixture(scope="module")
def mtls_collector(tmp_path_factory, pki):
    ca, server, _, _ = pki
    d = tmp_path_factory.mktemp("otelcol-mtls")
    with LocalCollector(d, free_port(), free_port(), tls=server, client_ca=ca.cert) as col:
        yield col


def endpoint(collector: LocalCollector, protocol: str) -> str:
    return collector.grpc_endpoint if protocol == "grpc" else collector.http_endpoint


async def setup(kafka, protocol: str, endpoint: str, **tls) -> tuple[str, config.Config, str]:
    """A run id, the config, and a consumer group starting at the end of the output topics."""
    run = uuid.uuid4().hex[:12]
    cfg = config.Config(
        kafka={"bootstrap": kafka.bootstrap},
        otlp={"protocol": protocol, "endpoint": endpoint, "metrics_port": 0, **tls},
    )
    await create_topics(kafka.bootstrap, topics.specs(cfg))
    return run, cfg, await exporter_group(kafka.bootstrap, f"test-otlp-tls-{run}")


async def publish(bootstrap: str, run: str) -> dict[tuple[str, int], int]:
    """A span, a log record and a data point of host ``host-<run>``: (topic, partition) ->
    the offset of each record."""
    host = f"host-{run}"
    t0 = time.time_ns() - 60 * 10**9  # recent: the exporter refuses what is a day old
    resource = {"host.id": host}
    records = [
        (
            SPANS_TOPIC,
            encode_spans(
                SpanBatch(
                    resource, [[uuid.uuid4().bytes, b"s" * 8, b"", "vfs_open", t0, t0 + 1000, 0, "", {}]]
                )
            ),
        ),
        (LOGS_TOPIC, encode_logs(LogBatch(resource, [[t0, 9, "INFO", f"log of {run}", {}, b"", b""]]))),
        (
            METRICS_TOPIC,
            encode_snapshot(
                MetricSnapshot(t0 // 1_000_000, [["file_created_total", "counter", resource, 23]])
            ),
        ),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    offsets = {}
    try:
        for topic, value in records:
            meta = await producer.send_and_wait(topic, value, key=host.encode())
            offsets[(topic, meta.partition)] = meta.offset
    finally:
        await producer.stop()
    return offsets


def arrived(collector: LocalCollector, run: str) -> tuple[list[str], list[str], list[int]]:
    """(span names, log bodies, counter values) of this run's host at the Collector."""

    def mine(items: list[dict]) -> list[dict]:
        return [i for i in items if i["resource"].get("host.id") == f"host-{run}"]

    return (
        [s["name"] for s in mine(collector.spans())],
        [r["body"]["stringValue"] for r in mine(collector.logs())],
        [int(p["asInt"]) for m in mine(collector.metrics()) for p in m["sum"]["dataPoints"]],
    )


def expected(run: str) -> tuple[list[str], list[str], list[int]]:
    return ["vfs_open"], [f"log of {run}"], [23]


async def wait_for(predicate, timeout: float = 90) -> None:
    async with asyncio.timeout(timeout):  # a guard against hanging, not a timing assertion
        while not predicate():
            await asyncio.sleep(0.3)


@contextlib.asynccontextmanager
async def exporting(cfg: config.Config, group: str):
    """``otlp.run`` as a task; cancelled on leaving, as `ktel export otlp` stops."""
    task = asyncio.create_task(otlp.run(cfg, asyncio.Event(), group_id=group))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)


async def wait_until_committed(bootstrap: str, group: str, offsets: dict[tuple[str, int], int]) -> None:
    """Until ``group`` has committed past each of ``offsets`` (the last record published)."""

    async def all_committed() -> bool:
        now = await committed_offsets(bootstrap, group)
        return all(now.get((topic, p)) == off + 1 for (topic, p), off in offsets.items())

    async with asyncio.timeout(90):  # a guard against hanging, not a timing assertion
        while not await all_committed():
            await asyncio.sleep(0.3)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
async def test_spans_logs_and_metrics_reach_a_tls_collector(
    kafka, pki, tls_collector, mtls_collector, protocol, mutual, monkeypatch
):
    ca, _, client, other_ca = pki
    # Set on many hosts, and by requests' rules it would replace otlp.certificate_file.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other_ca.cert))
    collector = mtls_collector if mutual else tls_collector
    tls = {"certificate_file": str(ca.cert)}
    if mutual:
        tls |= {"client_certificate_file": str(client.cert), "client_key_file": str(client.key)}
    run, cfg, group = await setup(kafka, protocol, endpoint(collector, protocol), **tls)
    await publish(kafka.bootstrap, run)
    async with exporting(cfg, group):
        await wait_for(lambda: arrived(collector, run) == expected(run))
    assert arrived(collector, run) == expected(run)  # each once
    if mutual:  # the certificate is what let it in: without one, this Collector answers nobody
        with pytest.raises(requests.exceptions.RequestException):
            requests.post(f"{collector.http_endpoint}/v1/logs", data=b"", verify=str(ca.cert), timeout=30)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_wrong_ca_is_one_log_line_and_nothing_is_dropped(kafka, pki, tls_collector, protocol, caplog):
    ca, _, _, other_ca = pki
    collector = tls_collector
    run, cfg, group = await setup(
        kafka, protocol, endpoint(collector, protocol), certificate_file=str(other_ca.cert)
    )
    offsets = await publish(kafka.bootstrap, run)
    before = await committed_offsets(kafka.bootstrap, group)
    letters = REGISTRY.get_sample_value("ktel_exporter_dead_letters_total", {"exporter": "otlp"}) or 0.0
    caplog.set_level(logging.INFO, logger="ktel.export.otlp")
    caplog.set_level(logging.WARNING, logger="ktel.retry")

    def retries() -> int:
        return sum(1 for r in caplog.records if r.name == "ktel.retry" and "OTLP export" in r.getMessage())

    async with exporting(cfg, group) as task:
        await wait_for(lambda: retries() >= 6)  # each signal failed more than once: still one line
        assert not task.done()
    errors = [
        r.getMessage() for r in caplog.records if r.name == "ktel.export.otlp" and r.levelno >= logging.ERROR
    ]
    assert len(errors) == 1, errors
    assert "the TLS handshake failed: check otlp.certificate_file, client_certificate_file" in errors[0]
    assert arrived(collector, run) == ([], [], [])
    assert (
        REGISTRY.get_sample_value("ktel_exporter_dead_letters_total", {"exporter": "otlp"}) or 0.0
    ) == letters
    assert await committed_offsets(kafka.bootstrap, group) == before  # nothing committed past them

    right = cfg.model_copy(update={"otlp": cfg.otlp.model_copy(update={"certificate_file": str(ca.cert)})})
    async with exporting(right, group):
        await wait_for(lambda: arrived(collector, run) == expected(run))
        await wait_until_committed(kafka.bootstrap, group, offsets)
    assert arrived(collector, run) == expected(run)  # each once
