"""`ktel replay` against the real broker: a window of ktel.raw for one host and kind.

Batches of two hosts are produced into ktel.raw with explicit record timestamps in
three windows, W1 = base+[0, 10) s, W2 = base+[60, 70) s, W3 = base+[120, 130) s,
plus a garbage record. base is the present (all timestamps are at or after every
record already in the session broker's ktel.raw), so offsets_for_times, which
looks for the first record at or after a time, starts every read at or before
ours. Host ids are unique to the run because other tests' batches share the topic.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndTimestamp

from ktel import cli, config, replay, topic_window, topics
from ktel.replay import NS, Filter, Options, ReplayError
from ktel.topics import TopicSpec, create_topics
from ktel.wire import (
    CONTROL_TOPIC,
    DEDUPED_TOPIC,
    DLQ_TOPIC,
    FILE_CREATED,
    RAW_TOPIC,
    TCP_RETRANSMIT,
    RawBatch,
    decode_batch,
    decode_dead_letter,
    encode_batch,
)
from ktel.wire.codec import compress
from tests.integration.agent_harness import read_topic
from tests.unit.test_replay import nested_too_deeply

pytestmark = pytest.mark.kafka

MS = 1_000_000
GARBAGE = b"\xc1 not a raw batch"


@dataclass(frozen=True)
class Data:
    base_ms: int
    host_a: str
    host_b: str
    run: str
    garbage_offset: int
    garbage_partition: int

    def ns(self, seconds: float) -> int:
        return self.base_ms * MS + int(seconds * NS)

    def path(self, name: str) -> str:
        return f"/tmp/{self.run}/{name}"


def created(ts_ns: int, path: str) -> list:
    return [FILE_CREATED.id, ts_ns, 42, 42, 0, "touch", path, 0o101, True]


def retransmit(ts_ns: int) -> list:
    return [TCP_RETRANSMIT.id, ts_ns, "ipv4", "10.0.0.1", 1234, "10.0.0.2", 80, "ESTABLISHED", 0]


@pytest.fixture(scope="module")
def data(kafka) -> Data:
    run = uuid.uuid4().hex[:8]
    d = Data(
        base_ms=time.time_ns() // MS + 1000,
        host_a=f"replay-a-{run}",
        host_b=f"replay-b-{run}",
        run=run,
        garbage_offset=-1,
        garbage_partition=-1,
    )
    a, b, t, p = d.host_a, d.host_b, d.ns, d.path
    # (host, record time s after base, events); produced in this order, which is also
    # record-time order, as an agent's records are.
    records: list[tuple[str, float, list | bytes]] = [
        (a, 1, [created(t(0.5), p("a-w1"))]),
        (b, 2, [created(t(1.5), p("b-w1"))]),
        # In W2, with a retransmit (another kind) and an event older than the window.
        (a, 61, [created(t(60.5), p("a-w2-0")), retransmit(t(60.6)), created(t(59), p("a-old"))]),
        (b, 62, [created(t(61), p("b-w2"))]),
        (a, 65, [created(t(64), p("a-w2-1")), created(t(64.5), p("a-w2-2"))]),
        (a, 66, GARBAGE),
        # Reached Kafka after W2 but within a 10 s margin: its W2 event counts, the later one not.
        (a, 75, [created(t(69.9), p("a-w2-late")), created(t(71), p("a-after"))]),
        (a, 121, [created(t(120.5), p("a-w3"))]),
        (b, 122, [created(t(121), p("b-w3"))]),
        # A W2 event that reached Kafka long after W2 (a spool drained after an outage).
        (a, 125, [created(t(68), p("a-w2-very-late"))]),
    ]

    async def produce() -> tuple[int, int]:
        cfg = config.Config(
            kafka=config.KafkaConfig(bootstrap=kafka.bootstrap), agent=config.AgentConfig(host_id=a)
        )
        await create_topics(kafka.bootstrap, topics.specs(cfg))
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, enable_idempotence=True)
        await producer.start()
        seqs = {a: 0, b: 0}
        try:
            for host, at, events in records:
                if isinstance(events, bytes):
                    value = events
                else:
                    value = encode_batch(RawBatch(host, "boot-1", seqs[host], t(at), events))
                    seqs[host] += 1
                meta = await producer.send_and_wait(
                    RAW_TOPIC, value, key=host.encode(), timestamp_ms=d.base_ms + int(at * 1000)
                )
                if value is GARBAGE:
                    garbage = (meta.partition, meta.offset)
        finally:
            await producer.stop()
        return garbage

    partition, offset = asyncio.run(produce())
    return Data(**{**d.__dict__, "garbage_partition": partition, "garbage_offset": offset})


def w2(d: Data, **kw) -> Filter:
    return Filter(d.ns(60), d.ns(70), **kw)


async def run(opts: Options) -> tuple[list[dict], list[str], replay.Summary]:
    lines: list[str] = []
    reports: list[str] = []
    summary = await replay.replay(opts, lines.append, reports.append)
    return [json.loads(line) for line in lines], reports, summary


async def test_a_window_of_one_host_and_kind_with_garbage_counted_and_dead_lettered(kafka, data):
    flt = w2(data, hosts=frozenset({data.host_a}), kinds=frozenset({FILE_CREATED.id}))
    events, reports, summary = await run(Options(kafka.bootstrap, flt, margin_ns=10 * NS, dlq=True))

    assert [e["path"] for e in events] == [data.path(n) for n in ("a-w2-0", "a-w2-1", "a-w2-2", "a-w2-late")]
    identities = {(e["host.id"], e["boot.id"], e["kind"]) for e in events}
    assert identities == {(data.host_a, "boot-1", "file_created")}
    assert [e["batch.seq"] for e in events] == [1, 2, 2, 3]
    assert (summary.batches, summary.events, summary.decode_failures) == (3, 4, 1)
    assert summary.records >= 5  # a-w2-0 .. a-w2-late, b-w2 and the garbage; other tests' too
    where = f"{RAW_TOPIC}[{data.garbage_partition}]@{data.garbage_offset}: raw batch: not msgpack"
    assert len(reports) == 1 and reports[0].startswith(f"ktel replay: {where}")

    dead = [
        decode_dead_letter(r.value)
        for r in await read_topic(kafka.bootstrap, DLQ_TOPIC)
        if r.key == data.host_a.encode()
    ]
    assert [(dl.stage, dl.topic, dl.partition, dl.offset, dl.payload) for dl in dead] == [
        ("replay", RAW_TOPIC, data.garbage_partition, data.garbage_offset, GARBAGE)
    ]
    assert summary.dead_lettered == 1


async def test_a_wider_margin_reads_the_batch_that_reached_kafka_long_after_the_window(kafka, data):
    flt = w2(data, hosts=frozenset({data.host_a}), kinds=frozenset({FILE_CREATED.id}))
    events, _, summary = await run(Options(kafka.bootstrap, flt, margin_ns=200 * NS))
    assert [e["path"] for e in events][-2:] == [data.path("a-w2-late"), data.path("a-w2-very-late")]
    assert (summary.batches, summary.events) == (4, 5)


async def test_every_host_and_kind_of_the_window(kafka, data):
    flt = w2(data, hosts=frozenset({data.host_a, data.host_b}))
    events, _, _ = await run(Options(kafka.bootstrap, flt, margin_ns=10 * NS))
    paths = sorted(e.get("path", e["kind"]) for e in events)
    names = ["a-w2-0", "a-w2-1", "a-w2-2", "a-w2-late", "b-w2"]
    assert paths == sorted([data.path(n) for n in names] + ["tcp_retransmit"])


async def test_to_topic_republishes_exactly_the_matching_batches_filtered_with_their_keys(kafka, data):
    out = f"ktel.replay-test-{data.run}"
    flt = w2(data, hosts=frozenset({data.host_a}), kinds=frozenset({FILE_CREATED.id}))
    opts = Options(
        kafka.bootstrap,
        flt,
        margin_ns=10 * NS,
        to_topic=out,
        to_topic_spec=TopicSpec(out, 3),  # replay creates it
        jsonl=False,
    )
    lines, _, summary = await run(opts)
    assert lines == []
    assert summary.republished == 3

    records = await read_topic(kafka.bootstrap, out)
    got = sorted(
        (r.key, r.timestamp, b.host_id, b.seq, [ev[6] for ev in b.events])
        for r in records
        for b in [decode_batch(r.value)]
    )
    key = data.host_a.encode()
    ms = data.base_ms
    assert got == [
        (key, ms + 61_000, data.host_a, 1, [data.path("a-w2-0")]),
        (key, ms + 65_000, data.host_a, 2, [data.path("a-w2-1"), data.path("a-w2-2")]),
        (key, ms + 75_000, data.host_a, 3, [data.path("a-w2-late")]),
    ]
    assert len({r.partition for r in records}) == 1  # one host, one partition, as in ktel.raw

    # The copy keeps the record timestamps, so it can be replayed by time itself.
    again, _, summary = await run(Options(kafka.bootstrap, w2(data), margin_ns=10 * NS, topic=out))
    assert len(again) == 4 and summary.decode_failures == 0


async def test_to_topic_republishes_a_batch_larger_uncompressed_than_a_kafka_request(kafka, data):
    """A batch the agent compressed (zstd, its own frame) that decodes to 2 MB: aiokafka
    measures a record before compressing it, against 1 MiB by default."""
    host, out = f"replay-big-{data.run}", f"ktel.replay-big-{data.run}"
    src = f"ktel.replay-big-source-{data.run}"  # (the other tests count what ktel.raw holds)
    await create_topics(kafka.bootstrap, [TopicSpec(src, 1)])
    at_ms = data.base_ms + 300_000
    events = [created(at_ms * MS + i, data.path("big/" + "d" * 150 + f"/{i}")) for i in range(10_000)]
    value = compress(encode_batch(RawBatch(host, "boot-1", 0, at_ms * MS, events)))
    assert len(value) < 1 << 20 < len(encode_batch(RawBatch(host, "boot-1", 0, at_ms * MS, events)))
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(src, value, key=host.encode(), timestamp_ms=at_ms)
    finally:
        await producer.stop()
    flt = Filter(at_ms * MS, (at_ms + 1000) * MS, hosts=frozenset({host}))
    opts = Options(
        kafka.bootstrap, flt, topic=src, to_topic=out, to_topic_spec=TopicSpec(out, 1), jsonl=False
    )
    _, _, summary = await run(opts)
    assert summary.republished == 1
    [rec] = await read_topic(kafka.bootstrap, out)
    assert decode_batch(rec.value).events == events


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


def test_the_command_prints_json_lines_and_a_summary(kafka, data, monkeypatch, capsys):
    monkeypatch.setenv("KTEL_KAFKA__BOOTSTRAP", kafka.bootstrap)
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "replay-test")
    argv = ["replay", "--from", "-15m", "--to", iso(data.base_ms + 70_000), "--margin", "10s"]
    argv += ["--host", data.host_a, "--kind", "file_created"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 0
    out, err = capsys.readouterr()
    paths = [json.loads(line)["path"] for line in out.splitlines()]
    names = ["a-w1", "a-w2-0", "a-old", "a-w2-1", "a-w2-2", "a-w2-late"]
    assert paths == [data.path(n) for n in names]
    assert "raw batch: not msgpack" in err
    summary = err.splitlines()[-1]
    assert summary.startswith("ktel replay: read ")
    # Skipped: W3's records and the one long after W2, sent more than the margin after --to.
    assert summary.endswith(
        "partitions of ktel.raw; skipped 3 sent more than --margin after --to; "
        "matched 4 batches, 6 events; decode failures 1"
    )


def test_the_command_names_a_missing_topic(kafka, monkeypatch, capsys):
    monkeypatch.setenv("KTEL_KAFKA__BOOTSTRAP", kafka.bootstrap)
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "replay-test")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["replay", "--from", "-1h", "--topic", "ktel.no-such-topic"])
    assert exit_.value.code == 2
    assert f"ktel replay: topic ktel.no-such-topic is not on {kafka.bootstrap}" in capsys.readouterr().err


def test_a_reader_that_goes_away_ends_the_command_quietly(kafka, data):
    # `ktel replay ... | head`: the pipe's reader is gone before anything is written.
    env = dict(os.environ, KTEL_KAFKA__BOOTSTRAP=kafka.bootstrap, KTEL_AGENT__HOST_ID="replay-test")
    argv = [sys.executable, "-m", "ktel.cli", "replay", "--from", iso(data.base_ms)]
    argv += ["--to", iso(data.base_ms + 130_000), "--host", data.host_a]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        res = subprocess.run(argv, env=env, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "ktel replay: read " in res.stderr.splitlines()[-1]


@pytest.mark.parametrize("to_topic", [RAW_TOPIC, DEDUPED_TOPIC, CONTROL_TOPIC])
async def test_ktel_topics_of_the_live_cluster_are_refused_however_it_is_spelt(kafka, data, to_topic):
    same_cluster = f"{kafka.bootstrap},{kafka.bootstrap}"  # another string, the same cluster id
    cfg = config.Config(
        kafka=config.KafkaConfig(bootstrap=kafka.bootstrap), agent=config.AgentConfig(host_id="replay-test")
    )
    argv = dict(from_=iso(data.base_ms), to=iso(data.base_ms + 70_000), host=None, kind=None, margin="10s")
    args = argparse.Namespace(**argv, topic=RAW_TOPIC, to_topic=to_topic, to_bootstrap=same_cluster)
    args.format, args.dlq = None, False
    before = await written(kafka.bootstrap, to_topic)
    with pytest.raises(ReplayError, match=f"--to-topic {to_topic}: ktel's own topic, and .* is the Kafka"):
        await run(replay.options(cfg, args))
    assert await written(kafka.bootstrap, to_topic) == before  # nothing written


async def written(bootstrap: str, topic: str) -> set[tuple[int, int]]:
    records = await read_topic(bootstrap, topic, idle_s=0)
    return {(r.partition, r.offset) for r in records}


async def test_a_host_with_a_fast_clock_hides_no_other_hosts_events(kafka):
    """One partition holds a batch from a host whose clock is a day ahead, then
    another host's batch of the window, then a record nested too deeply to check."""
    run_id = uuid.uuid4().hex[:8]
    topic = f"ktel.replay-clocks-{run_id}"
    await create_topics(kafka.bootstrap, [TopicSpec(topic, 1)])
    now_ms = time.time_ns() // MS
    fast, slow = f"fast-{run_id}", f"ok-{run_id}"
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    try:
        day_ahead = (now_ms + 86_400_000) * MS
        ahead = RawBatch(fast, "b", 0, day_ahead, [created(day_ahead, "/fast")])
        await producer.send_and_wait(
            topic, encode_batch(ahead), key=fast.encode(), timestamp_ms=now_ms + 86_400_000
        )
        ok = RawBatch(slow, "b", 0, now_ms * MS, [created(now_ms * MS - NS, "/in-window")])
        await producer.send_and_wait(topic, encode_batch(ok), key=slow.encode(), timestamp_ms=now_ms)
        await producer.send_and_wait(topic, nested_too_deeply(), key=slow.encode(), timestamp_ms=now_ms)
    finally:
        await producer.stop()

    flt = Filter((now_ms - 60_000) * MS, (now_ms + 1000) * MS)
    events, reports, summary = await run(Options(kafka.bootstrap, flt, margin_ns=60 * NS, topic=topic))
    assert [(e["host.id"], e["path"]) for e in events] == [(slow, "/in-window")]
    assert (summary.records, summary.late, summary.decode_failures) == (3, 1, 1)
    why = "raw batch: event 0 (file_created) field 'path' must be a string, got list [[[...]]]"
    assert reports == [f"ktel replay: {topic}[0]@2: {why}"]


