"""The stages' Faust runner (processors/stages.py), each process driven as its worker
is: its source's records and heartbeats given to the handlers its fetch loop hands
them to (processors/faust_app.py, ``App.take_in_lists``); what it sends to its sink and
to ktel.dlq is recorded instead of produced (the timers, which send snapshots and
fidelity commands, do not run here). The stages' chains have their golden tests;
these check the wiring around them (which topics, which table, what is dropped, what
is counted). The real-broker tests are in
tests/integration/test_processing_stages.py."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import inspect
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from aiokafka.partitioner import murmur2
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import TopicPartition
from faust.types import TP, Message
from prometheus_client import REGISTRY

from ktel import config
from ktel.wire import (
    DEDUPED_TOPIC,
    DLQ_TOPIC,
    ENRICHED_TOPIC,
    FILE_CREATED,
    HEARTBEATS_TOPIC,
    METRICS_TOPIC,
    PROCESS_EXEC,
    RAW_TOPIC,
    SAMPLED_TOPIC,
    RawBatch,
    decode_batch,
    decode_dead_letter,
    decode_heartbeat,
    decode_snapshot,
    encode_batch,
    encode_heartbeat,
)
from ktel.wire.codec import SEND_MAX_BYTES
from ktel.wire.raw import HOST_CHARS
from processors import changelog, enrich_core, sample_core, stages

T = 1_700_000_000_000_000_000
DUPLICATES = "ktel_processor_duplicate_batches_total"


def file_created(pid: int, path: str) -> list:
    return [FILE_CREATED.id, T, pid, pid, 0, "touch", path, 0o101, False]


def exec_event(pid: int, comm: str, exe: str, cg: int = 4242) -> list:
    return [PROCESS_EXEC.id, T, pid, pid, 1, 1000, cg, comm, exe]


def heartbeat(host: str, boot: str, ts: int, name: str, containers: list | None = None) -> bytes:
    return encode_heartbeat(
        {
            "ts": ts,
            "host": {"host.id": host, "host.name": name, "os.type": "linux", "boot.id": boot},
            "probes": {},
            "counters": {},
            **({"containers": containers} if containers is not None else {}),
        }
    )


def batch(seq: int, events: list, host: str = "h1", boot: str = "b1") -> RawBatch:
    return RawBatch(host, boot, seq, T + seq, events)


def metric(name: str, stage: str) -> float:
    return REGISTRY.get_sample_value(name, {"stage": stage}) or 0.0


def evicted(table: str, stage: str) -> float:
    return (
        REGISTRY.get_sample_value("ktel_processor_enrich_evicted_total", {"stage": stage, "table": table})
        or 0.0
    )


def on_partition(key: bytes) -> int:
    """The partition a producer's default partitioner puts a record with ``key`` on."""
    return (murmur2(key) & 0x7FFFFFFF) % RESOLVED.raw_partitions


# As stages.run() hands it to make_app: "auto" replication resolved against the cluster.
RESOLVED = config.KafkaConfig(replication_factor=1, min_insync_replicas=1)


class Shell:
    """One stage's app with its agents under test_context and its sends recorded."""

    def __init__(self, tmp_path, stage: str, **sections):
        sections.setdefault("kafka", RESOLVED)
        sections.setdefault("process", config.ProcessConfig(data_dir=tmp_path / "data", metrics_port=0))
        cfg = config.Config(agent=config.AgentConfig(host_id="t"), **sections)
        self.stage = stage
        self.names = cfg.kafka.topics
        self.app = stages.make_app(cfg, stage)
        self.sent: list[tuple[str, bytes, bytes]] = []
        # The table's changelog records (key, value at the time of sending): a host's
        # snapshot keyed by its id, a delta by a list (processors/changelog.py).
        self.changelog: list[tuple[str | list, Any]] = []
        # None: Kafka acknowledges each changelog record as it is sent; a list: the
        # acknowledgements wait there until the test calls them.
        self.acks_held: list[Any] | None = None
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Shell:
        sent, changelog = self.sent, self.changelog
        changelog_topic = stages.changelog_topic(self.names, self.stage)
        offsets: dict[int, int] = {}  # the changelog's, per partition

        async def record(_app, topic, key, value, partition=None, acked=None):
            if topic == changelog_topic:
                # As serialized for Kafka (the table's JSON), a tombstone as None.
                changelog.append((json.loads(key), None if value is None else json.loads(value)))
                if acked is not None:  # Kafka has it (what a window waits for: stages.ChangelogAcks)
                    offsets[partition] = offset = offsets.get(partition, -1) + 1
                    meta = SimpleNamespace(topic_partition=TopicPartition(topic, partition), offset=offset)
                    if self.acks_held is None:
                        acked(meta)
                    else:  # (Kafka slow to answer: the test acks them)
                        self.acks_held.append(functools.partial(acked, meta))
            else:
                sent.append((topic, key, value))
                if acked is not None:  # (an output Kafka has: stages.OutputsFirst)
                    acked(None)

        self._stack.enter_context(mock.patch.object(stages, "produce", record))
        self.offset = 0
        self.heartbeats = Heartbeats(self)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._stack.aclose()

    async def put(
        self, *records: RawBatch | bytes | None, key: bytes = b"h1", partition: int | None = None
    ) -> None:
        """Each record of the stage's source handled whole, in order, as the worker takes
        a fetched list; ``partition``: where it was written (else where its key puts it)."""
        for r in records:
            value, k = (encode_batch(r), r.key) if isinstance(r, RawBatch) else (r, key)
            await self.take(self.names.topic(stages.SOURCE[self.stage]), k, value, partition)

    async def take(
        self, topic: str, key: bytes, value: bytes | None, partition: int | None, ends_list: bool = True
    ) -> None:
        """``ends_list``: the record is the last of its fetched list (else the next one
        taken is of the same list, and the changelog records the list made are sent only
        once it ends: stages.OutputsFirst)."""
        self.offset += 1
        at = on_partition(key) if partition is None else partition
        message = Message(topic, at, self.offset, time.time(), 0, [], key, value, None)
        await self.app.listed[topic](message)
        if ends_list:
            await self.app.before_acks()

    def ready(self) -> Any:
        """The app, as a worker holding every partition of its source, its table
        recovered: what its timers need to do their work."""
        source = self.names.topic(stages.SOURCE[self.stage])
        held = {TP(source, p) for p in range(RESOLVED.raw_partitions)}
        self.app.assignor.assigned_actives = lambda: held
        self.app.tables.recovery.completed.set()
        if self.app.upstream is not None:  # (the stages before it have passed everything on)
            self.app.upstream.ends, self.app.upstream.until = {}, {}
        return self.app

    def to(self, topic: str) -> list[bytes]:
        return [value for t, _key, value in self.sent if t == topic]

    def table(self, host: str) -> dict:
        return self.app.tables["host-state"][host]

    def silent_long(self, host: str) -> None:
        """``host`` sent its last batch far longer ago than its TTL."""
        self.table(host)["aggregate"]["last_ms"] = 0

    def states(self) -> list[tuple[str, dict]]:
        """At each changelog record, its host's value as a worker would recover it
        from the changelog up to there."""
        data: dict[str, dict] = {}
        out = []
        for key, value in copy.deepcopy(self.changelog):
            host, why = changelog.fold(data, key, value)
            assert why is None, why  # (what a worker writes, recovery takes)
            out.append((host, persisted(data.get(host, {}))))
        return out


class Heartbeats:
    """A stage's ktel.heartbeats, as its worker takes their records."""

    def __init__(self, shell: Shell):
        self.shell = shell

    async def put(
        self, value: bytes, key: bytes, partition: int | None = None, ends_list: bool = True
    ) -> None:
        await self.shell.take(self.shell.names.heartbeats, key, value, partition, ends_list)


def persisted(value: dict) -> dict:
    """A host's value as JSON carries it."""
    return json.loads(json.dumps(value))


async def test_dedupe_passes_each_batch_once_and_dead_letters_garbage(tmp_path):
    b0, b1 = batch(0, [file_created(1, "/a")]), batch(1, [file_created(1, "/b")])
    async with Shell(tmp_path, "dedupe") as shell:
        assert set(shell.app.listed) == {RAW_TOPIC}
        await shell.put(b0, b1, b0, b"\x92garbage", None)  # (None: a tombstone, no value at all)
        assert [decode_batch(v) for v in shell.to(DEDUPED_TOPIC)] == [b0, b1]
        # One changelog record per batch, the re-sent one's too.
        seen = [v["dedupe"]["seen"] for _k, v in shell.states()]
        assert seen == [{"b1": [[0, 0]]}, {"b1": [[0, 1]]}, {"b1": [[0, 1]]}]
        garbage, tombstone = [decode_dead_letter(v) for v in shell.to(DLQ_TOPIC)]
        assert (garbage.stage, garbage.topic, garbage.payload) == ("dedupe", RAW_TOPIC, b"\x92garbage")
        assert (tombstone.payload, tombstone.reason) == (b"", "raw batch: expected bytes, got NoneType")
        assert shell.table("h1")["dedupe"]["seen"] == {"b1": [[0, 1]]}


