"""The real agent against the real kernel and a real broker that goes away."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.record.default_records import DefaultRecordBatch
from aiokafka.record.memory_records import MemoryRecords

from edge_agent import control as control_mod
from edge_agent.control import Bounds, Control
from edge_agent.spool import HEADER, Spool
from ktel import config, topics
from ktel.probes import PROBES
from ktel.stack.kafka import LocalKafka
from ktel.topics import TopicSpec, create_topics, topic_partitions
from ktel.wire import (
    CONTROL_TOPIC,
    FILE_CREATED,
    HEARTBEATS_TOPIC,
    RAW_TOPIC,
    ControlCommand,
    RawBatch,
    WireError,
    decode_batch,
    decode_heartbeat,
    encode_batch,
    encode_command,
    event_dict,
)
from ktel.wire.codec import ZSTD_MAGIC
from tests.conftest import need_bpf
from tests.integration.agent_harness import AgentProcess, kill_leftovers, raw_events_under, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.bpf]


@pytest.fixture(autouse=True)
def no_leftover_agents():
    yield
    kill_leftovers()


def make_topics(bootstrap: str) -> None:
    cfg = config.Config(kafka=config.KafkaConfig(bootstrap=bootstrap), agent=config.AgentConfig(host_id="t"))
    asyncio.run(create_topics(bootstrap, topics.specs(cfg)))


def create_files(directory, n, rate_per_s, stop_at=None):
    directory.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    for i in range(n):
        (directory / f"f{i:05d}").touch()
        delay = start + (i + 1) / rate_per_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def raw_codecs(kafka) -> set[int]:
    """The compression codec of every record batch in the broker's ktel.raw log segments."""
    codecs = set()
    for segment in (kafka.data_dir / "logs").glob(f"{RAW_TOPIC}-*/*.log"):
        records = MemoryRecords(segment.read_bytes())
        while (batch := records.next_batch()) is not None:
            codecs.add(batch.compression_type)
    return codecs


def test_broker_down_30s_loses_nothing(private_kafka, tmp_path):
    need_bpf()
    agent = AgentProcess(tmp_path, private_kafka.bootstrap).start()
    target = tmp_path / "workload"
    n, rate = 1000, 25.0  # 40 s of steady file creation
    worker = threading.Thread(target=create_files, args=(target, n, rate))
    worker.start()
    time.sleep(5)
    private_kafka.stop()
    time.sleep(15)
    spooled_during_outage = agent.metric("ktel_agent_spool_bytes")
    time.sleep(15)
    private_kafka.start()
    worker.join()
    agent.wait_until_spool_empty()
    drops = agent.metric("ktel_agent_ringbuf_drops_total", probe="file_created") + agent.metric(
        "ktel_agent_spool_dropped_events_total"
    )
    assert agent.stop() == 0

    events, _dups = raw_events_under(private_kafka.bootstrap, f"{target}/")
    assert spooled_during_outage > 0  # the outage really happened and the spool took the batches
    assert drops == 0
    assert sorted(e["path"] for e in events) == [str(target / f"f{i:05d}") for i in range(n)]
    # Published zstd-compressed by the agent (agent.compression's default), each batch a
    # zstd frame in a record Kafka got without a codec of its own, through the broker's
    # restart too: an idempotent producer broken by it is replaced, not left failing.
    assert raw_codecs(private_kafka) == {DefaultRecordBatch.CODEC_NONE}
    values = [r.value for r in asyncio.run(read_topic(private_kafka.bootstrap, RAW_TOPIC))]
    assert values and all(v[:4] == ZSTD_MAGIC for v in values)


