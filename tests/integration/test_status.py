"""`ktel status` against a real broker and real agents (BPF in the running kernel):
two agents with their own host ids, one stopped mid-test, which `ktel status` then
shows stale and exits 1 for; the --json document checked against its schema. The
agents' /healthz and /readyz answer too."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import jsonschema
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ktel import config, status, topics
from ktel.topics import create_topics
from ktel.wire import HEARTBEATS_TOPIC, METRICS_TOPIC, encode_heartbeat
from tests.conftest import need_bpf
from tests.integration.agent_harness import AgentProcess, kill_leftovers, start_group_at_end

pytestmark = pytest.mark.kafka

# Well above the agents' 1 s heartbeats on a busy machine, well below the test's patience.
STALE_AFTER_S = 15


@pytest.fixture(autouse=True)
def no_leftover_agents():
    yield
    kill_leftovers()


def ktel_status(bootstrap: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ktel.cli", "status", "--stale-after", str(STALE_AFTER_S), *args],
        env={**os.environ, "KTEL_KAFKA__BOOTSTRAP": bootstrap, "KTEL_AGENT__HOST_ID": "status-cli"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def status_json(bootstrap: str, hosts: list[str]) -> tuple[int, dict]:
    out = ktel_status(bootstrap, "--json", *(a for h in hosts for a in ("--host", h)))
    assert out.returncode in (0, 1), out.stderr[-3000:]
    doc = json.loads(out.stdout)
    jsonschema.validate(doc, status.SCHEMA)
    return out.returncode, doc


def wait_for(what: str, check, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(1)


@pytest.mark.bpf
def test_status_shows_both_agents_then_the_stopped_one_stale(kafka, tmp_path):
    need_bpf()
    bootstrap = kafka.bootstrap
    cfg = config.Config(kafka=config.KafkaConfig(bootstrap=bootstrap), agent=config.AgentConfig(host_id="t"))
    asyncio.run(create_topics(bootstrap, topics.specs(cfg)))
    # Groups of ktel's naming, for the groups table: committed at the end, so no lag of
    # their own. Two, so that the broker describes several groups in one answer.
    group, other = (f"ktel-export-status-{uuid.uuid4().hex[:8]}" for _ in range(2))
    for g in (group, other):
        asyncio.run(start_group_at_end(bootstrap, g, METRICS_TOPIC))

    run = uuid.uuid4().hex[:8]
    ids = [f"status-a-{run}", f"status-b-{run}"]
    agents = []
    for host_id in ids:
        (tmp_path / host_id).mkdir()
        # file_created loads here; ktel_api needs ktel's module, so where it is absent
        # the agent reports it failed, with the reason.
        agents.append(
            AgentProcess(
                tmp_path / host_id, bootstrap, host_id=host_id, probes='["file_created", "ktel_api"]'
            )
        )
    for agent in agents:
        agent.start(timeout=300)

    for agent in agents:
        assert httpx.get(f"http://127.0.0.1:{agent.port}/healthz", trust_env=False).status_code == 200
        wait_for(
            "the agent's /readyz",
            lambda a=agent: (
                httpx.get(f"http://127.0.0.1:{a.port}/readyz", trust_env=False).status_code == 200
            ),
        )

    def both_fresh():
        code, doc = status_json(bootstrap, ids)
        fresh = [h for h in doc["hosts"] if not h["stale"]]
        return (code, doc) if len(fresh) == 2 else None

    code, doc = wait_for("both hosts fresh", both_fresh)
    assert code == 0
    assert [h["host_id"] for h in sorted(doc["hosts"], key=lambda h: h["host_id"])] == ids
    for h in doc["hosts"]:
        assert h["kernel"] == os.uname().release
        assert h["agent_version"]
        assert "file_created" in h["probes_loaded"]
        assert all(why for why in h["probes_failed"].values())
        assert set(h["probes_loaded"]) | set(h["probes_failed"]) == {"file_created", "ktel_api"}
        assert h["age_s"] <= STALE_AFTER_S
    # Described right, each of them (not misread as the answer's first group's neighbour).
    assert {g["group"]: g["state"] for g in doc["groups"] if g["group"] in (group, other)} == {
        group: "Empty",
        other: "Empty",
    }
    [g] = [g for g in doc["groups"] if g["group"] == group]
    assert g["lag"] == 0 and g["members"] == 0

    stopped, running = agents[0], agents[1]
    assert stopped.stop() == 0

    def first_stale():
        code, doc = status_json(bootstrap, ids)
        return (code, doc) if doc["stale_hosts"] else None

    code, doc = wait_for("the stopped agent's host stale", first_stale)
    assert code == 1
    assert doc["stale_hosts"] == [ids[0]]
    by_id = {h["host_id"]: h for h in doc["hosts"]}
    assert by_id[ids[0]]["stale"] and by_id[ids[0]]["age_s"] > STALE_AFTER_S
    assert not by_id[ids[1]]["stale"]

    # The table, for people: both hosts, the stale one marked, and the same exit status.
    table = ktel_status(bootstrap, "--host", ids[0], "--host", ids[1])
    assert table.returncode == 1, table.stderr[-3000:]
    stale_line = next(line for line in table.stdout.splitlines() if ids[0] in line)
    assert "STALE" in stale_line
    fresh_line = next(line for line in table.stdout.splitlines() if ids[1] in line)
    assert "STALE" not in fresh_line
    assert group in table.stdout
    assert running.proc is not None and running.proc.poll() is None


def test_watch_refreshes_until_ctrl_c(kafka, tmp_path):
    """--watch --json: one document per refresh, each reading Kafka again; Ctrl-C ends it
    with the last refresh's exit status."""
    bootstrap = kafka.bootstrap
    cfg = config.Config(kafka=config.KafkaConfig(bootstrap=bootstrap), agent=config.AgentConfig(host_id="t"))
    asyncio.run(create_topics(bootstrap, topics.specs(cfg)))
    host_id = f"status-watch-{uuid.uuid4().hex[:8]}"

    def beat(ts: int) -> None:
        record = {"ts": ts, "host": {"host.id": host_id}, "probes": {}, "counters": {}}
        asyncio.run(produce(bootstrap, HEARTBEATS_TOPIC, host_id.encode(), encode_heartbeat(record)))

    first = time.time_ns() // 1_000_000
    beat(first)
    watch = subprocess.Popen(
        [sys.executable, "-m", "ktel.cli", "status", "--json", "--watch", "1", "--host", host_id,
         "--stale-after", "3600"],
        env={**os.environ, "KTEL_KAFKA__BOOTSTRAP": bootstrap, "KTEL_AGENT__HOST_ID": "status-cli"},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    try:
        assert watch.stdout is not None
        doc = json.loads(watch.stdout.readline())
        jsonschema.validate(doc, status.SCHEMA)
        assert [h["last_heartbeat_ms"] for h in doc["hosts"]] == [first]
        second = first + 1000
        beat(second)
        # Each line is a later refresh; one of them sees the newer heartbeat.
        while [h["last_heartbeat_ms"] for h in doc["hosts"]] != [second]:
            line = watch.stdout.readline()
            assert line, "ktel status --watch ended on its own"
            doc = json.loads(line)
        watch.send_signal(signal.SIGINT)
        assert watch.wait(120) == 0
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()


async def produce(bootstrap: str, topic: str, key: bytes, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


def test_a_partition_a_group_has_not_committed_in_lags_by_its_records(kafka):
    """A group reads such a partition from its beginning (ktel's groups start at
    "earliest"): a partition its topic gained, or one not yet committed in, lags by all
    its records."""
    bootstrap = kafka.bootstrap
    topic = f"status-lag-{uuid.uuid4().hex[:8]}"
    group = f"ktel-export-lag-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_topics(bootstrap, [topics.TopicSpec(topic, 3)]))

    async def produce_and_commit() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            for partition, n in ((0, 2), (2, 3)):
                for _ in range(n):
                    await producer.send_and_wait(topic, b"x", partition=partition)
        finally:
            await producer.stop()
        # The group's commits: partition 0 at its end, partition 1 (empty) and 2 none.
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([TopicPartition(topic, 0)])
            await consumer.commit({TopicPartition(topic, 0): 2})
        finally:
            await consumer.stop()

    asyncio.run(produce_and_commit())
    got = asyncio.run(status.read(bootstrap, since_s=60))
    [row] = [status.group_row(*g) for g in got.groups if g[0] == group]
    assert row["lag_by_topic"] == {topic: 3}
