"""ktel's one typed configuration.

Sources, later ones winning: the defaults below, a TOML file (``--config`` or
``KTEL_CONFIG``; either given empty is refused), then environment variables
``KTEL_<SECTION>__<FIELD>``, e.g. ``KTEL_KAFKA__BOOTSTRAP=10.0.0.5:9092`` or
``KTEL_AGGREGATE__WINDOW_SECONDS=2``.
A variable replaces the value it names, a map too (JSON): ``KTEL_REMOTE_WRITE__HEADERS='{}'``
sends no header whatever the file's ``remote_write.headers``. A section's or table's
settings given each by its own variable are merged with the file's others, and so are a
map's keys given so (``KTEL_AGENT__SAMPLE_EVERY__FILE_CREATED=2``).

Every field says its default and meaning in its description; ``ktel config``
prints the effective configuration. Validation runs at start and an error
names the field, the bad value and what is allowed; what every field is held to
(no unknown settings, no true for a number, no nan, no empty text, ...) is in
``Section``. A field that holds a secret is marked ``SECRET`` (in its
``json_schema_extra``): what ktel prints of it, in ``ktel config`` and in errors,
is masked; the value itself is used as given.
"""

from __future__ import annotations

import difflib
import errno
import ipaddress
import json
import os
import re
import stat
import tomllib
import types
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin
from urllib.parse import urlsplit

from annotated_types import MaxLen, MinLen
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from ktel.probes import KIND_BY_NAME, KINDS, PROBES
from ktel.schema import U32
from ktel.wire.codec import MAX_RECORD_BYTES, SEND_MAX_BYTES
from ktel.wire.control import sample_command_id
from ktel.wire.raw import MAX_EVENTS, host_id_problem
from ktel.wire.topics import Topics


class ConfigError(Exception):
    pass


def check_readable(section: str, model: BaseModel, fields: tuple[str, ...]) -> None:
    """Refuse, naming the setting, a file an exporter's section names that this process
    cannot read. Checked when the exporter starts, not when the config loads: one config
    serves every ktel process (one ConfigMap in the Helm chart), and an exporter's
    credentials are mounted only where that exporter runs."""
    for name in fields:
        path = getattr(model, name)
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(
                f"{section}.{name} = '{path}': cannot be read (missing or not permitted): "
                "mount it where this exporter runs, or fix its permissions"
            )


# The marker of a field that holds a secret, and what is printed in its place.
SECRET: dict[str, Any] = {"secret": True}
MASK = "***"


class MovedSetting(ValueError):
    """A setting given under the name it had before it moved; the message names the new one."""


def _read_id(path: str) -> str:
    try:
        return Path(path).read_text().strip().replace("-", "")
    except OSError:
        return ""


# The longest text a setting takes unless it declares its own bound: far above any name,
# address, URL, pattern or token, and short of a file pasted into a variable by mistake.
MAX_CHARS = 65_536
# The largest whole number a setting takes unless it declares its own bound: the int64
# that Kafka, protobuf and the backends hold numbers in.
INT64 = (1 << 63) - 1
# Linux's longest path, counting the NUL that ends it.
PATH_MAX = 4096


def _scalars(annotation: Any) -> set[Any]:
    """The scalar types a field's annotation takes, through Optional, unions and
    Annotated. A Literal gives none: its own check names its choices."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _scalars(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return set().union(*(_scalars(a) for a in get_args(annotation)))
    if origin is None and isinstance(annotation, type):
        return {annotation}
    return set()


def _members(annotation: Any) -> tuple[Any, Any] | None:
    """(key, value) annotations of a dict field, (None, item) of a list field, through
    Optional; None for anything else."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        found = [m for a in get_args(annotation) if (m := _members(a)) is not None]
        return found[0] if found else None
    if origin is dict:
        key, value = get_args(annotation)
        return key, value
    if origin is list:
        return None, get_args(annotation)[0]
    return None


def _mistake(
    annotation: Any, value: Any, empty_ok: bool = False, most_chars: int | None = MAX_CHARS
) -> str | None:
    """What is wrong with ``value``, as the file or the environment gives it, for a
    field of ``annotation`` that pydantic's own coercion would let through: a TOML
    boolean where a number is meant (Python's bool is an int) or a number where a
    boolean is, empty or overlong text, a NUL; in the members of a map or a list too.
    Said of the value ("is ..."); None if nothing. Text where a number is meant is how
    the environment gives every number: pydantic parses it."""
    kinds = _scalars(annotation)
    if isinstance(value, bool):
        if kinds & {int, float} and bool not in kinds:
            return "is true or false, not a number: give a number"
        return None
    if isinstance(value, int | float):
        if bool in kinds and not kinds & {int, float, str}:
            return "is a number, not true or false: give true or false"
        return None
    if isinstance(value, str):
        if not kinds & {str, Path, SecretStr}:
            return None
        if "\0" in value:
            return "holds a NUL character"
        if not value and not empty_ok:
            return "is empty: give a value (or leave the setting out for its default)"
        if most_chars is not None and len(value) > most_chars:
            return f"is {len(value)} characters long: give at most {most_chars}"
        try:
            value.encode()
        except UnicodeEncodeError:
            return "is not valid UTF-8 text"
        return None
    members = _members(annotation)
    if members is None:
        return None
    key_type, item_type = members
    if isinstance(value, dict) and key_type is not None:
        for key, item in value.items():
            if why := _mistake(key_type, key):
                return f"key {key!r} {why}"
            if why := _mistake(item_type, item):
                return f"{key!r} {why}"
    if isinstance(value, list) and key_type is None:
        for i, item in enumerate(value):
            if why := _mistake(item_type, item):
                return f"item {i + 1} {why}"
    return None


