"""The local stack itself: a real single-node Kafka and a real Prometheus on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from ktel import config
from ktel.stack import kafka as stack_kafka
from ktel.stack import proc
from ktel.stack.kafka import LocalKafka, ensure_kafka
from ktel.stack.proc import free_port
from ktel.stack.prometheus import LocalPrometheus
from ktel.topics import TopicSpec, create_topics, ensure
from ktel.up import Stack
from ktel.wire import RAW_TOPIC

WEEK_MS = 7 * 24 * 3600 * 1000


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory):
    broker = LocalKafka(tmp_path_factory.mktemp("kafka"), port=free_port(), controller_port=free_port())
    with broker:
        yield broker


async def read_all(bootstrap: str, topic: str, expect: int) -> list[tuple[bytes, bytes]]:
    """Read the topic from the start until `expect` records have arrived."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    got: list[tuple[bytes, bytes]] = []
    try:
        # A guard against hanging forever, not a timing assertion.
        async with asyncio.timeout(60):
            while len(got) < expect:
                batches = await consumer.getmany(timeout_ms=1000)
                got += [(r.key, r.value) for recs in batches.values() for r in recs]
    finally:
        await consumer.stop()
    return got


async def produce(bootstrap: str, topic: str, key: bytes, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()


@pytest.mark.kafka
async def test_topic_created_with_partitions_and_retention(kafka: LocalKafka) -> None:
    spec = TopicSpec(RAW_TOPIC, partitions=3, retention_ms=WEEK_MS,
                     extra_config={"compression.type": "lz4"})  # fmt: skip
    await create_topics(kafka.bootstrap, [spec])
    await create_topics(kafka.bootstrap, [spec])  # idempotent

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        [topic] = await admin.describe_topics([RAW_TOPIC])
        [resp] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, RAW_TOPIC)])
    finally:
        await admin.close()
    assert topic["error_code"] == 0
    assert len(topic["partitions"]) == 3
    [(error_code, _msg, _type, name, entries)] = resp.resources
    assert (error_code, name) == (0, RAW_TOPIC)
    configs = {entry[0]: entry[1] for entry in entries}
    assert configs["retention.ms"] == str(WEEK_MS)
    assert configs["compression.type"] == "lz4"


@pytest.mark.kafka
async def test_record_survives_clean_restart(kafka: LocalKafka) -> None:
    await create_topics(kafka.bootstrap, [TopicSpec("ktel.test.restart", 3, WEEK_MS)])
    await produce(kafka.bootstrap, "ktel.test.restart", b"host-1", b"\x00payload\xff")
    assert await read_all(kafka.bootstrap, "ktel.test.restart", 1) == [(b"host-1", b"\x00payload\xff")]

    kafka.stop()
    assert not kafka.running
    kafka.start()
    assert await read_all(kafka.bootstrap, "ktel.test.restart", 1) == [(b"host-1", b"\x00payload\xff")]


@pytest.mark.kafka
async def test_record_survives_crash(kafka: LocalKafka) -> None:
    await create_topics(kafka.bootstrap, [TopicSpec("ktel.test.crash", 1, None)])
    await produce(kafka.bootstrap, "ktel.test.crash", b"k", b"v")
    kafka.kill()
    kafka.start()
    assert await read_all(kafka.bootstrap, "ktel.test.crash", 1) == [(b"k", b"v")]
    # and the broker takes writes again after the crash
    await produce(kafka.bootstrap, "ktel.test.crash", b"k2", b"v2")
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition("ktel.test.crash", 0)
        assert (await consumer.end_offsets([tp]))[tp] == 2
    finally:
        await consumer.stop()


@pytest.mark.kafka
async def test_create_topics_leaves_an_existing_topic_of_fewer_partitions_as_it_is(kafka: LocalKafka) -> None:
    """Not waited for until it shows partitions it will never have: the stage that reads
    it names the mismatch (processors/stages.py, check_partitions)."""
    name = f"fewer-{os.getpid()}"
    await create_topics(kafka.bootstrap, [TopicSpec(name, 2)])
    await create_topics(kafka.bootstrap, [TopicSpec(name, 4)])
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        [topic] = await admin.describe_topics([name])
    finally:
        await admin.close()
    assert len(topic["partitions"]) == 2


@pytest.mark.kafka
async def test_create_topics_reports_real_errors(kafka: LocalKafka) -> None:
    with pytest.raises(Exception, match="bad.topic"):
        await create_topics(kafka.bootstrap, [TopicSpec("bad.topic", 1, None, {"no.such": "1"})])


