"""kafka.prefix: every topic, consumer group and Faust app of one pipeline under one
prefix, so several pipelines share a cluster. The real-broker test is in
tests/integration/test_kafka_prefix.py."""

from __future__ import annotations

import pytest

from ktel import acls, config, topics
from ktel.wire import DLQ_TOPIC, RAW_TOPIC
from processors.chain import PROCESSES
from tests.unit.test_stage_shells import RESOLVED, Shell, batch, file_created

NAMES = {
    "ktel.raw", "ktel.deduped", "ktel.enriched", "ktel.sampled", "ktel.metrics",
    "ktel.spans", "ktel.logs", "ktel.dlq", "ktel.heartbeats", "ktel.control",
}  # fmt: skip


def cfg(prefix: str = "") -> config.Config:
    return config.Config(kafka=config.KafkaConfig(prefix=prefix), agent=config.AgentConfig(host_id="t"))


def test_without_a_prefix_the_names_are_unchanged():
    assert {s.name for s in topics.specs(cfg())} == NAMES
    t = cfg().kafka.topics
    assert (t.raw, t.dlq, t.group("dedupe")) == (RAW_TOPIC, DLQ_TOPIC, "ktel-dedupe")


def test_a_prefix_starts_every_topic_name():
    assert {s.name for s in topics.specs(cfg("blue."))} == {f"blue.{n}" for n in NAMES}


def test_a_prefix_from_the_environment(monkeypatch):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    monkeypatch.setenv("KTEL_KAFKA__PREFIX", "staging-")
    assert config.load().kafka.topics.heartbeats == "staging-ktel.heartbeats"


@pytest.mark.parametrize("bad", ["a b", "blue/", "x" * 201])
def test_a_prefix_kafka_cannot_name_is_refused_naming_the_setting(monkeypatch, bad):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "abc")
    monkeypatch.setenv("KTEL_KAFKA__PREFIX", bad)
    with pytest.raises(config.ConfigError, match=r"kafka\.prefix") as err:
        config.load()
    assert "letters, digits" in str(err.value)


def test_acls_grant_only_the_prefixed_names():
    k = cfg("blue.").kafka
    names = [
        argv[i + 1]
        for argv in acls.commands(k, PROCESSES)
        for i, flag in enumerate(argv)
        if flag in ("--topic", "--group")
    ]
    assert names and all(n.startswith("blue.ktel") for n in names), names
    assert "blue.ktel-export-" in names and "blue.ktel-all" in names and "blue.ktel-all-" in names
    assert {n for n in names if "." in n.removeprefix("blue.")} == {f"blue.{n}" for n in NAMES}


async def test_a_stage_reads_writes_and_keeps_its_table_under_the_prefix(tmp_path):
    kafka = RESOLVED.model_copy(update={"prefix": "blue."})
    async with Shell(tmp_path, "dedupe", kafka=kafka) as shell:
        assert shell.app.conf.id == "blue.ktel-dedupe"
        assert set(shell.app.listed) == {"blue.ktel.raw"}
        await shell.put(batch(0, [file_created(1, "/a")]), b"\x92garbage")
        assert len(shell.to("blue.ktel.deduped")) == 1
        assert len(shell.to("blue.ktel.dlq")) == 1
        assert shell.changelog  # recorded only from the prefixed changelog topic
        assert not [t for t, _k, _v in shell.sent if not t.startswith("blue.")]


def test_a_prefix_gives_the_stages_their_own_data_directory():
    """The tables' on-disk copies are named by table, so two pipelines sharing
    process.data_dir would otherwise read each other's."""
    from processors.stages import data_dir

    plain = config.Config(agent=config.AgentConfig(host_id="h"))
    blue = config.Config(agent=config.AgentConfig(host_id="h"), kafka=config.KafkaConfig(prefix="blue."))
    assert data_dir(plain, "all") == plain.process.data_dir / "all"  # where it always was
    assert data_dir(blue, "all") == blue.process.data_dir / "blue.all"
