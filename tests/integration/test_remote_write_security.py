"""Remote-write to receivers that want TLS, credentials and client certificates: a
real Prometheus with a ``--web.config.file`` (TLS and bcrypt basic auth; mutual TLS),
and a loopback receiver for what Prometheus does not show (a bearer token, a tenant
header). Certificates are made with openssl at test time (ktel/stack/certs.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import uuid

import httpx
import pytest
from aiohttp import web
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY

from exporters import remote_write
from ktel import config, topics
from ktel.stack import certs
from ktel.stack.proc import free_port
from ktel.stack.prometheus import LocalPrometheus, Web
from ktel.topics import create_topics
from ktel.wire import METRICS_TOPIC, MetricSnapshot, encode_snapshot
from tests.integration.agent_harness import committed_offsets, start_group_at_end

pytestmark = pytest.mark.kafka

USER, PASSWORD = "ktel", "s3cret-password"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> tuple[certs.Pair, certs.Pair, certs.Pair]:
    """(CA, the servers' certificate, the exporter's client certificate)."""
    d = tmp_path_factory.mktemp("pki")
    ca = certs.make_ca(d)
    return ca, certs.issue(ca, d, "server"), certs.issue(ca, d, "exporter")


@pytest.fixture(scope="module")
def basic_auth_prometheus(tmp_path_factory, pki):
    ca, server, _ = pki
    web_ = Web(server, ca.cert, users={USER: PASSWORD})
    with LocalPrometheus(tmp_path_factory.mktemp("prom-basic"), free_port(), web_) as prom:
        yield prom


@pytest.fixture(scope="module")
def mtls_prometheus(tmp_path_factory, pki):
    ca, server, client = pki
    web_ = Web(server, ca.cert, client_ca=ca.cert, client=client)
    with LocalPrometheus(tmp_path_factory.mktemp("prom-mtls"), free_port(), web_) as prom:
        yield prom


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def dead_letters() -> float:
    return counter("ktel_exporter_dead_letters_total", exporter="remote-write")


async def setup(kafka, name: str, **remote_write_settings) -> tuple[str, config.Config, str]:
    """A run id, the config, and a consumer group starting at the end of ktel.metrics."""
    run = uuid.uuid4().hex[:12]
    # Sections as data, as a config file gives them: KTEL_* variables go on top.
    cfg = config.Config(
        kafka={"bootstrap": kafka.bootstrap}, remote_write={"metrics_port": 0, **remote_write_settings}
    )
    await create_topics(kafka.bootstrap, topics.specs(cfg))
    group = f"{name}-{run}"
    await start_group_at_end(kafka.bootstrap, group, METRICS_TOPIC)
    return run, cfg, group


async def publish(bootstrap: str, run: str, values: list[float]) -> tuple[list[int], int, int]:
    """One gauge snapshot per value, a second apart, on one partition: (their
    timestamps, the partition, the offset of the first)."""
    t0 = time.time_ns() // 1_000_000 - 60_000  # recent: Prometheus refuses samples far in the past
    stamps = [t0 + 1000 * i for i in range(len(values))]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        metas = [
            await producer.send_and_wait(
                METRICS_TOPIC,
                encode_snapshot(MetricSnapshot(ts, [["ktel_secured", "gauge", {"ktel.run": run}, v]])),
                key=run.encode(),
            )
            for ts, v in zip(stamps, values, strict=True)
        ]
    finally:
        await producer.stop()
    return stamps, metas[0].partition, metas[0].offset


async def wait_for(predicate, timeout: float = 90) -> None:
    """Until ``predicate()`` (run in a thread: it may block, or be a coroutine function) holds."""
    async with asyncio.timeout(timeout):  # a guard against hanging, not a timing assertion
        while not (
            await predicate()
            if asyncio.iscoroutinefunction(predicate)
            else await asyncio.to_thread(predicate)
        ):
            await asyncio.sleep(0.3)


def stored(prom: LocalPrometheus, run: str) -> list[tuple[int, float]]:
    result = prom.query(f'ktel_secured{{ktel_run="{run}"}}[10m]')
    return [(round(ts * 1000), float(v)) for r in result for ts, v in r["values"]]


async def committed(bootstrap: str, group: str, partition: int) -> int:
    return (await committed_offsets(bootstrap, group))[(METRICS_TOPIC, partition)]


class Exporter:
    """``remote_write.run`` as a task, stopped on leaving."""

    def __init__(self, cfg: config.Config, group: str) -> None:
        self.cfg, self.group = cfg, group

    async def __aenter__(self) -> asyncio.Task:
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(remote_write.run(self.cfg, self.stop, group_id=self.group))
        return self.task

    async def __aexit__(self, *exc_info: object) -> None:
        # As `ktel export` stops: cancelled, even while it retries (offsets follow acknowledgements).
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, 30)


async def test_samples_reach_a_tls_and_basic_auth_prometheus_exactly(
    kafka, basic_auth_prometheus, pki, monkeypatch
):
    ca, _, _ = pki
    prom = basic_auth_prometheus
    # The password as an operator gives it: in the environment, never in the file.
    monkeypatch.setenv("KTEL_REMOTE_WRITE__BASIC_AUTH_PASSWORD", PASSWORD)
    run, cfg, group = await setup(
        kafka, "test-rw-basic", url=prom.remote_write_url, tls_ca_file=ca.cert, basic_auth_username=USER
    )
    assert cfg.remote_write.password() == PASSWORD
    stamps, _, _ = await publish(kafka.bootstrap, run, [1.0, 2.0, 3.0])
    async with Exporter(cfg, group):
        await wait_for(lambda: len(stored(prom, run)) >= 3)
    assert stored(prom, run) == list(zip(stamps, [1.0, 2.0, 3.0], strict=True))


async def test_a_wrong_password_is_one_log_line_keeps_the_data_and_a_fixed_file_delivers_it(
    kafka, basic_auth_prometheus, pki, tmp_path, caplog
):
    """401 is ktel's configuration, not the samples' fault: nothing dead-lettered, no offset
    committed past them, retried; fixing the password file (read per request) is enough,
    the exporter is not restarted."""
    ca, _, _ = pki
    prom = basic_auth_prometheus
    password_file = tmp_path / "password"
    password_file.write_text("not-the-password\n")
    run, cfg, group = await setup(
        kafka,
        "test-rw-wrong-password",
        url=prom.remote_write_url,
        tls_ca_file=ca.cert,
        basic_auth_username=USER,
        basic_auth_password_file=password_file,
    )
    stamps, partition, first = await publish(kafka.bootstrap, run, [4.0, 5.0, 6.0])
    letters = dead_letters()
    refused_before = counter("ktel_exporter_failed_requests_total", exporter="remote-write", status="401")
    caplog.set_level(logging.INFO, logger="ktel.export.remote_write")
    async with Exporter(cfg, group) as task:
        # Several attempts refused, the exporter still up.
        await wait_for(
            lambda: (
                counter("ktel_exporter_failed_requests_total", exporter="remote-write", status="401")
                >= refused_before + 3
            )
        )
        assert not task.done()
        assert stored(prom, run) == []
        assert dead_letters() == letters
        assert await committed(kafka.bootstrap, group, partition) == first
        password_file.write_text(PASSWORD + "\n")
        await wait_for(lambda: len(stored(prom, run)) >= 3)
    assert stored(prom, run) == list(zip(stamps, [4.0, 5.0, 6.0], strict=True))
    assert dead_letters() == letters
    assert await committed(kafka.bootstrap, group, partition) == first + 3

    lines = [r for r in caplog.records if r.name == "ktel.export.remote_write"]
    errors = [r.getMessage() for r in lines if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert (
        "refuses ktel's credentials: check remote_write.basic_auth_username and basic_auth_password"
        in errors[0]
    )
    assert "HTTP 401" in errors[0]
    assert PASSWORD not in caplog.text and "not-the-password" not in caplog.text
    assert any("takes the data again (credentials fixed)" in r.getMessage() for r in lines)


async def test_mutual_tls_delivers_and_an_untrusted_server_keeps_the_data(
    kafka, mtls_prometheus, pki, tmp_path, caplog
):
    """With a CA that did not sign the receiver's certificate the handshake fails: one line
    naming the TLS settings, nothing dead-lettered, no offset committed; restarted with
    the right CA and its client certificate, the exporter delivers it all."""
    ca, _, client = pki
    prom = mtls_prometheus
    other_ca = certs.make_ca(tmp_path, "other-ca")
    tls = {"tls_cert_file": client.cert, "tls_key_file": client.key}
    run, cfg, group = await setup(
        kafka, "test-rw-mtls", url=prom.remote_write_url, tls_ca_file=other_ca.cert, **tls
    )
    stamps, partition, first = await publish(kafka.bootstrap, run, [7.0, 8.0])
    letters = dead_letters()
    caplog.set_level(logging.INFO, logger="ktel.export.remote_write")
    caplog.set_level(logging.WARNING, logger="ktel.retry")

    def retries() -> int:
        return sum(
            1 for r in caplog.records if r.name == "ktel.retry" and prom.remote_write_url in r.getMessage()
        )

    async with Exporter(cfg, group) as task:
        await wait_for(lambda: retries() >= 3)  # several attempts failed: still one line
        assert not task.done()
    [error] = [
        r.getMessage()
        for r in caplog.records
        if r.name == "ktel.export.remote_write" and r.levelno >= logging.ERROR
    ]
    assert "the TLS handshake failed: check remote_write.tls_ca_file, tls_cert_file, tls_key_file" in error
    assert "CERTIFICATE_VERIFY_FAILED" in error
    assert stored(prom, run) == []
    assert dead_letters() == letters
    assert await committed(kafka.bootstrap, group, partition) == first

    right = config.Config(
        kafka={"bootstrap": kafka.bootstrap},
        remote_write={"url": prom.remote_write_url, "metrics_port": 0, "tls_ca_file": ca.cert, **tls},
    )
    async with Exporter(right, group):
        await wait_for(lambda: len(stored(prom, run)) >= 2)
    assert stored(prom, run) == list(zip(stamps, [7.0, 8.0], strict=True))
    assert dead_letters() == letters
    # The certificate is what let it in: without one, this Prometheus answers nobody.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{prom.url}/-/ready", verify=ssl.create_default_context(cafile=ca.cert), trust_env=False)


async def test_a_bearer_token_file_is_read_per_request_and_headers_are_sent(kafka, tmp_path):
    """The receiver takes only the current token: the old one is refused (401, retried, the
    data kept) until the token file is rotated, with no restart; the tenant header comes
    with every request."""
    valid = "token-2"
    seen: list[tuple[str | None, str | None]] = []  # (Authorization, X-Scope-OrgID) per request

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        seen.append((request.headers.get("Authorization"), request.headers.get("X-Scope-OrgID")))
        if request.headers.get("Authorization") != f"Bearer {valid}":
            return web.Response(status=401, text="bad token")
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/api/v1/write", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    token_file = tmp_path / "token"
    token_file.write_text("token-1\n")
    run, cfg, group = await setup(
        kafka,
        "test-rw-bearer",
        url=f"http://127.0.0.1:{port}/api/v1/write",
        bearer_token_file=token_file,
        headers={"X-Scope-OrgID": "tenant-a"},
    )
    _, partition, first = await publish(kafka.bootstrap, run, [9.0])
    letters = dead_letters()
    try:
        async with Exporter(cfg, group):
            await wait_for(lambda: len(seen) >= 3)
            assert await committed(kafka.bootstrap, group, partition) == first
            token_file.write_text(f"{valid}\n")

            async def acknowledged() -> bool:
                return await committed(kafka.bootstrap, group, partition) == first + 1

            await wait_for(acknowledged)
    finally:
        await runner.cleanup()
    assert set(seen) == {("Bearer token-1", "tenant-a"), ("Bearer token-2", "tenant-a")}
    assert seen[-1] == ("Bearer token-2", "tenant-a")
    assert seen.count(("Bearer token-2", "tenant-a")) == 1  # delivered once, after the refusals
    assert dead_letters() == letters
