"""The files of the local stack holding a password or a key (`ktel cluster`'s
``<user>.password``, the brokers' key store) are its owner's alone from the moment they
exist: never created readable by others, then narrowed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ktel.stack import certs, cluster


@pytest.fixture
def as_created(monkeypatch):
    """Files keep the mode they were created with: no umask narrows it (as under a
    umask of 0), and no chmod after the fact widens or narrows it."""
    old = os.umask(0)
    monkeypatch.setattr(os, "chmod", lambda *_a, **_k: None)
    monkeypatch.setattr(os, "fchmod", lambda *_a, **_k: None)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_private_file_is_created_its_owners_alone(tmp_path, as_created):
    path = certs.write_private(tmp_path / "a.password", "s3cret\n")
    assert (mode(path), path.read_text()) == (0o600, "s3cret\n")
    # One there already, readable by anyone, is replaced, not written into.
    other = tmp_path / "b.password"
    other.write_text("old\n")
    held = open(other)  # noqa: SIM115 - someone holding the old file open
    try:
        certs.write_private(other, "new\n")
        assert held.read() == "old\n"
    finally:
        held.close()
    assert (mode(other), other.read_text()) == (0o600, "new\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.password", "b.password"]


class _Cluster:
    """`ktel cluster`'s Kafka, not started."""

    sasl_ssl_bootstrap = mtls_bootstrap = "127.0.0.1:1"

    def __init__(self, *_args, **_kwargs):
        self.nodes = [self]

    def start(self):
        pass

    def apply_acls(self, _commands):
        pass


def test_ktel_clusters_passwords_and_key_store_are_created_their_owners_alone(
    tmp_path, monkeypatch, as_created
):
    def pair(d: Path, name: str, cert: str) -> certs.Pair:
        d.mkdir(parents=True, exist_ok=True)
        p = certs.Pair(d / f"{name}.{cert}", d / f"{name}.key")
        p.cert.write_text(f"{name} certificate\n")
        certs.write_private(p.key, f"{name} key\n")  # as openssl writes it: 0600
        return p

    monkeypatch.setattr(certs, "make_ca", lambda d, name="ca": pair(d, name, "pem"))
    monkeypatch.setattr(certs, "issue", lambda _ca, d, name: pair(d, name, "crt"))
    monkeypatch.setattr(cluster, "LocalKafkaCluster", _Cluster)
    cluster.start(tmp_path)
    secrets = sorted(tmp_path.glob("*.password"))
    assert [p.name for p in secrets] == sorted(f"{u}.password" for u in (cluster.ADMIN, *cluster.ROLES))
    assert {p.name: mode(p) for p in secrets} == {p.name: 0o600 for p in secrets}
    assert mode(tmp_path / "tls" / "broker.pem") == 0o600
