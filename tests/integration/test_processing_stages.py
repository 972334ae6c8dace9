"""The processing stages on the real broker: scaling, a SIGKILL, garbage input,
split mode, enrichment, and anomaly-driven fidelity commands."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client.parser import text_string_to_metric_families
from rocksdict import AccessType, Options, Rdict

from ktel.config import KafkaConfig
from ktel.stack.proc import free_port
from ktel.stack.proc import stop as stop_process
from ktel.topics import TopicSpec, create_topics, topic_partitions
from ktel.wire import (
    CONTROL_TOPIC,
    DEDUPED_TOPIC,
    DLQ_TOPIC,
    ENRICHED_TOPIC,
    FILE_CREATED,
    HEARTBEATS_TOPIC,
    KTEL_LOG,
    LOGS_TOPIC,
    METRICS_TOPIC,
    PROCESS_EXEC,
    RAW_TOPIC,
    SAMPLED_TOPIC,
    RawBatch,
    decode_batch,
    decode_command,
    decode_dead_letter,
    decode_heartbeat,
    decode_logs,
    decode_snapshot,
    encode_batch,
    encode_heartbeat,
)
from ktel.wire.codec import SEND_MAX_BYTES, ZSTD_MAGIC, compress
from ktel.wire.raw import PROCESS_ATTRS
from processors import changelog
from processors.stages import partition_of
from processors.table_store import OFFSET_KEY, WRITTEN_KEY, unframed
from tests.conftest import need_bpf
from tests.integration.agent_harness import AgentProcess, committed_offsets, read_topic
from tests.integration.probe_harness import cgroup2_child

pytestmark = pytest.mark.kafka


class Worker:
    def __init__(self, tmp_path, bootstrap, name, stage="all", module="ktel.cli", **settings):
        """``module``: what runs ``ktel process`` (tests.integration.stage_with_fault: with a fault)."""
        self.stage, self.module = stage, module
        self.log = tmp_path / f"{name}.log"
        self.port = free_port()
        self.env = dict(
            os.environ,
            KTEL_KAFKA__BOOTSTRAP=bootstrap,
            KTEL_AGGREGATE__WINDOW_SECONDS="1",
            KTEL_PROCESS__METRICS_PORT=str(self.port),
            KTEL_AGENT__HOST_ID="unused",
            KTEL_PROCESS__DATA_DIR=str(tmp_path / f"{name}-data"),
            **settings,
        )
        self.proc: subprocess.Popen | None = None

    def start(self, module=None):
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module or self.module, "process", self.stage],
                env=self.env,
                stdout=f,
                stderr=f,
            )
        return self

    def critical_line_at_exit(self, module: str) -> str:
        """Start with ``module`` (a fault in the worker), wait for it to exit with
        status 1, and return the one CRITICAL line it logged."""
        self.start(module)
        try:
            code = self.proc.wait(180)
        finally:
            self.stop()
        assert code == 1, self.log.read_text()[-3000:]
        [line] = [line for line in self.log.read_text().splitlines() if " CRITICAL " in line]
        return line

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def batches_done(self) -> float:
        """The worker's ktel_processor_batches (0 before its metrics endpoint is up)."""
        return self.metric("ktel_processor_batches_total")

    def metric(self, name: str) -> float:
        """A self-metric of the worker's, summed over its labels (0 before it is up)."""
        try:
            text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", trust_env=False).text
        except httpx.TransportError:
            return 0.0
        return sum(
            s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name
        )

    def buckets(self, name: str, **labels: str) -> dict[float, float]:
        """A histogram of the worker's, of the series with ``labels``: its observations
        within each bound, cumulative (empty before it is up)."""
        try:
            text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", trust_env=False).text
        except httpx.TransportError:
            return {}
        return {
            float(s.labels["le"]): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == f"{name}_bucket" and all(s.labels.get(k) == v for k, v in labels.items())
        }

    def stop(self):
        stop_process(self.proc, 60)


def batches(hosts: int, per_host: int, events: int):
    """Synthetic agent traffic: per host, numbered batches of file_created events."""
    for seq in range(per_host):
        for h in range(hosts):
            ev = [FILE_CREATED.id, 1, 2, 2, 0, "w", f"/data/h{h}/d{seq % 3}/f", 0o101, False]
            yield RawBatch(f"host-{h:02d}", "boot", seq, 1, [list(ev) for _ in range(events)])


def batches_totals(hosts: int, per_host: int, events: int) -> dict[tuple[str, str], float]:
    """The file_created_total of each (host, directory) that ``batches()`` makes."""
    return {
        (f"host-{h:02d}", f"/data/h{h}/d{d}"): float(events * len(range(d, per_host, 3)))
        for h in range(hosts)
        for d in range(3)
    }


async def produce(bootstrap, records, pace_s=0.0, topic=RAW_TOPIC):
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        for key, value in records:
            await producer.send(topic, value, key=key)
            if pace_s:
                await asyncio.sleep(pace_s)
        await producer.flush()
    finally:
        await producer.stop()


def latest_totals(bootstrap, idle_s=0.5) -> dict[tuple[str, str], float]:
    """The latest value of every file_created_total series in ktel.metrics.

    A read of a topic empty when it starts ends only after ``idle_s`` without a
    record, so ``idle_s`` stays below the workers' 1 s snapshot window: above it, a
    worker that starts writing during the read keeps it going to its timeout."""
    latest: dict[tuple[str, str], tuple[int, float]] = {}
    for rec in asyncio.run(read_topic(bootstrap, METRICS_TOPIC, idle_s=idle_s, timeout=10)):
        snap = decode_snapshot(rec.value)
        for name, _t, labels, value in snap.series:
            if name == "file_created_total":
                key = (labels["host.id"], labels["directory"])
                if key not in latest or latest[key][0] <= snap.ts_ms:
                    latest[key] = (snap.ts_ms, value)
    return {k: v for k, (_ts, v) in latest.items()}


def wait_for_totals(bootstrap, expected: dict, timeout=120) -> dict:
    """The totals once they equal ``expected``, and still a few windows later (a
    count that only passed through them on its way up is no match)."""
    deadline = time.monotonic() + timeout
    got = latest_totals(bootstrap)
    while got != expected and time.monotonic() < deadline:
        time.sleep(2)
        got = latest_totals(bootstrap)
    if got == expected:
        time.sleep(3)  # the workers' windows are 1 s
        got = latest_totals(bootstrap)
    return got


def group_members(bootstrap: str, group: str) -> tuple[str, int]:
    """The consumer group's state and how many members have an assignment."""

    async def describe():
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return await admin.describe_consumer_groups([group])
        finally:
            await admin.close()

    try:
        [response] = asyncio.run(describe())
    except KafkaError as err:
        if not err.retriable:  # e.g. no coordinator while __consumer_offsets is being made
            raise
        return type(err).__name__, 0
    [(_err, _group, state, _ptype, _protocol, members)] = response.groups
    return state, sum(1 for m in members if m[4])


def wait_for_group(bootstrap: str, group: str, members: int, timeout=120) -> None:
    deadline = time.monotonic() + timeout
    while (got := group_members(bootstrap, group)) != ("Stable", members):
        assert time.monotonic() < deadline, f"group {group}: {got}, not {members} stable members"
        time.sleep(0.5)


@pytest.mark.parametrize("store", ["rocksdict", "memory"])
def test_two_workers_and_a_sigkill_count_every_event_once(private_kafka, tmp_path, store):
    hosts, per_host, events = 12, 60, 50
    # The killed worker's partitions move once its session times out.
    fast = {"KTEL_PROCESS__SESSION_TIMEOUT_SECONDS": "10", "KTEL_PROCESS__TABLE_STORE": store}
    a = Worker(tmp_path, private_kafka.bootstrap, "a", **fast).start()
    b = Worker(tmp_path, private_kafka.bootstrap, "b", **fast).start()
    try:
        # Both must share the partitions before the traffic starts: on a slow machine
        # a worker killed before it joined would leave b alone, and nothing to test.
        wait_for_group(private_kafka.bootstrap, "ktel-all", members=2)
        traffic = [(bt.key, encode_batch(bt)) for bt in batches(hosts, per_host, events)]
        # Re-sent batches (an agent retrying) must not count twice.
        traffic += random.Random(7).sample(traffic, 40)
        half = len(traffic) // 2
        asyncio.run(produce(private_kafka.bootstrap, traffic[:half], pace_s=0.01))
        deadline = time.monotonic() + 60
        while not (a.batches_done() and b.batches_done()):
            assert time.monotonic() < deadline, "both workers should be processing their partitions"
            time.sleep(0.2)
        a.kill()  # mid-stream, without any chance to commit or flush
        copies = list((tmp_path / "a-data").rglob("*.rdict"))
        assert bool(copies) == (store == "rocksdict"), copies  # what the replacement starts from
        asyncio.run(produce(private_kafka.bootstrap, traffic[half : half + 200], pace_s=0.01))
        a = Worker(tmp_path, private_kafka.bootstrap, "a", **fast).start()  # on the same data directory
        asyncio.run(produce(private_kafka.bootstrap, traffic[half + 200 :], pace_s=0.005))

        expected = batches_totals(hosts, per_host, events)
        got = wait_for_totals(private_kafka.bootstrap, expected, timeout=300)
        assert got == expected
        assert sum(got.values()) == hosts * per_host * events
    finally:
        a.stop()
        b.stop()


def metrics_series_values(bootstrap: str) -> dict[tuple[str, str], list[float]]:
    """Every value each file_created_total series took on ktel.metrics, in the order
    Kafka has them (a host's snapshots are all on its partition)."""
    recs = asyncio.run(read_topic(bootstrap, METRICS_TOPIC, idle_s=0.5, timeout=10))
    went: dict[tuple[str, str], list[float]] = {}
    for rec in sorted(recs, key=lambda r: (r.partition, r.offset)):
        for name, _t, labels, value in decode_snapshot(rec.value).series:
            if name == "file_created_total":
                went.setdefault((labels["host.id"], labels["directory"]), []).append(value)
    return went