def test_a_quiet_hosts_events_wait_for_more_in_one_batch(kafka, tmp_path):
    """agent.batch_min_events above what the host sends: its events are not sealed on
    every 500 ms tick but held up to agent.batch_hold_ms (4 s). 30 file creations over
    6 s go out in at most 3 batches (at the default, about 12: one a tick), every one
    delivered once. (Other events of the host join the held batches; they can start a
    hold earlier, never make one longer.)"""
    need_bpf()
    make_topics(kafka.bootstrap)
    host = f"quiet-{uuid.uuid4().hex[:8]}"
    agent = AgentProcess(
        tmp_path, kafka.bootstrap, host_id=host, batch_min_events="5000", batch_hold_ms="4000"
    ).start()
    target = tmp_path / "quiet"
    started = time.monotonic()
    create_files(target, 30, rate_per_s=5)
    took = time.monotonic() - started  # 6 s, or longer on a stalled machine
    prefix = f"{target}/"

    def ours() -> dict[int, int]:
        """Our files' events per batch (sequence number) of this host on ktel.raw."""
        per_batch: dict[int, int] = {}
        for rec in asyncio.run(read_topic(kafka.bootstrap, RAW_TOPIC, idle_s=1.0)):
            try:
                batch = decode_batch(rec.value)
            except WireError:
                continue  # (another test's garbage record on the shared broker)
            if batch.host_id == host:
                n = sum(1 for ev in batch.events if event_dict(ev).get("path", "").startswith(prefix))
                if n:
                    per_batch[batch.seq] = per_batch.get(batch.seq, 0) + n
        return per_batch

    deadline = time.monotonic() + 60
    while sum((per_batch := ours()).values()) < 30:
        assert time.monotonic() < deadline, agent.log()
        time.sleep(1)
    assert agent.stop() == 0
    assert sum(per_batch.values()) == 30  # each once
    # Each batch held its first event 4 s: one batch per 4 s of creations, plus the
    # last, plus one for another event of the host starting a hold early.
    assert len(per_batch) <= took // 4 + 2, (took, per_batch)


def test_damaged_spool_is_recovered_and_the_damage_counted(kafka, tmp_path):
    need_bpf()
    make_topics(kafka.bootstrap)
    host = f"spool-{uuid.uuid4().hex[:8]}"
    # A spool left by a previous run: 12 batches, one damaged, the last torn.
    spool = Spool(tmp_path / "agent-state" / "spool")
    sizes = []
    for seq in range(12):
        ev = [FILE_CREATED.id, 1, 2, 2, 0, "old", f"/spooled/{seq}", 0o101, False]
        payload = encode_batch(RawBatch(host, "boot-before", seq, 1, [ev]))
        spool.append(payload, 1)
        sizes.append(HEADER.size + len(payload))
    spool.close()
    [seg] = (tmp_path / "agent-state" / "spool").glob("*.seg")
    data = bytearray(seg.read_bytes())
    data[sum(sizes[:4]) + HEADER.size + 5] ^= 0xFF  # batch 4's payload
    seg.write_bytes(bytes(data[: len(data) - 7]))  # batch 11 torn

    agent = AgentProcess(tmp_path, kafka.bootstrap, host_id=host).start()
    agent.wait_until_spool_empty()
    corrupt = agent.metric("ktel_agent_spool_corrupt_bytes_total")
    assert agent.stop() == 0
    events, _ = raw_events_under(kafka.bootstrap, "/spooled/")
    assert sorted(int(e["path"].rsplit("/", 1)[1]) for e in events) == [0, 1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert corrupt == sizes[4] + sizes[11] - 7
    assert "is damaged at byte" in agent.log()


def test_control_command_lowers_rate_then_deadline_restores_it(kafka, tmp_path):
    need_bpf()
    make_topics(kafka.bootstrap)
    host = f"ctl-{uuid.uuid4().hex[:8]}"
    agent = AgentProcess(tmp_path, kafka.bootstrap, host_id=host).start()
    n = 3000

    create_files(tmp_path / "before", n, rate_per_s=5000)
    # Let the agent publish all of "before" first: an event is weighted with the
    # rate in force when the agent drains it (edge_agent/agent.py, drain_once).
    deadline = time.monotonic() + 60
    while len(raw_events_under(kafka.bootstrap, f"{tmp_path / 'before'}/")[0]) < n:
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.5)
    cmd = ControlCommand(
        f"cmd-{uuid.uuid4().hex[:6]}", host, "file_created", 10, time.time_ns() // 10**6 + 15_000
    )

    async def send():
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
        await producer.start()
        await producer.send_and_wait(CONTROL_TOPIC, encode_command(cmd), key=cmd.key)
        await producer.stop()

    asyncio.run(send())
    deadline = time.monotonic() + 10
    while agent.metric("ktel_agent_sample_every", probe="file_created") != 10:
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.1)
    create_files(tmp_path / "during", n, rate_per_s=5000)
    while agent.metric("ktel_agent_sample_every", probe="file_created") != 1:
        assert time.monotonic() < deadline + 30, agent.log()
        time.sleep(0.2)
    create_files(tmp_path / "after", n, rate_per_s=5000)
    agent.wait_until_spool_empty()
    time.sleep(1.5)  # one more heartbeat
    assert agent.stop() == 0

    phases = {
        p: raw_events_under(kafka.bootstrap, f"{tmp_path / p}/")[0] for p in ("before", "during", "after")
    }
    counts = {p: len(evs) for p, evs in phases.items()}
    assert counts["before"] == n and counts["after"] == n
    # 1 in 10 of 3000 is binomial(3000, 0.1): mean 300, sd 16.4; +-6 sd.
    assert 200 <= counts["during"] <= 400, counts
    # Each kept event stands for 10, so weighted counts estimate the true count.
    assert {e["weight"] for e in phases["during"]} == {10.0}
    assert {e["weight"] for e in phases["before"] + phases["after"]} == {1.0}
    beats = [decode_heartbeat(r.value) for r in asyncio.run(read_topic(kafka.bootstrap, HEARTBEATS_TOPIC))]
    mine = [b for b in beats if b["host"]["host.id"] == host]
    assert any(cmd.id in b["acked_commands"] for b in mine)
    assert any(b["probes"]["file_created"]["command"] == cmd.id for b in mine)
    assert mine[-1]["probes"]["file_created"] == {
        "loaded": True,
        "reason": "",
        "sample_every": 1,
        "command": None,
    }
    assert mine[-1]["host"]["os.version"] and mine[-1]["counters"]["events_published"] > 0