async def test_enrich_adds_host_and_process_attributes_and_the_feed_pod(tmp_path):
    feed = tmp_path / "pods.jsonl"
    pod = {"container.id": "9f86d0", "k8s.pod.name": "web-0", "k8s.namespace.name": "shop"}
    feed.write_text(json.dumps({"host.id": "h1", "cgroup.id": 4242, **pod}) + "\n")
    before = {m: metric(m, "enrich") for m in ("ktel_processor_heartbeats_total",)}
    async with Shell(tmp_path, "enrich", enrich=config.EnrichConfig(metadata_file=feed)) as shell:
        assert set(shell.app.listed) == {DEDUPED_TOPIC, HEARTBEATS_TOPIC}
        await shell.heartbeats.put(heartbeat("h1", "b1", 1000, "node-1"), key=b"h1")
        # A heartbeat keyed by another host would land in the wrong table partition.
        await shell.heartbeats.put(heartbeat("h1", "b1", 2000, "impostor"), key=b"h2")
        b0 = batch(0, [exec_event(10, "nginx", "/usr/sbin/nginx")])
        b1 = batch(1, [file_created(10, "/var/www/a"), file_created(99, "/tmp/b")])
        await shell.put(b0, b1, b1)

        out = [decode_batch(v) for v in shell.to(ENRICHED_TOPIC)]
        host = {"host.id": "h1", "host.name": "node-1", "os.type": "linux", "boot.id": "b1"}
        nginx = {
            "process.pid": 10,
            "process.parent_pid": 1,
            "process.executable.name": "nginx",
            "process.executable.path": "/usr/sbin/nginx",
            "process.real_user.id": 1000,
            "cgroup.id": 4242,
            **pod,
        }
        # pid 99 was never exec'd: no entry. The re-sent batch is passed on (aggregate drops it).
        assert [(b.seq, b.resource, b.processes) for b in out] == [
            (0, host, {"10": nginx}),
            (1, host, {"10": nginx}),
            (1, host, {"10": nginx}),
        ]
        assert [b.events for b in out] == [b0.events, b1.events, b1.events]
        [dl] = [decode_dead_letter(v) for v in shell.to(DLQ_TOPIC)]
        assert (dl.stage, dl.topic) == ("enrich", HEARTBEATS_TOPIC) and "not its host.id" in dl.reason
        # What is in the table is what a restarted worker recovers from the changelog.
        assert shell.table("h1")["enrich"]["boots"]["b1"]["procs"] == {
            "10": {"ppid": 1, "comm": "nginx", "exe": "/usr/sbin/nginx", "uid": 1000, "cg": 4242}
        }
    assert (
        metric("ktel_processor_heartbeats_total", "enrich") == before["ktel_processor_heartbeats_total"] + 1
    )


async def test_enrich_gives_a_batch_spooled_before_a_reboot_its_own_boots_container_and_feed_lines(tmp_path):
    """cgroup ids start again at every boot: the same id is another container's after a
    reboot. A batch of the boot before, sent after the new boot's heartbeat, takes that
    boot's container and the feed's line naming it, not the current boot's."""
    old, new = "a" * 64, "b" * 64
    feed = tmp_path / "pods.jsonl"
    lines = [
        {"host.id": "h1", "cgroup.id": 4242, "container.id": new, "k8s.pod.name": "web-new"},
        {"host.id": "h1", "boot.id": "b1", "cgroup.id": 4242, "k8s.pod.name": "web-old"},
    ]
    feed.write_text("".join(json.dumps(line) + "\n" for line in lines))
    async with Shell(tmp_path, "enrich", enrich=config.EnrichConfig(metadata_file=feed)) as shell:
        listed = [[4242, {"container.id": old}]]
        await shell.heartbeats.put(heartbeat("h1", "b1", 1000, "node-1", listed), key=b"h1")
        await shell.put(batch(0, [exec_event(10, "web", "/bin/web")]))
        listed = [[4242, {"container.id": new}]]
        await shell.heartbeats.put(heartbeat("h1", "b2", 2000, "node-1", listed), key=b"h1")
        await shell.put(batch(0, [exec_event(10, "web", "/bin/web")], boot="b2"))
        await shell.put(batch(1, [file_created(10, "/srv/a")]))  # spooled by b1, sent now

        out = [decode_batch(v) for v in shell.to(ENRICHED_TOPIC)]
        pods = [
            (b.boot_id, b.processes["10"]["container.id"], b.processes["10"]["k8s.pod.name"]) for b in out
        ]
        assert pods == [("b1", old, "web-old"), ("b2", new, "web-new"), ("b1", old, "web-old")]


async def test_enrich_counts_evictions_past_the_table_bound(tmp_path):
    before = evicted("processes", "enrich")
    async with Shell(tmp_path, "enrich", enrich=config.EnrichConfig(max_processes=2)) as shell:
        await shell.put(batch(0, [exec_event(pid, f"p{pid}", f"/bin/p{pid}") for pid in (1, 2, 3, 4)]))
        await shell.put(batch(1, [file_created(pid, "/x") for pid in (1, 2, 3, 4)]))
        last = decode_batch(shell.to(ENRICHED_TOPIC)[-1])
        assert sorted(last.processes) == ["3", "4"]
    assert evicted("processes", "enrich") == before + 2


async def test_a_heartbeat_naming_too_many_disks_is_taken_and_the_disks_past_the_bound_counted(
    tmp_path, caplog
):
    """Its host attributes are the enrich stage's: one disk too many leaves out that disk's
    series, counted and logged once, not the heartbeat. The disks its agent said it left
    out of the heartbeat are counted with them."""
    from processors import fleet_metrics

    def left_out() -> float:
        labels = {"stage": "enrich", "reading": "disks"}
        return REGISTRY.get_sample_value("ktel_processor_node_readings_left_out_total", labels) or 0.0

    before = left_out()
    node = {f"disk_in_flight.sd{i:03}": 1 for i in range(fleet_metrics.MAX_DISKS + 1)}
    async with Shell(tmp_path, "enrich") as shell:
        for ts, agent_left_out in ((1000, {}), (2000, {"node_left_out": {"disks": 3}})):
            hb = decode_heartbeat(heartbeat("h-disks", "b1", ts, "node-1"))
            hb = {**hb, "node": node, **agent_left_out}  # type: ignore[typeddict-item]
            await shell.heartbeats.put(encode_heartbeat(hb), key=b"h-disks")
        assert shell.to(DLQ_TOPIC) == []
        assert shell.table("h-disks")["enrich"]["boots"]["b1"]["host"]["host.name"] == "node-1"
    assert left_out() == before + 2 + 3
    assert len([r for r in caplog.records if "'h-disks': node readings left out" in r.getMessage()]) == 1


async def test_a_heartbeat_stamped_far_ahead_is_dead_lettered_and_its_hosts_next_are_taken(tmp_path):
    """Taken, it would be the newest of its boot until its time came, and every heartbeat
    its agent sent meanwhile would be ignored as older: the host down, its attributes
    frozen."""
    now_ms = time.time_ns() // 1_000_000
    ahead_ms = round((stages.MAX_HEARTBEAT_AHEAD_S + 60) * 1000)
    async with Shell(tmp_path, "enrich") as shell:
        forged = heartbeat("h-ahead", "b1", now_ms + ahead_ms, "forged-name")
        await shell.heartbeats.put(forged, key=b"h-ahead")
        [letter] = [decode_dead_letter(v) for v in shell.to(DLQ_TOPIC)]
        assert letter.payload == forged
        assert "s ahead of this worker's clock" in letter.reason
        await shell.heartbeats.put(heartbeat("h-ahead", "b1", now_ms, "node-1"), key=b"h-ahead")
        assert shell.table("h-ahead")["enrich"]["boots"]["b1"]["host"]["host.name"] == "node-1"
        # (within the bound: a clock a little ahead is taken)
        await shell.heartbeats.put(heartbeat("h-ahead", "b1", now_ms + 60_000, "node-2"), key=b"h-ahead")
        assert shell.table("h-ahead")["enrich"]["boots"]["b1"]["host"]["host.name"] == "node-2"
        assert len(shell.to(DLQ_TOPIC)) == 1


async def test_heartbeats_that_change_nothing_of_hosts_without_state_leave_no_memory_of_them(tmp_path):
    """A heartbeat without boot.id changes no table value, and of a host new to the worker
    leaves none. The worker's note of what its value on the changelog takes
    (``stages.Persisted``) was kept all the same, and only a rebalance let it go: a
    writer of ktel.heartbeats naming ever new host ids grew it without bound."""
    async with Shell(tmp_path, "enrich") as shell:
        handle = shell.app.listed[HEARTBEATS_TOPIC].keywords["handle"]
        as_persisted = inspect.getclosurevars(handle).nonlocals["as_persisted"]
        persisted = inspect.getclosurevars(as_persisted).nonlocals["persisted"]
        await shell.heartbeats.put(heartbeat("h1", "b1", 1000, "node-1"), key=b"h1")
        for i in range(100):
            host = f"no-boot-{i}"
            hb = encode_heartbeat({"ts": 1000, "host": {"host.id": host}, "probes": {}, "counters": {}})
            await shell.heartbeats.put(hb, key=host.encode())
        assert shell.to(DLQ_TOPIC) == []
        assert list(shell.app.tables["host-state"].data) == ["h1"]
        assert list(persisted) == ["h1"]


async def test_sample_reads_the_enriched_topic_and_keeps_the_attributes(tmp_path):
    sample = config.SampleConfig(baseline=0.5)
    attrs = {"res": {"host.id": "h1"}, "proc": {"1": {"process.pid": 1}}}
    b = RawBatch(
        "h1", "b1", 7, T, [file_created(1, f"/d/{i}") for i in range(50)], None, attrs["res"], attrs["proc"]
    )
    async with Shell(tmp_path, "sample", sample=sample) as shell:
        assert set(shell.app.listed) == {ENRICHED_TOPIC}
        await shell.put(b, b"not a batch")
        [out] = [decode_batch(v) for v in shell.to(SAMPLED_TOPIC)]
        # The core's decision for this batch (seeded by host, boot and seq), not another.
        expected = sample_core.Sampler(sample_core.Options(baseline=0.5)).sample(b)
        assert 0 < len(out.events) < 50
        assert (out.events, out.weights) == (expected.events, expected.weights)
        assert (out.resource, out.processes) == (attrs["res"], attrs["proc"])
        [dl] = [decode_dead_letter(v) for v in shell.to(DLQ_TOPIC)]
        assert (dl.stage, dl.topic) == ("sample", ENRICHED_TOPIC)


