"""ktel's clients against a broker that wants SASL_SSL (SCRAM over TLS) and ACLs.

The CA and the broker's certificate are made with openssl (ktel/stack/certs.py); the SCRAM users are
written when the broker's storage is formatted. The broker also has a PLAINTEXT
listener, a super user, for set-up (ACLs) and for looking at what ktel did.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAuthorizationFailedError

from ktel import acls, config, topics
from ktel.kafka_client import client_kwargs
from ktel.stack import certs
from ktel.stack.kafka import LocalKafka, Security, ensure_kafka
from ktel.stack.proc import free_port
from ktel.wire import (
    CONTROL_TOPIC,
    FILE_CREATED,
    METRICS_TOPIC,
    RAW_TOPIC,
    RawBatch,
    decode_snapshot,
    encode_batch,
)
from processors.chain import PROCESSES
from tests.integration.agent_harness import read_topic
from tests.integration.test_processing_stages import Worker

PASSWORDS = {name: uuid.uuid4().hex for name in ("ktel", "agent", "operator", "processor")}
PRINCIPALS = config.KafkaPrincipals(agent="User:agent", operator="User:operator", processor="User:processor")


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    ensure_kafka()
    ca = certs.make_ca(tmp_path_factory.mktemp("certs"))
    security = Security(certs.broker_keystore(ca), PASSWORDS, authorizer=True, super_users=("User:ktel",))
    broker = LocalKafka(
        tmp_path_factory.mktemp("kafka-secure"), free_port(), free_port(), security, sasl_ssl_port=free_port()
    )
    broker.start()
    yield broker, ca.cert
    broker.stop()


def kafka_config(broker: LocalKafka, ca: Path, user: str = "ktel", password: str | None = None, **kw):
    return config.KafkaConfig(
        bootstrap=f"127.0.0.1:{broker.sasl_ssl_port}",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username=user,
        sasl_password=password or PASSWORDS[user],
        ssl_cafile=ca,
        **kw,
    )


async def produce(kafka: config.KafkaConfig, topic: str, value: bytes) -> None:
    producer = AIOKafkaProducer(**client_kwargs(kafka), enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"h")
    finally:
        await producer.stop()


async def test_ktel_topics_then_a_round_trip_over_sasl_ssl(secure):
    broker, ca = secure
    kafka = kafka_config(broker, ca)
    cfg = config.Config(kafka=kafka, agent=config.AgentConfig(host_id="t"))
    said: list[str] = []
    assert await topics.ensure(cfg, said.append) == 0
    # One broker: "auto" is one replica, and one in sync.
    assert f"{RAW_TOPIC}: 6 partitions, replication factor 1, min.insync.replicas 1" in said[0]
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, RAW_TOPIC)])
    finally:
        await admin.close()
    # (name, value, read only, config source, ...): source 1 is the topic's own
    # setting, not the broker's (whose min.insync.replicas is 1 as well).
    entries = {e[0]: e for e in described[0].resources[0][4]}
    assert entries["min.insync.replicas"][1:4] == ("1", False, 1)

    value = uuid.uuid4().bytes
    await produce(kafka, RAW_TOPIC, value)
    consumer = AIOKafkaConsumer(
        RAW_TOPIC, **client_kwargs(kafka), auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    try:
        got: list[bytes] = []
        while value not in got:
            got += [r.value for recs in (await consumer.getmany(timeout_ms=1000)).values() for r in recs]
    finally:
        await consumer.stop()


async def test_a_wrong_password_is_one_error_naming_the_setting(secure):
    broker, ca = secure
    cfg = config.Config(
        kafka=kafka_config(broker, ca, password="wrong"), agent=config.AgentConfig(host_id="t")
    )
    said: list[str] = []
    assert await topics.ensure(cfg, said.append) == 1
    assert len(said) == 1, said
    assert "refused SASL SCRAM-SHA-512 user 'ktel'" in said[0] and "kafka.sasl_password" in said[0]
    assert "wrong" not in said[0].replace("(KTEL", "")


async def test_ktel_topics_refuses_topics_laid_out_otherwise(secure):
    broker, ca = secure
    base = config.Config(kafka=kafka_config(broker, ca), agent=config.AgentConfig(host_id="t"))
    assert await topics.ensure(base, lambda _: None) == 0
    cfg = config.Config(
        kafka=kafka_config(broker, ca, raw_partitions=3, replication_factor=2, min_insync_replicas=1),
        agent=config.AgentConfig(host_id="t"),
    )
    said: list[str] = []
    assert await topics.ensure(cfg, said.append) == 1
    assert f"ktel topics: {RAW_TOPIC} has 6 partitions but kafka.raw_partitions = 3" in said
    assert f"ktel topics: {RAW_TOPIC} has 1 replicas but kafka.replication_factor = 2" in said
    assert "refusing" in said[-1]


@pytest.fixture(scope="module")
def with_acls(secure):
    """The broker with ktel's topics and the ACLs `ktel acls` prints applied."""
    broker, ca = secure
    admin_cfg = kafka_config(broker, ca)
    assert asyncio.run(topics.ensure(config.Config(kafka=admin_cfg), lambda _: None)) == 0
    broker.apply_acls(acls.commands(admin_cfg.model_copy(update={"principals": PRINCIPALS}), PROCESSES))
    return broker, ca


async def test_the_agent_principal_cannot_write_control(with_acls):
    broker, ca = with_acls
    agent = kafka_config(broker, ca, user="agent")
    await produce(agent, RAW_TOPIC, b"batch")  # allowed
    with pytest.raises(TopicAuthorizationFailedError):
        await produce(agent, CONTROL_TOPIC, b"command")
    await produce(kafka_config(broker, ca, user="operator"), CONTROL_TOPIC, b"command")


def test_a_processing_worker_runs_on_its_principal_over_sasl_ssl(with_acls, tmp_path):
    """Faust gets the same settings: it reads ktel.raw, makes its changelog and writes
    ktel.metrics as the processor principal, with no more than `ktel acls` grants."""
    broker, ca = with_acls
    worker = Worker(
        tmp_path,
        f"127.0.0.1:{broker.sasl_ssl_port}",
        "secure",
        KTEL_KAFKA__SECURITY_PROTOCOL="SASL_SSL",
        KTEL_KAFKA__SASL_USERNAME="processor",
        KTEL_KAFKA__SASL_PASSWORD=PASSWORDS["processor"],
        KTEL_KAFKA__SSL_CAFILE=str(ca),
    ).start()
    try:
        batch = RawBatch(
            "secure-host", "boot", 0, 1, [[FILE_CREATED.id, 1, 2, 2, 0, "w", "/d/f", 0o101, False]]
        )
        asyncio.run(produce_key(kafka_config(broker, ca, user="agent"), batch.key, encode_batch(batch)))
        # A guard against waiting forever, not a measure: the worker takes seconds.
        deadline = time.monotonic() + 300
        while True:
            assert worker.proc is not None and worker.proc.poll() is None, worker.log.read_text()[-4000:]
            assert time.monotonic() < deadline, worker.log.read_text()[-4000:]
            snaps = [
                decode_snapshot(r.value)
                for r in asyncio.run(read_topic(broker.bootstrap, METRICS_TOPIC, idle_s=1))
                if r.key == b"secure-host"
            ]
            if snaps:
                break
    finally:
        worker.stop()
    assert "Authorization" not in worker.log.read_text()


async def produce_key(kafka: config.KafkaConfig, key: bytes, value: bytes) -> None:
    producer = AIOKafkaProducer(**client_kwargs(kafka), enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(RAW_TOPIC, value, key=key)
    finally:
        await producer.stop()
