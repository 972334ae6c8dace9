"""ktel's long-running processes against a SASL_SSL broker they are set up wrongly for,
or whose ACLs refuse them: each says once, in one line, which setting (or ACL) is
wrong, keeps trying, and the agent keeps every batch in its spool until it is fixed.

The broker (ktel/stack/kafka.py) has a PLAINTEXT listener for the test's own reads
and set-up, and a SASL_SSL one with SCRAM users and the StandardAuthorizer.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ktel import config, topics
from ktel.stack import certs
from ktel.stack.kafka import LocalKafka, Security, _java, ensure_kafka
from ktel.stack.proc import free_port
from ktel.wire import CONTROL_TOPIC, DLQ_TOPIC, HEARTBEATS_TOPIC, RAW_TOPIC
from tests.conftest import need_bpf
from tests.integration.agent_harness import AgentProcess, kill_leftovers
from tests.integration.test_agent_delivery import create_files
from tests.integration.test_agent_faults import deduped_paths, expected
from tests.integration.test_processing_stages import Worker, produce

pytestmark = pytest.mark.kafka

PASSWORDS = {name: uuid.uuid4().hex for name in ("ktel", "agent")}
ONLY_FILES = '["file_created"]'
# A guard against waiting forever, not a measure.
DEADLINE_S = 180
# How long a process is watched after its first complaint: several retries (the
# backoff reaches 5 s), each of which must stay silent.
WATCH_S = 20


@pytest.fixture(autouse=True)
def no_leftover_agents():
    yield
    kill_leftovers()


class Secure:
    def __init__(self, broker: LocalKafka, ca: Path, other_ca: Path):
        self.broker, self.ca, self.other_ca = broker, ca, other_ca
        assert broker.sasl_ssl_port is not None
        self.listener = f"127.0.0.1:{broker.sasl_ssl_port}"

    def env(self, user: str = "ktel") -> dict[str, str]:
        """The right settings for ``user``, as environment variables."""
        return {
            "KTEL_KAFKA__BOOTSTRAP": self.listener,
            "KTEL_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "KTEL_KAFKA__SASL_USERNAME": user,
            "KTEL_KAFKA__SASL_PASSWORD": PASSWORDS[user],
            "KTEL_KAFKA__SSL_CAFILE": str(self.ca),
        }

    def wrong(self, setting: str) -> dict[str, str]:
        """The right settings but ``setting``."""
        return {**self.env(), **{
            "kafka.sasl_password": {"KTEL_KAFKA__SASL_PASSWORD": "not-the-password"},
            "kafka.ssl_cafile": {"KTEL_KAFKA__SSL_CAFILE": str(self.other_ca)},
            "kafka.security_protocol": {"KTEL_KAFKA__SECURITY_PROTOCOL": "PLAINTEXT"},
        }[setting]}  # fmt: skip

    def acl(self, *args: str) -> None:
        """Kafka's own AclCommand, through the PLAINTEXT listener (a super user)."""
        java = [_java(), "-cp", f"{ensure_kafka()}/*", "kafka.admin.AclCommand"]
        argv = [*java, "--bootstrap-server", self.broker.bootstrap, *args]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    ensure_kafka()
    ca = certs.make_ca(tmp_path_factory.mktemp("certs"))
    other_ca = certs.make_ca(tmp_path_factory.mktemp("other-ca"))  # trusted by no broker here
    security = Security(certs.broker_keystore(ca), PASSWORDS, authorizer=True, super_users=("User:ktel",))
    broker = LocalKafka(
        tmp_path_factory.mktemp("kafka-misconfig"),
        free_port(),
        free_port(),
        security,
        sasl_ssl_port=free_port(),
    )
    broker.start()
    try:
        cfg = config.Config(kafka=config.KafkaConfig(bootstrap=broker.bootstrap))
        assert asyncio.run(topics.ensure(cfg, lambda _: None)) == 0
        yield Secure(broker, ca.cert, other_ca.cert)
    finally:
        broker.stop()


SETTINGS = ("kafka.sasl_password", "kafka.ssl_cafile", "kafka.security_protocol")


def errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line]


def wait_for_one_complaint(what: str, setting: str, log, alive) -> None:
    """``log()`` gets one line naming ``setting`` and keeps it the only one, with the
    process (``alive()``) retrying meanwhile, and nothing of aiokafka's loop."""
    deadline = time.monotonic() + DEADLINE_S
    while not errors(log()):
        assert alive(), f"{what} exited:\n{log()[-3000:]}"
        assert time.monotonic() < deadline, f"{what} never named {setting}:\n{log()[-3000:]}"
        time.sleep(0.5)
    time.sleep(WATCH_S)
    text = log()
    assert alive(), f"{what} exited:\n{text[-3000:]}"
    found = errors(text)
    assert len(found) == 1 and " ERROR ktel.kafka: " in found[0] and setting in found[0], text[-3000:]
    assert "Traceback" not in text and "Unable connect to" not in text, text[-3000:]


@pytest.mark.parametrize("setting", SETTINGS)
def test_a_processing_worker_names_the_wrong_setting_once(secure, tmp_path, setting):
    env = secure.wrong(setting)
    worker = Worker(tmp_path, env.pop("KTEL_KAFKA__BOOTSTRAP"), "worker", **env).start()
    try:
        wait_for_one_complaint(
            "ktel process", setting, worker.log.read_text, lambda: worker.proc.poll() is None
        )
    finally:
        worker.stop()


