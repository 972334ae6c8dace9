"""The topics' layout as the config gives it (ktel/topics.py). Creating them on a real
broker is tested in tests/integration (test_raw_topic.py, test_kafka_cluster.py)."""

from __future__ import annotations

import asyncio

import pytest

from ktel import config, topics

DAY_S = 86_400


def cfg(output_retention_hours: float, control_max_ttl_seconds: float) -> config.Config:
    return config.Config(
        kafka=config.KafkaConfig(output_retention_hours=output_retention_hours),
        agent=config.AgentConfig(host_id="t", control_max_ttl_seconds=control_max_ttl_seconds),
    )


def spec(c: config.Config, name: str) -> topics.TopicSpec:
    [s] = [s for s in topics.specs(c) if s.name == name]
    return s


@pytest.mark.parametrize(
    "hours, ttl, kept_ms, setting",
    [
        (24, 3600, DAY_S * 1000, "kafka.output_retention_hours"),  # the defaults
        (24, DAY_S, DAY_S * 1000, "kafka.output_retention_hours"),  # as long: the output's
        (24, 7 * DAY_S, 7 * DAY_S * 1000, "agent.control_max_ttl_seconds"),
        (1.5, 7200, 7_200_000, "agent.control_max_ttl_seconds"),
    ],
)
def test_the_control_topic_keeps_a_command_as_long_as_it_may_hold(hours, ttl, kept_ms, setting) -> None:
    """An agent that lost its control.json reads ktel.control back
    agent.control_max_ttl_seconds for the commands in force: kept only
    kafka.output_retention_hours, a command holding longer was gone at such a restart."""
    c = cfg(hours, ttl)
    control = spec(c, c.kafka.topics.control)
    assert (control.retention_ms, control.retention_setting) == (kept_ms, setting)
    # The other output topics keep their own retention.
    assert spec(c, c.kafka.topics.heartbeats).retention_ms == int(hours * topics.HOUR_MS)


def test_an_existing_control_topic_kept_less_long_is_named_with_the_ttl_in_seconds(monkeypatch) -> None:
    c = cfg(24, 2 * DAY_S)
    control = spec(c, c.kafka.topics.control)

    async def replication(kafka):
        return 1, 1

    async def layouts(kafka):
        return {control.name: (1, 1)}

    async def topic_configs(kafka, names):
        return {control.name: {"min.insync.replicas": "1", "retention.ms": str(DAY_S * 1000)}}

    monkeypatch.setattr(topics, "replication", replication)
    monkeypatch.setattr(topics, "layouts", layouts)
    monkeypatch.setattr(topics, "topic_configs", topic_configs)
    assert asyncio.run(topics.check_layout(c.kafka, [control])) == [
        f"{control.name} has retention.ms = 86400000 but "
        "agent.control_max_ttl_seconds = 172800 (172800000 ms)"
    ]


class _OneBroker:
    """An admin client of a cluster of one broker and no topics, whose CreateTopics
    answers ``create_code`` for each topic."""

    create_code = 0

    def __init__(self, **_kwargs) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def describe_cluster(self):
        return {"brokers": [{"node_id": 1}], "cluster_id": "c"}

    async def describe_topics(self, names=None):
        return []

    async def describe_configs(self, resources):
        return []

    async def create_topics(self, new):
        class Answer:
            topic_errors = [(t.name, self.create_code, "no") for t in new]

        return Answer()


@pytest.mark.parametrize(
    "kafka, create_code, said",
    [
        # "auto" replicas on one broker is 1, below the 2 in sync asked for: found against
        # the cluster, so only `ktel topics` can tell.
        (
            {"min_insync_replicas": 2},
            0,
            "kafka.min_insync_replicas = 2 is above the replication factor 1",
        ),
        # Kafka refuses the topics it is asked to create (38: InvalidReplicationFactor,
        # three replicas on one broker).
        ({"replication_factor": 3}, 38, "creating topic"),
    ],
)
def test_ktel_topics_names_what_is_wrong_and_exits_1_without_a_traceback(
    monkeypatch, kafka, create_code, said
) -> None:
    """A replication the cluster cannot give, and topics Kafka refuses to create, end
    `ktel topics` (and the chart's topics Job) with a line saying so and exit status 1,
    as a topic laid out otherwise does: they raised out of ensure, a traceback."""
    monkeypatch.setattr(_OneBroker, "create_code", create_code)
    monkeypatch.setattr(topics, "AIOKafkaAdminClient", _OneBroker)
    c = config.Config(kafka=config.KafkaConfig(**kafka), agent=config.AgentConfig(host_id="t"))
    lines: list[str] = []
    assert asyncio.run(topics.ensure(c, lines.append)) == 1
    assert any(line.startswith("ktel topics: ") and said in line for line in lines), lines