async def test_aggregate_folds_batches_into_the_table_once_each(tmp_path):
    async with Shell(tmp_path, "aggregate") as shell:
        assert set(shell.app.listed) == {SAMPLED_TOPIC}
        b0 = batch(0, [file_created(1, "/data/x/f")] * 3)
        b1 = RawBatch("h1", "b1", 1, T, [file_created(1, "/data/x/g")], [10.0])
        await shell.put(b0, b1, b0, b"\x00")
        # Snapshots leave on the stage's timer; a batch sends nothing by itself.
        assert [t for t, _k, _v in shell.sent] == [DLQ_TOPIC]
        series = shell.table("h1")["aggregate"]["series"]
        key = '["file_created_total", [["directory", "/data/x"]]]'
        assert series == {key: 13.0}
        # Each batch's state went to the changelog as the agent handled it (the
        # re-sent one too: its dedupe record may be trimmed), so a worker
        # restarted after any batch recovers exactly the counts up to it.
        assert [(k, v["aggregate"]["series"]) for k, v in shell.states()] == [
            ("h1", {key: 3.0}),
            ("h1", {key: 13.0}),
            ("h1", {key: 13.0}),
        ]


async def test_the_aggregate_closes_no_window_while_its_table_is_being_recovered(tmp_path):
    """A host's value not yet folded up to its changelog's end is old: a window on it would
    report old counts, and forget a host as silent that another worker kept alive."""

    aggregate = config.AggregateConfig(window_seconds=0.05)
    async with Shell(tmp_path, "aggregate", aggregate=aggregate) as shell:
        app = shell.ready()
        await shell.put(batch(0, [file_created(1, "/data/x/f")]))
        window = next(t for t in app._app_tasks if t.__name__ == "window")
        closing = asyncio.ensure_future(window())
        try:
            for _ in range(200):  # (a guard against hanging, not a timing assertion)
                if len(shell.to(METRICS_TOPIC)) >= 2:
                    break
                await asyncio.sleep(0.01)
            # Ready: the window closed, with the host's new series at 0, then its value.
            zero, first = (decode_snapshot(v) for v in shell.to(METRICS_TOPIC))
            assert [row[3] for row in zero.series] == [0.0] and [row[3] for row in first.series] == [1.0]
            app.in_recovery = True  # a rebalance gave it partitions to recover
            await shell.put(batch(1, [file_created(1, "/data/x/g")]))
            await asyncio.sleep(0.5)  # about ten windows due
            assert len(shell.to(METRICS_TOPIC)) == 2
            app.in_recovery = False
            for _ in range(200):
                if len(shell.to(METRICS_TOPIC)) > 2:
                    break
                await asyncio.sleep(0.01)
            assert len(shell.to(METRICS_TOPIC)) == 3  # the first window after: what changed
        finally:
            closing.cancel()
            await asyncio.gather(closing, return_exceptions=True)


async def test_a_batch_taken_while_a_window_waits_for_the_changelog_keeps_its_host(tmp_path):
    """A window that found a host silent for aggregate.host_ttl_seconds waits for Kafka to
    have the changelog before it sends the host's last, stale snapshot and forgets it
    (stages.ChangelogAcks). A batch of the host taken meanwhile is counted into its value
    and committed: the window must not delete that value (its counts would be lost for
    good) nor mark the series it counts into stale."""
    aggregate = config.AggregateConfig(window_seconds=0.05, host_ttl_seconds=60)
    async with Shell(tmp_path, "aggregate", aggregate=aggregate) as shell:
        app = shell.ready()
        await shell.put(batch(0, [file_created(1, "/data/x/f")]))
        shell.silent_long("h1")  # silent far longer than its TTL
        shell.acks_held = []  # another host's batch on its way to the changelog
        await shell.put(batch(0, [file_created(1, "/data/y/f")], host="h2"), key=b"h2")
        waiting = asyncio.Event()
        wait = stages.ChangelogAcks.wait

        async def noted(acks: stages.ChangelogAcks, last: int) -> None:
            waiting.set()
            await wait(acks, last)

        window = next(t for t in app._app_tasks if t.__name__ == "window")
        with mock.patch.object(stages.ChangelogAcks, "wait", noted):
            closing = asyncio.ensure_future(window())
            try:
                await asyncio.wait_for(waiting.wait(), 30)  # (a guard against hanging)
                await shell.put(batch(1, [file_created(1, "/data/x/g")]))  # h1 is back
                for ack in shell.acks_held:
                    ack()
                shell.acks_held = None
                await app.on_before_shutdown.send()  # (returns once the close under way is done)
            finally:
                closing.cancel()
                await asyncio.gather(closing, return_exceptions=True)
        both = {'["file_created_total", [["directory", "/data/x"]]]': 2.0}
        assert shell.table("h1")["aggregate"]["series"] == both
        host, recovered = shell.states()[-1]  # (what a restarted worker has of it)
        assert host == "h1" and recovered["aggregate"]["series"] == both
        assert not any(decode_snapshot(v).stale for v in shell.to(METRICS_TOPIC))


async def two_hosts_gone_silent(shell: Shell) -> None:
    """h1 and h2 (on partitions 3 and 0) each send a batch, then nothing for longer than
    a host_ttl_seconds of 0.1 s and its margin (below the TTL a config may set,
    MIN_HOST_TTL_SECONDS, so the test waits half a second)."""
    for host in ("h1", "h2"):
        await shell.put(batch(0, [file_created(1, "/data/x/f")], host=host), key=host.encode())
    await asyncio.sleep(0.5)


async def test_no_host_of_a_partition_still_being_read_is_forgotten_as_silent(tmp_path):
    """Its next record may be in what the worker has not read yet (App.backlog): h1's
    partition is still being read, h2's is not."""
    aggregate = config.AggregateConfig(window_seconds=0.05).model_copy(update={"host_ttl_seconds": 0.1})
    async with Shell(tmp_path, "aggregate", aggregate=aggregate) as shell:
        app = shell.ready()
        source = shell.names.topic(stages.SOURCE["aggregate"])
        app.backlog = {TopicPartition(source, 3): (0, 10**9)}  # (h1's: read from 0 up to there)
        await two_hosts_gone_silent(shell)
        timer = next(t for t in app._app_tasks if t.__name__ == "forget_silent")
        await inspect.unwrap(timer)()
        assert {k if isinstance(k, str) else k[0] for k, v in shell.changelog if v is None} == {"h2"}


async def test_no_host_of_a_partition_a_stage_before_has_not_passed_on_is_forgotten_as_silent(tmp_path):
    """Split mode: its next record may wait in a stage before this one (processors/upstream.py):
    h1's partition is behind there, h2's is not."""
    aggregate = config.AggregateConfig(window_seconds=0.05).model_copy(update={"host_ttl_seconds": 0.1})
    async with Shell(tmp_path, "aggregate", aggregate=aggregate) as shell:
        app = shell.ready()
        app.upstream.until = {on_partition(b"h1"): app.upstream.checks}
        await two_hosts_gone_silent(shell)
        timer = next(t for t in app._app_tasks if t.__name__ == "forget_silent")
        await inspect.unwrap(timer)()
        assert {k if isinstance(k, str) else k[0] for k, v in shell.changelog if v is None} == {"h2"}
        app.upstream.unknown()  # (Kafka did not answer: nothing is known)
        shell.changelog.clear()
        await inspect.unwrap(timer)()
        assert [k for k, v in shell.changelog if v is None] == []


async def test_a_batch_taken_while_silent_hosts_are_forgotten_keeps_its_host(tmp_path):
    """The hosts no record named for a while are forgotten one after the other, each
    with tombstones that may wait for room in the producer. A batch of a host further
    down that list, taken meanwhile, is counted and committed: its host is alive, and
    its value must stay."""
    # (Below the TTL a config may set, MIN_HOST_TTL_SECONDS, so the test waits half a second.)
    aggregate = config.AggregateConfig(window_seconds=0.05).model_copy(update={"host_ttl_seconds": 0.1})
    async with Shell(tmp_path, "aggregate", aggregate=aggregate) as shell:
        app = shell.ready()
        await two_hosts_gone_silent(shell)
        forget, first, dropped = stages.forget, asyncio.Event(), []

        async def room_awaited(table: Any, key: str, partitions: int, *args: Any) -> None:
            dropped.append(key)
            if not first.is_set():
                first.set()
                await asyncio.sleep(0.05)  # (the producer full: the stream takes a record)
            await forget(table, key, partitions, *args)

        timer = next(t for t in app._app_tasks if t.__name__ == "forget_silent")
        with mock.patch.object(stages, "forget", room_awaited):
            forgetting = asyncio.ensure_future(inspect.unwrap(timer)())  # (the timer's one run)
            await asyncio.wait_for(first.wait(), 30)  # (a guard against hanging)
            back = "h2" if dropped == ["h1"] else "h1"  # (the one not yet forgotten)
            await shell.put(batch(1, [file_created(1, "/data/x/g")], host=back), key=back.encode())
            await forgetting
        assert dropped == ["h2" if back == "h1" else "h1"]
        assert shell.table(back)["aggregate"]["series"] == {
            '["file_created_total", [["directory", "/data/x"]]]': 2.0
        }