@pytest.mark.parametrize("setting", SETTINGS)
def test_an_exporter_names_the_wrong_setting_once(secure, tmp_path, setting):
    log_path = tmp_path / "exporter.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KTEL_")},
        **secure.wrong(setting),
        "KTEL_REMOTE_WRITE__URL": "http://127.0.0.1:9/api/v1/write",  # never reached
        "KTEL_REMOTE_WRITE__METRICS_PORT": "0",
    }
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ktel.cli", "export", "remote-write"], env=env, stdout=out, stderr=out
        )
    try:
        wait_for_one_complaint("ktel export", setting, log_path.read_text, lambda: proc.poll() is None)
    finally:
        proc.terminate()
        proc.wait(60)


def agent(tmp_path: Path, secure: Secure, host: str, env: dict[str, str]) -> AgentProcess:
    a = AgentProcess(tmp_path, secure.listener, host_id=host, probes=ONLY_FILES)
    a.env.update(env)
    return a.start()


def test_the_agent_spools_through_each_wrong_setting_then_delivers_exactly(secure, tmp_path):
    need_bpf()
    host = f"misconf-{uuid.uuid4().hex[:8]}"
    for i, setting in enumerate(SETTINGS):
        a = agent(tmp_path, secure, host, secure.wrong(setting))
        create_files(tmp_path / "files" / str(i), 50, rate_per_s=200)
        wait_for_one_complaint("ktel agent", setting, a.log, lambda a=a: a.proc.poll() is None)
        assert a.metric("ktel_agent_spool_bytes") > 0
        assert a.metric("ktel_agent_events_published_total") == 0
        assert a.stop() == 0
        a.log_path.rename(tmp_path / f"agent-{setting}.log")
    a = agent(tmp_path, secure, host, secure.env())
    a.wait_until_spool_empty(timeout=DEADLINE_S)
    assert a.stop() == 0
    made = sorted(p for i in range(len(SETTINGS)) for p in expected(tmp_path / "files" / str(i), 50))
    assert deduped_paths(secure.broker.bootstrap, host, f"{tmp_path / 'files'}/") == made


def test_the_agent_refused_writes_keeps_its_batches_until_granted(secure, tmp_path):
    need_bpf()
    host = f"acl-{uuid.uuid4().hex[:8]}"
    # What `ktel acls` grants the agent, but writing ktel.raw.
    principal = ["--add", "--allow-principal", "User:agent"]
    secure.acl(*principal, "--operation", "Write", "--topic", HEARTBEATS_TOPIC)
    secure.acl(*principal, "--operation", "Read", "--topic", CONTROL_TOPIC)
    a = agent(tmp_path, secure, host, secure.env("agent"))
    create_files(tmp_path / "files", 100, rate_per_s=200)
    refused = f"Kafka refuses this agent writes to {RAW_TOPIC}"
    deadline = time.monotonic() + DEADLINE_S
    while not errors(a.log()):
        assert a.proc.poll() is None and time.monotonic() < deadline, a.log()[-3000:]
        time.sleep(0.5)
    time.sleep(WATCH_S)
    found = errors(a.log())
    assert len(found) == 1 and refused in found[0], a.log()[-3000:]
    assert a.metric("ktel_agent_spool_bytes") > 0
    assert a.metric("ktel_agent_events_published_total") == 0
    assert a.metric("ktel_agent_heartbeats_total") > 0  # the rest of what it may do goes on

    secure.acl(*principal, "--operation", "Write", "--topic", RAW_TOPIC)
    # Refused batches are tried again after a wait that grows to a minute.
    a.wait_until_spool_empty(timeout=DEADLINE_S)
    assert "Kafka accepts this agent's batches again" in a.log()
    assert a.stop() == 0
    assert deduped_paths(secure.broker.bootstrap, host, f"{tmp_path / 'files'}/") == expected(
        tmp_path / "files", 100
    )


def test_dlq_and_replay_name_the_acls_that_refuse_their_reads(secure):
    """`ktel dlq` and `ktel replay` with a principal the ACLs refuse: each ends at once
    (exit 2) saying so, and how to fix it, rather than that the topic is missing or
    that Kafka failed."""
    for topic in (DLQ_TOPIC, RAW_TOPIC):
        asyncio.run(produce(secure.broker.bootstrap, [(b"h", b"a record to read")], topic=topic))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KTEL_")}, **secure.env("agent")}

    def refused(*argv: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "ktel.cli", *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=DEADLINE_S,
        )
        assert done.returncode == 2, done.stdout + done.stderr
        return done.stderr

    # Without Describe, Kafka does not show the principal the topic at all.
    said = refused("dlq")
    assert f"topic {DLQ_TOPIC} is not on {secure.listener}, or this principal may not describe it" in said
    assert "`ktel acls`" in said
    describe = ["--allow-principal", "User:agent", "--operation", "Describe"]
    for topic in (DLQ_TOPIC, RAW_TOPIC):
        secure.acl("--add", *describe, "--topic", topic)
    try:
        for argv in (["dlq"], ["replay", "--from", "-1h"]):
            said = refused(*argv)
            assert "TopicAuthorizationFailedError" in said, said
            assert (
                "Kafka's ACLs refuse this principal that: grant its principal the role with `ktel acls`"
                in said
            )
    finally:
        for topic in (DLQ_TOPIC, RAW_TOPIC):
            secure.acl("--remove", "--force", *describe, "--topic", topic)