def stopped(proc: subprocess.Popen) -> bool:
    """Whether the process is stopped (SIGSTOP), from its state in /proc."""
    with open(f"/proc/{proc.pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0] == "T"


def test_a_worker_paused_past_its_session_emits_and_writes_nothing_for_the_partitions_it_lost(
    private_kafka, tmp_path
):
    """A worker whose process stops (SIGSTOP: a VM paused, a long GC pause) for longer
    than the group's session timeout, halfway through a batch (counted in its host's
    value, the changelog record not yet handed to the producer), loses its partitions
    to the other worker, which counts their batches from the changelog and the
    committed offsets. Resumed, the paused worker must neither write their changelog
    (whoever recovers it after would find its older value) nor emit its own, older
    counts of those hosts (on ktel.metrics a series going back, which increase() reads
    as a counter reset and counts twice). Each host's changelog versions only ever go
    up, and so does every series, which ends at its exact total."""
    hosts, per_host, events = 12, 60, 20
    session = {"KTEL_PROCESS__SESSION_TIMEOUT_SECONDS": "6"}
    b = Worker(tmp_path, private_kafka.bootstrap, "b", **session).start()
    a = Worker(
        tmp_path,
        private_kafka.bootstrap,
        "a",
        module="tests.integration.stage_with_fault",
        KTEL_TEST_STOP_BEFORE_RECORD="20",
        **session,
    ).start()
    traffic = [(bt.key, encode_batch(bt)) for bt in batches(hosts, per_host, events)]
    # Paced over about 30 s, so that records keep coming while a is stopped and after.
    producing = threading.Thread(
        target=lambda: asyncio.run(produce(private_kafka.bootstrap, traffic, pace_s=0.04))
    )
    try:
        wait_for_group(private_kafka.bootstrap, "ktel-all", members=2)
        producing.start()
        deadline = time.monotonic() + 120
        while not stopped(a.proc):
            assert a.proc.poll() is None, a.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "a should have stopped itself at its 20th changelog record"
            time.sleep(0.2)
        # b alone in the group: a's session expired and b took its partitions.
        wait_for_group(private_kafka.bootstrap, "ktel-all", members=1)
        time.sleep(2)  # (b counts some of a's hosts' batches)
        a.proc.send_signal(signal.SIGCONT)
        # Resumed, a finds itself removed from the group as it is about to send, and ends
        # with nothing sent; its supervisor starts it again (here: the test, without the
        # fault). Had it nothing to send before it joined the group again, it would go on
        # as a member of the new generation.
        deadline = time.monotonic() + 120
        while a.proc.poll() is None and group_members(private_kafka.bootstrap, "ktel-all") != ("Stable", 2):
            assert time.monotonic() < deadline, "a should have ended or joined the group again"
            time.sleep(0.2)
        if a.proc.poll() is not None:
            assert a.proc.returncode == 1, a.log.read_text()[-3000:]
            assert "removed this worker" in a.log.read_text()
            a = Worker(tmp_path, private_kafka.bootstrap, "a", **session).start()
        producing.join()

        expected = batches_totals(hosts, per_host, events)
        got = wait_for_totals(private_kafka.bootstrap, expected, timeout=300)
        went = metrics_series_values(private_kafka.bootstrap)
        backwards = {s: v for s, v in went.items() if v != sorted(v)}
        assert not backwards, f"series that went back: {backwards}"
        # Each host's changelog versions, in the order Kafka has them: one worker's after
        # another's, never a version the host had already had again.
        versions: dict[str, list[int]] = {}
        for rec in sorted(changelog_records(private_kafka.bootstrap), key=lambda r: (r.partition, r.offset)):
            if rec.value is not None:
                key = json.loads(rec.key)
                host = key if isinstance(key, str) else key[0]
                versions.setdefault(host, []).append(json.loads(rec.value)[changelog.VERSION])
        rewritten = {h: v for h, v in versions.items() if any(y <= x for x, y in zip(v, v[1:], strict=False))}
        assert not rewritten, f"changelog versions written again: {rewritten}"
        assert got == expected
    finally:
        if a.proc.poll() is None:
            a.proc.send_signal(signal.SIGCONT)
        if producing.ident is not None:
            producing.join()
        a.stop()
        b.stop()


def test_the_on_disk_copy_holds_exactly_what_the_changelog_holds(private_kafka, tmp_path):
    """process.table_store = "rocksdict": the copy takes the changelog records Kafka
    acknowledged, several in one write (processors/table_store.py). Stopped, the worker
    leaves in each partition's copy every key's last record, with its offset, and the
    offset of the partition's last record: none missing, none ahead of Kafka."""
    hosts, per_host, events = 12, 30, 5
    w = Worker(tmp_path, private_kafka.bootstrap, "w", KTEL_PROCESS__TABLE_STORE="rocksdict").start()
    try:
        traffic = [(bt.key, encode_batch(bt)) for bt in batches(hosts, per_host, events)]
        asyncio.run(produce(private_kafka.bootstrap, traffic))
        expected = batches_totals(hosts, per_host, events)
        assert wait_for_totals(private_kafka.bootstrap, expected) == expected
    finally:
        w.stop()
    want: dict[int, dict[bytes, tuple[int, bytes]]] = {}
    last: dict[int, int] = {}
    for r in changelog_records(private_kafka.bootstrap):
        part = want.setdefault(r.partition, {})
        if r.value is None:
            part.pop(r.key, None)
        else:
            part[r.key] = (r.offset, r.value)
        last[r.partition] = max(last.get(r.partition, -1), r.offset)
    assert len(last) > 1  # the hosts' records spread over several partitions
    for partition, records in want.items():
        [path] = (tmp_path / "w-data").rglob(f"*-{partition}.rdict")
        db = Rdict(str(path), Options(raw_mode=True), access_type=AccessType.read_only())
        try:
            copy = dict(db.items())
        finally:
            db.close()
        assert int(copy.pop(OFFSET_KEY)) == last[partition]
        assert 0 <= time.time() - float(copy.pop(WRITTEN_KEY)) < 3600
        assert {key: unframed(stored) for key, stored in copy.items()} == records


def copy_offsets(data_dir) -> dict[int, int | None]:
    """Each changelog partition's copy under a stopped worker's data directory: the
    offset it holds (None: a copy with none)."""
    offsets = {}
    for path in data_dir.rglob("*.rdict"):
        db = Rdict(str(path), Options(raw_mode=True), access_type=AccessType.read_only())
        try:
            raw = db.get(OFFSET_KEY)
        finally:
            db.close()
        offsets[int(path.stem.rsplit("-", 1)[1])] = None if raw is None else int(raw)
    return offsets


async def delete_topic(bootstrap: str, topic: str) -> None:
    """Delete ``topic`` and wait until the broker no longer lists it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
        deadline = time.monotonic() + 60
        while topic in await admin.list_topics() and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


def test_a_copy_ahead_of_its_changelog_made_again_is_dropped_and_the_worker_counts_on(
    private_kafka, tmp_path
):
    """The changelog deleted while its worker was stopped (made again empty when it
    starts): each partition's on-disk copy now holds offsets the changelog does not.
    The worker drops those copies, saying why, and counts on from what Kafka holds
    (the hosts start afresh), where Faust stopped it at every start (ConsistencyError).
    A restart with the changelog still there drops none."""
    bootstrap = private_kafka.bootstrap
    w = Worker(tmp_path, bootstrap, "w", KTEL_PROCESS__TABLE_STORE="rocksdict")
    traffic = [(bt.key, encode_batch(bt)) for bt in batches(4, 12, 5)]
    # (traffic is seq-major, 4 hosts a batch number; batch n counts 5 in directory d{n % 3})
    totals = {k: v / 2 for k, v in batches_totals(4, 12, 5).items()}  # batches 0 to 5: 10 each

    def run(sent: list, counted: dict) -> None:
        """Start the worker, send ``sent``, wait for ``counted`` to be the totals, stop it."""
        totals.update(counted)
        w.start()
        try:
            asyncio.run(produce(bootstrap, sent))
            assert wait_for_totals(bootstrap, totals) == totals
            assert w.proc.poll() is None
        finally:
            w.stop()

    run(traffic[:24], {})
    run(traffic[24:28], {k: 15.0 for k in totals if k[1].endswith("/d0")})  # batch 6, copies kept
    kept = w.log.read_text()
    assert "is dropped" not in kept and "from its start" not in kept
    ahead = {p: o for p, o in copy_offsets(tmp_path / "w-data").items() if o is not None}
    assert ahead  # (copies holding records, which the made-again changelog will not)
    asyncio.run(delete_topic(bootstrap, "ktel-all-host-state-changelog"))
    run(traffic[28:36], {k: 5.0 for k in totals if not k[1].endswith("/d0")})  # 7 and 8, from 0
    log = w.log.read_text()
    assert "ConsistencyError" not in log
    for partition, offset in ahead.items():
        assert (
            f"holds changelog partition {partition} up to offset {offset}, but the changelog holds "
            "only offsets below 0" in log
        )


def test_a_record_another_worker_wrote_between_a_workers_own_drops_that_partitions_copy(
    private_kafka, tmp_path
):
    """Kafka does not fence off a worker that lost its partitions in a rebalance but
    still runs: its changelog record can land between the new owner's. The owner's
    copy lacks it, so the copy must not take an offset past it: the worker drops that
    partition's copy (and keeps the others), and its next start reads the partition
    from the changelog's start and counts on exactly."""
    hosts, events = 12, 5
    # (a round of every host at a time: traffic[: 10 * hosts] is every host's first 10)
    traffic = [(bt.key, encode_batch(bt)) for bt in batches(hosts, 30, events)]
    w = Worker(tmp_path, private_kafka.bootstrap, "w", KTEL_PROCESS__TABLE_STORE="rocksdict").start()
    try:
        asyncio.run(produce(private_kafka.bootstrap, traffic[: 10 * hosts]))
        expected = batches_totals(hosts, 10, events)
        assert wait_for_totals(private_kafka.bootstrap, expected) == expected
        # The other writer's record: the last of one partition, written there again.
        other = changelog_records(private_kafka.bootstrap)[-1]

        async def write_other() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=private_kafka.bootstrap)
            await producer.start()
            try:
                await producer.send_and_wait(
                    "ktel-all-host-state-changelog", other.value, key=other.key, partition=other.partition
                )
            finally:
                await producer.stop()

        asyncio.run(write_other())
        asyncio.run(produce(private_kafka.bootstrap, traffic[10 * hosts : 20 * hosts]))
        expected = batches_totals(hosts, 20, events)
        assert wait_for_totals(private_kafka.bootstrap, expected) == expected
    finally:
        w.stop()
    log = w.log.read_text()
    assert f"changelog partition {other.partition}: this worker's record is at offset" in log, log[-3000:]
    last: dict[int, int] = {}
    for r in changelog_records(private_kafka.bootstrap):
        last[r.partition] = max(last.get(r.partition, -1), r.offset)
    copies = copy_offsets(tmp_path / "w-data")
    assert copies.get(other.partition) is None, copies  # dropped: no offset past the hole
    others = {p: off for p, off in last.items() if p != other.partition}
    assert others and {p: copies.get(p) for p in others} == others  # the others copied to the end

    w.start()  # on the same data directory: that partition from the changelog's start
    try:
        asyncio.run(produce(private_kafka.bootstrap, traffic[20 * hosts :]))
        expected = batches_totals(hosts, 30, events)
        assert wait_for_totals(private_kafka.bootstrap, expected) == expected
    finally:
        w.stop()
    last = {}
    for r in changelog_records(private_kafka.bootstrap):
        last[r.partition] = max(last.get(r.partition, -1), r.offset)
    assert copy_offsets(tmp_path / "w-data")[other.partition] == last[other.partition]  # copied again