async def test_a_batch_of_a_host_being_forgotten_is_handled_only_after_its_tombstones(tmp_path):
    """A forgotten host's tombstones may each wait for room in the producer. A batch of
    that host that comes meanwhile starts it afresh: handled (and so committed) before
    the tombstones are sent, its changelog record is deleted by them (its snapshot key's
    among them), and a worker killed before anything else of the host reaches the
    changelog recovers no such host, the batch's counts lost for good. So the batch waits
    for the tombstones: whenever it is handled, the changelog as recovered has it."""
    # (Below the TTL a config may set, MIN_HOST_TTL_SECONDS, so the test waits half a second.)
    aggregate = config.AggregateConfig(window_seconds=0.05).model_copy(update={"host_ttl_seconds": 0.1})
    async with Shell(tmp_path, "aggregate", aggregate=aggregate) as shell:
        app = shell.ready()
        await shell.put(batch(0, [file_created(1, "/data/x/f")]))
        await asyncio.sleep(0.5)  # silent past host_ttl_seconds (and its margin)
        send, holding, room, tombstoned = stages.send, asyncio.Event(), asyncio.Event(), asyncio.Event()
        fresh = {'["file_created_total", [["directory", "/data/x"]]]': 1.0}
        seen: list[tuple[bool, Any]] = []  # at the first record after the tombstones

        async def room_awaited(table: Any, key: bytes, value: bytes | None, *args: Any) -> None:
            if value is None and not holding.is_set():  # (its first tombstone)
                holding.set()
                await room.wait()  # (the producer full: the stream takes a record)
            if value is not None and tombstoned.is_set() and not seen:
                # What a worker killed now recovers of h1, and whether the batch was handled.
                seen.append((taking.done(), dict(shell.states()).get("h1")))
            await send(table, key, value, *args)
            if value is None and json.loads(key) == ["h1", changelog.SLOTS - 1]:  # (the last)
                tombstoned.set()

        timer = next(t for t in app._app_tasks if t.__name__ == "forget_silent")
        with mock.patch.object(stages, "send", room_awaited):
            forgetting = asyncio.ensure_future(inspect.unwrap(timer)())  # (the timer's one run)
            await asyncio.wait_for(holding.wait(), 30)  # (a guard against hanging)
            taking = asyncio.ensure_future(shell.put(batch(1, [file_created(1, "/data/x/g")])))  # h1 is back
            for _ in range(100):  # (the loop's turns a batch takes if it does not wait)
                if taking.done():
                    break
                await asyncio.sleep(0)
            room.set()
            await asyncio.wait_for(asyncio.gather(forgetting, taking), 30)
        [(handled, recovered)] = seen
        assert not handled or (recovered or {}).get("aggregate", {}).get("series") == fresh
        assert shell.table("h1")["aggregate"]["series"] == fresh
        host, recovered = shell.states()[-1]  # (what a restarted worker has of it)
        assert host == "h1" and recovered == persisted(shell.table("h1"))


async def test_all_runs_the_four_cores_with_heartbeats_in_one_worker(tmp_path):
    before = {m: metric(m, "all") for m in ("ktel_processor_batches_total", DUPLICATES)}
    async with Shell(tmp_path, "all") as shell:
        assert set(shell.app.listed) == {RAW_TOPIC, HEARTBEATS_TOPIC}
        await shell.heartbeats.put(heartbeat("h1", "b1", 1000, "node-1"), key=b"h1")
        b0 = batch(0, [exec_event(10, "make", "/usr/bin/make"), file_created(10, "/src/a/x.o")])
        await shell.put(b0, b0)
        assert shell.sent == []  # fused: nothing between the stages goes to Kafka
        # The heartbeat's and each batch's table value went to the changelog, the
        # re-sent batch's too, with the dedupe record beside the counts it guards.
        states = shell.states()
        assert [k for k, _v in states] == ["h1", "h1", "h1"]
        # The re-sent batch changed nothing but the value's version.
        assert states[2][1] == persisted(shell.table("h1"))
        assert states[1][1] == {**states[2][1], "v": states[2][1]["v"] - 1}
        assert shell.table("h1")["aggregate"]["seen"] == {"b1": [[0, 0]]}
        state = shell.table("h1")
        assert state["aggregate"]["series"] == {
            '["process_execs_total", []]': 1.0,
            '["file_created_total", [["directory", "/src/a"]]]': 1.0,
        }
        boot = state["enrich"]["boots"]["b1"]
        assert boot["host"]["host.name"] == "node-1"
        assert boot["procs"]["10"]["exe"] == "/usr/bin/make"
    assert metric("ktel_processor_batches_total", "all") == before["ktel_processor_batches_total"] + 1
    assert metric(DUPLICATES, "all") == before[DUPLICATES] + 1


@pytest.mark.parametrize("stage", ["dedupe", "all"])
async def test_a_raw_batch_carrying_what_enrich_adds_goes_to_the_dlq(tmp_path, stage):
    """No agent writes ``res`` or ``proc``: carried from ktel.raw, a resource of megabytes
    was copied by the dedupe stage into every part of the batch it passed on."""
    plain = batch(0, [file_created(1, "/a")])
    given = [
        dataclasses.replace(batch(1, [file_created(1, "/b")]), resource={"host.name": "forged"}),
        dataclasses.replace(batch(2, [file_created(1, "/c")]), processes={"1": {"process.owner": "x"}}),
    ]
    async with Shell(tmp_path, stage) as shell:
        await shell.put(plain, *given)
        dead = [decode_dead_letter(v) for v in shell.to(DLQ_TOPIC)]
        reason = "raw batch: it carries res or proc, which enrich adds, not an agent"
        assert [(d.reason, d.payload) for d in dead] == [(reason, encode_batch(b)) for b in given]
        if stage == "dedupe":
            assert [decode_batch(v) for v in shell.to(DEDUPED_TOPIC)] == [plain]


async def test_a_record_written_to_another_partition_than_its_keys_goes_to_the_dlq(tmp_path):
    """Any client can name a partition: a host's record on another one would write the
    host's table value to that partition's changelog too, and recovery would fold the
    two in no set order."""
    async with Shell(tmp_path, "all") as shell:
        wrong = (on_partition(b"h1") + 1) % RESOLVED.raw_partitions
        await shell.heartbeats.put(heartbeat("h1", "b1", 1000, "node-1"), key=b"h1", partition=wrong)
        b0 = batch(0, [file_created(10, "/src/a/x.o")])
        await shell.put(b0, partition=wrong)
        dead = [decode_dead_letter(v) for v in shell.to(DLQ_TOPIC)]
        want = f"host 'h1' is on partition {wrong} of {{}}, not {on_partition(b'h1')}, where its key puts it"
        assert [d.reason for d in dead] == [
            f"heartbeat: {want.format(HEARTBEATS_TOPIC)}",
            f"raw batch: {want.format(RAW_TOPIC)}",
        ]
        assert shell.changelog == [] and "h1" not in shell.app.tables["host-state"]
        await shell.put(b0)  # (where its key puts it)
        assert shell.table("h1")["aggregate"]["series"] == {
            '["file_created_total", [["directory", "/src/a"]]]': 1.0
        }


def test_the_session_timeout_reaches_the_consumer_with_heartbeats_to_match(tmp_path):
    for session, heartbeat, request in [(60, 3.0, 90.0), (10, 1.0, 90.0), (300, 3.0, 300.0)]:
        cfg = config.Config(
            agent=config.AgentConfig(host_id="t"),
            process=config.ProcessConfig(data_dir=tmp_path / "data", session_timeout_seconds=session),
            kafka=RESOLVED,
        )
        conf = stages.make_app(cfg, "all").conf
        got = (conf.broker_session_timeout, conf.broker_heartbeat_interval, conf.broker_request_timeout)
        assert got == (session, heartbeat, request)


def test_an_aggregates_series_alerts_read_are_there_from_its_start(tmp_path):
    """Prometheus' increase() takes a series' first value as its start: an overflow that
    happened once would raise no alert (KtelCardinalityOverflow) were its count made by it.
    And KtelConsumerGroupGone reads that the worker is up before it has read anything.
    (Earlier tests of this process may have counted them: they must be there.)"""
    cfg = config.Config(
        agent=config.AgentConfig(host_id="t"),
        process=config.ProcessConfig(data_dir=tmp_path / "data"),
        kafka=RESOLVED,
    )
    app = stages.make_app(cfg, "aggregate")
    assert (
        REGISTRY.get_sample_value("ktel_processor_series_overflow_total", {"stage": "aggregate"}) is not None
    )
    assert REGISTRY.get_sample_value("ktel_consumer_group_up", {"group": app.conf.id}) == 1
    for why in ("rebalancing", "revoked"):
        labels = {"stage": "aggregate", "reason": why}
        assert REGISTRY.get_sample_value("ktel_processor_snapshots_skipped_total", labels) is not None


async def test_a_host_execing_more_processes_than_its_state_holds_is_persisted_and_counted(tmp_path):
    limit = 65_536
    before = {
        m: metric(m, "all") for m in ("ktel_processor_dead_letters_total", "ktel_processor_events_total")
    }
    before_evicted = evicted("processes", "all")
    async with Shell(
        tmp_path,
        "all",
        process=config.ProcessConfig(data_dir=tmp_path / "data", metrics_port=0, max_state_bytes=limit),
    ) as shell:
        await shell.put(batch(0, [file_created(1, "/a/x")]))
        # 1000 processes with long paths: about 200 KB of process table.
        huge = batch(1, [exec_event(pid, "p", "/opt/" + "x" * 150 + str(pid)) for pid in range(1000, 2000)])
        await shell.put(huge, batch(2, [file_created(1999, "/a/y"), file_created(1000, "/a/z")]))
        assert shell.to(DLQ_TOPIC) == []
        assert shell.table("h1")["aggregate"]["series"] == {
            '["file_created_total", [["directory", "/a"]]]': 3,
            '["process_execs_total", []]': 1000,
        }
        assert [v["aggregate"]["seen"] for _k, v in shell.states()] == [
            {"b1": [[0, 0]]},
            {"b1": [[0, 1]]},
            {"b1": [[0, 2]]},
        ]
        assert all(len(json.dumps(v, separators=(",", ":"))) <= limit for _k, v in shell.changelog)
        # The most recently exec'd are the ones kept.
        procs = shell.table("h1")["enrich"]["boots"]["b1"]["procs"]
        assert "1999" in procs and "1000" not in procs
    after = {m: metric(m, "all") for m in before}
    assert after["ktel_processor_dead_letters_total"] == before["ktel_processor_dead_letters_total"]
    assert after["ktel_processor_events_total"] == before["ktel_processor_events_total"] + 1003
    assert evicted("processes", "all") == before_evicted + 1000 - len(procs)


