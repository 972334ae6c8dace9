"""The one translation of ``kafka.*`` (ktel/config.py) into Kafka client settings.

Every ktel client gets its connection settings here, and nowhere else: the agent's
producer and control consumer, the processors' Faust app, the exporters, replay and
the admin calls of ktel/topics.py. A client built elsewhere from ``bootstrap`` alone
would reach a plaintext broker in development and fail in production. Importing this
module also bounds what every ktel reader expands a compressed batch to
(ktel/kafka_batches.py).

Every long-running client connects through :func:`start`, which retries with backoff
and says once, in one line naming the setting most likely wrong, why Kafka cannot be
reached (:func:`explain`), instead of aiokafka's line per broker per attempt; through
:func:`started` where its owner holds it for a stretch of code, so that it is stopped
however that ends.

Where a function takes ``KafkaConfig | str``, a string is a bootstrap list with every
other setting at its default (plaintext): what tests and the local stack use.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any, Protocol, TypeVar

import faust
from aiokafka import AIOKafkaProducer
from aiokafka.conn import create_conn
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
from aiokafka.helpers import create_ssl_context

from ktel import kafka_batches
from ktel.config import KafkaConfig
from ktel.retry import retry

# Every reader ktel makes is made here: each expands compressed batches within a bound.
kafka_batches.install()

Kafka = KafkaConfig | str
log = logging.getLogger("ktel.kafka")


class Client(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


C = TypeVar("C", bound=Client)


class _Explained(logging.Filter):
    def __init__(self, template: str) -> None:
        super().__init__()
        self.template = template

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != self.template


def explained_by_ktel(logger: str, template: str) -> None:
    """Drop the lines of aiokafka's ``logger`` made from ``template``: ktel says once,
    better, what aiokafka repeats at each attempt."""
    logging.getLogger(logger).addFilter(_Explained(template))


# A broker that refused a bootstrap attempt (aiokafka/client.py): start() explains it.
explained_by_ktel("aiokafka", 'Unable connect to "%s:%s": %s')


def settings(kafka: Kafka, bootstrap: str | None = None) -> KafkaConfig:
    """``kafka`` as a KafkaConfig; ``bootstrap``: another cluster, reached with the same settings."""
    cfg = kafka if isinstance(kafka, KafkaConfig) else KafkaConfig(bootstrap=kafka)
    return cfg.model_copy(update={"bootstrap": bootstrap}) if bootstrap else cfg


def servers(kafka: Kafka) -> list[str]:
    return [hp.strip() for hp in settings(kafka).bootstrap.split(",")]


def ssl_context(kafka: Kafka) -> ssl.SSLContext | None:
    """The TLS context of an SSL or SASL_SSL protocol; None otherwise."""
    k = settings(kafka)
    if k.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    ctx = create_ssl_context(
        cafile=str(k.ssl_cafile) if k.ssl_cafile else None,
        certfile=str(k.ssl_certfile) if k.ssl_certfile else None,
        keyfile=str(k.ssl_keyfile) if k.ssl_keyfile else None,
    )
    ctx.check_hostname = k.ssl_check_hostname
    return ctx


def client_kwargs(kafka: Kafka, bootstrap: str | None = None) -> dict[str, Any]:
    """Keyword arguments for AIOKafkaProducer, AIOKafkaConsumer and AIOKafkaAdminClient."""
    k = settings(kafka, bootstrap)
    kwargs: dict[str, Any] = {"bootstrap_servers": servers(k), "security_protocol": k.security_protocol}
    ctx = ssl_context(k)
    if ctx is not None:
        kwargs["ssl_context"] = ctx
    if k.security_protocol.startswith("SASL_"):
        kwargs |= {
            "sasl_mechanism": k.sasl_mechanism,
            "sasl_plain_username": k.sasl_username,
            "sasl_plain_password": k.password(),
        }
    return kwargs


def compression_type(codec: str) -> str | None:
    """aiokafka's ``compression_type`` for a codec as ``agent.compression`` names it
    ("none": None)."""
    return None if codec == "none" else codec


def agent_kafka_codec(codec: str) -> str | None:
    """The Kafka codec of the agent's producer for ``agent.compression``: none under
    "zstd", whose batches the agent compresses itself (ktel/wire/codec.py)."""
    return None if codec == "zstd" else compression_type(codec)


def faust_settings(kafka: Kafka) -> dict[str, Any]:
    """Keyword arguments for faust.App: the brokers and their credentials."""
    k = settings(kafka)
    # Faust splits a broker list on ";" (each entry a URL).
    out: dict[str, Any] = {"broker": ";".join(f"kafka://{hp}" for hp in servers(k))}
    ctx = ssl_context(k)
    if k.security_protocol.startswith("SASL_"):
        out["broker_credentials"] = faust.SASLCredentials(
            username=k.sasl_username, password=k.password(), mechanism=k.sasl_mechanism, ssl_context=ctx
        )
    elif ctx is not None:
        out["broker_credentials"] = faust.SSLCredentials(ctx)
    return out


async def start(client: Client, kafka: Kafka, who: str) -> None:
    """Start an aiokafka client, retrying with backoff (ktel/retry.py) until Kafka takes
    it. Why it cannot is logged once, as :func:`explain` words it, and again only if
    the failure changes; after such a failure, one line says when it connected.

    When this raises (cancelled while it retries, say), the client is still the caller's
    to stop: aiokafka may have started its metadata task before the failure.
    :func:`started` does both."""
    k = settings(kafka)
    failed: str | None = None

    async def attempt() -> None:
        nonlocal failed
        try:
            await client.start()
        except (KafkaError, OSError) as err:  # OSError covers TimeoutError
            if f"{type(err).__name__}: {err}" != failed:
                failed = f"{type(err).__name__}: {err}"
                log.error("%s: %s; retrying until it can", who, await explain(err, k))
            raise

    await retry(attempt, what=f"{who}: connect to Kafka at {k.bootstrap}", quiet=True)
    if failed is not None:
        log.warning("%s: connected to Kafka at %s", who, k.bootstrap)


@contextlib.asynccontextmanager
async def started(client: C, kafka: Kafka, who: str) -> AsyncIterator[C]:
    """``client`` started by :func:`start`, and stopped on leaving, also when its start
    fails or is cancelled: one left unstopped keeps its tasks and connections (and
    aiokafka's retries) after its owner is gone, and aiokafka warns of it unclosed."""
    try:
        await start(client, kafka, who)
        yield client
    finally:
        await client.stop()


async def reachable(kafka: Kafka, who: str) -> None:
    """Wait, as :func:`start` does, until Kafka takes a client with these settings:
    for a process whose clients are not started here (Faust's, the admin's)."""
    async with started(AIOKafkaProducer(**client_kwargs(kafka)), kafka, who):
        pass


# What Kafka answers a client it let in but may not do what it asked (its ACLs).
AUTHORIZATION_ERRORS = (
    TopicAuthorizationFailedError,
    GroupAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
# The fix for one of them.
GRANT = "grant its principal the role with `ktel acls`, or run this with the credentials of a role that may"


def refused(err: BaseException) -> str:
    """``err`` for the user, with the fix when it is Kafka's ACLs refusing the principal."""
    if isinstance(err, AUTHORIZATION_ERRORS):
        return f"{err} (Kafka's ACLs refuse this principal that: {GRANT})"
    return str(err)


async def explain(err: BaseException, kafka: Kafka) -> str:
    """A client's failure to connect, with the setting most likely at fault.

    aiokafka reports only "Unable to bootstrap" when every broker refused (it logs
    why, one line per broker), so on that the first broker is asked again, by hand.
    """
    k = settings(kafka)
    if isinstance(err, KafkaConnectionError):
        err = await _connect_once(k) or err
    text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    if isinstance(err, AUTHORIZATION_ERRORS):
        # (let in, refused what it asked: its password is right, its ACLs are not)
        who = f"SASL user {k.sasl_username!r}" if k.security_protocol.startswith("SASL_") else "this client"
        return f"Kafka at {k.bootstrap} refused {who} what it asked ({text}): {GRANT}"
    if isinstance(err, SaslAuthenticationFailed) or (
        k.security_protocol.startswith("SASL_") and "authentication" in text.lower()
    ):
        return (
            f"Kafka at {k.bootstrap} refused SASL {k.sasl_mechanism} user {k.sasl_username!r} ({text}): "
            "check kafka.sasl_username and kafka.sasl_password (KTEL_KAFKA__SASL_PASSWORD) "
            "or kafka.sasl_password_file"
        )
    if isinstance(err, ssl.SSLError) or "ssl" in text.lower() or "certificate" in text.lower():
        return (
            f"TLS with Kafka at {k.bootstrap} failed ({text}): check kafka.ssl_cafile, "
            "kafka.ssl_certfile, kafka.ssl_keyfile and kafka.ssl_check_hostname"
        )
    return f"cannot reach Kafka at {k.bootstrap} ({text}): check kafka.bootstrap and kafka.security_protocol"


async def _connect_once(k: KafkaConfig) -> BaseException | None:
    """Why the first bootstrap server refuses a connection (None: it does not)."""
    kwargs = client_kwargs(k)
    host, _, port = kwargs.pop("bootstrap_servers")[0].rpartition(":")
    try:
        conn = await create_conn(host, int(port), request_timeout_ms=10_000, **kwargs)
    except (OSError, KafkaError) as err:  # OSError covers TimeoutError
        return err
    conn.close()
    return None
