"""ktel on a local secured 3-broker Kafka (KRaft, every node a broker and a voter):
SASL_SSL with SCRAM users, an mTLS listener, the StandardAuthorizer with the ACLs of
`ktel acls`. Replication as in production (3 replicas, 2 in sync), and the broker
leading most of ktel.raw SIGKILLed under the whole pipeline, which must lose and
double nothing and need no restart by hand.

One cluster serves the module (mark ``cluster``): starting it takes a while."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections import Counter

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError

from ktel import acls, config, topics
from ktel.stack import certs
from ktel.stack.kafka import LocalKafkaCluster, Security, ensure_kafka
from ktel.wire import CONTROL_TOPIC, RAW_TOPIC
from processors.chain import PROCESSES
from processors.stages import changelog_topic
from tests.conftest import need_bpf
from tests.integration.agent_harness import kill_leftovers
from tests.integration.pipeline_harness import Pipeline, broker_crash_mid_stream
from tests.integration.test_kafka_security import produce

pytestmark = [pytest.mark.kafka, pytest.mark.cluster]

ROLES = ("agent", "processor", "exporter", "operator")
PASSWORDS = {name: uuid.uuid4().hex for name in ("ktel", *ROLES)}  # ktel: the administrator
PRINCIPALS = config.KafkaPrincipals(**{role: f"User:{role}" for role in ROLES})


class Secured:
    """The running cluster, its CA, and the settings each principal connects with."""

    def __init__(self, cluster: LocalKafkaCluster, ca):
        self.cluster, self.ca = cluster, ca

    def env(self, user: str) -> dict[str, str]:
        """KTEL_KAFKA__* for ``user`` over SASL_SSL (SCRAM-SHA-512)."""
        return {
            "KTEL_KAFKA__BOOTSTRAP": self.cluster.sasl_ssl_bootstrap,
            "KTEL_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "KTEL_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
            "KTEL_KAFKA__SASL_USERNAME": user,
            "KTEL_KAFKA__SASL_PASSWORD": PASSWORDS[user],
            "KTEL_KAFKA__SSL_CAFILE": str(self.ca),
        }

    def kafka(self, user: str = "ktel") -> config.KafkaConfig:
        return config.KafkaConfig(
            bootstrap=self.cluster.sasl_ssl_bootstrap,
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username=user,
            sasl_password=PASSWORDS[user],
            ssl_cafile=self.ca,
            principals=PRINCIPALS,
        )


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """The cluster, with ktel's topics made by `ktel topics` and the ACLs `ktel acls` prints."""
    ensure_kafka()
    ca = certs.make_ca(tmp_path_factory.mktemp("certs"))
    security = Security(
        certs.broker_keystore(ca), PASSWORDS, truststore=ca, authorizer=True, super_users=("User:ktel",)
    )
    cluster = LocalKafkaCluster(tmp_path_factory.mktemp("cluster"), 3, security)
    cluster.start()
    s = Secured(cluster, ca)
    try:
        res = subprocess.run(
            [sys.executable, "-m", "ktel.cli", "topics"],
            env=dict(os.environ, **s.env("ktel")),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"{RAW_TOPIC}: 6 partitions, replication factor 3, min.insync.replicas 2" in res.stdout
        cluster.nodes[0].apply_acls(acls.commands(s.kafka(), PROCESSES))
        yield s
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def pipeline(secured, prometheus, tmp_path_factory):
    """Worker and exporters over SASL_SSL, each on its principal; the agent too (a
    test that uses it needs BPF)."""
    need_bpf()
    p = Pipeline(
        tmp_path_factory.mktemp("pipeline"), prometheus, secured.env, f"cluster-{uuid.uuid4().hex[:8]}"
    )
    try:
        yield p.start()
    finally:
        p.stop()
        kill_leftovers()


async def replication_of(bootstrap: str) -> dict[str, tuple[set[int], str]]:
    """Per topic: the replica counts of its partitions, and its min.insync.replicas,
    as the brokers report them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
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
    got = asyncio.run(replication_of(secured.cluster.bootstrap))
    faust = {changelog_topic("all"), "ktel-all-__assignor-__leader"}
    ours = {s.name for s in topics.specs(config.Config())} | faust
    assert ours <= set(got), f"missing: {ours - set(got)}"
    # Everything ktel's (ktel.*) and its workers' (ktel-<stage>-*) and the brokers'
    # consumer offsets: a committed offset must survive a broker as well.
    checked = {t: got[t] for t in got if t.startswith("ktel") or t == "__consumer_offsets"}
    assert checked == {t: ({3}, "2") for t in checked}


def test_sigkill_of_the_broker_leading_most_of_ktel_raw_loses_and_doubles_nothing(secured, pipeline):
    async def leaders() -> Counter[int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=secured.cluster.bootstrap)
        await admin.start()
        try:
            [raw] = await admin.describe_topics([RAW_TOPIC])
        finally:
            await admin.close()
        return Counter(p["leader"] for p in raw["partitions"])

    def victim():
        [(node_id, _)] = asyncio.run(leaders()).most_common(1)
        return secured.cluster.node(node_id)

    rate = broker_crash_mid_stream(pipeline, victim)
    print(f"files created at {rate:.0f}/s")


def test_an_mtls_client_gets_its_certificate_principals_acls(secured):
    cert, key = certs.issue(secured.ca, "agent")
    agent = config.KafkaConfig(
        bootstrap=secured.cluster.mtls_bootstrap,
        security_protocol="SSL",
        ssl_cafile=secured.ca,
        ssl_certfile=cert,
        ssl_keyfile=key,
    )
    asyncio.run(produce(agent, RAW_TOPIC, b"batch"))  # User:agent may write ktel.raw
    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(produce(agent, CONTROL_TOPIC, b"command"))
    cert, key = certs.issue(secured.ca, "operator")
    operator = agent.model_copy(update={"ssl_certfile": cert, "ssl_keyfile": key})
    asyncio.run(produce(operator, CONTROL_TOPIC, b"command"))
    # Without a certificate the listener refuses the TLS handshake.
    anonymous = agent.model_copy(update={"ssl_certfile": None, "ssl_keyfile": None})
    with pytest.raises(KafkaConnectionError):
        asyncio.run(produce(anonymous, RAW_TOPIC, b"batch"))
