"""The local stack itself: a real single-node Kafka and a real Prometheus on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from ktel import config
from ktel.stack import kafka as stack_kafka
from ktel.stack.kafka import LocalKafka, TopicSpec, create_topics, ensure_kafka
from ktel.stack.proc import free_port
from ktel.stack.prometheus import LocalPrometheus
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
async def test_create_topics_reports_real_errors(kafka: LocalKafka) -> None:
    with pytest.raises(Exception, match="bad.topic"):
        await create_topics(kafka.bootstrap, [TopicSpec("bad.topic", 1, None, {"no.such": "1"})])


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


def test_ktel_up_names_a_taken_stack_port_and_its_setting_before_starting_anything(tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = config.Config(
            stack=config.StackConfig(data_dir=tmp_path, collector_grpc_port=port, kafka_port=free_port())
        )
        stack = Stack(cfg)
        with pytest.raises(
            RuntimeError,
            match=rf"127\.0\.0\.1:{port} \(stack\.collector_grpc_port, KTEL_STACK__COLLECTOR_GRPC_PORT\)",
        ):
            stack.start()
    assert not stack.kafka.running and not (tmp_path / "kafka").exists()  # nothing was started


def test_ktel_up_names_a_taken_child_port_before_starting_anything(tmp_path) -> None:
    """The agent could not listen, and ktel up would wait on whatever holds its port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = config.Config(stack=config.StackConfig(data_dir=tmp_path), agent={"metrics_port": port})
        stack = Stack(cfg)
        with pytest.raises(RuntimeError, match=rf":{port} \(agent\.metrics_port, KTEL_AGENT__METRICS_PORT\)"):
            stack.start()
    assert not (tmp_path / "kafka").exists()


def test_ktel_up_refuses_one_port_for_two_servers_before_starting_anything(tmp_path) -> None:
    port = free_port()
    cfg = config.Config(
        stack=config.StackConfig(data_dir=tmp_path, prometheus_port=port),
        otlp={"metrics_port": port},
        aggregate={"metrics_port": 0},  # off: 0 is no port, however many say it
        remote_write={"metrics_port": 0},
    )
    with pytest.raises(
        RuntimeError,
        match=rf"one port for two servers: {port} \(stack\.prometheus_port and otlp\.metrics_port\); ",
    ):
        Stack(cfg).start()
    assert not (tmp_path / "kafka").exists()


def test_ktel_up_names_a_server_that_died_with_its_exit_code_and_log(tmp_path) -> None:
    stack = Stack(config.Config(stack=config.StackConfig(data_dir=tmp_path, prometheus_port=free_port())))
    assert stack.dead() is None  # nothing started: nothing died
    stack.prometheus.start()
    try:
        assert stack.dead() is None
        stack.prometheus._proc.kill()  # a crash, as the OOM killer would do it
        stack.prometheus._proc.wait()
        dead = stack.dead()
    finally:
        stack.prometheus.stop()
    assert dead is not None
    log = tmp_path / "prometheus" / "prometheus.log"
    assert dead.startswith(f"Prometheus exited with code -9; the end of {log}:")
    assert "Server is ready to receive web requests" in dead  # its own last words