def test_a_changelog_record_at_the_state_bound_is_one_the_workers_producer_sends(tmp_path):
    """A host's state at process.max_state_bytes, its most, and its host id the longest
    there is, every character escaped as a surrogate pair in its JSON key: its changelog
    record, snapshot or delta, is still one the worker's producer sends. Past its
    producer_max_request_size the producer refuses it before Kafka sees it, and the
    worker stopped on it at every restart (the bound was 1,000,000 bytes of value)."""
    shell = Shell(
        tmp_path, "all", process=config.ProcessConfig(data_dir=tmp_path, max_state_bytes=SEND_MAX_BYTES)
    )
    with pytest.raises(ValueError):
        config.ProcessConfig(max_state_bytes=SEND_MAX_BYTES + 1)
    host = "\U0001f600" * HOST_CHARS
    value = b"x" * SEND_MAX_BYTES
    for key in (json.dumps(host).encode(), changelog.delta_key(host, changelog.SLOTS - 1)):
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, [])
        assert size <= shell.app.conf.producer_max_request_size


async def test_a_batch_refused_by_the_state_bound_leaves_every_piece_of_state_as_it_was(
    tmp_path, monkeypatch
):
    # The enrich tables allowed more than the whole state: what else may grow past
    # the bound (the backstop's case) is made here of processes.
    monkeypatch.setattr(enrich_core, "TABLE_SHARE", 10.0, raising=False)
    chains = []
    build = stages.build
    monkeypatch.setattr(stages, "build", lambda *a: chains.append(build(*a)) or chains[-1])
    limit = 65_536
    async with Shell(
        tmp_path,
        "all",
        process=config.ProcessConfig(data_dir=tmp_path / "data", metrics_port=0, max_state_bytes=limit),
    ) as shell:
        [chain] = chains
        enrich, sample = (next(s for s in chain.stages if s.name == n) for n in ("enrich", "sample"))
        await shell.put(batch(0, [exec_event(1, "sh", "/bin/sh"), file_created(1, "/a/x")]))
        processes = metric("ktel_processor_processes_known", "all")

        def state():
            sampler = sample.sampler
            return copy.deepcopy(
                (
                    persisted(shell.table("h1")),
                    chain.memory,
                    enrich.known,
                    dict(sampler.window_counts),
                    sampler.kind_p,
                    sampler.kept,
                    sampler.sampled_out,
                )
            )

        kept = state()
        huge = batch(1, [exec_event(pid, "p", "/opt/" + "x" * 150 + str(pid)) for pid in range(1000, 2000)])
        await shell.put(huge)
        [dl] = [decode_dead_letter(v) for v in shell.to(DLQ_TOPIC)]
        assert (dl.stage, dl.topic, dl.payload) == ("all", RAW_TOPIC, encode_batch(huge))
        assert "process.max_state_bytes = 65536" in dl.reason
        assert state() == kept  # as if the batch had not come
        # The process gauge still follows the table: one more process, one more.
        await shell.put(batch(2, [exec_event(2, "ls", "/bin/ls")]))
        assert metric("ktel_processor_processes_known", "all") == processes + 1


async def test_a_new_hosts_first_batch_refused_by_the_state_bound_leaves_the_host_unheld(
    tmp_path, monkeypatch
):
    """Nothing of a host whose only record was refused stays in the table, so that hosts
    invented by a writer of such records take no place of process.max_hosts, even once
    the worker counts its hosts again (a rebalance)."""
    monkeypatch.setattr(enrich_core, "TABLE_SHARE", 10.0, raising=False)
    async with Shell(
        tmp_path,
        "all",
        process=config.ProcessConfig(
            data_dir=tmp_path / "data", metrics_port=0, max_state_bytes=65_536, max_hosts=1
        ),
    ) as shell:
        for i in range(3):
            huge = batch(0, [exec_event(p, "p", "/opt/" + "x" * 150 + str(p)) for p in range(1000)], f"n{i}")
            await shell.put(huge)
        assert len(shell.to(DLQ_TOPIC)) == 3
        assert not any(f"n{i}" in shell.app.tables["host-state"] for i in range(3))
        # The worker counts its hosts again, as after a rebalance that left it every partition.
        every = {TP(RAW_TOPIC, p) for p in range(RESOLVED.raw_partitions)}
        monkeypatch.setattr(shell.app.assignor, "assigned_actives", lambda: every)
        await shell.app.on_partitions_assigned.send(every)
        await shell.put(batch(0, [file_created(1, "/a/x")]))
        assert shell.table("h1")["aggregate"]["seen"] == {"b1": [[0, 0]]}
        assert len(shell.to(DLQ_TOPIC)) == 3
        assert metric("ktel_processor_hosts", "all") == 1


async def test_a_host_whose_stored_state_is_past_the_bound_is_forgotten_and_starts_afresh(
    tmp_path, monkeypatch
):
    """A value already past process.max_state_bytes (recovered from a changelog written
    under a higher limit, or a hostile one) had every record that grew it refused, and
    its records kept it from being forgotten as silent: stuck for good. Its first such
    record forgets it instead, and its next starts it afresh."""
    monkeypatch.setattr(enrich_core, "TABLE_SHARE", 10.0, raising=False)
    huge = batch(0, [exec_event(pid, "p", "/opt/" + "x" * 150 + str(pid)) for pid in range(1000)])
    async with Shell(tmp_path, "all") as shell:  # (the default limit)
        await shell.put(huge)
        big = persisted(shell.table("h1"))
    limit = 65_536
    assert len(json.dumps(big, separators=(",", ":"))) > limit
    reset = metric("ktel_processor_hosts_reset_total", "all")
    process = config.ProcessConfig(data_dir=tmp_path / "lowered", metrics_port=0, max_state_bytes=limit)
    async with Shell(tmp_path, "all", process=process) as shell:
        shell.app.tables["host-state"].data["h1"] = big  # as recovery gives it
        grows = batch(1, [exec_event(5000, "q", "/bin/q")])
        await shell.put(grows)
        [dl] = [decode_dead_letter(v) for v in shell.to(DLQ_TOPIC)]
        assert dl.payload == encode_batch(grows)
        assert "process.max_state_bytes = 65536" in dl.reason and "the host is forgotten" in dl.reason
        assert "h1" not in shell.app.tables["host-state"]
        assert ("h1", None) in shell.changelog  # (its snapshot's tombstone)
        assert metric("ktel_processor_hosts_reset_total", "all") == reset + 1
        await shell.put(batch(2, [file_created(1, "/a/x")]))
        assert len(shell.to(DLQ_TOPIC)) == 1
        assert shell.table("h1")["aggregate"]["seen"] == {"b1": [[2, 2]]}  # (afresh)


async def test_past_max_hosts_a_new_hosts_batches_and_heartbeats_go_to_the_dlq_and_held_hosts_go_on(
    tmp_path,
):
    refused = metric("ktel_processor_hosts_refused_total", "all")
    async with Shell(
        tmp_path, "all", process=config.ProcessConfig(data_dir=tmp_path / "data", metrics_port=0, max_hosts=2)
    ) as shell:
        await shell.put(batch(0, [file_created(1, "/a/x")]))
        await shell.heartbeats.put(heartbeat("h2", "b1", 1000, "node-2"), key=b"h2")
        assert metric("ktel_processor_hosts", "all") == 2
        assert metric("ktel_processor_hosts_limit", "all") == 2
        new = batch(0, [file_created(1, "/a/x")], host="h3")
        await shell.put(new)
        new_beat = heartbeat("h4", "b1", 1000, "node-4")
        await shell.heartbeats.put(new_beat, key=b"h4")
        # The hosts held keep going.
        await shell.put(batch(1, [file_created(1, "/a/y")]), batch(0, [file_created(1, "/b/x")], host="h2"))
        dead = [decode_dead_letter(v) for v in shell.to(DLQ_TOPIC)]
        assert [(d.stage, d.topic, d.payload) for d in dead] == [
            ("all", RAW_TOPIC, encode_batch(new)),
            ("all", HEARTBEATS_TOPIC, new_beat),
        ]
        assert dead[0].reason == (
            "host 'h3': not one of the 2 hosts this worker holds, and process.max_hosts = 2"
        )
        assert "'h4'" in dead[1].reason and "process.max_hosts = 2" in dead[1].reason
        # Nothing of the refused hosts was kept.
        assert "h3" not in shell.app.tables["host-state"] and "h4" not in shell.app.tables["host-state"]
        assert shell.table("h1")["aggregate"]["seen"] == {"b1": [[0, 1]]}
        assert shell.table("h2")["aggregate"]["seen"] == {"b1": [[0, 0]]}
        assert metric("ktel_processor_hosts", "all") == 2
    assert metric("ktel_processor_hosts_refused_total", "all") == refused + 2


