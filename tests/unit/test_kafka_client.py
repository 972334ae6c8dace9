"""kafka.* -> the settings every ktel client gets (ktel/kafka_client.py)."""

from __future__ import annotations

import asyncio
import ssl
import subprocess

import faust
import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from ktel import acls, config, kafka_client
from ktel.wire import CONTROL_TOPIC


@pytest.fixture(scope="module")
def pem(tmp_path_factory):
    d = tmp_path_factory.mktemp("pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", d / "key.pem",
         "-out", d / "cert.pem", "-days", "1", "-subj", "/CN=ktel-test"],
        check=True, capture_output=True,
    )  # fmt: skip
    return d


def test_plaintext_gets_the_whole_bootstrap_list():
    k = config.KafkaConfig(bootstrap="k1:9092, k2:9093")
    assert kafka_client.client_kwargs(k) == {
        "bootstrap_servers": ["k1:9092", "k2:9093"],
        "security_protocol": "PLAINTEXT",
    }
    assert kafka_client.faust_settings(k) == {"broker": "kafka://k1:9092;kafka://k2:9093"}


def test_a_comma_separated_list_reaches_faust_as_every_broker(tmp_path):
    k = config.KafkaConfig(bootstrap="k1:9092,k2:9093,k3:9094")
    app = faust.App("ktel-test", **kafka_client.faust_settings(k))
    assert [(u.host, u.port) for u in app.conf.broker] == [("k1", 9092), ("k2", 9093), ("k3", 9094)]


def test_sasl_ssl_reaches_aiokafka_and_faust_alike(pem, tmp_path, monkeypatch):
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    k = config.KafkaConfig(
        bootstrap="k1:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="ktel",
        sasl_password_file=secret,
        ssl_cafile=pem / "cert.pem",
        ssl_certfile=pem / "cert.pem",
        ssl_keyfile=pem / "key.pem",
    )
    kw = kafka_client.client_kwargs(k)
    ctx = kw.pop("ssl_context")
    assert kw.pop("bootstrap_servers") == ["k1:9093"]
    assert kw == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "ktel",
        "sasl_plain_password": "s3cret",
    }
    assert isinstance(ctx, ssl.SSLContext) and ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    # Faust turns its credentials into aiokafka settings with this function: they must
    # come out as ktel's own clients get them.
    faust_kw = credentials_to_aiokafka_auth(kafka_client.faust_settings(k)["broker_credentials"])
    assert {key: v for key, v in faust_kw.items() if key != "ssl_context"} == kw
    assert isinstance(faust_kw["ssl_context"], ssl.SSLContext)


def test_ssl_alone_and_hostname_checks_off_on_request(pem):
    k = config.KafkaConfig(security_protocol="SSL", ssl_cafile=pem / "cert.pem", ssl_check_hostname=False)
    kw = kafka_client.client_kwargs(k)
    assert kw["security_protocol"] == "SSL" and not kw["ssl_context"].check_hostname
    assert "sasl_mechanism" not in kw
    faust_kw = credentials_to_aiokafka_auth(kafka_client.faust_settings(k)["broker_credentials"])
    assert faust_kw == {"security_protocol": "SSL", "ssl_context": faust_kw["ssl_context"]}


def test_the_password_comes_from_the_environment_and_is_never_printed(monkeypatch, capsys):
    from ktel import cli

    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "h")
    monkeypatch.setenv("KTEL_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("KTEL_KAFKA__SASL_USERNAME", "ktel")
    monkeypatch.setenv("KTEL_KAFKA__SASL_PASSWORD", "hunter2-secret")
    cfg = config.load()
    assert kafka_client.client_kwargs(cfg.kafka)["sasl_plain_password"] == "hunter2-secret"
    cli.main(["config"])
    out = capsys.readouterr().out
    assert '"sasl_password": "***"' in out and "hunter2" not in out
    assert "hunter2" not in repr(cfg) and "hunter2" not in str(cfg.kafka)


def test_a_bad_password_value_is_not_echoed_in_the_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "h")
    f = tmp_path / "k.toml"
    f.write_text("[kafka]\nsecurity_protocol = 'SASL_SSL'\nsasl_password = 'hunter2-secret'\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(f)
    assert "kafka.sasl_username" in str(err.value) and "hunter2" not in str(err.value)
    f.write_text("[kafka]\nsasl_password = ['hunter2-secret']\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(f)
    assert "kafka.sasl_password" in str(err.value) and "hunter2" not in str(err.value)


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("security_protocol = 'SASL_SSL'\nsasl_username = 'u'\n", "needs one of kafka.sasl_password"),
        ("ssl_certfile = '/etc/hostname'\n", "kafka.ssl_certfile and kafka.ssl_keyfile go together"),
        (
            "ssl_cafile = '/no/such/ca.pem'\n",
            "kafka.ssl_cafile = '/no/such/ca.pem': Value error, cannot be read",
        ),
        ("replication_factor = 2\nmin_insync_replicas = 3\n", "kafka.min_insync_replicas = 3 is above"),
        ("replication_factor = 0\n", "kafka.replication_factor = 0"),
        ("sasl_mechanism = 'GSSAPI'\n", "kafka.sasl_mechanism = 'GSSAPI'"),
    ],
)
def test_bad_client_settings_name_the_field(tmp_path, monkeypatch, toml, expected):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "h")
    f = tmp_path / "k.toml"
    f.write_text("[kafka]\n" + toml)
    with pytest.raises(config.ConfigError) as err:
        config.load(f)
    assert expected in str(err.value)