def test_a_worker_refused_its_table_writes_stops_with_nothing_committed_and_its_restart_counts_all(
    private_kafka, tmp_path
):
    """The group leader's metadata showing the changelog with 0 partitions (it lags the
    brokers'), Faust refuses every table write with PartitionsMismatch. The worker must
    not spin on it, committing offsets past batches it never persisted: it exits 1 with
    one line, and the worker started again counts every batch once."""
    hosts, per_host, events = 6, 10, 5
    traffic = [(bt.key, encode_batch(bt)) for bt in batches(hosts, per_host, events)]
    asyncio.run(produce(private_kafka.bootstrap, traffic))

    lagging = Worker(tmp_path, private_kafka.bootstrap, "lagging")
    line = lagging.critical_line_at_exit("tests.integration.worker_with_stale_metadata")
    assert "ktel process all: stopping: PartitionsMismatch: The source topic 'ktel.raw'" in line
    assert "'ktel-all-host-state-changelog' has 0 partitions, in Faust's metadata" in line
    assert "is committed: restart the worker (its supervisor does)" in line
    assert asyncio.run(committed_offsets(private_kafka.bootstrap, "ktel-all")) == {}

    worker = Worker(tmp_path, private_kafka.bootstrap, "again").start()
    try:
        expected = batches_totals(hosts, per_host, events)
        assert wait_for_totals(private_kafka.bootstrap, expected, timeout=300) == expected
        assert worker.proc.poll() is None
    finally:
        worker.stop()