async def test_hosts_whose_heartbeats_change_no_table_value_count_against_max_hosts(tmp_path):
    """A heartbeat without boot.id leaves its host no table value, but puts it in the
    worker's per-host series (/metrics) for aggregate.host_ttl_seconds. Counted against
    process.max_hosts only until the worker counted its hosts again from its table (at
    each silent-host check, a few times a minute), ever new host ids in such heartbeats
    took max_hosts more places there at each: the worker's memory and its scrape grew
    without the cap's bound."""
    refused = metric("ktel_processor_hosts_refused_total", "enrich")
    process = config.ProcessConfig(data_dir=tmp_path / "data", metrics_port=0, max_hosts=3)
    async with Shell(tmp_path, "enrich", process=process) as shell:
        app = shell.ready()
        timer = next(t for t in app._app_tasks if t.__name__ == "forget_silent")
        await shell.heartbeats.put(heartbeat("h1", "b1", 1000, "node-1"), key=b"h1")
        for check in range(3):
            for i in range(5):
                host = f"invented-{check}-{i}"
                hb = encode_heartbeat({"ts": 1000, "host": {"host.id": host}, "probes": {}, "counters": {}})
                await shell.heartbeats.put(hb, key=host.encode())
            await inspect.unwrap(timer)()  # (the silent-host check: the worker's hosts counted again)
        scraped = stages.FLEET.exposition().decode()
        up = {line.split('"')[1] for line in scraped.splitlines() if line.startswith("ktel_agent_up{")}
        assert up == {"h1", "invented-0-0", "invented-0-1"}
        assert set(stages.FLEET.host_ids()) == up
        assert metric("ktel_processor_hosts", "enrich") == 3
        dead = [decode_dead_letter(v) for v in shell.to(DLQ_TOPIC)]
        assert len(dead) == 3 * 5 - 2 and all("process.max_hosts = 3" in d.reason for d in dead)
    assert metric("ktel_processor_hosts_refused_total", "enrich") == refused + 3 * 5 - 2


async def test_the_sample_stage_counts_the_hosts_it_keeps_in_memory_against_max_hosts(tmp_path):
    async with Shell(
        tmp_path,
        "sample",
        process=config.ProcessConfig(data_dir=tmp_path / "data", metrics_port=0, max_hosts=1),
    ) as shell:
        other = batch(0, [file_created(1, "/a")], "h2")
        await shell.put(batch(0, [file_created(1, "/a")]), other, batch(1, []))
        assert [decode_batch(v).host_id for v in shell.to(SAMPLED_TOPIC)] == ["h1", "h1"]
        [dl] = [decode_dead_letter(v) for v in shell.to(DLQ_TOPIC)]
        assert (dl.stage, dl.topic, dl.payload) == ("sample", ENRICHED_TOPIC, encode_batch(other))
        assert "process.max_hosts = 1" in dl.reason
        assert metric("ktel_processor_hosts", "sample") == 1


def test_windows_close_on_multiples_of_their_length_and_a_late_one_pushes_none_back():
    s = 1_700_000_000_000  # ms since the epoch, a multiple of the 2 s window
    assert stages.next_window(s + 123, 2000) == s + 2000
    assert stages.next_window(s + 2000, 2000, s + 2000) == s + 4000  # closed on time
    assert stages.next_window(s + 2300, 2000, s + 2000) == s + 4000  # 300 ms late: the next is not
    # A close that took past three deadlines: the latest of them, once.
    assert stages.next_window(s + 8500, 2000, s + 2000) == s + 8000
    assert stages.next_window(s + 8600, 2000, s + 8000) == s + 10_000


async def test_a_window_closed_late_pushes_the_next_back_no_further():
    """Every wake 50 ms late and every close 300 ms long: each window still closes
    50 ms after its deadline (a timer sleeping a window after each close would drift
    by 350 ms a window); one close taking past two deadlines is followed by one close."""
    s = 1_700_000_000_000
    now, closes, delays = [s + 100], [], []
    took = [300, 4500, 300, 300]  # ms, each close

    async def sleep(seconds: float) -> None:
        now[0] += max(0, round(seconds * 1000)) + 50

    async def close(now_ms: int) -> None:
        closes.append(now_ms)
        now[0] += took[len(closes) - 1]

    await stages.close_windows(2000, close, delays.append, sleep, lambda: len(closes) == 4, lambda: now[0])
    # The second close ends at s + 8550: the deadlines at s + 6000 and s + 8000 have
    # passed, and only the later is closed, 600 ms late.
    assert closes == [s + 2050, s + 4050, s + 8600, s + 10_050]
    assert delays == [0.05, 0.05, 0.6, 0.05]


async def test_a_window_woken_late_closes_once_and_a_clock_stepped_back_does_not_stop_them():
    """Woken 3 s past a 2 s deadline (a paused process, the clock stepped forward): one
    close, for the latest deadline passed, then the next on time, not a second close
    right away. The clock stepped back 10 minutes: windows go on from the clock as it is."""
    s = 1_700_000_000_000
    now, closes, delays = [s + 100], [], []
    late = [3000, 0, 0, 0, 0]  # ms past its deadline, each wake-up
    step = {2: -600_000}  # after the nth close, the clock steps by this

    async def sleep(seconds: float) -> None:
        assert seconds <= 2.0  # never a sleep as long as the step
        now[0] += max(0, round(seconds * 1000)) + late[len(closes)]

    async def close(now_ms: int) -> None:
        closes.append(now_ms)
        now[0] += step.get(len(closes), 0)

    await stages.close_windows(2000, close, delays.append, sleep, lambda: len(closes) == 4, lambda: now[0])
    back = s - 600_000
    assert closes == [s + 5000, s + 6000, back + 8000, back + 10_000]
    assert delays == [1.0, 0.0, 0.0, 0.0]


async def test_a_worker_killed_while_forgetting_a_host_recovers_it_whole_or_not_at_all(tmp_path):
    """A host's tombstones leave one by one, and a worker may be killed after any of
    them. Its deltas' first, the snapshot's last, left (once compacted) its snapshot
    with deltas after a gap: recovered, the host's value of before the gap, the batches
    of the deltas after it lost though committed, and counted on from there if the host
    came back."""
    async with Shell(tmp_path, "aggregate") as shell:
        # (many series, so that a batch of one is a delta)
        await shell.put(batch(0, [file_created(1, f"/data/{n}/f") for n in range(50)]))
        await shell.put(*(batch(seq, [file_created(1, f"/data/{seq}/g")]) for seq in range(1, 5)))
        before = len(shell.changelog)
        assert [changelog.is_delta(key) for key, _ in shell.changelog] == [False, True, True, True, True]
        whole = shell.states()[-1]
        await stages.forget(shell.app.tables["host-state"], "h1", RESOLVED.raw_partitions)
        records = copy.deepcopy(shell.changelog)
        assert len(records) == before + changelog.SLOTS + 1
        for cut in range(before, len(records) + 1):  # (the worker killed after records[:cut])
            # Compacted, as Kafka may have them by then: each key's last record alone.
            last = {json.dumps(key): at for at, (key, _value) in enumerate(records[:cut])}
            data: dict[str, dict] = {}
            for at in sorted(last.values()):
                changelog.fold(data, *copy.deepcopy(records[at]))
            assert (cut, ("h1", persisted(data["h1"])) if "h1" in data else None) in (
                (cut, whole),
                (cut, None),
            )


async def test_a_record_refused_while_another_of_its_host_is_being_persisted_keeps_that_one(
    tmp_path, monkeypatch
):
    """A host's heartbeat and its batch in one fetched list. The batch, refused while the
    heartbeat's changelog record is held back (sent once the list is handled), put back
    the host's value as the changelog had it before the heartbeat: the heartbeat's part
    of it, on the changelog, gone from memory, and its version written again by the
    next record."""
    monkeypatch.setattr(enrich_core, "TABLE_SHARE", 10.0, raising=False)
    process = config.ProcessConfig(data_dir=tmp_path / "data", metrics_port=0, max_state_bytes=65_536)
    async with Shell(tmp_path, "enrich", process=process) as shell:
        await shell.put(batch(0, [exec_event(1, "sh", "/bin/sh")]))
        await shell.heartbeats.put(heartbeat("h1", "b1", 1000, "node-1"), key=b"h1", ends_list=False)
        huge = batch(1, [exec_event(pid, "p", "/opt/" + "x" * 150 + str(pid)) for pid in range(1000, 2000)])
        await shell.put(huge)  # (refused: past max_state_bytes)
        assert len(shell.to(DLQ_TOPIC)) == 1
        await shell.put(batch(2, [exec_event(2, "ls", "/bin/ls")]))
        host, recovered = shell.states()[-1]
        assert host == "h1" and recovered == persisted(shell.table("h1"))
        assert recovered["enrich"]["boots"]["b1"]["host"]["host.name"] == "node-1"


@asynccontextmanager
async def windows_running(app: Any) -> AsyncIterator[None]:
    """The app's window tasks running through the body, then until the closes under way end."""
    windows = [asyncio.ensure_future(t()) for t in app._app_tasks if t.__name__ == "window"]
    try:
        yield
        await app.on_before_shutdown.send()  # (returns once the closes under way are done)
    finally:
        for w in windows:
            w.cancel()
        ended = await asyncio.gather(*windows, return_exceptions=True)
    # A window task that raised stops its worker (Faust's tasks): the test fails with it.
    for e in ended:
        if isinstance(e, Exception):
            raise e


async def until(done: Callable[[], Any]) -> None:
    """Let the event loop run until ``done()``."""
    for _ in range(3000):  # (a guard against hanging, not a timing assertion)
        if done():
            break
        await asyncio.sleep(0.01)


async def heartbeating_past_its_ttl(shell: Shell) -> None:
    """h1 in a fused shell: one batch long before aggregate.host_ttl_seconds (its series
    due to end), its heartbeats coming still."""
    await shell.heartbeats.put(heartbeat("h1", "b1", 1000, "node-1"), key=b"h1")
    await shell.put(batch(0, [file_created(1, "/data/x/f")]))
    shell.silent_long("h1")  # no batch for far longer than its TTL
    await shell.heartbeats.put(heartbeat("h1", "b1", 2000, "node-1"), key=b"h1")  # alive