async def test_a_record_keyed_with_no_host_id_is_reported_once_not_on_each_events_line(kafka):
    """One record as large as ktel.raw takes: 990 KB of key beside 100,000 small events,
    compressed. Its key echoed on each event's line made 100 GB of output."""
    run_id = uuid.uuid4().hex[:8]
    topic = f"ktel.replay-keys-{run_id}"
    await create_topics(kafka.bootstrap, [TopicSpec(topic, 1)])
    now_ms = time.time_ns() // MS
    host = f"keyed-{run_id}"
    events = [created(now_ms * MS, "/k")] * 100_000
    value = compress(encode_batch(RawBatch(host, "b", 0, now_ms * MS, events)))
    key = b"k" * 990_000
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key, timestamp_ms=now_ms)
        ok = RawBatch(host, "b", 1, now_ms * MS, [created(now_ms * MS, "/ok")])
        await producer.send_and_wait(topic, encode_batch(ok), key=host.encode(), timestamp_ms=now_ms)
    finally:
        await producer.stop()

    lines: list[str] = []
    reports: list[str] = []

    def write(line: str) -> None:
        lines.append(line)
        # (Ends a replay that would write it all, rather than the machine's memory.)
        assert sum(map(len, lines)) < 1 << 20, f"{len(lines)} lines take more than 1 MiB"

    flt = Filter((now_ms - 60_000) * MS, (now_ms + 1000) * MS, hosts=frozenset({host}))
    summary = await replay.replay(Options(kafka.bootstrap, flt, topic=topic), write, reports.append)
    events_out = [json.loads(line) for line in lines]
    assert [(e["path"], e.get("messaging.kafka.message.key", "")) for e in events_out] == [("/ok", "")]
    assert (summary.records, summary.batches, summary.bad_keys) == (2, 1, 1)
    [report] = reports
    assert report.startswith(f"ktel replay: {topic}[0]@0: its key of 990000 bytes, b'kkk")
    assert len(report) < 300