def test_a_record_a_stage_fails_on_stops_one_worker_then_goes_to_the_dlq_and_the_rest_counts(
    private_kafka, tmp_path
):
    """A stage raising on a record stops the worker with the record uncommitted; the
    worker started again (same data directory, as a restarted process or pod) sends that
    record to ktel.dlq with the reason instead of stopping on it again, and counts the
    rest exactly: one bad record does not hold its partition up for good."""
    hosts, per_host, events = 4, 6, 5
    traffic = [(bt.key, encode_batch(bt)) for bt in batches(hosts, per_host, events)]
    poison = RawBatch("host-poison", "boot", 0, 1, [[FILE_CREATED.id, 1, 2, 2, 0, "w", "/p/x", 0o101, False]])
    traffic.insert(len(traffic) // 2, (poison.key, encode_batch(poison)))
    asyncio.run(produce(private_kafka.bootstrap, traffic))

    first = Worker(tmp_path, private_kafka.bootstrap, "poisoned")
    line = first.critical_line_at_exit("tests.integration.worker_with_poison")
    assert "ktel process all: stopping: ValueError: poisoned; nothing of ktel.raw[" in line

    again = Worker(tmp_path, private_kafka.bootstrap, "poisoned").start(
        "tests.integration.worker_with_poison"
    )
    try:
        expected = batches_totals(hosts, per_host, events)
        assert wait_for_totals(private_kafka.bootstrap, expected, timeout=300) == expected
        assert again.proc.poll() is None
        # The one record, dead-lettered (at least once: a record read again before its
        # offset is committed is dead-lettered again, as any bad record is).
        letters = dead_letters(private_kafka.bootstrap)
        assert len({(dl.topic, dl.partition, dl.offset) for dl in letters}) == 1, letters
        for dl in letters:
            assert dl.stage == "all" and dl.topic == RAW_TOPIC
            assert dl.reason == "a stage failed on it and stopped a worker (ValueError: poisoned)"
            assert dl.payload == encode_batch(poison)
        assert again.metric("ktel_processor_dead_letters_total") == len(letters)
    finally:
        again.stop()


def test_a_worker_whose_faust_app_crashes_exits_1_with_one_line(private_kafka, tmp_path):
    broken = Worker(tmp_path, private_kafka.bootstrap, "broken")
    line = broken.critical_line_at_exit("tests.integration.worker_with_broken_window")
    assert "ktel process all: stopping: the Faust app crashed on ValueError: a window broke; " in line
    assert "restart the worker (its supervisor does)" in line


def test_a_worker_stopped_while_closing_a_window_finishes_it_and_exits_0(private_kafka, tmp_path):
    """SIGTERM while a window close is under way (its first snapshot held back 3 s): the
    stop lets it finish, so the snapshot reaches Kafka and the worker exits 0."""
    closing = tmp_path / "closing"
    w = Worker(tmp_path, private_kafka.bootstrap, "w", KTEL_TEST_CLOSING=str(closing))
    w.start("tests.integration.worker_with_slow_window")
    try:
        [batch] = batches(1, 1, 5)
        asyncio.run(produce(private_kafka.bootstrap, [(batch.key, encode_batch(batch))]))
        deadline = time.monotonic() + 120
        while not closing.exists():
            assert w.proc.poll() is None and time.monotonic() < deadline, w.log.read_text()[-3000:]
            time.sleep(0.05)
        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(60) == 0, w.log.read_text()[-3000:]
    finally:
        w.stop()
    assert " CRITICAL " not in w.log.read_text()
    recs = asyncio.run(read_topic(private_kafka.bootstrap, METRICS_TOPIC, idle_s=0.5, timeout=10))
    sent = [(r[2]["directory"], r[3]) for rec in recs for r in decode_snapshot(rec.value).series]
    assert ("/data/h0/d0", 5.0) in sent


def killed_by_its_fault(tmp_path, bootstrap: str, traffic: list[RawBatch], stage="all", **fault) -> None:
    """A worker "w" of ``stage`` with a fault (tests.integration.stage_with_fault, set by
    ``fault``) takes ``traffic`` and SIGKILLs itself."""
    module = "tests.integration.stage_with_fault"
    faulty = Worker(tmp_path, bootstrap, "w", stage=stage, module=module, **fault).start()
    asyncio.run(produce(bootstrap, [(b.key, encode_batch(b)) for b in traffic]))
    try:
        assert faulty.proc.wait(300) == -signal.SIGKILL, faulty.log.read_text()[-3000:]
    finally:
        faulty.stop()


def changelog_records(bootstrap: str, stage: str = "all") -> list:
    return asyncio.run(read_topic(bootstrap, f"ktel-{stage}-host-state-changelog", idle_s=1))


@pytest.mark.parametrize("store", ["rocksdict", "memory"])
def test_a_worker_killed_right_after_a_changelog_delta_counts_its_batch_once(private_kafka, tmp_path, store):
    """SIGKILLed once Kafka has a batch's changelog delta (the series it changed and
    its dedupe record), before its offset is committed: restarted, the worker reads
    the batch again, drops it as counted, and every event is counted once."""
    hosts, per_host, dirs = 3, 20, 4
    traffic = [
        RawBatch(f"host-{h}", "boot", seq, 1, [file_event(f"/data/h{h}/d{seq % dirs}/f")] * 2)
        for seq in range(per_host)
        for h in range(hosts)
    ]
    store_env = {"KTEL_PROCESS__TABLE_STORE": store}
    killed_by_its_fault(
        tmp_path, private_kafka.bootstrap, traffic, KTEL_TEST_KILL_AFTER_RECORD="25", **store_env
    )
    # A snapshot of each host (its first record), deltas after.
    keys = [json.loads(r.key) for r in changelog_records(private_kafka.bootstrap)]
    assert len(keys) == 25
    assert {k for k in keys if isinstance(k, str)} == {f"host-{h}" for h in range(hosts)}
    assert any(isinstance(k, list) for k in keys)
    w = Worker(tmp_path, private_kafka.bootstrap, "w", **store_env).start()  # on the same data directory
    try:
        expected = {
            (f"host-{h}", f"/data/h{h}/d{d}"): 2.0 * per_host / dirs
            for h in range(hosts)
            for d in range(dirs)
        }
        assert wait_for_totals(private_kafka.bootstrap, expected, timeout=300) == expected
        assert w.metric("ktel_processor_duplicate_batches_total") >= 1  # the batch read again
    finally:
        w.stop()


@pytest.mark.parametrize("stage", ["all", "dedupe"])
def test_a_worker_killed_right_after_a_changelog_record_has_sent_what_its_batch_made(
    private_kafka, tmp_path, stage
):
    """SIGKILLed once Kafka has a batch's changelog record: what the batch made went to
    Kafka before it (fused: its kernel log on ktel.logs; split, the dedupe stage: the
    batch passed on to ktel.deduped, which the next stages count). Restarted, the worker
    drops the batch, read again, as a duplicate and makes nothing of it: had its outputs
    been behind the changelog record, they were lost for good."""
    hosts, per_host, ts = 3, 20, time.time_ns()
    traffic = [
        RawBatch(
            f"host-{h}",
            "boot",
            seq,
            ts,
            [[KTEL_LOG.id, ts, 7, 7, 9, f"h{h}-{seq}", {}, b"", b""], file_event(f"/data/h{h}/d/f")],
        )
        for seq in range(per_host)
        for h in range(hosts)
    ]
    made = {f"h{h}-{seq}" for h in range(hosts) for seq in range(per_host)}
    killed_by_its_fault(tmp_path, private_kafka.bootstrap, traffic, stage, KTEL_TEST_KILL_AFTER_RECORD="12")

    def sent_on() -> set[str]:
        if stage == "all":
            recs = asyncio.run(read_topic(private_kafka.bootstrap, LOGS_TOPIC, idle_s=1))
            return {row[3] for r in recs for row in decode_logs(r.value).logs}
        recs = asyncio.run(read_topic(private_kafka.bootstrap, DEDUPED_TOPIC, idle_s=1))
        return {ev[5] for r in recs for ev in decode_batch(r.value).events if ev[0] == KTEL_LOG.id}

    w = Worker(tmp_path, private_kafka.bootstrap, "w", stage=stage).start()  # (on the same data directory)
    try:
        deadline = time.monotonic() + 120
        # (until it has read the batch again, and everything sent on since is on Kafka)
        while w.metric("ktel_processor_duplicate_batches_total") < 1 and time.monotonic() < deadline:
            time.sleep(1)
        assert w.metric("ktel_processor_duplicate_batches_total") >= 1, w.log.read_text()[-3000:]
        got = sent_on()
        while got != made and time.monotonic() < deadline:
            time.sleep(1)
            got = sent_on()
        assert got == made, sorted(made - got)
    finally:
        w.stop()


def test_a_worker_killed_with_a_changelog_record_on_its_way_took_back_nothing_it_emitted(
    private_kafka, tmp_path
):
    """Windows close while a host's first batch has its changelog record on the way to
    Kafka (held back 3 s, windows of 1 s), and the worker is SIGKILLed before Kafka has it.
    The replacement counts the batch again from the value before it: had a window emitted
    the host's new series (0, then their values), the replacement's 0 and values after
    them would read as a counter reset, counted twice by increase(). Every series on
    ktel.metrics only ever goes up, and ends at its exact total."""
    hosts, per_host, events = 2, 6, 5
    traffic = list(batches(hosts, per_host, events))
    killed_by_its_fault(
        tmp_path,
        private_kafka.bootstrap,
        traffic,
        KTEL_TEST_KILL_HOLDING_RECORD="1",
        KTEL_TEST_HOLD_SECONDS="3",
    )
    w = Worker(tmp_path, private_kafka.bootstrap, "w").start()
    try:
        expected = batches_totals(hosts, per_host, events)
        assert wait_for_totals(private_kafka.bootstrap, expected, timeout=300) == expected
    finally:
        w.stop()
    recs = asyncio.run(read_topic(private_kafka.bootstrap, METRICS_TOPIC, idle_s=0.5, timeout=10))
    went: dict[tuple[str, str], list[float]] = {}
    for rec in sorted(recs, key=lambda r: (r.partition, r.offset)):  # (a host's, in its order)
        for name, _t, labels, value in decode_snapshot(rec.value).series:
            if name == "file_created_total":
                went.setdefault((labels["host.id"], labels["directory"]), []).append(value)
    assert went.keys() == expected.keys()
    for series, values in went.items():
        assert values == sorted(values), (series, values)


def file_event(path: str) -> list:
    return [FILE_CREATED.id, 1, 2, 2, 0, "w", path, 0o101, False]


def test_a_batch_changing_one_series_of_many_writes_a_delta_of_that_series(private_kafka, tmp_path):
    """A host holding about 2000 series: a batch adding to one of them writes one
    changelog record of a few hundred bytes, not the host's whole state."""
    w = Worker(tmp_path, private_kafka.bootstrap, "w").start()
    try:
        many = RawBatch("host-00", "boot", 0, 1, [file_event(f"/data/{i}/x/f") for i in range(1990)])
        asyncio.run(produce(private_kafka.bootstrap, [(many.key, encode_batch(many))]))
        expected = {("host-00", f"/data/{i}/x"): 1.0 for i in range(1990)}
        assert wait_for_totals(private_kafka.bootstrap, expected) == expected
        before = changelog_records(private_kafka.bootstrap)
        state = sum(len(r.key) + len(r.value) for r in before)
        assert state > 100_000  # the host's state, written whole once (its first snapshot)
        one = RawBatch("host-00", "boot", 1, 1, [file_event("/data/7/x/f")] * 3)
        asyncio.run(produce(private_kafka.bootstrap, [(one.key, encode_batch(one))]))
        expected[("host-00", "/data/7/x")] = 4.0
        assert wait_for_totals(private_kafka.bootstrap, expected) == expected
        [delta] = changelog_records(private_kafka.bootstrap)[len(before) :]
        assert json.loads(delta.key) == ["host-00", 2]  # the host's version 2
        assert json.loads(delta.value)["set"] == [
            [["aggregate", "series", '["file_created_total", [["directory", "/data/7/x"]]]'], 4.0]
        ]
        size = len(delta.key) + len(delta.value)
        print(f"changelog: {size} bytes for a batch changing 1 series of 1990 ({state} bytes whole)")
        assert size < 500
    finally:
        w.stop()


def test_garbage_and_wrong_versions_go_to_the_dlq_and_good_counts_stay_exact(private_kafka, tmp_path):
    import msgpack

    w = Worker(tmp_path, private_kafka.bootstrap, "w").start()
    try:
        rng = random.Random(11)
        # Half the good batches as the agent sends them (one zstd frame), half plain.
        good = [
            (bt.key, compress(encode_batch(bt)) if i % 2 else encode_batch(bt))
            for i, bt in enumerate(batches(4, 25, 10))
        ]
        # zstd frames no reader may inflate: one declaring 2**40 bytes, and a batch of a
        # good host with a second frame behind it (more than its header declares).
        stowaway = compress(encode_batch(list(batches(4, 25, 10))[3]))
        frames = [ZSTD_MAGIC + b"\xe0" + (1 << 40).to_bytes(8, "little") + bytes(8), stowaway + stowaway]
        bad = []
        for i in range(10_000):
            if i % 4 == 3:
                bad.append((b"host-03", frames[i // 4 % 2]))
            elif i % 4 == 0:
                bad.append((b"host-00", rng.randbytes(rng.randint(0, 64))))
            elif i % 4 == 1:
                bad.append((b"host-01", msgpack.packb({"v": 2, "host": "host-01", "events": []})))
            else:
                bad.append(
                    (
                        b"host-02",
                        msgpack.packb(
                            {"v": 1, "host": "host-02", "boot": "b", "seq": i, "sent": 1, "events": [[99]]}
                        ),
                    )
                )
        mixed = good + bad
        rng.shuffle(mixed)
        # Keep each host's good batches in order relative to each other (shuffle moved them).
        asyncio.run(produce(private_kafka.bootstrap, mixed))

        expected = {
            (f"host-{h:02d}", f"/data/h{h}/d{d}"): float(10 * len(range(d, 25, 3)))
            for h in range(4)
            for d in range(3)
        }
        got = wait_for_totals(private_kafka.bootstrap, expected)
        assert got == expected

        def dead_letters():
            return [
                decode_dead_letter(r.value)
                for r in asyncio.run(read_topic(private_kafka.bootstrap, DLQ_TOPIC, idle_s=2))
            ]

        # Garbage queued behind a partition's last good batch may still be on its way.
        deadline = time.monotonic() + 60
        while len(dead := dead_letters()) < 10_000 and time.monotonic() < deadline:
            time.sleep(1)
        assert len(dead) == 10_000
        reasons = {d.reason.split(":")[1].strip().split(" ")[0] for d in dead}
        assert any("unknown schema version 2" in d.reason for d in dead)
        assert any("unknown kind id 99" in d.reason for d in dead)
        assert any("a zstd frame of 1099511627776 bytes, more than" in d.reason for d in dead)
        assert any("raw batch: not a zstd frame" in d.reason for d in dead)
        assert reasons  # every dead letter carries a reason
        assert sorted(d.payload for d in dead) == sorted(v for _k, v in bad)
        assert w.proc.poll() is None  # the worker kept running
    finally:
        w.stop()


async def produce_bomb(bootstrap: str, key: bytes, records: int, topic: str = RAW_TOPIC) -> None:
    """One zstd record batch of ``records`` records of 8 MiB of zeros, keyed ``key`` and
    on its partition of ``topic``: a few KB in Kafka, ``records`` times 8 MiB expanded."""
    room = (records + 1) * (8 << 20)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, compression_type="zstd", max_batch_size=room, max_request_size=room
    )
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(topic))
        bomb = producer.create_batch()
        for _ in range(records):
            assert bomb.append(key=key, value=bytes(8 << 20), timestamp=None) is not None
        partition = DefaultPartitioner()(key, partitions, partitions)
        await (await producer.send_batch(bomb, topic, partition=partition))
    finally:
        await producer.stop()


def test_a_compression_bomb_is_one_dead_letter_and_its_hosts_counts_stay_exact(private_kafka, tmp_path):
    """A record batch of a few KB that expands to 40 MiB is not expanded (the bound is
    32 MiB, ktel/kafka_batches.py): the worker sends one dead letter naming it, in place
    of its five records, and counts the host's batches before and after it exactly."""
    bootstrap = private_kafka.bootstrap
    w = Worker(tmp_path, bootstrap, "w").start()
    try:
        real = list(batches(1, 30, 10))
        asyncio.run(produce(bootstrap, [(bt.key, encode_batch(bt)) for bt in real[:15]]))
        asyncio.run(produce_bomb(bootstrap, b"host-00", 5))
        asyncio.run(produce(bootstrap, [(bt.key, encode_batch(bt)) for bt in real[15:]]))
        expected = batches_totals(1, 30, 10)
        assert wait_for_totals(bootstrap, expected) == expected
        [dl] = dead_letters(bootstrap)
        assert (dl.topic, dl.offset, dl.payload) == (RAW_TOPIC, 19, b"")
        assert dl.reason == (
            "raw batch: a Kafka record batch not read (offsets 15 to 19): "
            "its zstd content expands past 32 MiB"
        )
        assert w.metric("ktel_processor_dead_letters_total") == 1
    finally:
        w.stop()


@pytest.mark.parametrize("store", ["memory", "rocksdict"])
def test_changelog_records_that_do_not_decode_are_left_out_counted_and_recovery_ends(
    private_kafka, tmp_path, store
):
    """Records no ktel worker writes, last on a host's changelog partition: one that is
    not JSON, and a batch past the expansion bound (its stand-in). The restarted worker
    leaves both out of recovery, counts them, ends its recovery and counts the host on,
    where Faust's recovery logged each, never took its offset, and waited for it for good."""
    bootstrap = private_kafka.bootstrap
    w = Worker(tmp_path, bootstrap, "w", KTEL_PROCESS__TABLE_STORE=store)
    traffic = [(bt.key, encode_batch(bt)) for bt in batches(1, 6, 5)]
    changelog = "ktel-all-host-state-changelog"
    w.start()
    try:
        asyncio.run(produce(bootstrap, traffic[:3]))
        first = {k: v / 2 for k, v in batches_totals(1, 6, 5).items()}
        assert wait_for_totals(bootstrap, first) == first
    finally:
        w.stop()
    asyncio.run(produce(bootstrap, [(b"host-00", b"\xff not JSON")], topic=changelog))
    asyncio.run(produce_bomb(bootstrap, b"host-00", 5, topic=changelog))
    w.start()
    try:
        asyncio.run(produce(bootstrap, traffic[3:]))
        expected = batches_totals(1, 6, 5)
        assert wait_for_totals(bootstrap, expected) == expected
        assert w.metric("ktel_processor_changelog_records_refused_total") == 2
    finally:
        w.stop()
    # (the bomb's five offsets follow the host's records and the one that is not JSON)
    not_read = (
        r"a Kafka record batch not read \(offsets (\d+) to (\d+)\): its zstd content expands past 32 MiB"
    )
    [(first, last)] = re.findall(not_read, w.log.read_text())
    assert int(last) - int(first) == 4


def dead_letters(bootstrap: str) -> list:
    return [decode_dead_letter(r.value) for r in asyncio.run(read_topic(bootstrap, DLQ_TOPIC, idle_s=2))]


def test_forged_batches_are_dead_lettered_and_cloned_hosts_counted_apart(private_kafka, tmp_path):
    """Batches keyed as another host, or far past their boot's sequence, go to the DLQ
    and leave the real host's counts exact; two machines sharing one host id (a cloned
    /etc/machine-id) are both counted, and every switch between them is a conflict."""
    w = Worker(tmp_path, private_kafka.bootstrap, "w").start()
    try:
        real = list(batches(1, 30, 10))  # host-00, seq 0..29
        forged_key = RawBatch("host-00", "boot", 1000, 1, real[0].events)
        forged_seq = RawBatch("host-00", "boot", 10**12, 1, real[0].events)
        traffic = [(bt.key, encode_batch(bt)) for bt in real[:10]]
        traffic += [(b"host-01", encode_batch(forged_key)), (b"host-00", encode_batch(forged_seq))]
        traffic += [(bt.key, encode_batch(bt)) for bt in real[10:]]
        ev = [FILE_CREATED.id, 1, 2, 2, 0, "w", "/clone/x/f", 0o101, False]
        traffic += [
            (b"clone", encode_batch(RawBatch("clone", boot, seq, 1, [list(ev)] * 5)))
            for seq in range(10)
            for boot in ("machine-a", "machine-b")
        ]
        asyncio.run(produce(private_kafka.bootstrap, traffic))
        expected = {("host-00", f"/data/h0/d{d}"): float(10 * len(range(d, 30, 3))) for d in range(3)}
        expected[("clone", "/clone/x")] = 100.0
        assert wait_for_totals(private_kafka.bootstrap, expected) == expected
        dead = dead_letters(private_kafka.bootstrap)
        assert sorted(d.reason for d in dead) == [
            "raw batch: key b'host-01' is not its host id 'host-00'",
            "raw batch: sequence 1000000000000 is more than 16777216 past the highest its host and boot "
            "sent (9); the stream re-anchors if its next batch follows this one",
        ]
        assert w.metric("ktel_processor_host_conflicts_total") == 18
        assert w.metric("ktel_processor_dead_letters_total") == 2
    finally:
        w.stop()


def test_past_max_hosts_a_new_hosts_records_go_to_the_dlq_and_the_held_hosts_keep_counting(
    private_kafka, tmp_path
):
    """A worker holding process.max_hosts hosts sends the batches and heartbeats of
    hosts new to it to the DLQ, naming the setting, counts them, and goes on counting
    the hosts it holds."""
    bootstrap = private_kafka.bootstrap
    w = Worker(tmp_path, bootstrap, "w", KTEL_PROCESS__MAX_HOSTS="2").start()
    try:
        held = list(batches(2, 20, 5))  # host-00 and host-01, seq 0..19
        asyncio.run(produce(bootstrap, [(b.key, encode_batch(b)) for b in held[:20]]))
        assert wait_for_totals(bootstrap, batches_totals(2, 10, 5)) == batches_totals(2, 10, 5)
        ev = [FILE_CREATED.id, 1, 2, 2, 0, "w", "/new/x/f", 0o101, False]
        new = [RawBatch(f"new-{i}", "boot", 0, 1, [ev]) for i in range(3)]
        asyncio.run(produce(bootstrap, [(b.key, encode_batch(b)) for b in new + held[20:]]))
        beat = encode_heartbeat(
            {"ts": 1, "host": {"host.id": "new-beat", "boot.id": "boot"}, "probes": {}, "counters": {}}
        )
        asyncio.run(produce(bootstrap, [(b"new-beat", beat)], topic=HEARTBEATS_TOPIC))
        assert wait_for_totals(bootstrap, batches_totals(2, 20, 5)) == batches_totals(2, 20, 5)
        deadline = time.monotonic() + 60
        while len(dead := dead_letters(bootstrap)) < 4 and time.monotonic() < deadline:
            time.sleep(1)
        assert sorted(d.payload for d in dead) == sorted([beat, *(encode_batch(b) for b in new)])
        assert all("this worker holds, and process.max_hosts = 2" in d.reason for d in dead)
        assert sorted(d.topic for d in dead) == [HEARTBEATS_TOPIC] + [RAW_TOPIC] * 3
        assert w.metric("ktel_processor_hosts_refused_total") == 4
        assert w.metric("ktel_processor_hosts") == 2
        assert w.metric("ktel_processor_hosts_limit") == 2
        assert w.metric("ktel_processor_batches_total") == 40
        assert w.proc.poll() is None
    finally:
        w.stop()


def test_records_refused_past_max_hosts_are_counted_once_when_re_driven_after_it_is_raised(
    private_kafka, tmp_path
):
    """`ktel dlq --redrive` puts a refused host's batches back on ktel.raw; a worker with
    room counts them, and re-driving them again (--again) counts nothing twice."""
    bootstrap = private_kafka.bootstrap
    w = Worker(tmp_path, bootstrap, "w", KTEL_PROCESS__MAX_HOSTS="1").start()
    held = list(batches(1, 6, 5))  # host-00
    ev = [FILE_CREATED.id, 1, 2, 2, 0, "w", "/new/x/f", 0o101, False]
    new = [RawBatch("new", "boot", seq, 1, [list(ev)] * 2) for seq in range(3)]
    try:
        asyncio.run(produce(bootstrap, [(b.key, encode_batch(b)) for b in held]))
        assert wait_for_totals(bootstrap, batches_totals(1, 6, 5)) == batches_totals(1, 6, 5)
        asyncio.run(produce(bootstrap, [(b.key, encode_batch(b)) for b in new]))
        deadline = time.monotonic() + 60
        while len(dead_letters(bootstrap)) < 3 and time.monotonic() < deadline:
            time.sleep(1)
        assert w.metric("ktel_processor_hosts_refused_total") == 3
    finally:
        w.stop()
    w.env["KTEL_PROCESS__MAX_HOSTS"] = "10"
    w.start()
    env = dict(os.environ, KTEL_KAFKA__BOOTSTRAP=bootstrap, KTEL_AGENT__HOST_ID="unused")
    redrive = [sys.executable, "-m", "ktel.cli", "dlq", "--redrive", "--reason", "process.max_hosts = 1"]
    try:
        done = subprocess.run(redrive, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stderr.splitlines()[-1].endswith("re-published 3 (3 to ktel.raw); left 0")
        expected = {**batches_totals(1, 6, 5), ("new", "/new/x"): 6.0}
        assert wait_for_totals(bootstrap, expected) == expected
        assert w.metric("ktel_processor_duplicate_batches_total") == 0
        # The next --redrive skips what the first marked re-driven; --again re-publishes it.
        skipped = subprocess.run(redrive, env=env, capture_output=True, text=True, timeout=120)
        assert skipped.returncode == 0, skipped.stderr
        assert "skipped 3 already re-driven" in skipped.stderr.splitlines()[-1]
        again = subprocess.run([*redrive, "--again"], env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        deadline = time.monotonic() + 60
        while w.metric("ktel_processor_duplicate_batches_total") < 3 and time.monotonic() < deadline:
            time.sleep(1)
        assert w.metric("ktel_processor_duplicate_batches_total") == 3
        assert wait_for_totals(bootstrap, expected) == expected
    finally:
        w.stop()


def test_the_split_sample_stage_which_keeps_no_table_refuses_hosts_past_max_hosts_too(
    private_kafka, tmp_path
):
    bootstrap = private_kafka.bootstrap
    w = Worker(tmp_path, bootstrap, "s", stage="sample", KTEL_PROCESS__MAX_HOSTS="1").start()
    try:
        ev = [FILE_CREATED.id, 1, 2, 2, 0, "w", "/a/b/f", 0o101, False]
        held, new, later = (RawBatch(h, "boot", seq, 1, [ev]) for h, seq in (("a", 0), ("b", 0), ("a", 1)))
        asyncio.run(produce(bootstrap, [(held.key, encode_batch(held))], topic=ENRICHED_TOPIC))
        deadline = time.monotonic() + 90
        while w.metric("ktel_processor_hosts") < 1:
            assert time.monotonic() < deadline, "the first host was not taken"
            time.sleep(1)
        asyncio.run(
            produce(bootstrap, [(b.key, encode_batch(b)) for b in (new, later)], topic=ENRICHED_TOPIC)
        )
        deadline = time.monotonic() + 60
        while not (dead := dead_letters(bootstrap)) and time.monotonic() < deadline:
            time.sleep(1)
        [dl] = dead
        assert (dl.stage, dl.topic, dl.payload) == ("sample", ENRICHED_TOPIC, encode_batch(new))
        assert dl.reason == "host 'b': not one of the 1 hosts this worker holds, and process.max_hosts = 1"

        # (b's dead letter may come before a's second batch: they are on two partitions)
        def sampled() -> list[RawBatch]:
            return [decode_batch(r.value) for r in asyncio.run(read_topic(bootstrap, SAMPLED_TOPIC))]

        while len(got := sampled()) < 2:
            assert time.monotonic() < deadline, got
            time.sleep(1)
        assert [(b.host_id, b.seq) for b in got] == [("a", 0), ("a", 1)]
        assert w.metric("ktel_processor_hosts_refused_total") == 1
        assert w.metric("ktel_processor_hosts") == 1
    finally:
        w.stop()


def file_created_sums(bootstrap: str, metric: str = "file_created_total") -> dict[str, float]:
    """Per host, the sum of its latest series of ``metric``, overflow series included."""
    latest: dict[tuple[str, str], tuple[int, float]] = {}
    for rec in asyncio.run(read_topic(bootstrap, METRICS_TOPIC, idle_s=0.5, timeout=10)):
        snap = decode_snapshot(rec.value)
        for name, _t, labels, value in snap.series:
            if name == metric:
                key = (labels["host.id"], json.dumps(labels, sort_keys=True))
                if key not in latest or latest[key][0] <= snap.ts_ms:
                    latest[key] = (snap.ts_ms, value)
    sums: dict[str, float] = {}
    for (host, _labels), (_ts, value) in latest.items():
        sums[host] = sums.get(host, 0.0) + value
    return sums


def test_a_host_past_its_state_bound_keeps_being_persisted_and_counted(private_kafka, tmp_path):
    """A host making far more series and processes than its state may hold: the excess
    series fold into the overflow series and the least recently named processes are
    evicted (both counted), every batch is counted, a heartbeat that would still grow
    the state past process.max_state_bytes goes to the DLQ, and the host's changelog
    records all stay within the bound."""
    limit = 65_536
    w = Worker(tmp_path, private_kafka.bootstrap, "w", KTEL_PROCESS__MAX_STATE_BYTES=str(limit)).start()
    try:
        ev = lambda path: [FILE_CREATED.id, 1, 2, 2, 0, "w", path, 0o101, False]  # noqa: E731
        # 20 batches of 200 new directories each: 4000 series, far past the bound.
        many = [
            RawBatch("host-00", "boot", s, 1, [ev(f"/d{s}/{i}/x/f") for i in range(200)]) for s in range(20)
        ]
        # 1000 processes with long paths: about 200 KB of process table.
        execs = [[PROCESS_EXEC.id, 1, p, p, 1, 0, 0, "p", "/opt/" + "x" * 150 + str(p)] for p in range(1000)]
        huge = RawBatch("host-00", "boot", 20, 1, execs)
        later = [RawBatch("host-00", "boot", s, 1, [ev("/late/a/b/f")] * 5) for s in range(21, 31)]
        asyncio.run(
            produce(private_kafka.bootstrap, [(b.key, encode_batch(b)) for b in [*many, huge, *later]])
        )
        expected = {"host-00": 20 * 200 + 10 * 5.0}
        deadline = time.monotonic() + 120
        while (got := file_created_sums(private_kafka.bootstrap)) != expected and time.monotonic() < deadline:
            time.sleep(2)
        assert got == expected
        assert file_created_sums(private_kafka.bootstrap, "process_execs_total") == {"host-00": 1000.0}
        assert dead_letters(private_kafka.bootstrap) == []

        # Host attributes are not evicted: two boots' worth of 28 KB (a heartbeat may
        # carry 32 of 1 KiB) with the host's series are more than its state may hold.
        big_host = {f"k{i:02d}": "v" * 1000 for i in range(28)}
        heartbeats = [
            encode_heartbeat(
                {
                    "ts": 1,
                    "host": {"host.id": "host-00", "boot.id": boot, **big_host},
                    "probes": {},
                    "counters": {},
                }
            )
            for boot in ("boot", "other-boot")
        ]
        asyncio.run(
            produce(private_kafka.bootstrap, [(b"host-00", hb) for hb in heartbeats], topic=HEARTBEATS_TOPIC)
        )
        deadline = time.monotonic() + 60
        while not (dead := dead_letters(private_kafka.bootstrap)) and time.monotonic() < deadline:
            time.sleep(1)
        [dl] = dead
        assert (dl.topic, dl.payload) == (HEARTBEATS_TOPIC, heartbeats[1])
        assert f"process.max_state_bytes = {limit}" in dl.reason
        # The first heartbeat's attributes left no room for any process: all 1000 were
        # evicted, some by the batch that exec'd them, the rest by the heartbeat.
        assert w.metric("ktel_processor_enrich_evicted_total") == 1000
        assert w.metric("ktel_processor_processes_known") == 0
        assert w.metric("ktel_processor_heartbeats_total") == 1
        assert w.metric("ktel_processor_series_overflow_total") > 0
        assert w.metric("ktel_processor_batches_total") == 31
        # Every changelog record fits; the host's state they make holds every batch's
        # dedupe record, the first heartbeat's attributes and no process.
        records = changelog_records(private_kafka.bootstrap)
        assert records and all(len(r.value) <= limit for r in records)
        recovered: dict = {}
        for r in records:
            changelog.fold(recovered, json.loads(r.key), json.loads(r.value))
        last = recovered["host-00"]
        assert last["aggregate"]["seen"] == {"boot": [[0, 30]]}
        assert list(last["enrich"]["boots"]) == ["boot"]
        assert last["enrich"]["boots"]["boot"]["host"]["k27"] == "v" * 1000
        assert last["enrich"]["boots"]["boot"].get("procs") == {}
        assert w.proc.poll() is None
    finally:
        w.stop()


def test_a_window_emits_only_the_series_that_changed_on_its_deadline(private_kafka, tmp_path):
    """A real worker: once a host's two series are out, a batch adding to one of them
    brings a snapshot of that one alone; the other waits for its refresh (250 s here,
    longer than the test). Each window closes on a multiple of its length since the
    epoch, late by what the worker counts in ktel_processor_window_delay_seconds; each
    record's age as the worker took it is in ktel_processor_input_age_seconds."""
    w = Worker(tmp_path, private_kafka.bootstrap, "w", KTEL_AGGREGATE__REFRESH_SECONDS="250").start()
    try:
        first, second, _, third = batches(1, 4, 5)  # directories d0, d1, d2, d0
        asyncio.run(produce(private_kafka.bootstrap, [(b.key, encode_batch(b)) for b in (first, second)]))
        both = {("host-00", "/data/h0/d0"): 5.0, ("host-00", "/data/h0/d1"): 5.0}
        assert wait_for_totals(private_kafka.bootstrap, both) == both
        asyncio.run(produce(private_kafka.bootstrap, [(third.key, encode_batch(third))]))
        after = {**both, ("host-00", "/data/h0/d0"): 10.0}
        assert wait_for_totals(private_kafka.bootstrap, after) == after
        recs = asyncio.run(read_topic(private_kafka.bootstrap, METRICS_TOPIC, idle_s=0.5, timeout=10))
        series = [[(r[2]["directory"], r[3]) for r in decode_snapshot(rec.value).series] for rec in recs]
        [changed] = [s for s in series if ("/data/h0/d0", 10.0) in s]
        assert changed == [("/data/h0/d0", 10.0)]
        assert w.metric("ktel_processor_unchanged_series_total") > 0
        delays = w.buckets("ktel_processor_window_delay_seconds", stage="all", window="aggregate")
        closed = delays[float("inf")]
        # A close for each snapshot at a close, at least (not counting those of new series
        # at 0, stamped 1 ms before their host's and sent just before it).
        at_close = [r for r in recs if any(row[3] for row in decode_snapshot(r.value).series)]
        assert closed >= len(at_close) >= 2
        # The least bound every delay is within: no snapshot at a close is further past
        # its second (a zero, 1 ms before one on time, is 999 ms past the one before).
        latest = min(le for le, n in delays.items() if n == closed)
        assert all(decode_snapshot(r.value).ts_ms % 1000 <= latest * 1000 for r in at_close)
        # Each raw record's age as the worker took it: the three batches, none over a minute.
        ages = w.buckets("ktel_processor_input_age_seconds", stage="all")
        assert ages[60.0] == ages[float("inf")] >= 3
    finally:
        w.stop()


def test_logs_past_what_a_kafka_record_takes_go_out_in_parts(private_kafka, tmp_path):
    """1,000 logs of 1 KB from one process in one batch (a module logging in a loop)
    make a 1 MB log record, past the 1,000,000 bytes a worker's producer sends: the
    worker stopped on that batch at every restart, and nothing after it on its partition
    was counted. The logs go out in parts that fit, every log in one of them."""
    host = str(uuid.uuid4())
    ts = time.time_ns()
    logs = [[KTEL_LOG.id, ts, 7, 7, 9, f"{i:06d}" + "x" * 1000, {}, b"", b""] for i in range(1000)]
    w = Worker(tmp_path, private_kafka.bootstrap, "w").start()
    try:
        raw = compress(encode_batch(RawBatch(host, "boot", 0, ts, logs)))  # (as an agent sends it)
        files = [[FILE_CREATED.id, 1, 2, 2, 0, "w", "/data/h0/d0/f", 0o101, False]] * 5
        after = encode_batch(RawBatch(host, "boot", 1, ts, files))  # the partition's next, counted
        asyncio.run(produce(private_kafka.bootstrap, [(host.encode(), raw), (host.encode(), after)]))
        totals = {(host, "/data/h0/d0"): 5.0}
        assert wait_for_totals(private_kafka.bootstrap, totals) == totals
        deadline, bodies = time.monotonic() + 60, []
        while len(bodies) < len(logs) and time.monotonic() < deadline:
            recs = asyncio.run(read_topic(private_kafka.bootstrap, LOGS_TOPIC, idle_s=1))
            recs = [r for r in recs if r.key == host.encode()]
            bodies = sorted(row[3] for r in recs for row in decode_logs(r.value).logs)
        assert bodies == [ev[5] for ev in logs] and len(recs) > 1
        assert all(len(r.key) + len(r.value) <= SEND_MAX_BYTES for r in recs)
        assert w.proc.poll() is None, w.log.read_text()[-3000:]  # (never stopped on it)
    finally:
        w.stop()


def test_a_batch_whose_log_no_record_can_carry_goes_to_the_dlq_uncounted(private_kafka, tmp_path):
    """A batch on ktel.sampled (any client can write it) naming a process with as many
    attributes as the wire takes, each an array of 4 KB strings: the log row of that
    process alone is past what a Kafka record takes, and no split helps. The worker sent
    its counts, then stopped on the log at every restart. The batch now goes to ktel.dlq
    with the reason before anything of it is counted, and the partition's next batch
    counts."""
    host = str(uuid.uuid4())
    ts = time.time_ns()
    log_ev = [KTEL_LOG.id, ts, 7, 7, 9, "hello", {}, b"", b""]
    files = [[FILE_CREATED.id, 1, 2, 2, 0, "w", "/data/h0/d0/f", 0o101, False]] * 5
    wide = {f"a{i:03d}": ["x" * 4096] * 3 for i in range(PROCESS_ATTRS)}
    big = compress(encode_batch(RawBatch(host, "boot", 0, ts, [log_ev, *files], processes={"7": wide})))
    after = encode_batch(RawBatch(host, "boot", 1, ts, files))
    w = Worker(tmp_path, private_kafka.bootstrap, "aggregate", stage="aggregate").start()
    try:
        records = [(host.encode(), big), (host.encode(), after)]
        asyncio.run(produce(private_kafka.bootstrap, records, topic=SAMPLED_TOPIC))
        totals = {(host, "/data/h0/d0"): 5.0}
        assert wait_for_totals(private_kafka.bootstrap, totals) == totals
        [dl] = [d for d in dead_letters(private_kafka.bootstrap) if d.payload == big]
        assert dl.stage == "aggregate" and "more than Kafka takes" in dl.reason, dl.reason
        assert latest_totals(private_kafka.bootstrap, idle_s=2)[(host, "/data/h0/d0")] == 5.0
        assert w.proc.poll() is None, w.log.read_text()[-3000:]  # (never stopped on it)
    finally:
        w.stop()


def test_a_silent_host_ends_its_series_stale_and_stays_forgotten_after_a_restart(private_kafka, tmp_path):
    ttl = {"KTEL_AGGREGATE__HOST_TTL_SECONDS": "3"}
    w = Worker(tmp_path, private_kafka.bootstrap, "w", **ttl).start()
    w2 = None

    def snapshots_of(host: str) -> list:
        recs = asyncio.run(read_topic(private_kafka.bootstrap, METRICS_TOPIC, idle_s=0.5, timeout=10))
        return [s for s in map(decode_snapshot, (r.value for r in recs)) if s.series[0][2]["host.id"] == host]

    try:
        [first] = batches(1, 1, 7)
        asyncio.run(produce(private_kafka.bootstrap, [(first.key, encode_batch(first))]))
        deadline = time.monotonic() + 60
        while not any(s.stale for s in snapshots_of("host-00")):
            assert time.monotonic() < deadline, "no stale snapshot for the silent host"
            time.sleep(1)
        # (counted once the host's changelog records are sent, just after its stale snapshot)
        while w.metric("ktel_processor_expired_hosts_total") < 1:
            assert time.monotonic() < deadline, "the silent host's expiry not counted"
            time.sleep(0.2)
        assert w.metric("ktel_processor_expired_hosts_total") == 1
        w.stop()
        # A worker recovering the table from its changelog must not bring the host back.
        w2 = Worker(tmp_path, private_kafka.bootstrap, "w2", **ttl).start()
        wait_for_group(private_kafka.bootstrap, "ktel-all", members=1)
        time.sleep(5)  # a few windows of the new worker, after it recovered the table
        snaps = snapshots_of("host-00")
        last_stale = len(snaps) - 1
        # One stale snapshot, the last: the host was forgotten, by the new worker too.
        assert [i for i, s in enumerate(snaps) if s.stale] == [last_stale], [s.stale for s in snaps]
        assert snaps[last_stale].series[0][3] == 7.0
        # Back again, it starts afresh: at 0, after its stale marker, then at its count.
        again = RawBatch("host-00", "boot", 1, 1, first.events[:2])
        asyncio.run(produce(private_kafka.bootstrap, [(again.key, encode_batch(again))]))
        deadline = time.monotonic() + 60
        while len(snaps := [s for s in snapshots_of("host-00")[last_stale + 1 :] if not s.stale]) < 2:
            assert time.monotonic() < deadline, "the returning host was not reported"
            time.sleep(1)
        assert [s.series[0][3] for s in snaps[:2]] == [0.0, 2.0]
        assert snapshots_of("host-00")[last_stale].ts_ms < snaps[0].ts_ms == snaps[1].ts_ms - 1
    finally:
        w.stop()
        if w2:
            w2.stop()


def test_a_worker_taking_hosts_over_after_an_outage_past_their_ttl_forgets_none_that_is_alive(
    private_kafka, tmp_path
):
    """Processing down for longer than aggregate.host_ttl_seconds: the worker that takes
    the partitions over finds every host's last batch older than that, and the batches
    since still unread. It forgets none of them while it reads what the partition held
    when it took it: a host that sent meanwhile keeps its series (no stale marker, no
    restart from 0) and its record of what was counted, so a batch read again counts once."""
    ttl = {"KTEL_AGGREGATE__HOST_TTL_SECONDS": "10"}
    partitions = KafkaConfig().raw_partitions
    counted, later = batches(1, 2, 7)
    # Records of another host of the same partition before the live host's: re-sent
    # batches, dropped as duplicates, enough for the worker's first windows to come
    # before it reads the live host's.
    same = partition_of("host-00", partitions)
    other = next(h for h in (f"other-{i}" for i in range(1000)) if partition_of(h, partitions) == same)
    filler = RawBatch(other, "boot", 0, 1, [])
    w = Worker(tmp_path, private_kafka.bootstrap, "w", **ttl).start()
    try:
        asyncio.run(produce(private_kafka.bootstrap, [(b.key, encode_batch(b)) for b in (counted, filler)]))
        deadline = time.monotonic() + 120
        while w.batches_done() < 2:
            assert time.monotonic() < deadline, "the first batches were not counted"
            time.sleep(0.2)
        counted_at = time.monotonic()
    finally:
        w.stop()  # (within the TTL: the host is held, with its record of what was counted)
    backlog = [(filler.key, encode_batch(filler))] * 40_000
    backlog += [(counted.key, encode_batch(counted)), (later.key, encode_batch(later))]
    asyncio.run(produce(private_kafka.bootstrap, backlog))
    time.sleep(max(0.0, counted_at + 11 - time.monotonic()))  # (the outage: past the TTL)
    w = Worker(tmp_path, private_kafka.bootstrap, "w2", **ttl).start()
    try:
        both = {("host-00", "/data/h0/d0"): 7.0, ("host-00", "/data/h0/d1"): 7.0}
        assert wait_for_totals(private_kafka.bootstrap, both, timeout=180) == both
    finally:
        w.stop()
    recs = asyncio.run(read_topic(private_kafka.bootstrap, METRICS_TOPIC, idle_s=0.5, timeout=10))
    snaps = [
        s for s in map(decode_snapshot, (r.value for r in recs)) if s.series[0][2]["host.id"] == "host-00"
    ]
    # No stale marker but a last one (the host silent since, past its TTL), and its series
    # only went up: the batch read again counted once, and nothing restarted at 0.
    assert not any(s.stale for s in snaps[:-1]), "the live host was forgotten while its batches were unread"
    for directory in {labels["directory"] for s in snaps for _n, _t, labels, _v in s.series}:
        values = [v for s in snaps for _n, _t, labels, v in s.series if labels["directory"] == directory]
        assert values == sorted(values), (directory, values)


@pytest.mark.parametrize(
    ("stage", "sends"), [("all", "heartbeats"), ("enrich", "heartbeats"), ("dedupe", "batches")]
)
def test_a_host_no_stage_forgets_is_forgotten_once_silent(private_kafka, tmp_path, stage, sends):
    """A host that only sends heartbeats (a forged host.id, a node whose probes send
    nothing) leaves the aggregate nothing to forget, and the split dedupe and enrich
    stages forget no host themselves: the worker does, once no record named the host
    for a little over aggregate.host_ttl_seconds, so a fleet's every host that ever
    was does not stay in its table. A host still sending stays."""
    ttl = {"KTEL_AGGREGATE__HOST_TTL_SECONDS": "2"}
    w = Worker(tmp_path, private_kafka.bootstrap, "w", stage=stage, **ttl).start()
    silent, live = f"silent-{stage}", f"live-{stage}"

    def record(host: str, n: int) -> tuple[bytes, bytes]:
        if sends == "batches":
            return host.encode(), encode_batch(RawBatch(host, "boot", n, 1, []))
        hb = {"ts": n + 1, "host": {"host.id": host, "boot.id": "boot"}, "probes": {}, "counters": {}}
        return host.encode(), encode_heartbeat(hb)

    topic = RAW_TOPIC if sends == "batches" else HEARTBEATS_TOPIC
    try:
        asyncio.run(produce(private_kafka.bootstrap, [record(silent, 0), record(live, 0)], topic=topic))
        n, deadline = 1, time.monotonic() + 90
        while w.metric("ktel_processor_expired_hosts_total") < 1:
            assert time.monotonic() < deadline, "the silent host was not forgotten"
            asyncio.run(produce(private_kafka.bootstrap, [record(live, n)], topic=topic))
            n += 1
            time.sleep(1)
        asyncio.run(produce(private_kafka.bootstrap, [record(live, n)], topic=topic))
        time.sleep(2)  # (more checks, within the live host's delay: it stays)
        assert w.metric("ktel_processor_expired_hosts_total") == 1
    finally:
        w.stop()
    tombstoned = {r.key for r in changelog_records(private_kafka.bootstrap, stage) if r.value is None}
    assert json.dumps(silent).encode() in tombstoned
    assert json.dumps(live).encode() not in tombstoned


def test_split_stages_chain_to_exact_counts(private_kafka, tmp_path):
    workers = [
        Worker(tmp_path, private_kafka.bootstrap, st, stage=st).start()
        for st in ("dedupe", "enrich", "sample", "aggregate")
    ]
    try:
        traffic = [(bt.key, encode_batch(bt)) for bt in batches(3, 20, 10)]
        traffic += traffic[:15]  # re-sent batches
        asyncio.run(produce(private_kafka.bootstrap, traffic))
        expected = {
            (f"host-{h:02d}", f"/data/h{h}/d{d}"): float(10 * len(range(d, 20, 3)))
            for h in range(3)
            for d in range(3)
        }
        assert wait_for_totals(private_kafka.bootstrap, expected) == expected
    finally:
        for w in workers:
            w.stop()


def test_split_stages_forget_no_live_host_while_a_stage_before_them_is_down_past_the_ttl(
    private_kafka, tmp_path
):
    """Split mode, the dedupe stage down for longer than aggregate.host_ttl_seconds while a
    host keeps sending: the stages after it hear nothing of the host meanwhile, and forget
    it only if the stages before them have passed on what they read (processors/upstream.py).
    Once dedupe is back, the host's series go on from where they were: no stale marker, no
    restart from 0, every batch counted once."""
    ttl = {"KTEL_AGGREGATE__HOST_TTL_SECONDS": "30"}  # (checked every 7.5 s)
    names = ("dedupe", "enrich", "sample", "aggregate")
    workers = {st: Worker(tmp_path, private_kafka.bootstrap, st, stage=st, **ttl).start() for st in names}
    sent = list(batches(1, 48, 5))
    try:
        asyncio.run(produce(private_kafka.bootstrap, [(b.key, encode_batch(b)) for b in sent[:3]]))
        first = batches_totals(1, 3, 5)
        assert wait_for_totals(private_kafka.bootstrap, first) == first
        workers["dedupe"].kill()
        # The outage: 45 s, past the TTL, a batch a second, none passed on.
        asyncio.run(
            produce(private_kafka.bootstrap, [(b.key, encode_batch(b)) for b in sent[3:]], pace_s=1.0)
        )
        assert latest_totals(private_kafka.bootstrap) == first
        workers["dedupe"] = Worker(
            tmp_path, private_kafka.bootstrap, "dedupe2", stage="dedupe", **ttl
        ).start()
        every = batches_totals(1, 48, 5)
        assert wait_for_totals(private_kafka.bootstrap, every, timeout=180) == every
        assert workers["aggregate"].metric("ktel_processor_expired_hosts_total") == 0
    finally:
        for w in workers.values():
            w.stop()
    snaps = [
        s
        for s in map(
            decode_snapshot,
            (
                r.value
                for r in asyncio.run(
                    read_topic(private_kafka.bootstrap, METRICS_TOPIC, idle_s=0.5, timeout=10)
                )
            ),
        )
        if s.series and s.series[0][2].get("host.id") == "host-00"
    ]
    assert not any(s.stale for s in snaps), "the live host was forgotten while dedupe was down"


def test_split_stages_enrich_batches_with_exactly_what_is_known(private_kafka, tmp_path):
    host = "host-enrich"
    feed = tmp_path / "pods.jsonl"
    pod = {"container.id": "9f86d081884c", "k8s.pod.name": "web-0", "k8s.namespace.name": "shop"}
    feed.write_text(json.dumps({"host.id": host, "cgroup.id": 4242, **pod}) + "\n")
    workers = [
        Worker(tmp_path, private_kafka.bootstrap, st, stage=st, KTEL_ENRICH__METADATA_FILE=str(feed)).start()
        for st in ("dedupe", "enrich", "sample", "aggregate")
    ]
    host_attrs = {"host.id": host, "host.name": "node-7", "host.arch": "x86_64", "os.type": "linux"}
    host_attrs |= {"os.version": "6.1.0-28-amd64", "boot.id": "boot", "ktel.agent.version": "0.1.0"}

    async def send(topic, *values):
        producer = AIOKafkaProducer(bootstrap_servers=private_kafka.bootstrap, enable_idempotence=True)
        await producer.start()
        try:
            for v in values:
                await producer.send_and_wait(topic, v, key=host.encode())
        finally:
            await producer.stop()

    def enriched() -> list[RawBatch]:
        recs = asyncio.run(read_topic(private_kafka.bootstrap, ENRICHED_TOPIC, idle_s=1))
        return [b for b in (decode_batch(r.value) for r in recs) if b.host_id == host]

    try:
        hb = {"ts": 1, "host": host_attrs, "probes": {}, "counters": {}}
        asyncio.run(send(HEARTBEATS_TOPIC, encode_heartbeat(hb)))
        # Heartbeats and batches are separate topics, read in no set order: send
        # empty batches until one comes out with the heartbeat's host.name.
        seq, deadline = 0, time.monotonic() + 90
        while time.monotonic() < deadline:
            asyncio.run(send(RAW_TOPIC, encode_batch(RawBatch(host, "boot", seq, 1, []))))
            seq += 1
            if any(b.resource and "host.name" in b.resource for b in enriched()):
                break
        else:
            pytest.fail("no enriched batch carried the heartbeat's host attributes")
        exec_ev = [PROCESS_EXEC.id, 1, 4321, 4321, 1, 1000, 4242, "ktel-demo", "/usr/bin/ktel-demo"]
        files = [
            [FILE_CREATED.id, 2, 4321, 4321, 1000, "ktel-demo", "/tmp/enrich/a", 0o101, True],
            [FILE_CREATED.id, 2, 777, 777, 0, "never-seen", "/tmp/enrich/b", 0o101, True],
        ]
        first = seq
        asyncio.run(
            send(
                RAW_TOPIC,
                encode_batch(RawBatch(host, "boot", first, 1, [exec_ev])),
                encode_batch(RawBatch(host, "boot", first + 1, 1, files)),
            )
        )
        # Through sample and aggregate too: the enriched batches are counted. This
        # test's broker has no other snapshots, so ktel.metrics starts empty.
        expected = {(host, "/tmp/enrich"): 2.0}
        assert wait_for_totals(private_kafka.bootstrap, expected) == expected
        out = {b.seq: b for b in enriched()}
        demo = {
            "process.pid": 4321,
            "process.parent_pid": 1,
            "process.executable.name": "ktel-demo",
            "process.executable.path": "/usr/bin/ktel-demo",
            "process.real_user.id": 1000,
            "cgroup.id": 4242,
            **pod,
        }
        assert (out[first].resource, out[first].processes) == (host_attrs, {"4321": demo})
        # pid 777 was never exec'd: no process attributes at all.
        assert (out[first + 1].resource, out[first + 1].processes) == (host_attrs, {"4321": demo})
        assert out[first + 1].events == files
    finally:
        for w in workers:
            w.stop()


def test_split_enrich_passes_on_a_batch_it_made_larger_than_a_kafka_record(private_kafka, tmp_path):
    """A raw batch of file creations with long paths that do not compress (any client
    can write ktel.raw), 0.98 MB compressed, enriched with its host's resource from a
    heartbeat (30 attributes of 1 KB, as random): more than a Kafka record takes
    even compressed. The worker stopped on it at every restart (the producer refused
    it); the enrich stage now passes it on in parts that fit, as the agent splits its
    own, every event in one part, where its part says."""
    host = "host-wide"
    workers = [Worker(tmp_path, private_kafka.bootstrap, st, stage=st).start() for st in ("dedupe", "enrich")]
    attrs = {f"host.label.h{i:02d}": base64.b64encode(os.urandom(768)).decode() for i in range(30)}
    hb = {"ts": 1, "host": {"host.id": host, "boot.id": "boot", **attrs}, "probes": {}, "counters": {}}
    paths: list[str] = []

    def files() -> list[list]:
        return [[FILE_CREATED.id, 1, 2, 2, 0, "w", path, 0o101, False] for path in paths]

    for random_bytes, up_to in ((12_000, 950_000), (1_500, 980_000)):  # (just under a record)
        while len(compress(encode_batch(RawBatch(host, "boot", 0, 1, files())))) < up_to:
            paths.append(f"/d{len(paths):02d}/" + base64.b64encode(os.urandom(random_bytes)).decode())

    def send(topic: str, value: bytes) -> None:
        asyncio.run(produce(private_kafka.bootstrap, [(host.encode(), value)], topic=topic))

    def enriched() -> list[tuple[RawBatch, int]]:
        recs = asyncio.run(read_topic(private_kafka.bootstrap, ENRICHED_TOPIC, idle_s=1))
        return [
            (b, len(r.key) + len(r.value)) for r in recs for b in [decode_batch(r.value)] if b.host_id == host
        ]

    try:
        send(HEARTBEATS_TOPIC, encode_heartbeat(hb))
        seq, deadline = 0, time.monotonic() + 90
        while time.monotonic() < deadline:  # (until the heartbeat is in: the topics are read in no set order)
            raw = compress(encode_batch(RawBatch(host, "boot", seq, 1, files())))
            send(RAW_TOPIC, raw)
            seq += 1
            time.sleep(1)
            wide = [b.seq for b, _ in enriched() if b.resource and "host.label.h00" in b.resource]
            if wide:
                break
        else:
            pytest.fail("no enriched batch carried the host's resource")
        assert len(raw) < SEND_MAX_BYTES

        def parts_of_first() -> list[tuple[RawBatch, int]]:
            return [(b, n) for b, n in enriched() if b.seq == wide[0]]

        # (until that batch's parts hold all its events: the first may be read before the rest)
        parts = parts_of_first()
        while sum(len(b.events) for b, _ in parts) < len(paths):
            assert time.monotonic() < deadline + 60, [len(b.events) for b, _ in parts]
            time.sleep(1)
            parts = parts_of_first()
        assert len(parts) > 1 and all(n <= SEND_MAX_BYTES for _, n in parts)
        assert all(b.part is not None and b.part[1] == len(paths) for b, _ in parts)
        # Each part's events where its part says, and every event in one part.
        at = sorted((b.part[0] + i, ev[6]) for b, _ in parts for i, ev in enumerate(b.events))
        assert at == list(enumerate(paths))
        assert all(b.resource == {**hb["host"]} for b, _ in parts)
        for w in workers:
            assert w.proc.poll() is None, w.log.read_text()[-3000:]  # (never stopped on it)
    finally:
        for w in workers:
            w.stop()


@pytest.mark.bpf
def test_the_agent_names_a_process_container_and_pod_and_enrich_attaches_them(private_kafka, tmp_path):
    need_bpf()
    host, cid, pod_uid = "host-containers", secrets.token_hex(32), str(uuid.uuid4())
    pod_slice = f"kubepods-besteffort-pod{pod_uid.replace('-', '_')}.slice"
    out_dir = tmp_path / "in-container"
    out_dir.mkdir()
    workers = [Worker(tmp_path, private_kafka.bootstrap, st, stage=st).start() for st in ("dedupe", "enrich")]
    with cgroup2_child(pod_slice, f"cri-containerd-{cid}.scope") as cgroup:
        cgroup_id = os.stat(cgroup).st_ino
        agent = AgentProcess(
            tmp_path, private_kafka.bootstrap, host_id=host, probes='["process", "file_created"]'
        )
        try:
            agent.start()
            # Heartbeats and batches are separate topics, read in no set order, and
            # a file's exec may be drained into a later batch than the file: create
            # files in the container until one comes out with its container.
            deadline, n = time.monotonic() + 90, 0
            while time.monotonic() < deadline:
                subprocess.run(
                    ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec touch "$0"', out_dir / f"f{n}"],
                    check=True,
                )
                n += 1
                time.sleep(0.5)
                found = [
                    b.processes[str(ev[2])]
                    for r in asyncio.run(read_topic(private_kafka.bootstrap, ENRICHED_TOPIC, idle_s=0.5))
                    if (b := decode_batch(r.value)).host_id == host
                    for ev in b.events
                    if ev[0] == FILE_CREATED.id
                    and ev[6].startswith(str(out_dir))
                    and str(ev[2]) in b.processes
                ]
                if any("container.id" in attrs for attrs in found):
                    break
            else:
                pytest.fail(f"no enriched batch named the container behind a file in {out_dir}")
            heartbeats = [
                decode_heartbeat(r.value)
                for r in asyncio.run(read_topic(private_kafka.bootstrap, HEARTBEATS_TOPIC, idle_s=0.5))
                if r.key == host.encode()
            ]
            pod_id = os.stat(cgroup.parent).st_ino
        finally:
            agent.stop()
            for w in workers:
                w.stop()
    # Each file's process as enrich knew it: `touch`, once its exec was read. (A file
    # read before that exec finds the pid's `sh`, still outside the container.)
    named = [a for a in found if "container.id" in a]
    assert {a["process.executable.name"] for a in named} == {"touch"}
    assert {a["cgroup.id"] for a in named} == {cgroup_id}
    assert {(a["container.id"], a["container.runtime.name"], a["k8s.pod.uid"]) for a in named} == {
        (cid, "containerd", pod_uid)
    }
    # What the agent listed: the pod's cgroup and the container's, each exactly once.
    ours = [(cg, a) for cg, a in heartbeats[-1]["containers"] if cg in (pod_id, cgroup_id)]
    assert sorted(ours) == [
        (pod_id, {"k8s.pod.uid": pod_uid}),
        (cgroup_id, {"k8s.pod.uid": pod_uid, "container.id": cid, "container.runtime.name": "containerd"}),
    ]


def test_a_rate_spike_raises_the_hosts_fidelity_and_the_calm_restores_it(private_kafka, tmp_path):
    w = Worker(
        tmp_path,
        private_kafka.bootstrap,
        "w",
        KTEL_SAMPLE__WINDOW_SECONDS="1",
        KTEL_SAMPLE__NORMAL_SAMPLE_EVERY="10",
        KTEL_SAMPLE__MIN_RATE="5",
    ).start()
    try:
        # The worker must be reading before the timed traffic starts: a backlog read
        # at once would make one window's rate of several seconds' traffic.
        ev = [FILE_CREATED.id, 1, 2, 2, 0, "w", "/x/f", 0o101, False]
        warm_up = RawBatch("warm-up", "boot", 0, 1, [ev])
        asyncio.run(produce(private_kafka.bootstrap, [(warm_up.key, encode_batch(warm_up))]))
        deadline = time.monotonic() + 120
        while not w.batches_done():
            assert time.monotonic() < deadline, w.log.read_text()[-3000:]
            time.sleep(0.2)

        async def traffic():
            producer = AIOKafkaProducer(bootstrap_servers=private_kafka.bootstrap)
            await producer.start()
            loop = asyncio.get_running_loop()
            start, seq = loop.time(), 0
            # Steady 100 events/s from two hosts, then host-01 jumps to 2000/s for 4 s,
            # then calms down. Sent every tenth of a second, on a fixed schedule: a
            # batch late for its window then moves a tenth of a second's events.
            for tick in range(220):
                second = tick // 10
                for h in (0, 1):
                    n = 200 if h == 1 and 10 <= second < 14 else 10
                    b = RawBatch(f"host-{h:02d}", "boot", seq, 1, [list(ev) for _ in range(n)])
                    await producer.send("ktel.raw", encode_batch(b), key=b.key)
                    seq += 1
                await asyncio.sleep(max(0.0, start + (tick + 1) / 10 - loop.time()))
            await producer.stop()

        asyncio.run(traffic())

        def commands() -> list:
            return [
                decode_command(r.value)
                for r in asyncio.run(read_topic(private_kafka.bootstrap, CONTROL_TOPIC, idle_s=2))
            ]

        # The restore goes out with the first calm window the worker handles.
        deadline = time.monotonic() + 120
        cmds = commands()
        while not any(c.sample_every == 10 for c in cmds):
            assert time.monotonic() < deadline, (cmds, w.log.read_text()[-3000:])
            time.sleep(1)
            cmds = commands()
        assert {c.target for c in cmds} == {"host-01"}  # the steady host is left alone
        assert [(c.probe, c.sample_every) for c in cmds] == [("file_created", 1), ("file_created", 10)]
        assert cmds[0].until_ms > time.time_ns() // 1_000_000  # the raise is still in force when read
    finally:
        w.stop()


def test_a_stage_refuses_topics_its_table_cannot_be_partitioned_like(private_kafka, tmp_path):
    def start(stage, **settings):
        env = Worker(tmp_path, private_kafka.bootstrap, stage, stage, **settings).env
        return subprocess.run(
            [sys.executable, "-m", "ktel.cli", "process", stage],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    # The topics were made with kafka.raw_partitions = 6; the config now says 4.
    done = start("dedupe", KTEL_KAFKA__RAW_PARTITIONS="4")
    assert done.returncode != 0
    assert "ktel.raw has 6 partitions but kafka.raw_partitions = 4" in done.stderr
    assert "set kafka.raw_partitions = 6" in done.stderr

    # A ktel.heartbeats made before the enrich stage existed (output_partitions).
    async def remake_heartbeats():
        admin = AIOKafkaAdminClient(bootstrap_servers=private_kafka.bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([HEARTBEATS_TOPIC])
        finally:
            await admin.close()
        for _ in range(50):  # deletion completes asynchronously
            try:
                await create_topics(private_kafka.bootstrap, [TopicSpec(HEARTBEATS_TOPIC, 2)])
                if await topic_partitions(private_kafka.bootstrap, HEARTBEATS_TOPIC) == 2:
                    return
            except KafkaError:
                pass
            await asyncio.sleep(0.2)
        raise AssertionError("ktel.heartbeats was not made again with 2 partitions")

    asyncio.run(remake_heartbeats())
    done = start("enrich")
    assert done.returncode != 0
    assert "ktel.heartbeats has 2 partitions but kafka.raw_partitions = 6" in done.stderr
    assert "run `ktel topics`" in done.stderr
