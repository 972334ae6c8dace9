"""A throwaway Kafka (KRaft, combined broker+controller nodes) for tests and dev: one
node, or a cluster of several, optionally with SASL_SSL, mTLS and ACLs.

The broker's jars come from Maven Central through ``deploy/kafka/pom.xml`` rather
than the Apache release tarball, so a machine that reaches only package registries
can run it. They are cached per version: only the first start needs the network.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from ktel import paths
from ktel.config import KafkaConfig
from ktel.kafka_client import client_kwargs
from ktel.paths import DATA_DIR
from ktel.stack import proc

KAFKA_VERSION = "3.9.1"

_POM = DATA_DIR / "deploy" / "kafka" / "pom.xml"
_MARKER = ".complete"
# The brokers' certificate's CN (ktel/stack/certs.py, broker_keystore), as a principal.
BROKER_PRINCIPAL = "User:broker"


# --------------------------------------------------------------------------- jars


def ensure_kafka(cache_dir: Path | None = None) -> Path:
    """Return a directory holding the complete broker classpath, fetching it once.

    ``cache_dir`` is the cache root (default ``$KTEL_CACHE_DIR`` or ``~/.cache/ktel``);
    the jars land in ``<root>/kafka-<version>/libs``.
    """
    root = cache_dir or paths.cache_dir()
    home = Path(root) / f"kafka-{KAFKA_VERSION}"
    libs = home / "libs"
    home.mkdir(parents=True, exist_ok=True)
    # A lock, so two test processes starting at once don't run mvn into the same dir.
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _libs_complete(home, libs):
            return libs
        if not _POM.is_file():
            raise RuntimeError(f"cannot fetch Kafka: {_POM} is missing")
        mvn = shutil.which("mvn")
        if mvn is None:
            raise RuntimeError("cannot fetch Kafka: `mvn` is not on PATH")
        # Marker first: a run that dies half-way must leave the cache visibly incomplete.
        (home / _MARKER).unlink(missing_ok=True)
        shutil.rmtree(libs, ignore_errors=True)
        argv = [
            mvn, "-B", "-q", "-f", str(_POM),
            f"-Dkafka.version={KAFKA_VERSION}",  # this module is the one place the version lives
            "dependency:copy-dependencies", f"-DoutputDirectory={libs}",
        ]  # fmt: skip
        try:
            res = proc.run(argv, timeout=900)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"mvn timed out fetching Kafka {KAFKA_VERSION}") from e
        jars = sorted(p.name for p in libs.glob("*.jar")) if libs.is_dir() else []
        if res.returncode != 0 or not any(j.startswith("kafka_2.13-") for j in jars):
            # Maven 3.8 emits colour resets even in batch mode.
            out = re.sub(r"\x1b\[[0-9;]*m", "", res.stdout + res.stderr).strip()[-4000:]
            raise RuntimeError(f"mvn failed to fetch Kafka {KAFKA_VERSION} (exit {res.returncode}):\n{out}")
        # Written last: its presence means the jar set is whole.
        (home / _MARKER).write_text("\n".join(jars) + "\n")
        return libs


def _libs_complete(home: Path, libs: Path) -> bool:
    marker = home / _MARKER
    if not marker.is_file():
        return False
    return all((libs / name).is_file() for name in marker.read_text().split())


# ---------------------------------------------------------------- process helpers


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("cannot start Kafka: `java` is not on PATH and JAVA_HOME is unset")
    return java


# ------------------------------------------------------------------------- broker

_LOG4J = """\
# Console -> stdout, which LocalKafka redirects to kafka.log: one file then holds both
# the broker's log and anything the JVM itself prints (bad flags, OOM, crashes).
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.org.apache.kafka.common.utils.AppInfoParser=WARN
"""


@dataclasses.dataclass(frozen=True)
class Security:
    """The secured listeners, for tests of ktel's client settings and for trying ktel
    against a cluster set up like a production one.

    ``keystore``: PEM file with the brokers' unencrypted private key and certificate
    chain (one certificate for 127.0.0.1 serves every node); ``users``: SCRAM-SHA-512
    and SCRAM-SHA-256 credentials written into the metadata when the storage is
    formatted, for the SASL_SSL listener; ``truststore``: the CA (PEM) that signed the
    clients' certificates: with it, each node has an mTLS listener too (SSL, a client
    certificate required, its CN the principal: ``CN=agent`` is ``User:agent``);
    ``authorizer``: the StandardAuthorizer, denying what no ACL allows.

    The brokers' own listeners (inter-broker, controller), whose principal is a super
    user as are ``super_users``: with a ``truststore``, SSL with the keystore's
    certificate required on both ends (its CN, ``broker``, is the principal
    ``User:broker``), so no listener of the node is in the clear; without one,
    PLAINTEXT (``User:ANONYMOUS``), also a loopback back door for set-up and admin.
    """

    keystore: Path
    users: dict[str, str]
    truststore: Path | None = None
    authorizer: bool = False
    super_users: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Quorum:
    """A node's place in a cluster: its id, every controller ("id@host:port,...")
    and the cluster id that all the nodes' storage is formatted with."""

    node_id: int
    voters: str
    cluster_id: str

    @property
    def size(self) -> int:
        return len(self.voters.split(","))