async def test_in_fused_mode_a_host_that_heartbeats_keeps_its_state_when_its_series_end(tmp_path):
    """A host that sent no batch for aggregate.host_ttl_seconds has its series end (a last,
    stale snapshot) and the aggregate's state of it goes, in fused mode as in split mode.
    Its heartbeats keep coming: it is alive, and what they gave (its enrich state) stays,
    as the split enrich stage keeps it, on the changelog too."""
    aggregate = config.AggregateConfig(window_seconds=0.05, host_ttl_seconds=60)
    async with Shell(tmp_path, "all", aggregate=aggregate) as shell:
        app = shell.ready()
        await heartbeating_past_its_ttl(shell)
        async with windows_running(app):
            await until(lambda: shell.to(METRICS_TOPIC))
        [last] = [decode_snapshot(v) for v in shell.to(METRICS_TOPIC)]
        assert last.stale and [row[3] for row in last.series] == [1.0]
        value = app.tables["host-state"].data.get("h1")
        assert value is not None and "aggregate" not in value
        assert value["enrich"]["boots"]["b1"]["host"]["host.name"] == "node-1"
        host, recovered = shell.states()[-1]  # (what a restarted worker has of it)
        assert host == "h1" and recovered == persisted(value)
        # A batch after: its series start afresh.
        await shell.put(batch(1, [file_created(1, "/data/x/g")]))
        assert shell.table("h1")["aggregate"]["series"] == {
            '["file_created_total", [["directory", "/data/x"]]]': 1.0
        }
        assert shell.table("h1")["enrich"]["boots"]["b1"]["host"]["host.name"] == "node-1"


async def test_a_heartbeating_host_whose_partition_goes_while_its_last_snapshot_waits_is_left_alone(
    tmp_path,
):
    """A window that forgets the aggregate's section of a host whose heartbeats keep
    coming first sends the host's last, stale snapshot, which may wait for room in the
    producer. The host's partition may be revoked meanwhile, and this worker let its
    value go (another worker holds it now): the window must then leave the host alone,
    neither failing (which stops the worker) nor writing its value back to the changelog."""
    aggregate = config.AggregateConfig(window_seconds=0.05, host_ttl_seconds=60)
    async with Shell(tmp_path, "all", aggregate=aggregate) as shell:
        app = shell.ready()
        await heartbeating_past_its_ttl(shell)
        produce, room, held = stages.produce, asyncio.Event(), asyncio.Event()

        async def no_room_yet(app: Any, topic: str, *args: Any, **kwargs: Any) -> None:
            if topic == METRICS_TOPIC and not room.is_set():
                held.set()
                await room.wait()
            await produce(app, topic, *args, **kwargs)

        data = app.tables["host-state"].data
        assigned = app.assignor.assigned_actives()
        revoked = stages.partition_of("h1", RESOLVED.raw_partitions)
        timer = next(t for t in app._app_tasks if t.__name__ == "forget_silent")
        with mock.patch.object(stages, "produce", no_room_yet):
            async with windows_running(app):
                await asyncio.wait_for(held.wait(), 30)  # h1's last snapshot (a guard against hanging)
                app.assignor.assigned_actives = lambda: {tp for tp in assigned if tp.partition != revoked}
                await inspect.unwrap(timer)()  # (the timer's one run: it lets h1's value go)
                assert "h1" not in data
                written = len(shell.changelog)
                room.set()
        [last] = [decode_snapshot(v) for v in shell.to(METRICS_TOPIC)]
        assert last.stale
        assert "h1" not in data and len(shell.changelog) == written


async def test_a_host_whose_batch_comes_while_a_window_forgets_another_is_not_counted_nor_ended(
    tmp_path,
):
    """A window sends the last, stale snapshot of each host it forgets, each send may
    wait for room in the producer, and the stream takes records meanwhile. A host with a
    batch taken then is alive and keeps its value: it is not counted as forgotten
    (ktel_processor_expired_hosts_total), its series are not marked stale, and the next
    window emits them."""
    aggregate = config.AggregateConfig(window_seconds=0.05, host_ttl_seconds=60)
    expired = "ktel_processor_expired_hosts_total"
    before = metric(expired, "aggregate")
    async with Shell(tmp_path, "aggregate", aggregate=aggregate) as shell:
        app = shell.ready()
        for host in ("h1", "h2"):
            await shell.put(batch(0, [file_created(1, "/data/x/f")], host=host), key=host.encode())
            shell.silent_long(host)  # silent far longer than its TTL
        produce, room, held = stages.produce, asyncio.Event(), asyncio.Queue()

        async def no_room_yet(app: Any, topic: str, key: bytes, *args: Any, **kwargs: Any) -> None:
            if topic == METRICS_TOPIC and not room.is_set():
                held.put_nowait(key.decode())
                await room.wait()
            await produce(app, topic, key, *args, **kwargs)

        with mock.patch.object(stages, "produce", no_room_yet):
            async with windows_running(app):
                first = await asyncio.wait_for(held.get(), 30)  # (a guard against hanging)
                back = "h2" if first == "h1" else "h1"
                await shell.put(batch(1, [file_created(1, "/data/x/g")], host=back), key=back.encode())
                room.set()
                # (until the next window emits the host kept)
                await until(lambda: any(k == back.encode() for t, k, _v in shell.sent if t == METRICS_TOPIC))
        data = app.tables["host-state"].data
        assert first not in data and back in data
        assert metric(expired, "aggregate") == before + 1
        snapshots = [(k.decode(), decode_snapshot(v)) for t, k, v in shell.sent if t == METRICS_TOPIC]
        assert [(h, s.stale) for h, s in snapshots] == [(first, True), (back, False)]
        assert [row[3] for row in snapshots[1][1].series] == [2.0]


@pytest.mark.parametrize("stage", ["aggregate", "all"])
async def test_a_window_writes_nothing_to_the_changelog_of_a_partition_revoked_while_its_last_snapshot_waits(
    tmp_path, stage
):
    """A window's last, stale snapshot of a host it forgets may wait for room in the
    producer, and the host's partition may be revoked meanwhile, before anything let its
    value go here (forget_silent runs a few times a minute). Another worker holds the
    partition now, recovered from the changelog, and counts its batches: this one must not
    write the host's tombstones (nor, fused, its value without the aggregate's section)
    after that worker's records, which a worker recovering the partition next would take
    for the host's last state."""
    aggregate = config.AggregateConfig(window_seconds=0.05, host_ttl_seconds=60)
    async with Shell(tmp_path, stage, aggregate=aggregate) as shell:
        app = shell.ready()
        if stage == "all":
            await heartbeating_past_its_ttl(shell)  # (its section dropped: drop_section)
        else:
            await shell.put(batch(0, [file_created(1, "/data/x/f")]))
            shell.silent_long("h1")  # silent: the host dropped (drop_host)
        produce, room, held = stages.produce, asyncio.Event(), asyncio.Event()

        async def no_room_yet(app: Any, topic: str, *args: Any, **kwargs: Any) -> None:
            if topic == METRICS_TOPIC and not room.is_set():
                held.set()
                await room.wait()
            await produce(app, topic, *args, **kwargs)

        assigned = app.assignor.assigned_actives()
        revoked = stages.partition_of("h1", RESOLVED.raw_partitions)
        with mock.patch.object(stages, "produce", no_room_yet):
            async with windows_running(app):
                await asyncio.wait_for(held.wait(), 30)  # h1's last snapshot (a guard against hanging)
                app.assignor.assigned_actives = lambda: {tp for tp in assigned if tp.partition != revoked}
                written = len(shell.changelog)
                room.set()
        [last] = [decode_snapshot(v) for v in shell.to(METRICS_TOPIC)]
        assert last.stale
        assert shell.changelog[written:] == []


@pytest.mark.parametrize("revocation", ["partition_revoked", "rebalance_begun", "taken_and_given_back"])
async def test_a_revocation_between_a_forgotten_hosts_tombstones_stops_the_rest(tmp_path, revocation):
    """A host a window forgets has its tombstones sent one by one, each of which may wait
    for room in the producer, and a revocation may begin between two of them. Another
    worker then holds the partition, recovered from the changelog, and counts the host's
    batches: the tombstones after that must not be written after its records (a worker
    recovering the partition next would find the host gone, its counts since lost). Nor
    once the partition came back to this worker within the wait (two rebalances): the
    other worker's records of the host are on the changelog all the same."""
    aggregate = config.AggregateConfig(window_seconds=0.05, host_ttl_seconds=60)
    async with Shell(tmp_path, "aggregate", aggregate=aggregate) as shell:
        app = shell.ready()
        await shell.put(batch(0, [file_created(1, "/data/x/f")]))
        shell.silent_long("h1")  # silent: the host dropped (drop_host)
        send = stages.send
        assigned = app.assignor.assigned_actives()
        revoked = stages.partition_of("h1", RESOLVED.raw_partitions)

        async def revoked_after_the_first(table: Any, key: bytes, value: bytes | None, *args: Any) -> None:
            await send(table, key, value, *args)
            if value is None:  # (a tombstone sent: the revocation begins before the next)
                if revocation == "partition_revoked":
                    app.assignor.assigned_actives = lambda: {tp for tp in assigned if tp.partition != revoked}
                elif revocation == "rebalance_begun":
                    app.rebalancing = True
                else:
                    await taken_and_given_back(app, revoked)

        with mock.patch.object(stages, "send", revoked_after_the_first):
            async with windows_running(app):
                await until(lambda: [k for k, v in shell.changelog if v is None])
        [last] = [decode_snapshot(v) for v in shell.to(METRICS_TOPIC)]
        assert last.stale
        assert [key for key, value in shell.changelog if value is None] == ["h1"]  # (its snapshot key's)