def _whole_numbers(value: Any) -> list[int]:
    """The whole numbers in a validated value, in its maps and lists too."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _whole_numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _whole_numbers(v)]
    return []


class Section(BaseModel):
    """What every section of the configuration, and every table in one, holds to: a
    setting it does not have is refused (a misspelt one would silently not apply), a
    number is finite (TOML and the environment both take nan and inf), and what
    ``_mistake`` names and a whole number beyond int64 are refused for every field,
    unless the field declares otherwise: ``min_length=0`` where empty text means
    something, its own ``max_length`` for a tighter or looser bound than MAX_CHARS."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="wrap")
    @classmethod
    def _as_written(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        field = cls.model_fields[info.field_name or ""]
        own_max = any(isinstance(m, MaxLen) for m in field.metadata)
        why = _mistake(field.annotation, value, MinLen(0) in field.metadata, None if own_max else MAX_CHARS)
        if why:
            raise ValueError(why)
        result = handler(value)
        for n in _whole_numbers(result):
            if abs(n) > INT64:
                raise ValueError(f"{n} is too large: at most {INT64}")
        return result


PathOrName = TypeVar("PathOrName", Path, str)


def _a(kind: Literal["directory", "file"]) -> AfterValidator:
    """A path that is, when it exists, a ``kind``. A missing one is allowed: a directory
    is made by what uses it, a file may be written after the process starts (or be
    mounted only where its user runs, which checks it then: check_readable)."""

    def check(path: PathOrName) -> PathOrName:
        name = os.fsencode(path)
        if len(name) >= PATH_MAX:
            raise ValueError(f"is {len(name)} bytes long: a path has at most {PATH_MAX - 1}")
        try:
            mode = os.stat(path).st_mode
        except OSError as err:
            if err.errno == errno.ENAMETOOLONG:
                raise ValueError("has a part longer than a file name may be (255 bytes)") from None
            return path  # missing, or hidden from this process: what uses it says so
        if kind == "directory" and not stat.S_ISDIR(mode):
            raise ValueError("is not a directory: name a directory")
        if kind == "file" and stat.S_ISDIR(mode):
            raise ValueError("is a directory: name the file itself")
        return path

    return AfterValidator(check)


Dir = Annotated[Path, _a("directory")]
File = Annotated[Path, _a("file")]
# A file the OpenTelemetry SDK opens by its name.
FileName = Annotated[str, _a("file")]


def _known(names: Any, known: Any, what: str, hint: str) -> Any:
    """``names`` (a list, or a dict's keys) if each is in ``known``; else a ValueError naming it."""
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {what} {name!r} ({hint}: {', '.join(known)})")
    return names


class KafkaPrincipals(Section):
    """One Kafka principal per role; `ktel acls` grants each only what its role needs."""

    agent: str = Field("User:ktel-agent", description="the edge agents' principal")
    processor: str = Field("User:ktel-processor", description="the processing workers' principal")
    exporter: str = Field("User:ktel-exporter", description="the exporters' principal")
    operator: str = Field("User:ktel-operator", description="who may send fidelity commands")
    status: str = Field("User:ktel-status", description="who may run `ktel status` (reads, writes nothing)")
    dlq: str = Field(
        "User:ktel-dlq",
        description="who may run `ktel dlq` (reads ktel.dlq; re-drives to the topics the stages read)",
    )

    @field_validator("agent", "processor", "exporter", "operator", "status", "dlq")
    @classmethod
    def _typed(cls, v: str) -> str:
        kind, _, name = v.partition(":")
        if not kind or not name:
            raise ValueError(f"{v!r} is not a principal like User:name")
        return v


# Kafka's legal topic characters; 200 leaves room for the longest name ktel puts after
# the prefix within Kafka's limit of 249.
PREFIX = re.compile(r"[A-Za-z0-9._-]{0,200}")
# What the Kafka protocol holds: a topic's partitions are an int32 (CreateTopics), its
# replication factor an int16, its retention.ms a Java long.
KAFKA_MAX_PARTITIONS = (1 << 31) - 1
KAFKA_MAX_REPLICAS = (1 << 15) - 1
MAX_RETENTION_HOURS = INT64 // 3_600_000


class KafkaConfig(Section):
    bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port]")
    prefix: str = Field(
        "",
        min_length=0,
        description="starts the name of every ktel topic, consumer group and Faust app, so that "
        "several pipelines share a cluster (e.g. 'staging.' gives staging.ktel.raw); default none",
    )
    raw_partitions: int = Field(
        6,
        ge=1,
        le=KAFKA_MAX_PARTITIONS,
        description="partitions of ktel.raw and of the topics and table changelogs partitioned like it "
        "(ktel.deduped, ktel.enriched, ktel.sampled, ktel.heartbeats): the unit of processor scaling",
    )
    raw_retention_hours: float = Field(
        168,
        gt=0,
        le=MAX_RETENTION_HOURS,
        description="how long ktel.raw keeps raw events for replay (default 7 days)",
    )
    output_partitions: int = Field(
        6,
        ge=1,
        le=KAFKA_MAX_PARTITIONS,
        description="partitions of ktel.metrics, ktel.spans and ktel.logs (exporter scaling)",
    )
    output_retention_hours: float = Field(
        24,
        gt=0,
        le=MAX_RETENTION_HOURS,
        description="retention of every ktel topic but ktel.raw and ktel.dlq: ktel.metrics, ktel.spans, "
        "ktel.logs, the stages' ktel.deduped, ktel.enriched and ktel.sampled, ktel.heartbeats, "
        "ktel.control (kept agent.control_max_ttl_seconds where that is longer)",
    )
    dlq_retention_hours: float = Field(168, gt=0, le=MAX_RETENTION_HOURS, description="retention of ktel.dlq")
    replication_factor: int | Literal["auto"] = Field(
        "auto",
        description="replicas of every ktel topic and every processor changelog; auto: 3 on a "
        "cluster of 3 or more brokers, else as many as there are",
    )
    min_insync_replicas: int | Literal["auto"] = Field(
        "auto",
        description="min.insync.replicas of those topics: how many replicas must have a record "
        "before it is acknowledged; auto: 2 where the replication factor is 3 or more, else 1",
    )
    # Client settings: every ktel client (agent, control consumer, processors, exporters,
    # replay, admin) gets them through ktel/kafka_client.py, so they never disagree.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL (TLS), SASL_PLAINTEXT or SASL_SSL (SASL over TLS)"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism, with a SASL_* security_protocol"
    )
    sasl_username: str | None = Field(None, description="SASL user, with a SASL_* security_protocol")
    sasl_password: SecretStr | None = Field(
        None,
        description="SASL password; best given as KTEL_KAFKA__SASL_PASSWORD or sasl_password_file, "
        "not in the file; never printed",
        json_schema_extra=SECRET,
    )
    sasl_password_file: File | None = Field(
        None, description="file holding the SASL password (trailing newline ignored)"
    )
    ssl_cafile: File | None = Field(
        None, description="CA bundle (PEM) that signed the brokers' certificates; unset: the system's"
    )
    ssl_certfile: File | None = Field(None, description="client certificate (PEM), for mutual TLS")
    ssl_keyfile: File | None = Field(
        None, description="client private key (PEM, unencrypted), for mutual TLS"
    )
    ssl_check_hostname: bool = Field(
        True, description="check that a broker's certificate names the host connected to"
    )
    principals: KafkaPrincipals = Field(
        default_factory=KafkaPrincipals, description="Kafka principals of `ktel acls`"
    )

    @field_validator("bootstrap")
    @classmethod
    def _hostports(cls, v: str) -> str:
        for hp in v.split(","):
            host, _, port = hp.strip().rpartition(":")
            if not host or not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
                raise ValueError(f"{hp!r} is not host:port (a port from 1 to 65535)")
            if "/" in host:
                # A listener's URL (PLAINTEXT://kafka:9092): the clients took its scheme for
                # part of the host, and retried it for good.
                raise ValueError(
                    f"{hp!r} is not host:port: give it without a scheme (kafka.security_protocol "
                    "says PLAINTEXT, SSL or SASL)"
                )
        return v

    @field_validator("prefix")
    @classmethod
    def _topic_chars(cls, v: str) -> str:
        if not PREFIX.fullmatch(v):
            raise ValueError(
                f"{v!r}: use at most 200 of the letters, digits, '.', '_' and '-' (e.g. 'staging.')"
            )
        return v

    @field_validator("replication_factor", "min_insync_replicas")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= KAFKA_MAX_REPLICAS:
            raise ValueError(f"{v}: give from 1 to {KAFKA_MAX_REPLICAS}, or auto")
        return v

    @field_validator("sasl_password_file", "ssl_cafile", "ssl_certfile", "ssl_keyfile")
    @classmethod
    def _readable(cls, v: Path | None) -> Path | None:
        if v is not None and not os.access(v, os.R_OK):
            raise ValueError("cannot be read (missing or not permitted)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> KafkaConfig:
        rf, isr = self.replication_factor, self.min_insync_replicas
        if isinstance(rf, int) and isinstance(isr, int) and isr > rf:
            raise ValueError(
                f"kafka.min_insync_replicas = {isr} is above kafka.replication_factor = {rf}: "
                "no write could ever be acknowledged"
            )
        if self.security_protocol.startswith("SASL_"):
            if not self.sasl_username:
                raise ValueError(
                    f"kafka.security_protocol = {self.security_protocol} needs kafka.sasl_username"
                )
            if (self.sasl_password is None) == (self.sasl_password_file is None):
                raise ValueError(
                    f"kafka.security_protocol = {self.security_protocol} needs one of kafka.sasl_password "
                    "(KTEL_KAFKA__SASL_PASSWORD) and kafka.sasl_password_file"
                )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("kafka.ssl_certfile and kafka.ssl_keyfile go together (mutual TLS)")
        return self

    @property
    def topics(self) -> Topics:
        """ktel's topic and group names under ``prefix``."""
        return Topics(self.prefix)

    def password(self) -> str:
        """The SASL password, from the environment, the file or sasl_password_file."""
        if self.sasl_password_file is not None:
            return self.sasl_password_file.read_text().rstrip("\r\n")
        return self.sasl_password.get_secret_value() if self.sasl_password is not None else ""


class RedactRule(Section):
    """Replace matches of ``pattern`` in a field of an event kind or of the heartbeat,
    whatever its type (edge_agent/redact.py)."""

    kind: str = Field(description="event kind, e.g. file_created, or heartbeat")
    field: str = Field(
        description="field of that kind, e.g. path or labels; of a heartbeat, a host attribute "
        "(e.g. host.name) or a container attribute (e.g. k8s.pod.name)"
    )
    pattern: str = Field(description="Python regular expression")
    replacement: str = Field("***", min_length=0, description="what a match becomes (may use \\1 groups)")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as err:
            raise ValueError(f"not a valid regular expression: {err}") from None
        return v


# The longest a control command may hold, whatever an agent's control_max_ttl_seconds.
CONTROL_TTL_CEILING = 7 * 86400
# The longest an exporter waits for one request: longer is a unit slip (milliseconds given
# as seconds), and gRPC fails at once a deadline it cannot represent (from about 10**9 s).
MAX_REQUEST_SECONDS = 3600
# The longest period of the work ktel does every so many seconds (agent.heartbeat_seconds,
# sample.window_seconds; 10 s by default): longer is a unit slip (milliseconds given as
# seconds), and one long enough never comes round: the heartbeats, which say an agent is up
# and acknowledge its commands, stop after the first (at 1e12 s), and the sample stage's
# windows, which set its rates, budgets and anomalies, never close (their milliseconds
# overflow from about 1e305 s, stopping the worker).
MAX_PERIOD_SECONDS = 3600
# The shortest agent.heartbeat_seconds. Each heartbeat is a record that every worker reading
# ktel.heartbeats takes (about 75 µs: docs/operating.md), so at 1 ms 10,000 hosts would send
# 10 million a second; and an agent waits at most an interval for Kafka to take one, skipping
# it if not (then reading as not ready). A shorter interval tells nothing sooner: the
# workers count no heartbeat's interval as under a second before taking its host as down
# (processors/fleet_metrics.py), and KtelAgentDown waits 2 minutes before it pages.
MIN_HEARTBEAT_SECONDS = 1


# What the agent's spool keeps of agent.spool_max_mb besides a batch's bytes: the batch's
# record header and the room for its ack and dropped-in-flight files (edge_agent/spool.py,
# HEADER and FILES_BYTES; tests/unit/test_spool.py holds the spool to it).
SPOOL_OVERHEAD_BYTES = 128


def _ms_within(v: int, most: int, advice: str) -> int:
    """``v`` milliseconds if from 1 to ``most``, else the range and ``advice``."""
    if not 1 <= v <= most:
        raise ValueError(f"{v} ms is out of range: from 1 to {most} ({advice})")
    return v


class AgentConfig(Section):
    host_id: str = Field(
        default_factory=lambda: _read_id("/etc/machine-id"),
        description="host.id; default /etc/machine-id",
    )
    host_name: str | None = Field(
        None,
        min_length=1,
        max_length=255,  # (the most a DNS name takes)
        description="host.name in heartbeats; default the kernel's host name, read at each heartbeat. "
        "In a pod that is the pod's own name (a new one at each rollout), so the Helm chart sets "
        "it to the node's name",
    )
    state_dir: Dir = Field(
        Path("/var/lib/ktel/agent"), description="where the agent keeps its sequence numbers"
    )
    probes: list[str] = Field(
        # ktel_api needs ktel's kernel module (kmod/); without it, it is skipped and reported.
        ["file_created", "ktel_api"],
        description="probes to load (`ktel probes` lists them); a probe this kernel cannot attach "
        "is skipped and reported",
    )
    ringbuf_pages: int = Field(
        2048,
        description="BPF ring buffer size of each probe, in 4 KiB pages (a power of two); the default "
        "8 MiB holds a second or more of file creations at 10,000/s, so that the timer, not the "
        "buffer's quarter-full wake-ups, paces the reads of absolute paths (docs/guarantees.md)",
    )
    batch_max_events: int = Field(
        5000,
        ge=1,
        le=MAX_EVENTS,  # the most a batch may hold (ktel/wire/raw.py)
        description="seal a batch at this many events (a batch costs the agent more than its "
        "events do: fewer, larger batches are cheaper, downstream too)",
    )
    batch_max_bytes: int = Field(
        1 << 20,
        ge=4096,
        # Kafka's limit is on compressed bytes: past the readers' bound (decompressed) a
        # batch would be dead-lettered, not split.
        le=MAX_RECORD_BYTES,
        description="the most bytes a batch's encoding takes (Kafka's default record limit is "
        f"1 MiB; the processors read at most {MAX_RECORD_BYTES >> 20} MiB); a larger one is sealed "
        "as two, halved until each fits",
    )
    batch_max_ms: int = Field(
        500,
        description="seal what was read on the ticks of this interval (multiples of it on the "
        "monotonic clock); reads that a busy ring buffer wakes between them add to the next "
        "batch rather than each sealing one. Equal to read_interval_ms (the default), each "
        "timed read is sealed 10 ms after it (docs/guarantees.md)",
    )
    batch_min_events: int = Field(
        1,
        ge=1,
        description="a batch of fewer events than this is not sealed on a tick but waits for more, "
        "up to batch_hold_ms (1: every tick seals what it holds). Quiet hosts then send fewer, "
        "fuller records, which is what the processors' cost follows (docs/operating.md), at the "
        "price of that much more delay on their events; busy hosts' batches go on every tick",
    )
    batch_hold_ms: int = Field(
        5000,
        description="the longest a batch below batch_min_events waits from when its first event "
        "was taken (sealed on the first tick after): a quiet host's events are that much, a read "
        "interval and a tick later, and a SIGKILL of the agent can lose as much of them",
    )
    read_interval_ms: int = Field(
        500,
        description="read the probes' ring buffers on the ticks of this interval, all probes at "
        "once (a buffer a quarter full is read at once); with batch_max_ms equal to it, adds at "
        "most this much and 10 ms to an event's delivery",
    )
    compression: Literal["zstd", "lz4", "gzip", "none"] = Field(
        "zstd",
        description="codec of the raw batches the agent (and ktel replay) write to Kafka. zstd: "
        "the agent compresses each batch itself (one zstd frame, level 1) before spooling it, "
        "so any broker takes it; ktel replay uses Kafka's zstd (2.1 or later). lz4 and gzip "
        "are Kafka's codecs",
    )
    metrics_port: int = Field(9465, ge=0, le=65535, description="agent self-metrics /metrics port (0: off)")
    spool_max_mb: int = Field(
        1024,
        ge=1,
        description="bound on the spool's bytes on disk (<state_dir>/spool: its files' sizes, "
        "acknowledged batches not yet deleted too), MiB; with a compression other than zstd, "
        "which spool batches uncompressed, it must hold one of batch_max_bytes",
    )
    spool_full_policy: Literal["drop_oldest", "drop_newest"] = Field(
        "drop_oldest", description="what a full spool drops; either way the events are counted"
    )
    spool_fsync: Literal["always", "interval", "never"] = Field(
        "interval", description="fsync of the spool: every batch, at most once a second, or never"
    )
    heartbeat_seconds: float = Field(
        10,
        ge=MIN_HEARTBEAT_SECONDS,
        le=MAX_PERIOD_SECONDS,
        description="interval of heartbeats on ktel.heartbeats, from 1 s to an hour",
    )
    cgroup_root: Dir | None = Field(
        None,
        description="the cgroup v2 mount whose container and pod cgroups each heartbeat lists "
        "(edge_agent/containers.py); unset: found in /proc/self/mountinfo",
    )
    libc_path: File | None = Field(
        None,
        description="the libc whose getaddrinfo dns_latency's uprobe is on: it sees only the "
        "processes that map this very file. Unset: the agent's own (ldconfig's), the host's where "
        "the agent runs on it; in a container, that is the image's, so give the host's libc as "
        "mounted there (the Helm chart's agent.libcHostPath sets it)",
    )
    sample_every: dict[str, int] = Field(
        {},
        description="sampling per probe, 1 in N (default 1: keep all); control commands override it",
    )
    redact: list[RedactRule] = Field(
        [], description="rules masking sensitive values before anything leaves the node"
    )
    # Bounds on fidelity commands from ktel.control (edge_agent/control.py): one out
    # of them is refused, counted and reported in the next heartbeat.
    control_max_sample_every: int = Field(
        1_000_000,
        ge=1,
        le=U32,  # the probes' in-kernel knob is a u32
        description="the sparsest sampling (1 in N) a control command may set",
    )
    control_max_ttl_seconds: float = Field(
        3600,
        gt=0,
        le=CONTROL_TTL_CEILING,
        description="the longest a control command may hold; a restarted agent also reads "
        "ktel.control back this far, and ktel topics keeps ktel.control at least this long",
    )
    control_max_id_chars: int = Field(
        512, ge=16, le=512, description="the longest control command id the agent accepts"
    )

    @field_validator("probes")
    @classmethod
    def _known_probes(cls, v: list[str]) -> list[str]:
        return _known(v, PROBES, "probe", "`ktel probes` lists them")

    @field_validator("sample_every")
    @classmethod
    def _rates(cls, v: dict[str, int]) -> dict[str, int]:
        _known(v, PROBES, "probe", "`ktel probes` lists them")
        for probe, n in v.items():
            # The probes' in-kernel knob is a u32: a larger N would wrap there (2**32 keeps
            # every event) while the agent weighs each event it keeps by N.
            if not 1 <= n <= U32:
                raise ValueError(f"{probe} = {n}: a rate is 1 in N with N from 1 to {U32}")
        return v

    @field_validator("ringbuf_pages")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v < 1 or v & (v - 1):
            raise ValueError(f"{v} is not a power of two (try 64, 256 or 1024)")
        return v

    @field_validator("read_interval_ms")
    @classmethod
    def _read_interval(cls, v: int) -> int:
        return _ms_within(v, 1000, "default 500; longer saves wake-ups, shorter delivers sooner")

    @field_validator("batch_max_ms")
    @classmethod
    def _batch_max(cls, v: int) -> int:
        # What a SIGKILL can lose grows with it (docs/guarantees.md): a minute at most.
        return _ms_within(
            v, 60_000, "default 500, the read interval; longer saves batches, shorter delivers sooner"
        )

    @field_validator("batch_hold_ms")
    @classmethod
    def _batch_hold(cls, v: int) -> int:
        return _ms_within(
            v, 60_000, "default 5000; how long a quiet host's events may wait for agent.batch_min_events"
        )

    @model_validator(mode="after")
    def _batch_min(self) -> AgentConfig:
        if self.batch_min_events > self.batch_max_events:
            raise ValueError(
                f"agent.batch_min_events ({self.batch_min_events}) is above agent.batch_max_events "
                f"({self.batch_max_events}), where a batch is sealed full: lower it"
            )
        return self

    @model_validator(mode="after")
    def _spool_holds_a_batch(self) -> AgentConfig:
        # Spooled as encoded, a full batch larger than the spool's bound is dropped
        # (counted) whatever the spool holds. zstd batches are spooled compressed, to
        # about a tenth of their encoding.
        most = (self.spool_max_mb << 20) - SPOOL_OVERHEAD_BYTES
        if self.compression != "zstd" and self.batch_max_bytes > most:
            least = (self.batch_max_bytes + SPOOL_OVERHEAD_BYTES + (1 << 20) - 1) >> 20
            raise ValueError(
                f"agent.spool_max_mb ({self.spool_max_mb}) cannot hold a batch of agent.batch_max_bytes "
                f"({self.batch_max_bytes}), which agent.compression = {self.compression!r} spools "
                "uncompressed: the spool would drop every batch that large, counted, however empty; "
                f"raise agent.spool_max_mb to at least {least}, lower agent.batch_max_bytes to at "
                f"most {most}, or set agent.compression = 'zstd'"
            )
        return self

    @field_validator("host_id")
    @classmethod
    def _a_host_id(cls, v: str) -> str:
        # Held to the rule every batch's host is held to (a batch this agent sealed would
        # be dead-lettered). An empty one is refused like any empty text (Section); the
        # default, /etc/machine-id, is read by every process, and the agent alone, which
        # needs it, refuses it empty.
        problem = host_id_problem(v)
        if problem is not None:
            raise ValueError(f"{problem}: set agent.host_id to this host's own id")
        return v


# Prometheus takes a series without a sample for this long as ended (its lookback delta).
PROMETHEUS_STALENESS_SECONDS = 300
# The shortest aggregate.host_ttl_seconds. Every worker looks for its silent hosts every
# quarter of it (at most every 30 s: processors/stages.py), each look a pass over every
# host it holds, so a TTL of microseconds ran that timer without pause; and a host is then
# forgotten between its batches, which come every agent.batch_max_ms (500 ms by default)
# at most, its series ending and starting again from 0 at each. As the shortest
# agent.heartbeat_seconds (MIN_HEARTBEAT_SECONDS), nothing sooner is told below a second.
MIN_HOST_TTL_SECONDS = 1


class AggregateConfig(Section):
    window_seconds: float = Field(10, gt=0, description="how often metric snapshots are emitted")
    refresh_seconds: float = Field(
        120,
        gt=0,
        description="a series whose value did not change is emitted again this long after it "
        "last was (each window emits only what changed); with window_seconds, below Prometheus' "
        "5 minutes, after which a series without a sample is taken as ended",
    )
    directory_depth: int = Field(
        3,
        ge=1,
        le=16,
        description="path components kept in the `directory` label of file_created_total",
    )
    include_filename: bool = Field(
        False,
        description="add a `file` label to file_created_total (unbounded; only for small setups)",
    )
    host_ttl_seconds: float = Field(
        3600,
        description="a host that sent no batch for this long has its series end: one last "
        "snapshot marks them stale (Prometheus stale markers; the pull endpoint drops them) "
        "and its aggregate state is deleted (all of it, unless its heartbeats still come); "
        "it starts afresh if it comes back. At least 1 s",
    )

    @field_validator("host_ttl_seconds")
    @classmethod
    def _a_host_ttl(cls, v: float) -> float:
        if v < MIN_HOST_TTL_SECONDS:
            raise ValueError(
                f"is below {MIN_HOST_TTL_SECONDS} s: the workers look for silent hosts every quarter of "
                "it, over every host they hold, and would forget live hosts between their batches, "
                "their series starting again from 0 at each; give the time after which a silent "
                "host's series end (default 3600)"
            )
        return v

    @model_validator(mode="after")
    def _refreshed_before_stale(self) -> AggregateConfig:
        # A refresh goes out with the first window after it is due: up to a window late.
        if self.refresh_seconds + self.window_seconds >= PROMETHEUS_STALENESS_SECONDS:
            raise ValueError(
                f"refresh_seconds ({self.refresh_seconds:g}) plus window_seconds ({self.window_seconds:g}) "
                f"must be below {PROMETHEUS_STALENESS_SECONDS}: an unchanged series must be sent again "
                "before Prometheus takes it as ended; lower KTEL_AGGREGATE__REFRESH_SECONDS (or "
                "KTEL_AGGREGATE__WINDOW_SECONDS)"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        # Unknown anyway (Section), but a setting left under its old name is told
        # where it went.
        if isinstance(data, dict):
            moved = [f for f in ("metrics_port", "data_dir", "session_timeout_seconds") if f in data]
            if moved:
                where = [f"aggregate.{f} moved to process.{f} (KTEL_PROCESS__{f.upper()})" for f in moved]
                raise MovedSetting("; ".join(where))
        return data


# The highest process.max_hosts: at the 10-20 KiB a host measured, about 20 GiB.
MAX_HOSTS_CEILING = 1_000_000


class ProcessConfig(Section):
    """What every processing worker (``ktel process <stage>``) shares, whichever stages it runs."""

    metrics_port: int = Field(9466, ge=0, le=65535, description="processor self-metrics port (0: off)")
    data_dir: Dir = Field(Path("/var/lib/ktel/processor"), description="Faust's data directory (per stage)")
    table_store: Literal["rocksdict", "memory"] = Field(
        "rocksdict",
        description="where a stage keeps its hosts' state besides memory: 'rocksdict', a copy of the "
        "changelog under data_dir, so a restarted worker reads only the changelog's tail; 'memory', "
        "nothing, so it reads the whole changelog again",
    )
    session_timeout_seconds: float = Field(
        60,
        ge=6,  # the least a broker accepts by default (group.min.session.timeout.ms)
        le=300,  # Faust keeps its request timeout above it: longer would hide a hung broker
        description="how long a processing worker that stopped answering keeps its partitions, "
        "which the other workers then take over (the Kafka consumer group's session timeout)",
    )
    max_state_bytes: int = Field(
        900_000,
        ge=65_536,
        # A host's changelog record is its value and its key (a host id of at most 256
        # characters, at most ~3 KB JSON-escaped): with the value at most SEND_MAX_BYTES,
        # the record stays below Faust's producer's 1,000,000 bytes a request, which
        # refuses one past it before Kafka sees it (and so the worker, at every restart).
        le=SEND_MAX_BYTES,
        description="the most one host's state (its table value, JSON-encoded as its changelog "
        "record) may take: the aggregate's series get half of it, the enrich stage's process and "
        "container tables 3/8, and a record that would still grow the state past it is "
        "dead-lettered (docs/guarantees.md, Untrusted input)",
    )
    max_hosts: int = Field(
        20_000,
        description="the most hosts one processing worker holds state of, over the partitions it "
        "holds (about 10-20 KiB of memory each, so the default stays well under 1 GiB); a record "
        "of a new host past it goes to ktel.dlq (ktel_processor_hosts_refused_total), the hosts "
        "held keep being processed. Raise it, or add workers, when ktel_processor_hosts nears it",
    )

    @field_validator("max_hosts")
    @classmethod
    def _some_hosts(cls, v: int) -> int:
        # A cap this low refuses every host; one this high no longer bounds a worker's
        # memory (a worker OOM-killed rebuilds the same hosts from its changelog).
        if not 1 <= v <= MAX_HOSTS_CEILING:
            raise ValueError(
                f"must be from 1 to {MAX_HOSTS_CEILING}: the most hosts one worker holds; to serve "
                "more hosts, run more workers (up to kafka.raw_partitions) rather than one larger cap"
            )
        return v


class EnrichConfig(Section):
    """The enrich stage (processors/enrich_core.py says what it adds and when)."""

    max_processes: int = Field(
        2048,
        ge=1,
        le=4096,
        description="processes remembered per host (least recently named go first); each adds "
        "100-300 bytes to the host's table value, one changelog record, whose process and "
        "container tables also stay within 3/8 of process.max_state_bytes",
    )
    exit_grace_seconds: float = Field(
        5,
        ge=0,
        # A batch is sealed at most agent.batch_hold_ms (a minute) after its events were
        # read, so an hour keeps only processes long gone; and the grace is counted in
        # whole nanoseconds, which overflow from about 1e299 s: every batch stopped the
        # worker.
        le=3600,
        description="how long an exited process stays known, for its events that arrive after its exit",
    )
    metadata_file: File | None = Field(
        None,
        description="JSON-lines file mapping a host's cgroup.id (of one boot: boot.id; none: its current "
        "boot) to container.* and k8s.* attributes, reloaded when it changes "
        "(format: processors/enrich_core.py load_metadata); unset: none",
    )


class SampleConfig(Section):
    """The sample stage (processors/sample_core.py says what each policy does)."""

    @field_validator("keep_kinds", "budget_per_s")
    @classmethod
    def _known_kinds(cls, v: Any) -> Any:
        return _known(v, KIND_BY_NAME, "event kind", "`ktel probes --kinds` lists them")

    baseline: float = Field(1.0, gt=0, le=1, description="probability of keeping an event no policy keeps")
    keep_kinds: list[str] = Field(
        sorted(k.name for k in KINDS.values() if k.keep),
        description="event kinds always kept (default: the rare and error kinds, as their probes "
        "declare them; kernel spans with status ERROR always are)",
    )
    budget_per_s: dict[str, Annotated[float, Field(gt=0)]] = Field(
        {},
        description="fleet-wide events/s per kind, as they arrive at the sample stage (not "
        "weighted); above it the kind is sampled down (more than 0: a kind to keep none of "
        "is one whose probe is not loaded)",
    )
    window_seconds: float = Field(
        10, gt=0, le=MAX_PERIOD_SECONDS, description="window of rates, budgets and anomaly detection"
    )
    spike_factor: float = Field(
        3.0, gt=1, description="a host is anomalous above this many times its EWMA rate"
    )
    min_rate: float = Field(10.0, ge=0, description="events/s below which no host is anomalous")
    ewma_alpha: float = Field(0.3, gt=0, le=1, description="weight of the newest window in the EWMA")
    # Agents refuse a command over their agent.control_max_sample_every and
    # agent.control_max_ttl_seconds (1000000 and 3600 by default).
    raised_sample_every: int = Field(1, ge=1, le=U32, description="probe sampling (1 in N) during an anomaly")
    # When the anomaly passes the raise ends and each agent's agent.sample_every comes
    # back; agents that predate that apply this rate for command_ttl_seconds instead.
    normal_sample_every: int = Field(
        1,
        ge=1,
        le=U32,
        description="probe sampling (1 in N) after an anomaly, for agents that predate restores",
    )
    command_ttl_seconds: float = Field(
        300,
        # Sent in whole ms, and an agent refuses a command of 0 ms; nor does any agent
        # accept a longer one than the ceiling.
        ge=0.001,
        le=CONTROL_TTL_CEILING,
        description="how long a fidelity command holds, from when each agent applies it",
    )


# Headers the remote-write exporter sets itself: remote_write.headers may not replace them.
RESERVED_HEADERS = frozenset(
    {"authorization", "content-encoding", "content-type", "user-agent", "x-prometheus-remote-write-version"}
)


class RemoteWriteConfig(Section):
    url: str = Field("http://127.0.0.1:9090/api/v1/write", description="Prometheus remote-write endpoint")
    histograms: Literal["native", "classic"] = Field(
        "native",
        description="the kernel's log2 histograms as native histograms (schema 0: one series, "
        "exact buckets; Prometheus 2.40+ run with --enable-feature=native-histograms, or 3.x) or "
        "as classic _bucket/_sum/_count series (one per bucket, for receivers without native "
        "histograms)",
    )
    timeout_seconds: float = Field(10, gt=0, le=MAX_REQUEST_SECONDS, description="per-request timeout")
    metrics_port: int = Field(9467, ge=0, le=65535, description="exporter self-metrics port (0: off)")
    max_age_seconds: float = Field(
        3600,
        gt=0,
        description="a snapshot older than this (by the exporter's clock) goes to ktel.dlq instead: "
        "Prometheus refuses a sample more than an hour older than its newest, answering 400 to the "
        "whole request holding it",
    )
    max_future_seconds: float = Field(
        600,
        gt=0,
        description="a snapshot further ahead of the exporter's clock than this goes to ktel.dlq "
        "instead: once stored, a sample from the future makes Prometheus refuse every sample "
        "more than an hour older than it",
    )
    # Security (exporters/remote_write_client.py): read per request, so a rotated
    # password or token file takes effect without a restart, as in Prometheus.
    basic_auth_username: str | None = Field(None, description="HTTP basic auth user")
    basic_auth_password: SecretStr | None = Field(
        None,
        description="HTTP basic auth password; best given as KTEL_REMOTE_WRITE__BASIC_AUTH_PASSWORD "
        "or basic_auth_password_file, not in the file; never printed",
        json_schema_extra=SECRET,
    )
    basic_auth_password_file: File | None = Field(
        None, description="file holding the basic auth password (trailing newline ignored), read per request"
    )
    bearer_token_file: File | None = Field(
        None,
        description="file holding a bearer token (Authorization: Bearer), read per request, so a "
        "rotated token is used at once",
    )
    headers: dict[str, str] = Field(
        {},
        description="headers sent with every request, e.g. X-Scope-OrgID for a multi-tenant backend "
        "(printed with their values masked)",
        json_schema_extra=SECRET,
    )
    tls_ca_file: File | None = Field(
        None, description="CA bundle (PEM) that signed the receiver's certificate; unset: the system's"
    )
    tls_cert_file: File | None = Field(None, description="client certificate (PEM), for mutual TLS")
    tls_key_file: File | None = Field(
        None, description="client private key (PEM, unencrypted), for mutual TLS"
    )
    tls_check_hostname: bool = Field(
        True, description="check that the receiver's certificate names the host in url"
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        _ = parts.port  # a port out of range is a ValueError
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("give an http:// or https:// URL, e.g. http://prometheus:9090/api/v1/write")
        return v

    @field_validator("headers")
    @classmethod
    def _not_reserved(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(
                    f"header {name!r} is set by ktel itself (the remote-write protocol's headers and "
                    "Authorization, which basic_auth_* and bearer_token_file set): remove it"
                )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RemoteWriteConfig:
        password = self.basic_auth_password is not None or self.basic_auth_password_file is not None
        if self.basic_auth_username is None and password:
            raise ValueError("remote_write.basic_auth_password(_file) needs remote_write.basic_auth_username")
        if self.basic_auth_username is not None:
            if self.basic_auth_password is not None and self.basic_auth_password_file is not None:
                raise ValueError(
                    "remote_write.basic_auth_password and remote_write.basic_auth_password_file: set one"
                )
            if not password:
                raise ValueError(
                    "remote_write.basic_auth_username needs remote_write.basic_auth_password "
                    "(KTEL_REMOTE_WRITE__BASIC_AUTH_PASSWORD) or remote_write.basic_auth_password_file"
                )
            if self.bearer_token_file is not None:
                raise ValueError(
                    "remote_write.basic_auth_username and remote_write.bearer_token_file both set the "
                    "Authorization header: set one"
                )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "remote_write.tls_cert_file and remote_write.tls_key_file go together (mutual TLS)"
            )
        tls = self.tls_ca_file or self.tls_cert_file or not self.tls_check_hostname
        if tls and not self.url.startswith("https://"):
            raise ValueError(
                f"remote_write.tls_* settings apply to an https:// url, and remote_write.url = {self.url!r}: "
                "make it https://"
            )
        return self

    # The files ``ktel export remote-write`` reads (check_readable at its start).
    FILES: ClassVar[tuple[str, ...]] = (
        "basic_auth_password_file",
        "bearer_token_file",
        "tls_ca_file",
        "tls_cert_file",
        "tls_key_file",
    )

    def password(self) -> str:
        """The basic auth password, from basic_auth_password_file (read now) or basic_auth_password."""
        if self.basic_auth_password_file is not None:
            return self.basic_auth_password_file.read_text().rstrip("\r\n")
        return self.basic_auth_password.get_secret_value() if self.basic_auth_password is not None else ""


OTLP_PROTOCOLS = ("grpc", "http/protobuf")
DEFLATE_OVER_GRPC = "otlp.compression = 'deflate' is not available over grpc: use gzip"
# The paths the OTLP/HTTP exporter appends to otlp.endpoint (exporters/otlp.py).
OTLP_HTTP_PATHS = ("v1/traces", "v1/metrics", "v1/logs")
# gRPC's own address schemes (its name resolvers), which the SDK passes on as they are
# unless they have an authority (``//`` and a host): it then connects to that, dropping the rest.
GRPC_SCHEMES = frozenset({"dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock", "xds", "google-c2p"})
# Those of them whose address is a path or a name, never a host after ``//``.
GRPC_LOCAL_SCHEMES = frozenset({"unix", "unix-abstract", "vsock"})
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")


def _address_problem(netloc: str, protocol: str) -> str | None:
    """What is wrong with the host[:port] of an OTLP endpoint, as the exporter passes it
    on, or None."""
    if _SPACE_OR_CONTROL.search(netloc):
        return "has a space or control character in its host or port: remove it"
    if "," in netloc:
        return "names more than one address: give one endpoint"
    if "@" in netloc and protocol == "grpc":
        return (
            "has a user or password, which a gRPC address cannot carry: remove it, and send "
            "credentials with otlp.headers or otlp.bearer_token_file"
        )
    try:
        parts = urlsplit("//" + netloc)
    except ValueError as err:
        return f"is not host:port ({err}): give one such as collector:4317"
    if not parts.hostname:
        return "has no host: give one, e.g. http://collector:4317"
    try:
        port = parts.port  # (None: the scheme's own)
    except ValueError:
        port = 0
    if port == 0:
        return "has a port that is not a number from 1 to 65535: give the receiver's port"
    return None


def otlp_endpoint_problem(endpoint: str, protocol: str) -> str | None:
    """Why ``endpoint`` (otlp.endpoint) cannot work over ``protocol``, with the form to
    give; None if it may. As the SDK exporters take it: over grpc a URL's host and port
    (its scheme says plaintext or TLS, its path is not used) or, without ``//`` and a host
    after it, a gRPC address as it is (host:port, dns:///host:port, unix:path, ...); over
    http/protobuf an http(s) base URL, to which the signal's path is appended
    (exporters/otlp.py)."""
    try:
        parts = urlsplit(endpoint)  # (as the SDK's urlparse: leading spaces, tabs and newlines go)
    except ValueError as err:
        return f"is not a URL ({err}): give one such as http://collector:4317"
    if protocol == "grpc":
        if parts.netloc and parts.scheme in GRPC_SCHEMES:
            # The SDK would connect to the authority as host:port, dropping the rest: of
            # dns://server/name the DNS server, of unix://relative/path "relative".
            scheme, address, name = parts.scheme, endpoint.strip().partition("//")[2], parts.path[1:]
            if scheme == "unix":
                return (
                    "has a relative path after unix://, where gRPC takes only an absolute one: give "
                    f"unix:{address} (relative), or unix:///{address} (absolute)"
                )
            if scheme in GRPC_LOCAL_SCHEMES:
                return (
                    f"has // after {scheme}:, which makes the OTLP exporter take {parts.netloc} for a "
                    f"host: give {scheme}:{address}"
                )
            if name:
                return (
                    f"has {parts.netloc} after {scheme}://, which the OTLP exporter would connect to "
                    f"instead of {name} (it cannot be given a DNS server or another authority): give "
                    f"{scheme}:///{name}"
                )
        if parts.netloc:
            return _address_problem(parts.netloc.rstrip(), protocol)  # (gRPC takes trailing spaces)
        if parts.scheme in GRPC_SCHEMES:
            return None
        # An address as it is: host[:port], nothing more.
        try:
            bare = urlsplit("//" + endpoint.rstrip())
            more = bool(bare.path or bare.query or bare.fragment)
        except ValueError:  # (an IPv6 address's bracket left open)
            more = True
        if more or parts.scheme in ("http", "https"):
            return (
                "is neither host:port nor a URL: give http://host:port (https:// for TLS), "
                "e.g. http://collector:4317"
            )
        return _address_problem(endpoint.rstrip(), protocol)
    if parts.scheme not in ("http", "https"):
        return (
            "has no http:// or https:// scheme, which http/protobuf needs: give a base URL such "
            "as http://collector:4318"
        )
    # What requests is given: the endpoint, its leading spaces stripped, and the path.
    netloc = re.split(r"[/?#]", endpoint.lstrip().partition("//")[2], maxsplit=1)[0]
    if why := _address_problem(netloc, protocol):
        return why
    if parts.query or parts.fragment:
        return (
            "has a ?query or #fragment, after which the signal's path (/v1/traces, ...) would be "
            "appended: give the base URL without it"
        )
    if parts.path.rstrip("/").endswith(tuple("/" + p for p in OTLP_HTTP_PATHS)):
        return (
            "ends in a signal's path, and ktel appends /v1/traces, /v1/metrics and /v1/logs itself: "
            "give the base URL, e.g. http://collector:4318"
        )
    return None


class OtlpConfig(Section):
    """``ktel export otlp``. A field left unset (None) falls back to the OpenTelemetry SDK's
    own environment variable, which the SDK exporters read, then to the SDK's default:
    endpoint OTEL_EXPORTER_OTLP_ENDPOINT, headers OTEL_EXPORTER_OTLP_HEADERS, insecure
    OTEL_EXPORTER_OTLP_INSECURE, certificate_file OTEL_EXPORTER_OTLP_CERTIFICATE,
    client_key_file OTEL_EXPORTER_OTLP_CLIENT_KEY, client_certificate_file
    OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE, compression OTEL_EXPORTER_OTLP_COMPRESSION,
    timeout_seconds OTEL_EXPORTER_OTLP_TIMEOUT (and their per-signal _TRACES_/_METRICS_/_LOGS_
    forms), protocol OTEL_EXPORTER_OTLP_PROTOCOL. bearer_token_file is ktel's own (the SDK
    reads no credential from a file)."""

    protocol: Literal["grpc", "http/protobuf"] | None = Field(
        None, description="OTLP transport; unset: OTEL_EXPORTER_OTLP_PROTOCOL, else grpc"
    )
    endpoint: str | None = Field(
        None,
        description="base URL, e.g. http://collector:4317 (grpc) or http://collector:4318 (http; "
        "/v1/traces, /v1/metrics, /v1/logs are appended); https:// means TLS",
    )
    headers: dict[str, str] | None = Field(
        None,
        description="headers sent with every request (printed with their values masked: they "
        "often carry tokens)",
        json_schema_extra=SECRET,
    )
    bearer_token_file: File | None = Field(
        None,
        description="file holding a bearer token sent as Authorization: Bearer <token>, read per "
        "request, so a rotated token, or a wrong one fixed in the file, is used at once",
    )
    insecure: bool | None = Field(None, description="grpc only: plaintext even without an http:// scheme")
    certificate_file: FileName | None = Field(None, description="CA bundle (PEM) to verify the backend")
    client_key_file: FileName | None = Field(None, description="client private key (PEM) for mTLS")
    client_certificate_file: FileName | None = Field(None, description="client certificate (PEM) for mTLS")
    compression: Literal["none", "gzip", "deflate"] | None = Field(
        None, description="request compression (deflate only over http)"
    )
    timeout_seconds: float | None = Field(
        None, gt=0, le=MAX_REQUEST_SECONDS, description="per-request timeout (SDK default 10)"
    )
    max_export_batch_size: int = Field(
        2048, ge=1, description="spans, log records or data points per request at most"
    )
    histograms: Literal["exponential", "explicit"] = Field(
        "exponential",
        description="the kernel's log2 histograms as exponential histograms (scale 0: exact "
        "buckets, in nanoseconds) or as explicit-bucket histograms (in seconds, for backends "
        "without exponential histograms)",
    )
    metrics_port: int = Field(9468, ge=0, le=65535, description="exporter self-metrics port (0: off)")
    max_age_seconds: float = Field(
        86400,
        gt=0,
        description="a span, log record or data point older than this (by the exporter's clock) "
        "goes to ktel.dlq instead (default a day, the default retention of ktel's output topics)",
    )
    max_future_seconds: float = Field(
        600,
        gt=0,
        description="a span, log record or data point further ahead of the exporter's clock than "
        "this goes to ktel.dlq instead (a host clock that far ahead, or a broken timestamp)",
    )

    # The files ``ktel export otlp`` reads, itself or through the SDK (check_readable at
    # its start: over grpc, one missing stopped it with a traceback).
    FILES: ClassVar[tuple[str, ...]] = (
        "bearer_token_file",
        "certificate_file",
        "client_key_file",
        "client_certificate_file",
    )

    @field_validator("endpoint")
    @classmethod
    def _usable(cls, v: str | None, info: ValidationInfo) -> str | None:
        # Over the protocol set here; unset, the exporter's OTEL_EXPORTER_OTLP_PROTOCOL
        # decides, which this process need not share (one config serves every process):
        # refused here what neither takes, and at the exporter's start the rest
        # (exporters/otlp.py make_exporters).
        protocol = info.data.get("protocol")
        if v is not None:
            problems = [otlp_endpoint_problem(v, p) for p in ([protocol] if protocol else OTLP_PROTOCOLS)]
            if all(problems):
                raise ValueError(problems[0])
        return v

    @model_validator(mode="after")
    def _one_authorization(self) -> OtlpConfig:
        headers = {h.lower() for h in self.headers or {}}
        if self.bearer_token_file is not None and "authorization" in headers:
            raise ValueError(
                "otlp.headers has an Authorization header and otlp.bearer_token_file sets it too: remove one"
            )
        if self.protocol == "grpc" and self.compression == "deflate":
            raise ValueError(DEFLATE_OVER_GRPC)
        return self


# What one snapshot the wire takes (up to 32 MiB of Prometheus samples as it counts them,
# MAX_PROMETHEUS_BYTES) may take of the pull endpoint's memory as the endpoint counts it
# (exporters/pull.py): at most about 1,264 MiB, for histograms of 5 buckets and 63 labels
# of one character, a character outside the BMP in each
# (tests/unit/test_untrusted_snapshots.py builds it). The least pull.max_series_bytes, so
# that every snapshot the wire takes fits an empty endpoint.
MIN_PULL_SERIES_BYTES = 1280 << 20


class PullConfig(Section):
    host: str = Field("127.0.0.1", description="address of the pull endpoint")
    port: int = Field(9464, ge=1, le=65535, description="port of the pull endpoint (/metrics)")
    metrics_port: int = Field(
        9469, ge=0, le=65535, description="the pull endpoint's own self-metrics port (0: off)"
    )
    max_future_seconds: float = Field(
        600,
        gt=0,
        description="a snapshot further ahead of the endpoint's clock than this goes to ktel.dlq "
        "instead: kept, it would hide every later value of its series (the newest one is served)",
    )
    max_series_bytes: int = Field(
        MIN_PULL_SERIES_BYTES,
        ge=MIN_PULL_SERIES_BYTES,
        description="the most memory the series the endpoint serves may take, held and at the peak of a "
        "scrape, as it counts them (exporters/pull.py: about 870 bytes for a gauge of one short label, 26 KB "
        "for a histogram of 40 buckets, more while any character served is not ASCII); filled to it, what "
        "Python allocates for them is 0.6 to 0.97 of it (bench/pull_memory.py), and the process takes about "
        "100 MB besides. At least 1.25 GiB, what one snapshot the wire takes may take. A series that would "
        "take them past it, new or grown, goes to ktel.dlq (those served keep their values); "
        "ktel_exporter_pull_series_bytes shows how near it is",
    )

    @field_validator("host")
    @classmethod
    def _one_host(cls, v: str) -> str:
        # A colon is an IPv6 address's alone: the endpoint takes any other for one, and
        # stopped with a traceback (as `ktel up` did checking its port).
        if ":" in v:
            try:
                ipaddress.IPv6Address(v)
            except ValueError:
                raise ValueError(
                    "is not an address or a host name: give the address alone (e.g. 0.0.0.0, or :: "
                    "without brackets), and the port as pull.port"
                ) from None
        return v


class StackConfig(Section):
    data_dir: Dir = Field(
        Path("/var/lib/ktel/local"), description="Kafka, Prometheus and Collector data of `ktel up`"
    )
    kafka_port: int = Field(9092, ge=1, le=65535, description="local broker port")
    kafka_controller_port: int = Field(9093, ge=1, le=65535, description="local KRaft controller port")
    prometheus_port: int = Field(9090, ge=1, le=65535, description="local Prometheus port")
    collector_grpc_port: int = Field(
        4317, ge=1, le=65535, description="local OpenTelemetry Collector's OTLP/gRPC port"
    )
    collector_http_port: int = Field(
        4318, ge=1, le=65535, description="local OpenTelemetry Collector's OTLP/HTTP port"
    )
    collector_binary: File | None = Field(
        None,
        description="a prebuilt OpenTelemetry Collector to run (it needs the otlp receiver and the "
        "file and debug exporters, as deploy/otelcol/builder-config.yaml lists); unset: built once "
        "from the Go module proxy into the cache",
    )

    @field_validator("collector_binary")
    @classmethod
    def _executable(cls, v: Path | None) -> Path | None:
        if v is not None and not (v.is_file() and os.access(v, os.X_OK)):
            raise ValueError("is not an executable file; name the Collector binary, or unset it to build one")
        return v


class ServiceConfig(Section):
    """What every ktel process shares about itself: its name, its logs, where it serves
    its self-metrics and health endpoints."""

    name: str = Field(
        "ktel",
        min_length=1,
        description="service.name on every OTLP resource ktel sends; OTEL_SERVICE_NAME, where set, wins",
    )
    metrics_bind: str = Field(
        "127.0.0.1",
        min_length=1,
        description="address the self-metrics servers (/metrics, /healthz, /readyz) listen on; "
        "0.0.0.0 to be scraped and probed from other hosts",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="log level; the command line's --log-level wins"
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="text: one readable line per record; json: one JSON object per line"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("metrics_bind")
    @classmethod
    def _address(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError("not an IP address (e.g. 127.0.0.1, 0.0.0.0, ::1 or ::)") from None
        return v


# A machine id's length (/etc/machine-id: 32 hex digits): the agent.host_id of an agent
# that does not set one.
MACHINE_ID_CHARS = 32
# The latest time a command id carries, in ms since the epoch: 13 digits, until 2286.
LATEST_MS = 10**13 - 1


class Config(BaseSettings):
    # "null" unsets an optional setting from the environment (`ktel up` unsets a token file so).
    model_config = SettingsConfigDict(
        env_prefix="KTEL_", env_nested_delimiter="__", extra="forbid", env_parse_none_str="null"
    )

    kafka: KafkaConfig = KafkaConfig()
    agent: AgentConfig = AgentConfig()
    process: ProcessConfig = ProcessConfig()
    aggregate: AggregateConfig = AggregateConfig()
    enrich: EnrichConfig = EnrichConfig()
    sample: SampleConfig = SampleConfig()
    remote_write: RemoteWriteConfig = RemoteWriteConfig()
    otlp: OtlpConfig = OtlpConfig()
    pull: PullConfig = PullConfig()
    stack: StackConfig = StackConfig()
    service: ServiceConfig = ServiceConfig()

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, **_):  # type: ignore[override]
        # The file is passed as init kwargs; the environment overrides it.
        return (env_settings, init_settings)


def check_sample_commands(cfg: Config) -> None:
    """Refuse a sample stage whose fidelity commands the agents would refuse (their
    bounds, edge_agent/control.py), naming both settings: adaptive sampling would
    silently never apply. Checked where the sample stage starts (``ktel process sample``
    or ``all``), not when the config loads, as ``check_readable`` is: an agent may read
    a file of its own (deploy/ktel-agent.service), whose bounds are no reason for it not
    to start. Where one ktel.toml serves the workers and the agents (the Helm chart's
    ConfigMap) an agent setting left out counts at its default: it is what the agents
    reading that file hold to; a worker given a file of its own names the agents' bounds
    there if they are not the defaults."""
    sample, agent = cfg.sample, cfg.agent
    problems = []
    # Both sides count in whole ms (sample_core.observe_host, control.Bounds).
    if int(sample.command_ttl_seconds * 1000) > int(agent.control_max_ttl_seconds * 1000):
        problems.append(
            f"sample.command_ttl_seconds ({sample.command_ttl_seconds:g}) is above "
            f"agent.control_max_ttl_seconds ({agent.control_max_ttl_seconds:g}), the longest command "
            "an agent takes: the agents would refuse every command of the sample stage; lower "
            f"sample.command_ttl_seconds to at most {agent.control_max_ttl_seconds:g}, or raise "
            f"agent.control_max_ttl_seconds (up to {CONTROL_TTL_CEILING})"
        )
    # (Agents judge a restore without its rate: normal_sample_every is for the agents
    # that predate restores, which refuse one over their bound and so keep the raise.)
    for name, refused in (
        ("raised_sample_every", "the agents would refuse every raise of the sample stage"),
        (
            "normal_sample_every",
            "agents that predate restores would refuse every restore of the sample stage, "
            "keeping each raise for sample.command_ttl_seconds",
        ),
    ):
        every = getattr(sample, name)
        if every > agent.control_max_sample_every:
            problems.append(
                f"sample.{name} ({every}) is above agent.control_max_sample_every "
                f"({agent.control_max_sample_every}), the sparsest rate an agent takes: {refused}; "
                f"lower sample.{name} to at most {agent.control_max_sample_every}, or raise "
                f"agent.control_max_sample_every (up to {U32})"
            )
    if agent.probes:
        # The ids name the host and the probe: this agent's longest (an agent without
        # a host_id of its own is named by its machine id).
        host = agent.host_id or "h" * MACHINE_ID_CHARS
        probe = max(agent.probes, key=len)
        longest = max(len(sample_command_id(w, host, probe, LATEST_MS)) for w in ("raise", "restore"))
        if longest > agent.control_max_id_chars:
            problems.append(
                f"agent.control_max_id_chars ({agent.control_max_id_chars}) is below the {longest} "
                "characters of the ids the sample stage gives its commands to this agent "
                f"(ktel-sample-restore-<host id>-<probe>-<ms>, with a host id of {len(host)} characters "
                f"and probe {probe}): the agent would refuse every one; raise "
                f"agent.control_max_id_chars to at least {longest}"
            )
    if problems:
        raise ConfigError("\n  ".join(problems))


def _is_secret(field: Any) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("secret"))


def _masked(value: Any) -> Any:
    """A secret's value as printed: a map keeps its keys (header names say what is
    set), everything else is masked."""
    if isinstance(value, dict):
        return {k: MASK for k in value}
    return None if value is None else MASK


def printable(model: BaseModel) -> dict[str, Any]:
    """``model`` as JSON-ready data, with its secret fields masked (``ktel config``)."""
    data = model.model_dump(mode="json")
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if _is_secret(field):
            data[name] = _masked(data[name])
        elif isinstance(value, BaseModel):
            data[name] = printable(value)
        elif isinstance(value, list):
            data[name] = [
                printable(v) if isinstance(v, BaseModel) else d
                for v, d in zip(value, data[name], strict=True)
            ]
    return data


def _secret_at(loc: tuple[int | str, ...]) -> bool:
    """Whether a validation error's location is in a secret field."""
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return False
        if _is_secret(field):
            return True
        model = field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return False
    return False


# The most of a bad value an error shows: enough to recognise it.
SHOWN_CHARS = 80


def _shown(value: Any) -> str:
    text = repr(value)
    if len(text) <= SHOWN_CHARS:
        return text
    return f"{text[:SHOWN_CHARS]}... ({len(value) if isinstance(value, str) else len(text)} characters)"


def _model_of(annotation: Any) -> Any:
    """The model a field holds, itself or as the items of its list or map, through
    Optional; None if it holds none."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    members = _members(annotation)
    if members is not None:
        return _model_of(members[1])
    for a in get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else ():
        if (model := _model_of(a)) is not None:
            return model
    return None


def _holds_secret(field: Any) -> bool:
    """Whether a field is a secret or a section or table with one in it (a whole
    section given as one variable may carry its password)."""
    model = _model_of(field.annotation)
    return _is_secret(field) or (
        model is not None and any(_holds_secret(f) for f in model.model_fields.values())
    )


def _variable(loc: tuple[int | str, ...]) -> str:
    """Where the environment sets what is at ``loc``: its KTEL_* variable, or for what is
    in a list's item (agent.redact's rules), the whole list's, as JSON: no variable
    names an item (KTEL_AGENT__REDACT__0__PATTERN is refused as not a list)."""
    names = [str(p) for p in loc[: next((i for i, p in enumerate(loc) if isinstance(p, int)), len(loc))]]
    var = "KTEL_" + "__".join(n.upper() for n in names)
    return var if len(names) == len(loc) else f"{var} (the whole list, as JSON)"


def _unknown(loc: tuple[int | str, ...]) -> str:
    """What to say of a key the table it is in has no setting of."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, str):
            field = model.model_fields.get(part) if model is not None else None
            model = _model_of(field.annotation) if field is not None else None
    names = list(model.model_fields) if model is not None else []
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    if len(loc) == 1:
        return f"not a section of ktel's configuration: {hint}the sections are {', '.join(names)}"
    env = _variable(loc)
    where = ".".join(str(p) for p in loc[:-1])
    return (
        f"not a setting of {where} (in the file, or {env} in the environment): {hint}`ktel config` lists them"
    )


def _quoted(loc: tuple[int | str, ...], value: object) -> str:
    """How a number given where a string is wanted is written as one."""
    return f'{loc[-1]} = "{value}"' if isinstance(loc[-1], str) else f'"{value}"'


def _explain(err: ValidationError, source: str) -> str:
    lines = [f"invalid ktel configuration ({source}):"]
    for e in err.errors():
        if isinstance(e.get("ctx", {}).get("error"), MovedSetting):
            lines.append(f"  {e['ctx']['error']}")
            continue
        if not e["loc"] and "error" in e.get("ctx", {}):
            # Across sections (Config's own checks): the message names the settings.
            lines.append(f"  {e['ctx']['error']}")
            continue
        field = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {field}: {_unknown(e['loc'])}")
            continue
        env = _variable(e["loc"])
        value = e.get("input")
        if isinstance(value, dict):
            # A whole section failed a check across fields: the message names them,
            # and the section may hold a secret.
            lines.append(f"  {field}: {e['msg']}")
            continue
        shown = MASK if _secret_at(e["loc"]) else _shown(value)
        if e["type"] == "string_type" and isinstance(value, int | float) and not isinstance(value, bool):
            # Digits unquoted: TOML and YAML read them as a number, and so does Helm's --set.
            lines.append(
                f"  {field} = {shown}: a string is wanted, and this is a number: write it in "
                f"quotes in the file ({_quoted(e['loc'], value)}); in the Helm chart's values, "
                "quote it too, or give it with --set-string instead of --set"
            )
            continue
        lines.append(f"  {field} = {shown}: {e['msg']} (set it in the file or with {env})")
    return "\n".join(lines)


def _explain_environment(err: SettingsError, source: str) -> str:
    """A KTEL_* variable of a list, a map or a table that is not JSON, which is how the
    environment gives them (pydantic-settings names only the section)."""
    lines = [f"invalid ktel configuration ({source}):"]
    env = {k.upper(): v for k, v in os.environ.items()}
    for section, sfield in Config.model_fields.items():
        fields = _model_of(sfield.annotation).model_fields
        for setting, field in [(section, sfield), *((f"{section}.{n}", f) for n, f in fields.items())]:
            var = "KTEL_" + setting.upper().replace(".", "__")
            # Only these are read as JSON: other values are taken as text.
            if var not in env or (_members(field.annotation) is None and _model_of(field.annotation) is None):
                continue
            try:
                json.loads(env[var])
            except ValueError:
                shown = MASK if _holds_secret(field) else _shown(env[var])
                what = (
                    'list, e.g. ["a", "b"]'
                    if get_origin(field.annotation) is list
                    else 'object, e.g. {"a": 1}'
                )
                lines.append(f"  {setting}: {var} = {shown} is not JSON: give a JSON {what}")
    if len(lines) == 1:
        lines.append(f"  {err}")
    return "\n".join(lines)


def _maps(model: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Where ``model`` holds a map (remote_write.headers, agent.sample_every, ...), through
    its sections and tables: each such field's path."""
    found = []
    for name, field in model.model_fields.items():
        members = _members(field.annotation)
        if members is not None:
            if members[0] is not None:  # (a list is replaced whole anyway)
                found.append((*path, name))
        elif (table := _model_of(field.annotation)) is not None:
            found += _maps(table, (*path, name))
    return found


def _given_whole(path: tuple[str, ...], env: dict[str, str]) -> bool:
    """Whether the environment (its names lowercased) gives the map at ``path`` whole: as
    its own variable (KTEL_REMOTE_WRITE__HEADERS), or in a section's or table's given as
    JSON (KTEL_REMOTE_WRITE), not only keys of it (KTEL_AGENT__SAMPLE_EVERY__FILE_CREATED)."""
    for i in range(1, len(path) + 1):
        var = "ktel_" + "__".join(path[:i])
        if var not in env:
            continue
        if i == len(path):
            return True
        try:
            value = json.loads(env[var])
        except ValueError:
            continue  # (pydantic-settings refuses it: _explain_environment)
        for key in path[i:]:
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            return True
    return False


def _without_maps_the_environment_gives(data: dict[str, Any]) -> dict[str, Any]:
    """The file's ``data`` less each map the environment gives whole: pydantic-settings
    merges a map of the environment into the file's, key by key, so that
    KTEL_REMOTE_WRITE__HEADERS='{}' left the file's headers as they were, and no variable
    could take one of them away; it replaces any other value."""
    env = {k.lower(): v for k, v in os.environ.items()}
    for path in _maps(Config):
        if not _given_whole(path, env):
            continue
        table: Any = data
        for key in path[:-1]:
            table = table.get(key) if isinstance(table, dict) else None
        if isinstance(table, dict):
            table.pop(path[-1], None)
    return data


# The largest config file read: a mistaken path (a log, a device) is refused, not read whole.
MAX_FILE_BYTES = 1 << 20


def load(path: str | Path | None = None) -> Config:
    """Load and validate; raises ConfigError with one line per bad field."""
    # Empty, a file was meant and its name lost (an unset shell variable, an empty
    # template value): running on the defaults instead would hide it.
    if path == "":
        raise ConfigError("the config file given (--config) is empty: name the TOML file, or leave it out")
    if path is None:
        path = os.environ.get("KTEL_CONFIG")
        if path == "":
            raise ConfigError(
                "KTEL_CONFIG is set but empty: name the TOML config file in it, or unset it to run "
                "on the defaults and the KTEL_* variables"
            )
    data: dict[str, Any] = {}
    source = "defaults and KTEL_* environment"
    if path:
        source = f"{path} and KTEL_* environment"
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_FILE_BYTES + 1)
            if len(raw) > MAX_FILE_BYTES:
                raise ConfigError(
                    f"config file {path} is larger than {MAX_FILE_BYTES >> 20} MiB: not a ktel configuration"
                )
            data = tomllib.loads(raw.decode())
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"config file {path} is not UTF-8 text (byte {err.start}): save it as UTF-8"
            ) from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
        except RecursionError:
            # tomllib parses nested arrays and inline tables recursively.
            raise ConfigError(
                f"config file {path} nests arrays or tables hundreds deep: not a ktel configuration"
            ) from None
    # A variable naming a section ktel does not have is never read by pydantic-settings,
    # so a misspelt one (KTEL_AGGREGATES__WINDOW_SECONDS) would silently not apply.
    sections = {name.upper() for name in Config.model_fields}
    for var in sorted(os.environ):
        head, delimiter, _ = var.upper().removeprefix("KTEL_").partition("__")
        # Nor one joining its section and setting with one underscore
        # (KTEL_AGGREGATE_WINDOW_SECONDS): it names no section, and so is never read.
        section = next((s for s in sections if head.startswith(s + "_")), None)
        if var.upper().startswith("KTEL_") and not delimiter and section is not None:
            meant = f"KTEL_{section}__{head.removeprefix(section + '_')}"
            raise ConfigError(
                f"invalid ktel configuration ({source}):\n  {var}: not read, as a section and its "
                f"setting are joined by two underscores: did you mean {meant}?"
            )
        if var.upper().startswith("KTEL_") and delimiter and head not in sections:
            close = difflib.get_close_matches(head, sections, n=1)
            hint = f"did you mean KTEL_{close[0]}__...? " if close else ""
            raise ConfigError(
                f"invalid ktel configuration ({source}):\n  {var}: {head.lower()} is not a section "
                f"of ktel's configuration: {hint}the sections are {', '.join(Config.model_fields)}"
            )
    try:
        return Config(**_without_maps_the_environment_gives(data))
    except ValidationError as err:
        raise ConfigError(_explain(err, source)) from None
    except SettingsError as err:
        raise ConfigError(_explain_environment(err, source)) from None