class LocalKafka(proc.Server):
    """One KRaft node acting as both broker and controller, listening on 127.0.0.1:
    alone (the default), or one of a :class:`LocalKafkaCluster`."""

    def __init__(
        self,
        data_dir: Path,
        port: int = 9092,
        controller_port: int = 9093,
        security: Security | None = None,
        sasl_ssl_port: int | None = None,
        mtls_port: int | None = None,
        quorum: Quorum | None = None,
        heap: str = "512m",
    ) -> None:
        if security is not None and sasl_ssl_port is None:
            raise ValueError("a secured LocalKafka needs sasl_ssl_port")
        if (mtls_port is None) != (security is None or security.truststore is None):
            raise ValueError("an mTLS listener needs both mtls_port and security.truststore")
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.controller_port = controller_port
        self.security = security
        self.sasl_ssl_port = sasl_ssl_port
        self.mtls_port = mtls_port
        self.quorum = quorum or Quorum(1, f"1@127.0.0.1:{controller_port}", _new_cluster_id())
        self.heap = heap
        self.log_path = self.data_dir / "kafka.log"

    @property
    def node_id(self) -> int:
        return self.quorum.node_id

    @property
    def bootstrap(self) -> str:
        """The brokers' own listener (inter-broker): see :meth:`client_settings`."""
        return f"127.0.0.1:{self.port}"

    @property
    def internal_tls(self) -> bool:
        """Whether the brokers' own listeners (inter-broker, controller) are SSL."""
        return self.security is not None and self.security.truststore is not None

    def client_settings(self, bootstrap: str | None = None) -> KafkaConfig:
        """How a client reaches the brokers' own listener, a super user: PLAINTEXT, or
        SSL with the brokers' certificate. For set-up and admin, not for ktel's roles."""
        sec = self.security
        if sec is None or sec.truststore is None:
            return KafkaConfig(bootstrap=bootstrap or self.bootstrap)
        return KafkaConfig(
            bootstrap=bootstrap or self.bootstrap,
            security_protocol="SSL",
            ssl_cafile=sec.truststore,
            ssl_certfile=sec.keystore,  # the PEM key store: key and certificate in one file
            ssl_keyfile=sec.keystore,
        )

    def start(self, timeout: float = 90) -> None:
        """Start the broker (formatting data_dir on first use) and wait until it answers."""
        if self.running:
            return
        self.launch()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    def launch(self) -> None:
        """Start the process without waiting: a cluster's nodes wait for each other's
        votes, so none of them is ready before a majority runs."""
        if self.running:
            return
        ports = (self.port, self.controller_port, self.sasl_ssl_port, self.mtls_port)
        for p in (p for p in ports if p is not None):
            # Otherwise the readiness probe could be answered by some other broker.
            if proc.port_in_use(p):
                raise RuntimeError(f"cannot start Kafka: 127.0.0.1:{p} is already in use")
        libs = ensure_kafka()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        props = self._write_config()
        classpath = ["-cp", f"{libs}/*"]  # the JVM expands the '*', not a shell
        log4j = f"-Dlog4j.configuration=file:{self.data_dir / 'log4j.properties'}"
        if not (self.data_dir / "logs" / "meta.properties").exists():
            self._format([_java(), log4j, *classpath, "kafka.tools.StorageTool"], props)
        argv = [_java(), f"-Xmx{self.heap}", "-Djava.awt.headless=true", log4j, *classpath,
                "kafka.Kafka", str(props)]  # fmt: skip
        with proc.stop_signals_held():
            self._proc = proc.spawn(argv, self.log_path, self.data_dir)

    def kill(self) -> None:
        """SIGKILL: an unclean crash, for tests of recovery."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def apply_acls(self, commands: list[list[str]]) -> None:
        """Run ``kafka-acls.sh`` command lines (`ktel acls`' ones) with Kafka's own
        AclCommand, through the brokers' own listener (a super user)."""
        java = [_java(), "-cp", f"{ensure_kafka()}/*", "kafka.admin.AclCommand"]
        java += ["--command-config", str(self.data_dir / "client.properties")]
        for argv in commands:
            if argv[:2] != ["kafka-acls.sh", "--bootstrap-server"]:
                raise ValueError(f"not a kafka-acls.sh --bootstrap-server command line: {argv}")

        def run(argv: list[str]) -> None:
            res = proc.run([*java, "--bootstrap-server", self.bootstrap, *argv[3:]], timeout=300)
            if res.returncode != 0:
                raise RuntimeError(f"kafka-acls {argv[3:]} failed:\n{(res.stdout + res.stderr)[-4000:]}")

        # A few at a time: each is a JVM that takes seconds to start, and ACLs are independent.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            try:
                list(pool.map(run, commands))
            except BaseException:
                # Stopped (Ctrl-C, a failed command): the pool would wait for each JVM
                # in flight to its end (up to its timeout, the broker away), and they
                # are out of a Ctrl-C's reach, each in a session of its own.
                with proc.tools_stopped():
                    pool.shutdown(cancel_futures=True)
                raise

    def _write_config(self) -> Path:
        (self.data_dir / "log4j.properties").write_text(_LOG4J)
        props = self.data_dir / "server.properties"
        sec = self.security
        # The brokers' own listeners: BROKER (inter-broker) and CONTROLLER.
        own = "SSL" if self.internal_tls else "PLAINTEXT"
        listeners = f"BROKER://127.0.0.1:{self.port}"
        protocols = f"BROKER:{own},CONTROLLER:{own}"
        client = "security.protocol=PLAINTEXT\n"  # AclCommand's settings, for BROKER
        secured = ""
        if sec is not None:
            listeners += f",SASL_SSL://127.0.0.1:{self.sasl_ssl_port}"
            protocols += ",SASL_SSL:SASL_SSL"
            scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            secured += f"""\
sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={scram}
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config={scram}
ssl.keystore.type=PEM
ssl.keystore.location={sec.keystore}
"""
            if sec.truststore is not None:
                listeners += f",SSL://127.0.0.1:{self.mtls_port}"
                protocols += ",SSL:SSL"
                secured += f"""\
ssl.truststore.type=PEM
ssl.truststore.location={sec.truststore}
listener.name.ssl.ssl.client.auth=required
# The certificate's CN is the principal, so an mTLS client and a SCRAM user of the
# same name get the same ACLs: CN=agent is User:agent.
ssl.principal.mapping.rules=RULE:^CN=([^,]+).*$/$1/,DEFAULT
# The brokers' own listeners: mutual TLS with the brokers' certificate (User:broker).
listener.name.broker.ssl.client.auth=required
listener.name.controller.ssl.client.auth=required
"""
                client = f"""\
security.protocol=SSL
ssl.keystore.type=PEM
ssl.keystore.location={sec.keystore}
ssl.truststore.type=PEM
ssl.truststore.location={sec.truststore}
"""
            if sec.authorizer:
                # The principal of the brokers' own listeners: over SSL the brokers'
                # certificate's, in the clear anybody's (a loopback back door).
                own_principal = BROKER_PRINCIPAL if self.internal_tls else "User:ANONYMOUS"
                secured += f"""\
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users={";".join((own_principal, *sec.super_users))}
"""
        (self.data_dir / "client.properties").write_text(client)
        # Internal topics as replicated as ktel's own ("auto": 3 replicas, 2 in sync).
        rf = min(3, self.quorum.size)
        isr = 2 if rf >= 3 else 1
        props.write_text(
            f"""\
process.roles=broker,controller
node.id={self.quorum.node_id}
controller.quorum.voters={self.quorum.voters}
listeners={listeners},CONTROLLER://127.0.0.1:{self.controller_port}
advertised.listeners={listeners}
listener.security.protocol.map={protocols}
inter.broker.listener.name=BROKER
controller.listener.names=CONTROLLER
log.dirs={self.data_dir / "logs"}
default.replication.factor={rf}
min.insync.replicas={isr}
offsets.topic.replication.factor={rf}
transaction.state.log.replication.factor={rf}
transaction.state.log.min.isr={isr}
# After a SIGKILL the restarted controller keeps the dead broker's registration until
# its session expires, and refuses the new one till then (DUPLICATE_BROKER_REGISTRATION):
# with the 9 s default a crash-restart takes ~14 s. Heartbeats here never leave the
# machine, so a short session is safe.
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=1000
# Tests start consumers right away; the default 3 s delay only slows the first join.
group.initial.rebalance.delay.ms=0
# Topics are created explicitly (create_topics), so a typo fails instead of creating one.
auto.create.topics.enable=false
{secured}"""
        )
        return props

    def _format(self, storage_tool: list[str], props: Path) -> None:
        scram = []
        for name, password in (self.security.users if self.security else {}).items():
            for mechanism in ("SCRAM-SHA-512", "SCRAM-SHA-256"):
                scram += ["--add-scram", f"{mechanism}=[name={name},password={password}]"]
        res = proc.run(
            [*storage_tool, "format", "-t", self.quorum.cluster_id, "-c", str(props), *scram],
            cwd=self.data_dir,
            timeout=120,
        )
        if res.returncode != 0:
            raise RuntimeError(
                f"kafka StorageTool format failed (exit {res.returncode}):\n"
                f"{(res.stdout + res.stderr).strip()[-4000:]}"
            )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_started("Kafka")
            # A plain connect first: cheap, and spares aiokafka's error logs while the
            # port is still closed.
            if proc.port_in_use(self.port) and _run_async(
                _broker_ready(self.client_settings(), self.node_id)
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Kafka not ready after {timeout}s; tail of {self.log_path}:\n" + proc.tail(self.log_path)
                )
            time.sleep(0.25)


class LocalKafkaCluster:
    """``brokers`` KRaft nodes, each a broker and a voter of the controller quorum,
    on free loopback ports: ktel's topics get 3 replicas and 2 in sync on it, as in
    production. Each node is a :class:`LocalKafka`, to be killed and restarted alone."""

    def __init__(
        self, data_dir: Path, brokers: int = 3, security: Security | None = None, heap: str = "384m"
    ) -> None:
        controllers = [proc.free_port() for _ in range(brokers)]
        voters = ",".join(f"{i}@127.0.0.1:{p}" for i, p in enumerate(controllers, 1))
        cluster_id = _new_cluster_id()
        self.nodes = [
            LocalKafka(
                Path(data_dir) / f"node-{i}",
                proc.free_port(),
                controller,
                security,
                sasl_ssl_port=proc.free_port() if security else None,
                mtls_port=proc.free_port() if security and security.truststore else None,
                quorum=Quorum(i, voters, cluster_id),
                heap=heap,
            )
            for i, controller in enumerate(controllers, 1)
        ]

    @property
    def bootstrap(self) -> str:
        """Every node's own listener (inter-broker): see :meth:`client_settings`."""
        return ",".join(n.bootstrap for n in self.nodes)

    def client_settings(self) -> KafkaConfig:
        """How a super user reaches every node's own listener (set-up and admin)."""
        return self.nodes[0].client_settings(self.bootstrap)

    @property
    def sasl_ssl_bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n.sasl_ssl_port}" for n in self.nodes)

    @property
    def mtls_bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n.mtls_port}" for n in self.nodes)

    def node(self, node_id: int) -> LocalKafka:
        [node] = [n for n in self.nodes if n.node_id == node_id]
        return node

    def start(self, timeout: float = 180) -> None:
        try:
            for n in self.nodes:
                n.launch()
            for n in self.nodes:
                n.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        # All at once: a node stopped alone waits for the quorum's answers to shut down
        # cleanly, and the last ones would wait for nodes already gone.
        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda n: n.stop(), self.nodes))

    def __enter__(self) -> LocalKafkaCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _new_cluster_id() -> str:
    # Kafka's Uuid.toString: URL-safe base64 of 16 random bytes, unpadded; Kafka never
    # hands out one that starts with '-' (it would read as a command-line flag).
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


async def _broker_ready(kafka: KafkaConfig, node_id: int) -> bool:
    """The broker answers metadata, lists itself, and knows the active controller."""
    admin = AIOKafkaAdminClient(**client_kwargs(kafka), request_timeout_ms=5000)
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
        listed = any(b["node_id"] == node_id for b in cluster["brokers"])
        return listed and cluster.get("controller_id", -1) >= 0
    except (KafkaError, OSError):  # OSError covers TimeoutError and refused connections
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def _run_async(coro):  # type: ignore[no-untyped-def]
    # start() is synchronous but may be called from inside a running event loop
    # (an async fixture), where asyncio.run() is refused: use a fresh loop on a thread.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
