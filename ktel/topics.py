"""ktel's topics, with the partition counts, retention and replication the config
gives, and the Kafka admin calls that create and inspect topics."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import BrokerResponseError, KafkaError, TopicAlreadyExistsError, for_code

from ktel.config import Config, KafkaConfig
from ktel.kafka_client import Kafka, client_kwargs, explain, settings

# How long a created topic may take to show in the brokers' metadata (moments, normally).
VISIBLE_WITHIN_S = 30

HOUR_MS = 3_600_000
RAW, OUTPUT = "kafka.raw_partitions", "kafka.output_partitions"
RAW_KEPT, OUTPUT_KEPT = "kafka.raw_retention_hours", "kafka.output_retention_hours"
DLQ_KEPT = "kafka.dlq_retention_hours"
CONTROL_TTL = "agent.control_max_ttl_seconds"
# A retention setting's unit, by the end of its name.
UNIT_MS = {"hours": HOUR_MS, "seconds": 1000}


def unit_ms(setting: str) -> int:
    """How many ms one unit of the retention setting ``setting`` is."""
    return UNIT_MS[setting.rsplit("_", 1)[1]]


@dataclasses.dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    retention_ms: int | None = None
    extra_config: dict[str, str] = dataclasses.field(default_factory=dict)
    # The setting its partition count follows, named when an existing topic differs.
    setting: str = "fixed"
    # The setting its retention follows (in its unit: unit_ms), likewise.
    retention_setting: str = "fixed"


def specs(cfg: Config) -> list[TopicSpec]:
    k, t = cfg.kafka, cfg.kafka.topics

    def retention_ms(setting: str) -> int:
        section, field = setting.split(".")
        return int(getattr(getattr(cfg, section), field) * unit_ms(setting))

    def kept(name: str, partitions: int, retention_setting: str, setting: str = "fixed") -> TopicSpec:
        # The retention is read by the setting's name, so the retention a topic gets and
        # the setting named when an existing topic differs cannot disagree.
        return TopicSpec(
            name,
            partitions,
            retention_ms(retention_setting),
            setting=setting,
            retention_setting=retention_setting,
        )

    # A command may hold agent.control_max_ttl_seconds, and an agent that lost its
    # <state_dir>/control.json reads ktel.control back that far for the commands in
    # force (edge_agent/control.py): kept less long, one still holding would be gone.
    control_kept = max(OUTPUT_KEPT, CONTROL_TTL, key=retention_ms)

    return [
        # Raw batches are the forensic record: kept by time, compressed by the producer.
        kept(t.raw, k.raw_partitions, RAW_KEPT, setting=RAW),
        # Between stages in split mode: keyed and partitioned like ktel.raw, so
        # each stage's per-host table stays co-partitioned with its input.
        *(
            kept(name, k.raw_partitions, OUTPUT_KEPT, setting=RAW)
            for name in (t.deduped, t.enriched, t.sampled)
        ),
        *(
            kept(name, k.output_partitions, OUTPUT_KEPT, setting=OUTPUT)
            for name in (t.metrics, t.spans, t.logs)
        ),
        kept(t.dlq, 1, DLQ_KEPT),
        # Partitioned like ktel.raw: the enrich stage keeps a host's heartbeat in the
        # same table partition as its batches (Faust refuses a table write from a
        # topic whose partition count differs from the table's changelog).
        kept(t.heartbeats, k.raw_partitions, OUTPUT_KEPT, setting=RAW),
        # One partition: every agent reads all commands, in the order they were given.
        kept(t.control, 1, control_kept),
    ]


class TopicMismatch(Exception):
    """An existing topic laid out otherwise than the configuration says."""


async def replication(kafka: Kafka) -> tuple[int, int]:
    """``kafka.replication_factor`` and ``kafka.min_insync_replicas``, "auto" resolved
    against the cluster: 3 replicas (at most as many as there are brokers) and 2 in
    sync where there are 3, so a write survives one broker down and an acknowledged
    record is on two brokers; on fewer brokers, 1 in sync, or a single broker down
    would stop every write."""
    k = settings(kafka)
    rf, isr = k.replication_factor, k.min_insync_replicas
    if rf == "auto" or isr == "auto":
        # The aiokafka admin speaks CreateTopics v3 at most, which cannot ask for the
        # broker's default (-1): the factor is always explicit, so it is found here.
        admin = AIOKafkaAdminClient(**client_kwargs(k))
        try:
            await admin.start()
            brokers = len((await admin.describe_cluster())["brokers"])
        finally:
            await admin.close()
        if rf == "auto":
            rf = max(1, min(3, brokers))
        if isr == "auto":
            isr = 2 if isinstance(rf, int) and rf >= 3 else 1
    assert isinstance(rf, int) and isinstance(isr, int)
    if isr > rf:
        raise TopicMismatch(
            f"kafka.min_insync_replicas = {isr} is above the replication factor {rf}: "
            "no write could be acknowledged; lower it or set kafka.replication_factor"
        )
    return rf, isr


def resolved(kafka: KafkaConfig, rf_isr: tuple[int, int]) -> KafkaConfig:
    """``kafka`` with its replication settings as :func:`replication` found them."""
    return kafka.model_copy(update={"replication_factor": rf_isr[0], "min_insync_replicas": rf_isr[1]})


async def create_topics(kafka: Kafka, specs: list[TopicSpec]) -> None:
    """Create the topics, replicated as ``kafka.replication_factor`` and
    ``kafka.min_insync_replicas`` say; one that already exists is left as it is
    (not reconfigured: :func:`check_layout` compares it)."""
    if not specs:
        return
    rf, isr = await replication(kafka)
    new = []
    for s in specs:
        config = {"min.insync.replicas": str(isr), **{k: str(v) for k, v in s.extra_config.items()}}
        if s.retention_ms is not None:
            config["retention.ms"] = str(s.retention_ms)
        new.append(NewTopic(s.name, s.partitions, rf, topic_configs=config))
    admin = AIOKafkaAdminClient(**client_kwargs(kafka))
    await admin.start()
    try:
        resp = await admin.create_topics(new)
        existed = set()
        for topic, code, message in resp.topic_errors:
            if code == TopicAlreadyExistsError.errno:
                existed.add(topic)
            elif code != 0:
                raise for_code(code)(f"creating topic {topic!r}: {message}")
        # One that existed keeps its partitions, which may be fewer: it is waited for
        # until it shows (another client may have just created it), not for a count it
        # will never have, which ended in "created but not in the brokers' metadata"
        # after VISIBLE_WITHIN_S (`ktel up` on a data dir of fewer kafka.raw_partitions).
        await _until_visible(admin, {s.name: 1 if s.name in existed else s.partitions for s in specs})
    finally:
        await admin.close()


async def _until_visible(admin: AIOKafkaAdminClient, partitions: dict[str, int]) -> None:
    """Wait until the broker's metadata shows every topic with its partitions: a topic
    is created on the controller first, and a Faust worker started on metadata that
    does not show its changelog yet fails with PartitionsMismatch ("0 partitions")."""
    deadline = time.monotonic() + VISIBLE_WITHIN_S
    while True:
        described = await admin.describe_topics(list(partitions))
        missing = [
            t["topic"]
            for t in described
            if t["error_code"] != 0 or len(t["partitions"]) < partitions[t["topic"]]
        ]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise KafkaError(
                f"topics {missing} created but not in the brokers' metadata after {VISIBLE_WITHIN_S}s"
            )
        await asyncio.sleep(0.2)


async def layouts(kafka: Kafka) -> dict[str, tuple[int, int]]:
    """(partitions, replication factor) of each existing topic."""
    admin = AIOKafkaAdminClient(**client_kwargs(kafka))
    try:
        await admin.start()
        # Every topic, not just some: asking for a missing topic by name can
        # make the broker auto-create it with its default partition count.
        described = await admin.describe_topics()
    finally:
        await admin.close()
    return {
        t["topic"]: (len(t["partitions"]), min((len(p["replicas"]) for p in t["partitions"]), default=0))
        for t in described
        if t["error_code"] == 0
    }


async def topic_configs(kafka: Kafka, names: list[str]) -> dict[str, dict[str, str]]:
    """Each of the existing topics ``names``' configuration, as in force (the brokers'
    defaults included)."""
    if not names:
        return {}
    admin = AIOKafkaAdminClient(**client_kwargs(kafka))
    try:
        await admin.start()
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
    finally:
        await admin.close()
    out = {}
    for response in responses:
        for code, message, _type, name, entries in response.resources:
            if code != 0:
                raise for_code(code)(f"describing the configuration of topic {name!r}: {message}")
            out[name] = {entry[0]: entry[1] for entry in entries}
    return out


async def check_layout(kafka: Kafka, specs: list[TopicSpec]) -> list[str]:
    """How each existing topic of ``specs`` differs from the configuration (empty: none
    does): its partitions, replicas, and the settings :func:`create_topics` gives it."""
    k = settings(kafka)
    rf, isr = await replication(k)
    have = await layouts(k)
    wanted_rf = f"{rf}" if k.replication_factor == rf else f"{k.replication_factor} ({rf} on this cluster)"
    wanted_isr = (
        f"{isr}" if k.min_insync_replicas == isr else f"{k.min_insync_replicas} ({isr} on this cluster)"
    )
    existing = [s for s in specs if s.name in have]
    configs = await topic_configs(k, [s.name for s in existing])
    wrong = []
    for s in existing:
        partitions, replicas = have[s.name]
        if partitions != s.partitions:
            want = f"ktel needs {s.partitions}" if s.setting == "fixed" else f"{s.setting} = {s.partitions}"
            wrong.append(f"{s.name} has {partitions} partitions but {want}")
        if replicas != rf:
            wrong.append(f"{s.name} has {replicas} replicas but kafka.replication_factor = {wanted_rf}")
        # What create_topics would give it, which an existing topic keeps otherwise.
        wanted = {"min.insync.replicas": (str(isr), f"kafka.min_insync_replicas = {wanted_isr}")}
        if s.retention_ms is not None:
            if s.retention_setting == "fixed":
                kept = f"ktel needs {s.retention_ms}"
            else:
                given = s.retention_ms / unit_ms(s.retention_setting)
                kept = f"{s.retention_setting} = {given:g} ({s.retention_ms} ms)"
            wanted["retention.ms"] = (str(s.retention_ms), kept)
        for key, value in s.extra_config.items():
            wanted[key] = (str(value), f"ktel needs {value}")
        got = configs.get(s.name, {})
        for key, (value, why) in wanted.items():
            if got.get(key) != value:
                wrong.append(f"{s.name} has {key} = {got.get(key)} but {why}")
    return wrong


async def partition_counts(kafka: Kafka) -> dict[str, int]:
    """How many partitions each existing topic has."""
    return {topic: n for topic, (n, _) in (await layouts(kafka)).items()}


async def topic_partitions(kafka: Kafka, topic: str) -> int | None:
    """How many partitions ``topic`` has; None if it does not exist."""
    return (await partition_counts(kafka)).get(topic)


async def ensure(cfg: Config, say: Callable[[str], None]) -> int:
    """``ktel topics``: refuse if an existing ktel topic is laid out otherwise than the
    configuration says (exit status 1), else create the missing ones and say what
    each is (0); exit status 1 also, saying why, when Kafka cannot be reached, cannot
    give the replication configured, or refuses to create a topic. Nothing is changed
    on a refusal: Kafka cannot lower a partition count, and a topic's replicas are an
    operator's to move."""
    wanted = specs(cfg)
    k = cfg.kafka
    try:
        wrong = await check_layout(k, wanted)
    except TopicMismatch as err:  # a replication this cluster cannot give
        say(f"ktel topics: {err}")
        return 1
    except (KafkaError, OSError) as err:
        say(f"ktel topics: {await explain(err, k)}")
        return 1
    if wrong:
        for line in wrong:
            say(f"ktel topics: {line}")
        say(
            "ktel topics: refusing to go on: change the setting named to match the topic, or "
            "recreate, reassign or reconfigure (kafka-configs.sh) the topic to match the setting"
        )
        return 1
    try:
        rf, isr = await replication(k)
        await create_topics(resolved(k, (rf, isr)), wanted)
    except BrokerResponseError as err:
        # Kafka's own answer (more replicas than brokers, a topic policy, no right to
        # create topics), which says what is wrong: not a Kafka out of reach.
        say(f"ktel topics: Kafka at {k.bootstrap} refused: {err}")
        return 1
    except (KafkaError, OSError) as err:
        say(f"ktel topics: {await explain(err, k)}")
        return 1
    for s in wanted:
        retention = "unlimited" if s.retention_ms is None else f"{s.retention_ms} ms"
        say(
            f"{s.name}: {s.partitions} partitions, replication factor {rf}, "
            f"min.insync.replicas {isr}, retention {retention}"
        )
    return 0