async def read_with_its_end_moved_back(kafka, position: int) -> tuple[str, list[bytes], str]:
    """What a partition whose end moved back looks like to the consumer (an unclean
    leader election is not made here): a topic of 3 records, whose end was 10 when the
    read began, read from ``position``. Its name, the records read and the ReadError."""
    topic = f"ktel.replay-end-{uuid.uuid4().hex[:8]}"
    await create_topics(kafka.bootstrap, [TopicSpec(topic, 1)])
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    try:
        for i in range(3):
            await producer.send_and_wait(topic, b"%d" % i)
    finally:
        await producer.stop()
    tp = TopicPartition(topic, 0)
    reader = topic_window.consumer(config.KafkaConfig(), kafka.bootstrap)
    await reader.start()
    try:
        real_end_offsets = reader.end_offsets

        async def end_when_the_read_began(parts):
            reader.end_offsets = real_end_offsets  # (asked again, Kafka tells)
            return {tp: 10}

        async def the_position(times):
            return {tp: OffsetAndTimestamp(position, 0)}

        reader.end_offsets = end_when_the_read_began
        reader.offsets_for_times = the_position
        got = []
        with pytest.raises(topic_window.ReadError) as err:
            async for _, rec in topic_window.records(reader, [tp], 0, kafka.bootstrap, stall_s=30):
                got.append(rec.value)
    finally:
        await reader.stop()
    return topic, got, str(err.value)


async def test_a_read_past_a_partitions_end_stops_there_with_an_error_not_from_its_oldest_record(kafka):
    """The read placed past the end of what Kafka holds. Reset to its oldest record, the
    consumer read it again."""
    topic, got, err = await read_with_its_end_moved_back(kafka, 5)
    assert got == []
    assert err.startswith(
        f"partition 0 of {topic}: its end moved back, from offset 10 to 3, below the read at offset 5 "
    )


async def test_a_partition_whose_end_moved_back_above_the_read_is_read_to_there_and_ends_at_once(kafka):
    """The read placed within what Kafka holds, its end to reach past it: the records up
    to Kafka's end are read, and the read ends there naming the partition, rather than
    waiting the stall time for records that are not there."""
    topic, got, err = await read_with_its_end_moved_back(kafka, 1)
    assert got == [b"1", b"2"]
    assert err.startswith(
        f"partition 0 of {topic}: its end moved back, from offset 10 to 3, the read being at offset 3 "
    )