@pytest.mark.kafka
async def test_ktel_topics_refuses_an_existing_topic_kept_otherwise_than_configured(
    kafka: LocalKafka,
) -> None:
    """Its retention is the configuration's only when ktel created it: an existing one
    keeps its own, which `ktel topics` names rather than printing the configured one."""
    prefix = f"kept{os.getpid()}."

    def cfg(**kafka_settings: object) -> config.Config:
        return config.Config(
            kafka=config.KafkaConfig(bootstrap=kafka.bootstrap, prefix=prefix, **kafka_settings),
            agent=config.AgentConfig(host_id="t"),
        )

    assert await ensure(cfg(), lambda _: None) == 0
    assert await ensure(cfg(), lambda _: None) == 0  # as configured: nothing to name
    said: list[str] = []
    assert await ensure(cfg(raw_retention_hours=24), said.append) == 1
    assert said[:-1] == [
        f"ktel topics: {prefix}{RAW_TOPIC} has retention.ms = {WEEK_MS} "
        f"but kafka.raw_retention_hours = 24 ({24 * 3600 * 1000} ms)"
    ]
    assert "refusing" in said[-1]


def _fake_mvn(bin_dir: Path, script: str) -> None:
    bin_dir.mkdir()
    mvn = bin_dir / "mvn"
    mvn.write_text("#!/bin/sh\n" + script)
    mvn.chmod(mvn.stat().st_mode | stat.S_IEXEC)


def test_ensure_kafka_needs_no_mvn_once_complete(tmp_path, monkeypatch) -> None:
    # A cache whose marker lists jars that are present: mvn must not run (here it
    # would fail loudly), so a second start needs no network.
    _fake_mvn(tmp_path / "bin", "echo should-not-run; exit 1\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    home = tmp_path / f"kafka-{stack_kafka.KAFKA_VERSION}"
    (home / "libs").mkdir(parents=True)
    (home / "libs" / "kafka_2.13-x.jar").write_bytes(b"")
    (home / ".complete").write_text("kafka_2.13-x.jar\n")
    assert ensure_kafka(tmp_path) == home / "libs"

    # a jar gone missing makes the cache incomplete again, and mvn's output is reported
    (home / "libs" / "kafka_2.13-x.jar").unlink()
    with pytest.raises(RuntimeError, match="should-not-run"):
        ensure_kafka(tmp_path)
    assert not (home / ".complete").exists()


def test_ensure_kafka_honours_ktel_cache_dir(tmp_path, monkeypatch) -> None:
    home = tmp_path / f"kafka-{stack_kafka.KAFKA_VERSION}"
    (home / "libs").mkdir(parents=True)
    (home / ".complete").write_text("")
    monkeypatch.setenv("KTEL_CACHE_DIR", str(tmp_path))
    assert ensure_kafka() == home / "libs"


def test_prometheus_starts_and_answers_queries(tmp_path) -> None:
    with LocalPrometheus(tmp_path / "prom", port=free_port()) as prom:
        assert prom.remote_write_url == f"http://127.0.0.1:{prom.port}/api/v1/write"
        [sample] = prom.query("vector(1)")
        assert sample["value"][1] == "1"
        with pytest.raises(RuntimeError, match="bad_data"):
            prom.query("vector(")


def up_config(tmp_path: Path, **ports: int) -> config.Config:
    """A `ktel up` config with a free port for everything, but ``ports`` (by setting)."""
    values = {name: free_port() for name in Stack(config.Config()).ports()} | {
        name.replace("__", "."): port for name, port in ports.items()
    }
    sections: dict[str, dict[str, object]] = {"stack": {"data_dir": tmp_path}}
    for name, port in values.items():
        section, field = name.split(".")
        sections.setdefault(section, {})[field] = port
    return config.Config(**sections)


def start_refused(stack: Stack, match: str) -> None:
    """start() must refuse before it starts anything (stopped, should it not)."""
    try:
        with pytest.raises(RuntimeError, match=match):
            stack.start()
    finally:
        stack.stop()
    assert not (stack.cfg.stack.data_dir / "kafka").exists()


@pytest.fixture
def listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))
        s.listen()
        yield s.getsockname()[1]


def test_ktel_up_names_a_taken_stack_port_and_its_setting_before_starting_anything(
    tmp_path, listener
) -> None:
    start_refused(
        Stack(up_config(tmp_path, stack__collector_grpc_port=listener)),
        rf"127\.0\.0\.1:{listener} \(stack\.collector_grpc_port, KTEL_STACK__COLLECTOR_GRPC_PORT\)",
    )


def test_ktel_up_names_a_taken_child_port_before_starting_anything(tmp_path, listener) -> None:
    """Else the agent could not listen, and ktel up would wait on whatever holds its port."""
    start_refused(
        Stack(up_config(tmp_path, agent__metrics_port=listener)),
        rf"127\.0\.0\.1:{listener} \(agent\.metrics_port, KTEL_AGENT__METRICS_PORT\)",
    )


