"""ktel on the local secured 3-broker Kafka of ``ktel cluster`` (KRaft,
every node a broker and a voter): SASL_SSL with SCRAM users, an mTLS listener,
inter-broker and controller traffic over mutual TLS (no listener in the clear), the
StandardAuthorizer with the ACLs of `ktel acls`, each principal's config file.
Replication as in production (3 replicas, 2 in sync), and the broker leading most
of ktel.raw SIGKILLed under the whole pipeline, which must lose and double nothing
and need no restart by hand. The pipeline's Prometheus is a production-like one too:
remote write only over TLS, with a password.

One cluster serves the module (mark ``cluster``): starting it takes a while."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter

import jsonschema
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError

from ktel import config, status, topics
from ktel.config import load
from ktel.kafka_client import client_kwargs
from ktel.stack import certs
from ktel.stack.cluster import ADMIN, SecuredCluster, start
from ktel.stack.kafka import ensure_kafka
from ktel.stack.proc import free_port
from ktel.stack.prometheus import LocalPrometheus, Web
from ktel.wire import (
    CONTROL_TOPIC,
    DLQ_TOPIC,
    FILE_CREATED,
    LOGS_TOPIC,
    METRICS_TOPIC,
    RAW_TOPIC,
    SPANS_TOPIC,
    DeadLetter,
    MetricSnapshot,
    RawBatch,
    dead_letter_record,
    encode_batch,
    encode_snapshot,
)
from processors.chain import PROCESSES
from processors.stages import changelog_topic
from tests.conftest import need_bpf
from tests.integration.agent_harness import kill_leftovers
from tests.integration.pipeline_harness import Pipeline, broker_crash_mid_stream
from tests.integration.test_kafka_security import produce

pytestmark = [pytest.mark.kafka, pytest.mark.cluster]


def env(secured: SecuredCluster, user: str) -> dict[str, str]:
    """How ``user``'s ktel process is configured: the file the cluster wrote for it."""
    return {
        "KTEL_CONFIG": str(secured.config_file(user)),
        # The harnesses set it too; from the file, so the two agree.
        "KTEL_KAFKA__BOOTSTRAP": secured.cluster.sasl_ssl_bootstrap,
    }


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """The cluster as `ktel cluster` starts it (ACLs applied), with
    ktel's topics made by `ktel topics`, run as the administrator."""
    ensure_kafka()
    s = start(tmp_path_factory.mktemp("cluster"), 3, tuple(PROCESSES))
    try:
        res = subprocess.run(
            [sys.executable, "-m", "ktel.cli", "--config", str(s.config_file(ADMIN)), "topics"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"{RAW_TOPIC}: 6 partitions, replication factor 3, min.insync.replicas 2" in res.stdout
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def secured_prometheus(tmp_path_factory):
    """A Prometheus that takes remote write only over TLS and with basic auth, and the
    remote-write exporter's settings that pass it."""
    d = tmp_path_factory.mktemp("prom-pki")
    ca = certs.make_ca(d)
    password = d / "remote-write.password"
    password.write_text(uuid.uuid4().hex + "\n")
    web = Web(certs.issue(ca, d, "prometheus"), ca.cert, users={"ktel": password.read_text().strip()})
    with LocalPrometheus(tmp_path_factory.mktemp("prom-secured"), free_port(), web) as prom:
        yield (
            prom,
            {
                "KTEL_REMOTE_WRITE__TLS_CA_FILE": str(ca.cert),
                "KTEL_REMOTE_WRITE__BASIC_AUTH_USERNAME": "ktel",
                "KTEL_REMOTE_WRITE__BASIC_AUTH_PASSWORD_FILE": str(password),
            },
        )


@pytest.fixture(scope="module")
def pipeline(secured, secured_prometheus, tmp_path_factory):
    """Worker and exporters over SASL_SSL, each on its principal; the agent too (a
    test that uses it needs BPF); remote write into the TLS and password Prometheus."""
    need_bpf()
    prometheus, remote_write_env = secured_prometheus
    p = Pipeline(
        tmp_path_factory.mktemp("pipeline"),
        prometheus,
        functools.partial(env, secured),
        f"cluster-{uuid.uuid4().hex[:8]}",
        remote_write_env,
    )
    try:
        yield p.start()
    finally:
        p.stop()
        kill_leftovers()


def admin_client(secured: SecuredCluster) -> AIOKafkaAdminClient:
    """The administrator's client (a super user), over SASL_SSL as `ktel topics`."""
    return AIOKafkaAdminClient(**client_kwargs(load(secured.config_file(ADMIN)).kafka))


async def replication_of(secured: SecuredCluster) -> dict[str, tuple[set[int], str]]:
    """Per topic: the replica counts of its partitions, and its min.insync.replicas,
    as the brokers report them."""
    admin = admin_client(secured)
    await admin.start()
    try:
        described = {t["topic"]: t for t in await admin.describe_topics()}
        resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in described]
        configs = await admin.describe_configs(resources)
    finally:
        await admin.close()
    isr = {
        name: {e[0]: e[1] for e in entries}["min.insync.replicas"]
        for response in configs
        for _code, _msg, _type, name, entries in response.resources
    }
    return {name: ({len(p["replicas"]) for p in t["partitions"]}, isr[name]) for name, t in described.items()}


def test_every_ktel_and_faust_topic_has_3_replicas_and_2_in_sync(secured, pipeline):
    got = asyncio.run(replication_of(secured))
    faust = {changelog_topic(config.Config().kafka.topics, "all"), "ktel-all-__assignor-__leader"}
    ours = {s.name for s in topics.specs(config.Config())} | faust
    assert ours <= set(got), f"missing: {ours - set(got)}"
    # Everything ktel's (ktel.*) and its workers' (ktel-<stage>-*) and the brokers'
    # consumer offsets: a committed offset must survive a broker as well.
    checked = {t: got[t] for t in got if t.startswith("ktel") or t == "__consumer_offsets"}
    assert checked == {t: ({3}, "2") for t in checked}


def test_sigkill_of_the_broker_leading_most_of_ktel_raw_loses_and_doubles_nothing(secured, pipeline):
    async def leaders() -> Counter[int]:
        admin = admin_client(secured)
        await admin.start()
        try:
            [raw] = await admin.describe_topics([RAW_TOPIC])
        finally:
            await admin.close()
        return Counter(p["leader"] for p in raw["partitions"])

    def victim():
        [(node_id, _)] = asyncio.run(leaders()).most_common(1)
        return secured.cluster.node(node_id)

    broker_crash_mid_stream(pipeline, victim)


async def refused_writes(kafka: config.KafkaConfig, names: list[str]) -> list[str]:
    """The topics of ``names`` Kafka refuses ``kafka``'s principal a write to. Not an
    idempotent producer: its producer id would be refused before any topic is tried."""
    refused = []
    for name in names:
        producer = AIOKafkaProducer(**client_kwargs(kafka), acks="all", request_timeout_ms=30000)
        await producer.start()
        try:
            await producer.send_and_wait(name, b"not a status", key=b"h")
        except TopicAuthorizationFailedError:
            refused.append(name)
        finally:
            await producer.stop()
    return refused


def ktel_as(
    secured: SecuredCluster, user: str, *args: str, more: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """A ktel command run with ``user``'s config file alone (no KTEL_ settings of the
    tests), and ``more`` settings given by variables."""
    return subprocess.run(
        [sys.executable, "-m", "ktel.cli", "--config", str(secured.config_file(user)), *args],
        env={k: v for k, v in os.environ.items() if not k.startswith("KTEL_")} | (more or {}),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_status_principal_shows_the_fleet_and_can_write_no_topic(secured, pipeline):
    """`ktel status` on the principal `ktel acls` gives the status role: the host
    from its heartbeats, the worker's and the exporter's groups with their lag."""
    res = ktel_as(secured, "status", "status", "--json", "--host", pipeline.host, "--timeout", "120")
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(res.stdout)
    jsonschema.validate(doc, status.SCHEMA)
    [host] = doc["hosts"]
    assert (host["host_id"], host["stale"]) == (pipeline.host, False)
    assert "file_created" in host["probes_loaded"]
    groups = {g["group"]: g for g in doc["groups"]}
    # The groups of the pipeline's worker and remote-write exporter (the pull endpoint
    # has none), with what they committed.
    assert {"ktel-all", "ktel-export-remote-write"} <= set(groups), groups
    assert groups["ktel-all"]["members"] >= 1
    assert RAW_TOPIC in groups["ktel-all"]["lag_by_topic"]
    assert METRICS_TOPIC in groups["ktel-export-remote-write"]["lag_by_topic"]

    # Every topic on the cluster (but the brokers' own): the status principal writes none.
    every = {t for t in asyncio.run(replication_of(secured)) if not t.startswith("__")}
    assert {s.name for s in topics.specs(config.Config())} <= every
    as_status = load(secured.config_file("status")).kafka
    assert sorted(asyncio.run(refused_writes(as_status, sorted(every)))) == sorted(every)


async def send_one(kafka: config.KafkaConfig, topic: str, key: bytes | None, value: bytes) -> tuple[int, int]:
    """Send a record as ``kafka``'s principal: its (partition, offset)."""
    producer = AIOKafkaProducer(**client_kwargs(kafka), enable_idempotence=True)
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, value, key=key)
        return meta.partition, meta.offset
    finally:
        await producer.stop()


async def records_after(kafka: config.KafkaConfig, topic: str, partition: int, offset: int) -> list:
    """The records of ``topic[partition]`` after ``offset``, up to its end."""
    consumer = AIOKafkaConsumer(**client_kwargs(kafka), group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset + 1)
        end = (await consumer.end_offsets([tp]))[tp]
        records: list = []
        while await consumer.position(tp) < end:
            records += (await consumer.getmany(tp, timeout_ms=1000)).get(tp, [])
        return records
    finally:
        await consumer.stop()


def test_the_dlq_principal_re_drives_a_dead_letter_and_can_write_no_other_topic(secured):
    """`ktel dlq --redrive` on the principal `ktel acls` gives the dlq role: a batch a
    stage dead-lettered goes back to ktel.raw, read back from there first, and its marker
    to ktel.dlq, after it; the output topics and ktel.control are refused to it."""
    host = f"dlq-{uuid.uuid4().hex[:8]}"
    event = [FILE_CREATED.id, 1, 2, 2, 0, "w", "/d/f", 0o101, False]
    batch = encode_batch(RawBatch(host, "boot", 0, 1, [event]))
    partition, offset = asyncio.run(
        send_one(load(secured.config_file("agent")).kafka, RAW_TOPIC, host.encode(), batch)
    )
    letter = DeadLetter("all", "refused for the test", RAW_TOPIC, partition, offset, batch)
    processor = load(secured.config_file("processor")).kafka
    asyncio.run(send_one(processor, DLQ_TOPIC, *dead_letter_record(letter, host.encode())))
    res = ktel_as(secured, "dlq", "dlq", "--redrive", "--host", host)
    assert res.returncode == 0, res.stdout + res.stderr
    admin = load(secured.config_file(ADMIN)).kafka
    copies = [
        r for r in asyncio.run(records_after(admin, RAW_TOPIC, partition, offset)) if r.key == host.encode()
    ]
    assert [(r.value, [name for name, _ in r.headers]) for r in copies] == [(batch, ["ktel-redriven-from"])]
    again = ktel_as(secured, "dlq", "dlq", "--redrive", "--host", host)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "skipped 1 already re-driven" in again.stderr  # (its marker written, on ktel.dlq)

    denied = [CONTROL_TOPIC, METRICS_TOPIC, SPANS_TOPIC, LOGS_TOPIC]
    as_dlq = load(secured.config_file("dlq")).kafka
    assert sorted(asyncio.run(refused_writes(as_dlq, denied))) == sorted(denied)


def test_the_dlq_principal_sends_an_exporters_dead_letter_to_its_backend(secured, secured_prometheus):
    """`ktel dlq --redrive` on the dlq role's principal reads an exporter's dead letter's
    record back from ktel.metrics, which only that role's read of the output topics
    allows, and sends it to the TLS and password Prometheus, not to ktel.metrics."""
    prometheus, remote_write_env = secured_prometheus
    run = uuid.uuid4().hex[:12]
    host = f"dlq-{run}"
    snapshot = encode_snapshot(
        MetricSnapshot(
            time.time_ns() // 1_000_000, [["ktel_redriven", "gauge", {"host.id": host, "ktel.run": run}, 7]]
        )
    )
    processor = load(secured.config_file("processor")).kafka
    partition, offset = asyncio.run(send_one(processor, METRICS_TOPIC, host.encode(), snapshot))
    letter = DeadLetter("remote-write", "refused for the test", METRICS_TOPIC, partition, offset, snapshot)
    exporter = load(secured.config_file("exporter")).kafka
    asyncio.run(send_one(exporter, DLQ_TOPIC, *dead_letter_record(letter, host.encode())))
    res = ktel_as(
        secured,
        "dlq",
        "dlq",
        "--redrive",
        "--host",
        host,
        more={"KTEL_REMOTE_WRITE__URL": prometheus.remote_write_url, **remote_write_env},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"sent: remote-write to {prometheus.remote_write_url}" in res.stdout
    [sample] = prometheus.query(f'ktel_redriven{{ktel_run="{run}"}}')
    assert sample["value"][1] == "7"
    admin = load(secured.config_file(ADMIN)).kafka
    # (Other tests' workers share the cluster and may write to the same partition.)
    after = asyncio.run(records_after(admin, METRICS_TOPIC, partition, offset))
    assert [r for r in after if r.key == host.encode()] == []


def test_an_mtls_client_gets_its_certificate_principals_acls(secured):
    agent = load(secured.mtls_config_file("agent")).kafka
    asyncio.run(produce(agent, RAW_TOPIC, b"batch"))  # User:agent may write ktel.raw
    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(produce(agent, CONTROL_TOPIC, b"command"))
    asyncio.run(produce(load(secured.mtls_config_file("operator")).kafka, CONTROL_TOPIC, b"command"))
    # Without a certificate the listener refuses the TLS handshake.
    anonymous = agent.model_copy(update={"ssl_certfile": None, "ssl_keyfile": None})
    with pytest.raises(KafkaConnectionError):
        asyncio.run(produce(anonymous, RAW_TOPIC, b"batch"))


def test_no_listener_of_the_cluster_is_in_the_clear(secured):
    """What each broker says of its listeners: inter-broker and controller traffic is
    mutual TLS with the brokers' certificate, clients SASL_SSL or mutual TLS."""

    async def listeners() -> dict[int, dict[str, str]]:
        admin = admin_client(secured)
        await admin.start()
        try:
            resources = [
                ConfigResource(ConfigResourceType.BROKER, str(n.node_id)) for n in secured.cluster.nodes
            ]
            responses = await admin.describe_configs(resources)
        finally:
            await admin.close()
        return {
            int(name): {e[0]: e[1] for e in entries}
            for response in responses
            for _code, _msg, _type, name, entries in response.resources
        }

    configs = asyncio.run(listeners())
    assert sorted(configs) == [n.node_id for n in secured.cluster.nodes]
    for node_id, c in configs.items():
        protocols = dict(kv.split(":") for kv in c["listener.security.protocol.map"].split(","))
        used = {
            listener.split("://")[0]: protocols[listener.split("://")[0]]
            for listener in c["listeners"].split(",")
        }
        assert used == {"BROKER": "SSL", "SASL_SSL": "SASL_SSL", "SSL": "SSL", "CONTROLLER": "SSL"}, node_id
        assert protocols[c["inter.broker.listener.name"]] == "SSL"
        assert protocols[c["controller.listener.names"]] == "SSL"
    # Each requires a client certificate (tests/unit/test_local_kafka.py): without the
    # brokers' one, their own listener refuses a client.
    node = secured.cluster.nodes[0]
    anonymous = node.client_settings().model_copy(update={"ssl_certfile": None, "ssl_keyfile": None})
    with pytest.raises(KafkaConnectionError):
        asyncio.run(produce(anonymous, RAW_TOPIC, b"batch"))