def test_no_role_but_the_processor_and_the_operator_may_write_control():
    k = config.KafkaConfig()
    writers = {
        argv[argv.index("--allow-principal") + 1]
        for argv in acls.commands(k, ["all"])
        if "Write" in argv and CONTROL_TOPIC in argv
    }
    assert writers == {k.principals.processor, k.principals.operator}


def test_the_status_role_reads_the_heartbeats_and_only_describes_the_rest():
    mine = [g for g in acls.grants(["all"], config.KafkaConfig(prefix="s.").topics) if g.role == "status"]
    assert {op for g in mine for op in g.operations} == {"Read", "Describe"}
    assert [g.names for g in mine if "Read" in g.operations] == [("s.ktel.heartbeats",)]
    assert any(g.resource == "group" and g.names == ("s.ktel-",) and g.prefixed for g in mine)


def test_the_dlq_role_reads_the_dead_letters_and_writes_only_the_topics_the_stages_read_and_its_markers():
    t = config.KafkaConfig(prefix="s.").topics
    mine = [g for g in acls.grants(["all"], t) if g.role == "dlq"]
    stage_inputs = {t.raw, t.deduped, t.enriched, t.sampled, t.heartbeats}
    outputs = {t.metrics, t.spans, t.logs}  # (read back, for an exporter's dead letters: never written)
    # (ktel.dlq: the marker of each dead letter a re-drive delivered)
    assert {n for g in mine if "Write" in g.operations for n in g.names} == stage_inputs | {t.dlq}
    assert {n for g in mine if "Read" in g.operations for n in g.names} == stage_inputs | outputs | {t.dlq}
    assert {g.resource for g in mine} == {"topic"}  # no group: ktel dlq reads without one
    assert not any(g.prefixed for g in mine)


def test_every_kafka_client_gets_its_settings_from_kafka_client():
    """A client built from a bootstrap list alone would work against the local broker
    and fail against a production one: every construction passes **client_kwargs(...)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    clients = {"AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient"}
    found, bare = 0, []
    for pkg in ("ktel", "edge_agent", "processors", "exporters"):
        for path in sorted((root / pkg).rglob("*.py")):
            if "stack" in path.relative_to(root).parts:  # the local development broker's own probe
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) in clients:
                    found += 1
                    spread = [k.value for k in node.keywords if k.arg is None]
                    if not any(
                        getattr(getattr(v, "func", None), "id", None) == "client_kwargs" for v in spread
                    ):
                        bare.append(f"{path.relative_to(root)}:{node.lineno}")
    assert found >= 10 and not bare, bare


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "PLAINTEXT"])
def test_a_refused_operation_names_the_acls_not_the_password_or_the_address(protocol, tmp_path):
    """A client Kafka let in but refused what it asked (a role without the ACL, e.g.
    `ktel status` run with the agent's credentials): "auth" in TopicAuthorizationFailed
    made it a wrong SASL password, and without SASL an unreachable broker. It names
    the ACLs and `ktel acls`."""
    from aiokafka.errors import TopicAuthorizationFailedError

    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    sasl = (
        {"sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "agent", "sasl_password_file": secret}
        if protocol.startswith("SASL")
        else {}
    )
    k = config.KafkaConfig(bootstrap="k1:9092", security_protocol=protocol, **sasl)
    said = asyncio.run(kafka_client.explain(TopicAuthorizationFailedError("ktel.heartbeats"), k))
    assert "`ktel acls`" in said and "TopicAuthorizationFailedError" in said
    assert "sasl_password" not in said and "check kafka.bootstrap" not in said
