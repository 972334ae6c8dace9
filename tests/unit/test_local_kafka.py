"""The local Kafka's node configuration: what each node of a cluster is told, as
server.properties (the brokers themselves are exercised in tests/integration)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ktel.stack.kafka import LocalKafka, LocalKafkaCluster, Security


def properties(node: LocalKafka) -> dict[str, str]:
    node.data_dir.mkdir(parents=True, exist_ok=True)
    lines = node._write_config().read_text().splitlines()
    return dict(ln.split("=", 1) for ln in lines if ln and not ln.startswith("#"))


def test_a_cluster_shares_one_quorum_and_replicates_its_internal_topics(tmp_path: Path) -> None:
    security = Security(
        tmp_path / "broker.pem", {"ktel": "pw"}, truststore=tmp_path / "ca.pem", authorizer=True
    )
    cluster = LocalKafkaCluster(tmp_path, 3, security)
    props = [properties(n) for n in cluster.nodes]
    assert [p["node.id"] for p in props] == ["1", "2", "3"]
    assert len({p["controller.quorum.voters"] for p in props}) == 1
    assert len(props[0]["controller.quorum.voters"].split(",")) == 3
    assert len({n.quorum.cluster_id for n in cluster.nodes}) == 1
    for p, node in zip(props, cluster.nodes, strict=True):
        assert (p["default.replication.factor"], p["min.insync.replicas"]) == ("3", "2")
        assert p["offsets.topic.replication.factor"] == "3"
        assert f"SASL_SSL://127.0.0.1:{node.sasl_ssl_port}" in p["advertised.listeners"]
        assert f"SSL://127.0.0.1:{node.mtls_port}" in p["advertised.listeners"]
        assert p["listener.name.ssl.ssl.client.auth"] == "required"
        assert p["authorizer.class.name"].endswith("StandardAuthorizer")
        # The brokers' own listeners: mutual TLS, the brokers' certificate a super user.
        protocols = dict(kv.split(":") for kv in p["listener.security.protocol.map"].split(","))
        names = [listener.split("://")[0] for listener in p["listeners"].split(",")]
        assert {name: protocols[name] for name in names} == {
            "BROKER": "SSL", "SASL_SSL": "SASL_SSL", "SSL": "SSL", "CONTROLLER": "SSL"
        }  # fmt: skip
        assert (p["inter.broker.listener.name"], p["controller.listener.names"]) == ("BROKER", "CONTROLLER")
        assert p["listener.name.broker.ssl.client.auth"] == "required"
        assert p["listener.name.controller.ssl.client.auth"] == "required"
        assert "User:broker" in p["super.users"].split(";")
        assert "User:ANONYMOUS" not in p["super.users"].split(";")
    assert cluster.sasl_ssl_bootstrap.count(",") == 2


def test_a_single_node_keeps_one_replica(tmp_path: Path) -> None:
    p = properties(LocalKafka(tmp_path, 19092, 19093))
    assert (p["default.replication.factor"], p["min.insync.replicas"]) == ("1", "1")
    assert p["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert p["listener.security.protocol.map"] == "BROKER:PLAINTEXT,CONTROLLER:PLAINTEXT"


def test_listeners_and_their_material_go_together(tmp_path: Path) -> None:
    security = Security(tmp_path / "broker.pem", {})
    with pytest.raises(ValueError, match="sasl_ssl_port"):
        LocalKafka(tmp_path, security=security)
    with pytest.raises(ValueError, match="mTLS"):
        LocalKafka(tmp_path, security=security, sasl_ssl_port=1, mtls_port=2)


def test_ktel_cluster_refuses_a_cluster_without_brokers(tmp_path: Path) -> None:
    from ktel import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["cluster", str(tmp_path), "--brokers", "0"])
    assert exit_.value.code == "ktel cluster: --brokers 0: a cluster needs at least one broker"
    assert list(tmp_path.iterdir()) == []  # nothing made, nothing started