# The capabilities the README documents for running the agent without full root.
AGENT_CAPS = "+bpf,+perfmon"


def test_agent_with_only_its_documented_capabilities_publishes(kafka, tmp_path):
    need_bpf()
    make_topics(kafka.bootstrap)
    host = f"caps-{uuid.uuid4().hex[:8]}"
    # uid 0 stays the owner of the agent's files, but securebits noroot makes it
    # get no capability from being root: only the ambient set below.
    wrapper = [
        "setpriv",
        f"--inh-caps=-all,{AGENT_CAPS}",
        f"--ambient-caps=-all,{AGENT_CAPS}",
        f"--bounding-set=-all,{AGENT_CAPS}",
        "--securebits=+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked",
    ]
    # Heartbeats an hour apart: the ones this test sees are the first, sent on connecting,
    # and the last, sent on stopping.
    agent = AgentProcess(tmp_path, kafka.bootstrap, wrapper=wrapper, host_id=host, heartbeat_seconds="3600")
    agent.start()
    status = Path(f"/proc/{agent.proc.pid}/status").read_text()
    cap_eff = int(status.split("CapEff:")[1].split()[0], 16)
    assert cap_eff == (1 << 38) | (1 << 39)  # CAP_PERFMON (38) and CAP_BPF (39), nothing else
    create_files(tmp_path / "capped", 23, rate_per_s=1000)
    deadline = time.monotonic() + 30
    while agent.metric("ktel_agent_events_published_total") < 23:
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.2)
    agent.wait_until_spool_empty()
    while agent.metric("ktel_agent_heartbeats_total") < 1:  # the one sent on connecting
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.2)
    assert agent.stop() == 0
    events, _ = raw_events_under(kafka.bootstrap, f"{tmp_path / 'capped'}/")
    assert len(events) == 23
    beats = [decode_heartbeat(r.value) for r in asyncio.run(read_topic(kafka.bootstrap, HEARTBEATS_TOPIC))]
    [first, last] = [b for b in beats if b["host"]["host.id"] == host]
    assert first["probes"]["file_created"]["loaded"] and first["host"]["boot.id"]
    # Stopped by a signal: its last heartbeat says so (no page for its silence from now on).
    assert "stopping" not in first and last["stopping"] is True and last["ts"] >= first["ts"]
    # The node's SLI readings, the BPF map's fill included, with only those capabilities.
    node = first["node"]
    assert node["context_switches"] > 0 and node["cpu_steal_ms"] >= 0
    assert node["map_max_entries.file_created.pending"] == 10240  # bpf/file_created.bpf.c
    assert 0 <= node["map_entries.file_created.pending"] <= 10240