async def taken_and_given_back(app: Any, partition: int) -> None:
    """Two rebalances, as Faust signals them: ``partition`` assigned to another worker,
    then to this one again (after the assignment the worker had, as at its start)."""
    assigned = app.assignor.assigned_actives()
    await app.on_partitions_assigned.send(set(assigned))
    await app.on_partitions_assigned.send({tp for tp in assigned if tp.partition != partition})
    await app.on_partitions_assigned.send(set(assigned))


async def test_a_host_whose_partition_was_another_workers_meanwhile_has_the_whole_delay_again(tmp_path):
    """A host heard from long ago by this worker, whose partition another worker then
    held for a while (two rebalances between two silent-host checks), may have been
    heard from there: a heartbeat that changes nothing writes no changelog record. It
    has the whole delay again, as a host the worker has no memory of; the other host,
    whose partition stayed, is forgotten as silent."""
    aggregate = config.AggregateConfig(window_seconds=0.05).model_copy(update={"host_ttl_seconds": 0.1})
    async with Shell(tmp_path, "aggregate", aggregate=aggregate) as shell:
        app = shell.ready()
        await two_hosts_gone_silent(shell)
        await taken_and_given_back(app, stages.partition_of("h1", RESOLVED.raw_partitions))
        timer = next(t for t in app._app_tasks if t.__name__ == "forget_silent")
        await inspect.unwrap(timer)()  # (the timer's one run)
        tombstoned = {k if isinstance(k, str) else k[0] for k, v in shell.changelog if v is None}
        assert tombstoned == {"h2"}
        assert "aggregate" in shell.table("h1")


async def test_what_the_chain_keeps_of_a_host_whose_partition_went_elsewhere_is_forgotten(tmp_path):
    """A host's partition assigned to another worker: the next check of silent hosts
    forgets what this worker's chain keeps of it (the processes the enrich stage knows),
    whatever the assignment's signal did with its time."""
    async with Shell(tmp_path, "all") as shell:
        app = shell.ready()
        await shell.put(batch(0, [exec_event(10, "web", "/bin/web")]))
        known = metric("ktel_processor_processes_known", "all")
        assigned = app.assignor.assigned_actives()
        gone = stages.partition_of("h1", RESOLVED.raw_partitions)
        await app.on_partitions_assigned.send(set(assigned))
        elsewhere = {tp for tp in assigned if tp.partition != gone}
        app.assignor.assigned_actives = lambda: elsewhere
        await app.on_partitions_assigned.send(elsewhere)
        timer = next(t for t in app._app_tasks if t.__name__ == "forget_silent")
        await inspect.unwrap(timer)()  # (the timer's one run)
        assert metric("ktel_processor_processes_known", "all") == known - 1


def revoke(app: Any, host: str, revocation: str) -> None:
    """As Faust has it while a window waits: a rebalance under way, or one that began
    (counted as it began) and ended since with ``host``'s partition another worker's."""
    if revocation == "rebalance_begun":
        app.rebalancing = True
        return
    gone = stages.partition_of(host, RESOLVED.raw_partitions)
    assigned = app.assignor.assigned_actives()
    app.rebalancing_count += 1
    app.assignor.assigned_actives = lambda: {tp for tp in assigned if tp.partition != gone}


@pytest.mark.parametrize("revocation", ["partition_revoked", "rebalance_begun"])
async def test_a_window_sends_no_snapshot_of_a_host_once_a_revocation_begins_while_an_earlier_one_waits(
    tmp_path, revocation
):
    """A window's snapshots are sent one after the other, each of which may wait for room
    in the producer, and a revocation may begin meanwhile. The worker holding a host's
    partition then sends its snapshots: one of this worker's written after them would be
    a sample out of order (remote-write's receiver refuses it, the pull endpoint and
    OTLP show a step back). So a snapshot is sent only while no rebalance is under way
    and its host's partition is this worker's, the others counted. A host still held
    after the rebalance is emitted whole by the next window."""
    skipped = "ktel_processor_snapshots_skipped_total"
    reason = "revoked" if revocation == "partition_revoked" else "rebalancing"

    def skips() -> float:
        return REGISTRY.get_sample_value(skipped, {"stage": "aggregate", "reason": reason}) or 0.0

    before = skips()
    aggregate = config.AggregateConfig(window_seconds=0.05, host_ttl_seconds=60)
    async with Shell(tmp_path, "aggregate", aggregate=aggregate) as shell:
        app = shell.ready()
        for host in ("h1", "h2"):  # (on partitions 3 and 0)
            await shell.put(batch(0, [file_created(1, "/data/x/f")], host=host), key=host.encode())
        produce, room, held = stages.produce, asyncio.Event(), asyncio.Queue()

        async def no_room_yet(app: Any, topic: str, key: bytes, *args: Any, **kwargs: Any) -> None:
            if topic == METRICS_TOPIC and not room.is_set():
                held.put_nowait(key.decode())
                await room.wait()
            await produce(app, topic, key, *args, **kwargs)

        def snapshots() -> list[tuple[str, Any]]:
            return [(k.decode(), decode_snapshot(v)) for t, k, v in shell.sent if t == METRICS_TOPIC]

        with mock.patch.object(stages, "produce", no_room_yet):
            async with windows_running(app):
                first = await asyncio.wait_for(held.get(), 30)  # its zeros (a guard against hanging)
                other = "h2" if first == "h1" else "h1"
                revoke(app, other, revocation)
                room.set()
                if revocation == "rebalance_begun":
                    # The rest of the window: nothing more sent, each snapshot counted.
                    await until(lambda: skips() == before + 3)
                    assert [h for h, _s in snapshots()] == [first]
                    app.rebalancing = False  # (both partitions still this worker's)
                    await until(lambda: len(snapshots()) == 3)
                else:
                    await until(lambda: len(snapshots()) == 2)
        sent = [(h, [row[3] for row in s.series]) for h, s in snapshots()]
        if revocation == "rebalance_begun":
            # First's values and the other's, at the next window, with no zeros first.
            assert sent[0] == (first, [0.0]) and sorted(sent[1:]) == [("h1", [1.0]), ("h2", [1.0])]
            assert skips() == before + 3
        else:
            assert sent == [(first, [0.0]), (first, [1.0])]  # none of the other's
            assert skips() == before + 2


@pytest.mark.parametrize("revocation", ["partition_revoked", "rebalance_begun"])
async def test_a_host_a_window_leaves_to_a_revocation_is_not_counted_as_forgotten(tmp_path, revocation):
    """A window's last, stale snapshot of a silent host may wait for room in the producer
    across a revocation, and the host is then not forgotten here (its new owner forgets
    it): nor is it counted in ktel_processor_expired_hosts_total."""
    expired = "ktel_processor_expired_hosts_total"
    before = metric(expired, "aggregate")
    aggregate = config.AggregateConfig(window_seconds=0.05, host_ttl_seconds=60)
    async with Shell(tmp_path, "aggregate", aggregate=aggregate) as shell:
        app = shell.ready()
        await shell.put(batch(0, [file_created(1, "/data/x/f")]))
        shell.silent_long("h1")  # silent far longer than its TTL
        produce, room, held = stages.produce, asyncio.Event(), asyncio.Event()

        async def no_room_yet(app: Any, topic: str, *args: Any, **kwargs: Any) -> None:
            if topic == METRICS_TOPIC and not room.is_set():
                held.set()
                await room.wait()
            await produce(app, topic, *args, **kwargs)

        with mock.patch.object(stages, "produce", no_room_yet):
            async with windows_running(app):
                await asyncio.wait_for(held.wait(), 30)  # h1's last snapshot (a guard against hanging)
                revoke(app, "h1", revocation)
                room.set()
        [last] = [decode_snapshot(v) for v in shell.to(METRICS_TOPIC)]
        assert last.stale
        assert not [k for k, v in shell.changelog if v is None]  # (not forgotten here)
        assert metric(expired, "aggregate") == before


async def test_a_silent_host_left_to_a_revocation_while_another_is_forgotten_is_not_counted(tmp_path):
    """The silent hosts are forgotten one after the other, each one's tombstones may wait
    for room in the producer, and a revocation begun meanwhile leaves the hosts of the
    partitions it took to their new owner: those are not counted as forgotten here."""
    expired = "ktel_processor_expired_hosts_total"
    before = metric(expired, "aggregate")
    # (Below the TTL a config may set, MIN_HOST_TTL_SECONDS, so the test waits half a second.)
    aggregate = config.AggregateConfig(window_seconds=0.05).model_copy(update={"host_ttl_seconds": 0.1})
    async with Shell(tmp_path, "aggregate", aggregate=aggregate) as shell:
        app = shell.ready()
        await two_hosts_gone_silent(shell)
        send, dropped = stages.send, []

        async def revoked_at_the_first(table: Any, key: bytes, value: bytes | None, *args: Any) -> None:
            if value is None and not dropped:  # (the first host's first tombstone)
                dropped.append(json.loads(key))
                revoke(app, "h2" if dropped == ["h1"] else "h1", "partition_revoked")
            await send(table, key, value, *args)

        timer = next(t for t in app._app_tasks if t.__name__ == "forget_silent")
        with mock.patch.object(stages, "send", revoked_at_the_first):
            await inspect.unwrap(timer)()  # (the timer's one run)
        [first] = dropped
        # Its snapshot key's tombstone and each delta key's; none of the other's.
        tombstoned = [k if isinstance(k, str) else k[0] for k, v in shell.changelog if v is None]
        assert tombstoned == [first] * (1 + changelog.SLOTS)
        assert metric(expired, "aggregate") == before + 1
