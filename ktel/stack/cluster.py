"""A local Kafka set up like a production one, to try ktel against: 3 KRaft nodes,
SASL_SSL with a SCRAM user per ktel role, an mTLS listener, and the ACLs of
`ktel acls` enforced by the StandardAuthorizer. The brokers talk to each other and
to the controllers over mutual TLS too: no listener is in the clear.

``ktel cluster DIR`` starts it and writes, in DIR, a config file per principal
(``<user>.toml`` over SASL_SSL, ``<role>-mtls.toml`` with a client certificate) for
``ktel --config``; Ctrl-C or SIGTERM stops it, at any point of its start too.
Certificates and passwords are throwaway ones, made at start: never use them for
anything real.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import signal
import sys
from pathlib import Path

from ktel import acls
from ktel.config import KafkaConfig, KafkaPrincipals, load
from ktel.stack import certs, proc
from ktel.stack.kafka import LocalKafkaCluster, Security

ADMIN = "ktel"  # a super user: creates the topics (`ktel topics`)
ROLES = ("agent", "processor", "exporter", "operator", "status", "dlq")
PRINCIPALS = {role: f"User:{role}" for role in ROLES}


@dataclasses.dataclass
class SecuredCluster:
    cluster: LocalKafkaCluster
    directory: Path
    ca: Path

    def config_file(self, user: str) -> Path:
        """``user``'s settings over SASL_SSL (SCRAM-SHA-512): ``ktel --config`` takes it."""
        return self.directory / f"{user}.toml"

    def mtls_config_file(self, role: str) -> Path:
        """``role``'s settings over mTLS: its certificate's CN is its principal."""
        return self.directory / f"{role}-mtls.toml"

    def start(self, stages: tuple[str, ...] = ()) -> None:
        """Start the brokers and apply the ACLs `ktel acls` prints for ``stages`` (the
        names of `ktel process` stages); stopped by an exception on the way (a stop
        signal's handler that raises, a failure), all started is stopped."""
        try:
            self.cluster.start()
            self.cluster.nodes[0].apply_acls(acls.commands(_admin_settings(self), stages))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop what runs of it, if anything: of one started in part, or stopped, too."""
        self.cluster.stop()


def start(directory: Path, brokers: int = 3, stages: tuple[str, ...] = ()) -> SecuredCluster:
    """Make the certificates and users, write the config files, start the cluster and
    apply the ACLs `ktel acls` prints for ``stages``. ktel's topics are left to `ktel
    topics`, run as the administrator."""
    s = make(directory, brokers)
    s.start(stages)
    return s


def make(directory: Path, brokers: int = 3) -> SecuredCluster:
    """The certificates, the users and their config files of a cluster, which is not
    started: nothing of it runs (its tools, openssl, ran to their end)."""
    directory = directory.resolve()
    tls = directory / "tls"
    ca_pair = certs.make_ca(tls)
    ca = ca_pair.cert
    passwords = {user: secrets.token_hex(16) for user in (ADMIN, *ROLES)}
    security = Security(
        certs.broker_keystore(ca_pair),
        passwords,
        truststore=ca,
        authorizer=True,
        super_users=(f"User:{ADMIN}",),
    )
    cluster = LocalKafkaCluster(directory / "kafka", brokers, security)
    s = SecuredCluster(cluster, directory, ca)
    principals = "[kafka.principals]\n" + "".join(f"{r} = {json.dumps(p)}\n" for r, p in PRINCIPALS.items())
    for user, password in passwords.items():
        secret = certs.write_private(directory / f"{user}.password", password + "\n")
        s.config_file(user).write_text(
            _kafka_table(
                bootstrap=cluster.sasl_ssl_bootstrap,
                security_protocol="SASL_SSL",
                sasl_mechanism="SCRAM-SHA-512",
                sasl_username=user,
                sasl_password_file=str(secret),
                ssl_cafile=str(ca),
            )
            + principals
        )
    for role in ROLES:
        client = certs.issue(ca_pair, tls, role)
        s.mtls_config_file(role).write_text(
            _kafka_table(
                bootstrap=cluster.mtls_bootstrap,
                security_protocol="SSL",
                ssl_cafile=str(ca),
                ssl_certfile=str(client.cert),
                ssl_keyfile=str(client.key),
            )
            + principals
        )
    return s


def _admin_settings(s: SecuredCluster) -> KafkaConfig:
    kafka = load(s.config_file(ADMIN)).kafka
    return kafka.model_copy(update={"principals": KafkaPrincipals(**PRINCIPALS)})


def _kafka_table(**settings: str) -> str:
    # JSON strings are TOML basic strings.
    return "[kafka]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()) + "\n"


def run(directory: Path, brokers: int, stages: tuple[str, ...]) -> int:
    """``ktel cluster``: start it, say how to use it, stop it on Ctrl-C or SIGTERM, at
    any point, and exit 0 once all it started has stopped. Its start takes a minute or
    two (certificates, brokers, ACLs): a SIGTERM then, with no handler yet, ended the
    process at once, its brokers killed uncleanly with it and the kafka-acls JVMs in
    flight (started from a pool's threads, not tied to its life) left running."""
    stopping = False
    started = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stopping
        # Once: it ends the start's waits where they are, or the wait for it after, and
        # a second signal must not cut short the stop the first began. What was started
        # is kept where it is made (proc.run's tools, the brokers in the cluster's
        # nodes), for the stop below to find.
        if not stopping:
            stopping = True
            raise proc.Interrupted

    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell may start it ignoring that
        signal.signal(sig, on_signal)
    s = None
    try:
        s = make(directory, brokers)
        s.start(stages)
        started = True
        print(f"SASL_SSL: {s.cluster.sasl_ssl_bootstrap}; mTLS: {s.cluster.mtls_bootstrap}")
        print(f"inter-broker (mutual TLS, {s.ca.parent / 'broker.pem'}): {s.cluster.bootstrap}")
        print(f"create the topics: ktel --config {s.config_file(ADMIN)} topics")
        for role in ROLES:
            print(f"{role}: ktel --config {s.config_file(role)} ... (or {s.mtls_config_file(role).name})")
        print("Ctrl-C stops it.", flush=True)
        while True:
            signal.pause()
    except proc.Interrupted:
        if not started:
            print(
                "ktel cluster: interrupted while starting; stopping what it started",
                file=sys.stderr,
                flush=True,
            )
    finally:
        stopping = True  # a signal now (a failed start's) is not to cut the stop short
        if s is not None:
            s.stop()
    return 0