async def send_commands(bootstrap: str, cmds: list[ControlCommand]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for c in cmds:
            await producer.send_and_wait(CONTROL_TOPIC, encode_command(c), key=c.key)
    finally:
        await producer.stop()


def heartbeats_of(bootstrap: str, host: str) -> list:
    beats = [decode_heartbeat(r.value) for r in asyncio.run(read_topic(bootstrap, HEARTBEATS_TOPIC))]
    return [b for b in beats if b["host"]["host.id"] == host]


def test_out_of_bounds_commands_are_refused_counted_and_heartbeats_keep_flowing(kafka, tmp_path):
    need_bpf()
    make_topics(kafka.bootstrap)
    host = f"bounds-{uuid.uuid4().hex[:8]}"
    agent = AgentProcess(tmp_path, kafka.bootstrap, host_id=host, control_max_id_chars="64").start()
    now = time.time_ns() // 10**6
    run = uuid.uuid4().hex[:6]
    bad = {
        "sample_every": ControlCommand(f"big-{run}", host, "file_created", (1 << 63) - 1, now + 60_000),
        "probe": ControlCommand(f"probe-{run}", "*", "no_such_probe", 10, now + 60_000, 60_000),
        "ttl": ControlCommand(f"ttl-{run}", host, "file_created", 10, 1 << 62),
        "id": ControlCommand("i" * 65, host, "file_created", 10, now + 60_000, 60_000),
    }
    asyncio.run(send_commands(kafka.bootstrap, list(bad.values())))
    deadline = time.monotonic() + 30
    while any(agent.metric("ktel_agent_commands_refused_total", reason=r) < 1 for r in bad):
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.2)
    beats_then = agent.metric("ktel_agent_heartbeats_total")
    while agent.metric("ktel_agent_heartbeats_total") < beats_then + 2:  # still flowing
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.2)
    assert agent.metric("ktel_agent_sample_every", probe="file_created") == 1
    assert agent.metric("ktel_agent_commands_applied_total") == 0
    assert agent.stop() == 0

    mine = heartbeats_of(kafka.bootstrap, host)
    refused = {cmd_id: why for b in mine for cmd_id, why in b.get("refused_commands", [])}
    assert refused.keys() == {c.id[:64] for c in bad.values()}, refused
    assert (
        "4294967295" not in refused[bad["sample_every"].id] and "1000000" in refused[bad["sample_every"].id]
    )
    assert mine[-1]["counters"]["commands_refused"] == 4
    assert all(b["acked_commands"] == [] for b in mine)
    assert mine[-1]["probes"]["file_created"]["sample_every"] == 1


def test_a_command_in_force_survives_agent_restarts(kafka, tmp_path):
    need_bpf()
    make_topics(kafka.bootstrap)
    host = f"restart-{uuid.uuid4().hex[:8]}"
    agent = AgentProcess(tmp_path, kafka.bootstrap, host_id=host)
    agent.start()
    # Ten minutes from when the agent applies it: long enough for two restarts.
    cmd = ControlCommand(f"keep-{uuid.uuid4().hex[:6]}", host, "file_created", 7, 0, 600_000)
    asyncio.run(send_commands(kafka.bootstrap, [cmd]))
    deadline = time.monotonic() + 30
    while agent.metric("ktel_agent_sample_every", probe="file_created") != 7:
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.1)
    assert agent.stop() == 0

    # Restarted with its state: in force from the start, before Kafka is read.
    agent.start()
    assert agent.metric("ktel_agent_sample_every", probe="file_created") == 7
    n = 1400
    create_files(tmp_path / "after-restart", n, rate_per_s=5000)
    agent.wait_until_spool_empty()
    assert agent.stop() == 0
    events, _ = raw_events_under(kafka.bootstrap, f"{tmp_path / 'after-restart'}/")
    # The kernel keeps 1 in 7 of 1400: binomial mean 200, sd 13.1; +-6 sd.
    assert 120 <= len(events) <= 280 and {e["weight"] for e in events} == {7.0}

    # Restarted without its state (lost): ktel.control, read back, brings the command back.
    (agent.state_dir / "control.json").unlink()
    agent.start()
    while agent.metric("ktel_agent_sample_every", probe="file_created") != 7:
        assert time.monotonic() < deadline + 60, agent.log()
        time.sleep(0.1)
    beats_then = agent.metric("ktel_agent_heartbeats_total")
    while agent.metric("ktel_agent_heartbeats_total") < beats_then + 2:  # one composed since
        assert time.monotonic() < deadline + 60, agent.log()
        time.sleep(0.2)
    assert agent.stop() == 0
    mine = heartbeats_of(kafka.bootstrap, host)
    assert mine[-1]["probes"]["file_created"]["command"] == cmd.id
    assert mine[-1]["probes"]["file_created"]["sample_every"] == 7
    # Applied anew by the agent that had lost its state, and acknowledged.
    assert mine[-1]["counters"]["commands_applied"] == 1
    assert any(cmd.id in b["acked_commands"] for b in mine)