def test_ktel_up_refuses_one_port_for_two_servers_before_starting_anything(tmp_path) -> None:
    port = free_port()
    cfg = up_config(
        tmp_path,
        stack__prometheus_port=port,
        otlp__metrics_port=port,
        process__metrics_port=0,  # off: 0 is no port, however many say it
        remote_write__metrics_port=0,
    )
    start_refused(
        Stack(cfg),
        rf"one port for two servers: {port} \(stack\.prometheus_port, KTEL_STACK__PROMETHEUS_PORT; "
        rf"otlp\.metrics_port, KTEL_OTLP__METRICS_PORT\); ",
    )


def only_pull(tmp_path: Path, port: int) -> Stack:
    """A stack whose one child with a port is the pull endpoint, on ``port``."""
    off = {f"{name}__metrics_port": 0 for name in ("agent", "process", "remote_write", "otlp", "pull")}
    return Stack(up_config(tmp_path, pull__port=port, **off))


def test_ktel_up_waits_for_the_child_itself_to_listen_on_its_port(tmp_path, listener) -> None:
    """Another process answering on a child's port does not make the child ready."""
    stack = only_pull(tmp_path, listener)
    stack.children["pull"] = subprocess.Popen(["sleep", "60"])  # alive, listening on nothing
    try:
        with pytest.raises(
            TimeoutError, match=rf"not ready within 1s: pull \(not listening on port {listener} yet\)"
        ):
            stack.wait_ready(timeout=1)
    finally:
        stack.children["pull"].kill()
        stack.children["pull"].wait()


def readyz_server(port: int, not_ready: int) -> list[str]:
    """A child serving /readyz on ``port`` as ktel's processes do (ktel/selfmetrics.py):
    503 with its reason to the first ``not_ready`` requests, 200 after."""
    script = f"""
from http.server import BaseHTTPRequestHandler, HTTPServer
asked = 0
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        global asked
        asked += 1
        ready = self.path == "/readyz" and asked > {not_ready}
        body = b"ready\\n" if ready else b"not ready: no partitions assigned yet\\n"
        self.send_response(200 if ready else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", {port}), H).serve_forever()
"""
    return [sys.executable, "-c", script]


def test_ktel_up_is_ready_once_the_childs_readyz_answers_200_and_names_why_until_then(
    tmp_path, capsys
) -> None:
    port = free_port()
    stack = only_pull(tmp_path, port)
    stack.children["pull"] = subprocess.Popen(readyz_server(port, not_ready=3))
    try:
        stack.wait_ready(timeout=60)
        assert proc.listening(stack.children["pull"].pid, port)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", trust_env=False).status_code == 200
    finally:
        stack.children["pull"].kill()
        stack.children["pull"].wait()
    said = capsys.readouterr().out.splitlines()
    # Said once, not at every poll: the reason did not change.
    assert said.count("ktel up: waiting for pull: not ready: no partitions assigned yet") == 1


def test_ktel_up_names_a_child_that_stays_not_ready_and_why(tmp_path) -> None:
    port = free_port()
    stack = only_pull(tmp_path, port)
    stack.children["pull"] = subprocess.Popen(readyz_server(port, not_ready=10**9))
    try:
        # Serving first (a loaded machine may take seconds to start Python): the reason
        # the wait ends on is then the child's own, not "not listening yet".
        deadline = time.monotonic() + 120
        while not proc.listening(stack.children["pull"].pid, port):
            assert time.monotonic() < deadline, "the /readyz server never listened"
            time.sleep(0.1)
        with pytest.raises(
            TimeoutError, match=r"not ready within 5s: pull \(not ready: no partitions assigned yet\)"
        ):
            stack.wait_ready(timeout=5)
    finally:
        stack.children["pull"].kill()
        stack.children["pull"].wait()


def test_ktel_up_names_a_child_that_exits_while_it_waits(tmp_path) -> None:
    stack = only_pull(tmp_path, free_port())
    stack.logs.mkdir(parents=True)
    (stack.logs / "pull.log").write_text("OSError: [Errno 98] Address already in use\n")
    stack.children["pull"] = subprocess.Popen(["sh", "-c", "exit 3"])
    with pytest.raises(RuntimeError, match=r"(?s)^pull exited with code 3; the end of .*pull\.log:\nOSError"):
        stack.wait_ready(timeout=30)


def test_ktel_up_names_a_server_that_died_with_its_exit_code_and_log(tmp_path) -> None:
    stack = Stack(up_config(tmp_path))
    assert stack.dead() is None  # nothing started: nothing died
    stack.prometheus.start()
    try:
        assert stack.dead() is None
        stack.prometheus._proc.kill()  # a crash, as the OOM killer would do it
        stack.prometheus._proc.wait()
        dead = stack.dead()
    finally:
        stack.prometheus.stop()
    assert stack.dead() is None  # stopped on purpose is not dead
    assert dead is not None
    log = tmp_path / "prometheus" / "prometheus.log"
    assert dead.startswith(f"Prometheus exited with code -9; the end of {log}:")
    assert "Server is ready to receive web requests" in dead  # its own last words