async def remake_control_topic(bootstrap: str) -> None:
    """ktel.control deleted and created again, empty."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([CONTROL_TOPIC])
    finally:
        await admin.close()
    deadline = time.monotonic() + 60
    while await topic_partitions(bootstrap, CONTROL_TOPIC) is not None:  # (deleted asynchronously)
        assert time.monotonic() < deadline, "ktel.control was not deleted"
        await asyncio.sleep(0.2)
    await create_topics(bootstrap, [TopicSpec(CONTROL_TOPIC, 1)])


def test_commands_sent_to_a_control_topic_made_again_reach_the_running_agent(
    private_kafka: LocalKafka, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ktel.control deleted and made again while the agent follows it, and commands sent
    to the new topic before the agent's next fetch (it was cut off from Kafka meanwhile):
    its position is past the new topic's end. Reset to that end, as aiokafka's default
    does, the consumer passed over those commands; the agent reads the new topic from
    its start."""
    bootstrap = private_kafka.bootstrap
    host = "made-again"
    run = uuid.uuid4().hex[:6]
    tp = TopicPartition(CONTROL_TOPIC, 0)
    consumers: list[AIOKafkaConsumer] = []

    class Held(AIOKafkaConsumer):
        """The follower's consumer, for the test to hold its fetches off."""

        def __init__(self, **settings) -> None:
            super().__init__(**settings)
            consumers.append(self)

    monkeypatch.setattr(control_mod, "AIOKafkaConsumer", Held)
    ctl = Control(host, {}, lambda probe, every: None, Bounds(1000, 3_600_000, 64), tmp_path)

    def command(probe: str, target: str = host) -> ControlCommand:
        return ControlCommand(f"{probe}-{target}-{run}", target, probe, 5, 0, 600_000)

    async def until(done, what: str) -> None:
        deadline = time.monotonic() + 60
        while not await done():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.1)

    async def scenario() -> None:
        follower = asyncio.create_task(ctl.follow(bootstrap))
        try:
            old = [command("file_created"), command("file_created", "h2"), command("process", "h2")]
            await send_commands(bootstrap, old)

            async def judged_old() -> bool:
                return ctl.judged_to == len(old) - 1

            await until(judged_old, "the old topic's commands judged")
            [consumer] = consumers
            # No fetch goes out from now on. The one that may be in flight is answered by
            # the record sent next, of the old topic, which a paused partition drops.
            consumer.pause(tp)
            await send_commands(bootstrap, [command("oom_kill", "h2")])
            await remake_control_topic(bootstrap)
            await send_commands(bootstrap, [command("syscall_latency"), command("tcp_retransmit")])
            consumer.resume(tp)

            async def moved_off() -> bool:  # (to the new topic's end, or its start)
                return await consumer.position(tp) < len(old) + 1

            await until(moved_off, "the follower's position out of the new topic's range")
            await send_commands(bootstrap, [command("runq_latency")])

            async def judged_last() -> bool:
                return ctl.command("runq_latency") is not None

            await until(judged_last, "the command sent last applied")
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower

    asyncio.run(scenario())
    applied = {p: c.id for p in PROBES if (c := ctl.command(p)) is not None}
    assert applied == {
        p: command(p).id for p in ("file_created", "syscall_latency", "tcp_retransmit", "runq_latency")
    }
    # The state file holds the new topic's offset: a start once the new topic grew past the
    # old one's would otherwise pass over its records.
    assert json.loads((tmp_path / "control.json").read_text())["judged_to"] == 2
