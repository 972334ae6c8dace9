"""`ktel dlq` against a real broker: dead letters listed, and re-published to the topics
they came from with their keys, except those it cannot re-drive, each said why; and an
exporter's dead letters, written by the real exporter, sent to the real Prometheus or
OpenTelemetry Collector once it takes them.

The stages' dead letters are written here as stages write them (``dead_letter_record``);
that a re-driven record is then counted, once however often it is re-driven:
tests/integration/test_processing_stages.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from exporters import otlp, remote_write
from ktel import config
from ktel.replay import format_ns
from ktel.stack.otelcol import LocalCollector, attributes
from ktel.stack.proc import free_port
from ktel.stack.prometheus import LocalPrometheus
from ktel.topics import topic_partitions
from ktel.wire import (
    DLQ_TOPIC,
    FILE_CREATED,
    HEARTBEATS_TOPIC,
    METRICS_TOPIC,
    RAW_TOPIC,
    SPANS_TOPIC,
    DeadLetter,
    MetricSnapshot,
    RawBatch,
    SpanBatch,
    dead_letter_record,
    decode_spans,
    encode_batch,
    encode_heartbeat,
    encode_snapshot,
    encode_spans,
)
from ktel.wire.codec import MAX_RECORD_BYTES
from tests.integration.agent_harness import dead_letters_of, read_topic
from tests.integration.test_otlp_collector import LimitedCollector, span, wait_for

pytestmark = pytest.mark.kafka

REFUSED = "host 'b': not one of the 1 hosts this worker holds, and process.max_hosts = 1"
BATCH = encode_batch(
    RawBatch("b", "boot", 0, 1, [[FILE_CREATED.id, 1, 2, 2, 0, "w", "/a/b/f", 0o101, False]])
)
BEAT = encode_heartbeat({"ts": 1, "host": {"host.id": "b", "boot.id": "boot"}, "probes": {}, "counters": {}})
JUNK = b"\xc1 not a dead letter"


def ktel_dlq(bootstrap: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, KTEL_KAFKA__BOOTSTRAP=bootstrap, KTEL_AGENT__HOST_ID="unused", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "ktel.cli", "dlq", *args], env=env, capture_output=True, text=True, timeout=120
    )


def raw_batch(host: str, seq: int, events: int = 1, path: str = "/a/b/f") -> bytes:
    ev = [FILE_CREATED.id, 1, 2, 2, 0, "w", path, 0o101, False]
    return encode_batch(RawBatch(host, "boot", seq, 1, [list(ev) for _ in range(events)]))


BATCH = raw_batch("b", 0)
# Past what a dead letter carries whole (SEND_MAX_BYTES), within what ktel.raw takes.
BIG = raw_batch("big", 0, events=62, path="/" + "p" * 16_000)


async def send(
    bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]]
) -> list[tuple[int, int]]:
    """(partition, offset) of each record, sent in order."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=MAX_RECORD_BYTES)
    await producer.start()
    try:
        placed = []
        for key, value in records:
            meta = await producer.send_and_wait(topic, value, key=key)
            placed.append((meta.partition, meta.offset))
        return placed
    finally:
        await producer.stop()


async def write_dead_letters(bootstrap: str) -> dict[str, tuple[int, int]]:
    """The records of the stages' topics, then dead letters naming them as a stage would,
    and a few a stage would not write; where each original is."""
    [batch, big] = await send(bootstrap, RAW_TOPIC, [(b"b", BATCH), (b"big", BIG)])
    [beat] = await send(bootstrap, HEARTBEATS_TOPIC, [(b"b", BEAT)])
    letters = [
        (DeadLetter("all", REFUSED, RAW_TOPIC, *batch, BATCH), b"b"),
        (DeadLetter("all", REFUSED, HEARTBEATS_TOPIC, *beat, BEAT), b"b"),
        (DeadLetter("export-otlp", "backend refused: 400", METRICS_TOPIC, 0, 12, b"snapshot"), None),
        (DeadLetter("all", "hostile", "payments", 0, 13, b"charge"), b"b"),
        (DeadLetter("all", REFUSED, RAW_TOPIC, *big, BIG), b"big"),  # (its payload cut)
        (DeadLetter("dedupe", "raw batch: a tombstone", RAW_TOPIC, 0, 15, None), b"c"),
        # Written by someone else than a stage: what it names is not what it carries.
        (DeadLetter("all", REFUSED, RAW_TOPIC, *batch, raw_batch("b", 1)), b"b"),
        (DeadLetter("all", REFUSED, RAW_TOPIC, batch[0], 10**6, BATCH), b"b"),
    ]
    records: list[tuple[bytes | None, bytes | None]] = [dead_letter_record(dl, key) for dl, key in letters]
    await send(bootstrap, DLQ_TOPIC, [*records, (b"j", JUNK)])  # (the junk: what a hostile client may write)
    return {"batch": batch, "big": big, "beat": beat}


def test_dead_letters_are_listed_and_re_driven_to_their_topics_except_those_that_cannot_be(private_kafka):
    bootstrap = private_kafka.bootstrap
    at = asyncio.run(write_dead_letters(bootstrap))
    (bp, bo), (_, go), (hp, ho) = at["batch"], at["big"], at["beat"]

    listed = ktel_dlq(bootstrap, "--json")
    assert listed.returncode == 0, listed.stderr
    found = [json.loads(line) for line in listed.stdout.splitlines()]
    # What the dead letters alone tell: the originals are read only to re-drive.
    assert [(f["stage"], f["topic"], f["offset"], f["left_because"]) for f in found] == [
        ("all", RAW_TOPIC, bo, None),
        ("all", HEARTBEATS_TOPIC, ho, None),
        (
            "export-otlp",
            METRICS_TOPIC,
            12,
            "'ktel.metrics' is not a topic a ktel stage reads (every exporter reads it), and 'export-otlp' "
            "not an exporter whose backend --redrive sends to (otlp, remote-write)",
        ),
        ("all", "payments", 13, "'payments' is not a topic a ktel stage reads"),
        ("all", RAW_TOPIC, go, None),
        ("dedupe", RAW_TOPIC, 15, "it has no payload (a tombstone)"),
        ("all", RAW_TOPIC, bo, None),
        ("all", RAW_TOPIC, 10**6, None),
    ]
    assert (found[0]["key"], bytes.fromhex(found[0]["payload"]), found[0]["reason"]) == ("b", BATCH, REFUSED)
    assert "payload cut to fit ktel.dlq" in found[4]["reason"] and found[4]["payload_bytes"] < len(BIG)
    assert "ktel.dlq[0]@8: dead letter: " in listed.stderr  # the junk, named where it is
    assert listed.stderr.splitlines()[-1] == (
        "ktel dlq: read 9 dead letters from 1 partitions of ktel.dlq; 1 not dead letters; selected 8"
    )

    only = ktel_dlq(bootstrap, "--reason", r"max_hosts = \d", "--source", HEARTBEATS_TOPIC)
    assert only.returncode == 0, only.stderr
    [line] = only.stdout.splitlines()
    assert f"all: {HEARTBEATS_TOPIC}[{hp}]@{ho} key='b' {len(BEAT)} B (can be re-driven): {REFUSED}" in line

    redriven = ktel_dlq(bootstrap, "--redrive", "--json")
    assert redriven.returncode == 1, redriven.stderr  # some were left
    assert redriven.stderr.splitlines()[-1].endswith(
        "selected 8; re-published 3 (1 to ktel.heartbeats, 2 to ktel.raw); left 5"
    )
    left = {
        (f["offset"], f["payload_bytes"]): f["left_because"]
        for f in map(json.loads, redriven.stdout.splitlines())
    }
    assert left[(bo, len(raw_batch("b", 1)))] == (
        f"the record at ktel.raw[{bp}]@{bo} is not the one it carries (not a ktel stage's dead letter?)"
    )
    assert left[(10**6, len(BATCH))] == (
        f"no record is at ktel.raw[{bp}]@1000000 now (retention took it, or there never was one)"
    )
    copies = [r for r in asyncio.run(read_topic(bootstrap, RAW_TOPIC, idle_s=0.5)) if r.headers]
    beats = [r for r in asyncio.run(read_topic(bootstrap, HEARTBEATS_TOPIC, idle_s=0.5)) if r.headers]
    # The cut one whole, from its topic.
    assert sorted((r.key, r.value) for r in copies) == [(b"b", BATCH), (b"big", BIG)]
    assert [(r.key, r.value) for r in beats] == [(b"b", BEAT)]
    # On the partition its key hashes to, as an agent sends it.
    for rec, topic in [*((c, RAW_TOPIC) for c in copies), (beats[0], HEARTBEATS_TOPIC)]:
        partitions = asyncio.run(topic_partitions(bootstrap, topic))
        assert partitions > 1
        assert rec.partition == (murmur2(rec.key) & 0x7FFFFFFF) % partitions
    assert {list(r.headers)[0][1] for r in copies} == {b"ktel.dlq[0]@0", b"ktel.dlq[0]@4"}
    assert list(beats[0].headers) == [("ktel-redriven-from", b"ktel.dlq[0]@1")]
    assert asyncio.run(read_topic(bootstrap, METRICS_TOPIC, idle_s=0.5)) == []

    # Each re-published one marked on ktel.dlq, after it: the next --redrive skips them.
    once = ktel_dlq(bootstrap, "--redrive")
    assert once.returncode == 1, once.stderr  # (the same 5 left)
    assert once.stderr.splitlines()[-1].endswith(
        "; 3 re-drive markers; 1 not dead letters; selected 8; skipped 3 already re-driven "
        "(--again re-drives them); re-published 0; left 5"
    )
    skipped = [line for line in once.stdout.splitlines() if "(skipped: re-driven at " in line]
    assert [line.split()[1] for line in skipped] == ["ktel.dlq[0]@0", "ktel.dlq[0]@1", "ktel.dlq[0]@4"]
    assert f"to {HEARTBEATS_TOPIC} (marked at ktel.dlq[0]@" in skipped[1]
    again = [r for r in asyncio.run(read_topic(bootstrap, RAW_TOPIC, idle_s=0.5)) if r.headers]
    assert sorted((r.partition, r.offset) for r in again) == sorted((r.partition, r.offset) for r in copies)


def test_a_batch_the_agent_sent_with_a_kafka_codec_is_re_driven_compressed_as_it_came(private_kafka):
    """With agent.compression a Kafka codec (lz4, gzip), the agent's producer compresses a
    batch, and ktel.raw takes up to its limit (1 MiB) compressed. Its record reads back
    uncompressed: sent again so, Kafka refused it (MessageSizeTooLargeError)."""
    bootstrap = private_kafka.bootstrap
    value = raw_batch("gz", 0, events=96, path="/" + "g" * 16_000)  # 1.5 MB, 10 KB gzipped
    assert len(value) > 1 << 20

    async def write() -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, compression_type="gzip", max_request_size=MAX_RECORD_BYTES
        )
        await producer.start()
        try:
            meta = await producer.send_and_wait(RAW_TOPIC, value, key=b"gz")
            letter = DeadLetter("all", REFUSED, RAW_TOPIC, meta.partition, meta.offset, value)
            [after] = await send(bootstrap, RAW_TOPIC, [(b"gz", raw_batch("gz", 1))])
            assert after[0] == meta.partition  # (same key)
            later = DeadLetter("all", REFUSED, RAW_TOPIC, *after, raw_batch("gz", 1))
            await send(
                bootstrap, DLQ_TOPIC, [dead_letter_record(letter, b"gz"), dead_letter_record(later, b"gz")]
            )
        finally:
            await producer.stop()

    asyncio.run(write())
    env = {"KTEL_AGENT__COMPRESSION": "gzip"}
    redriven = ktel_dlq(bootstrap, "--redrive", env=env)
    assert redriven.returncode == 0, redriven.stderr
    assert redriven.stderr.splitlines()[-1].endswith("re-published 2 (2 to ktel.raw); left 0")
    copies = [r for r in asyncio.run(read_topic(bootstrap, RAW_TOPIC, idle_s=0.5)) if r.headers]
    assert sorted((r.value for r in copies), key=len) == [raw_batch("gz", 1), value]


def test_a_window_reads_only_the_dead_letters_written_in_it(private_kafka):
    bootstrap = private_kafka.bootstrap
    now_ms = int(time.time() * 1000)
    hour = 3_600_000

    async def write() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            for stage, ts in (
                ("two-hours-ago", now_ms - 2 * hour),
                ("an-hour-ago", now_ms - hour),
                ("now", now_ms),
            ):
                key, value = dead_letter_record(DeadLetter(stage, "r", RAW_TOPIC, 0, 0, b"x"), b"h")
                await producer.send_and_wait(DLQ_TOPIC, value, key=key, timestamp_ms=ts)
        finally:
            await producer.stop()

    asyncio.run(write())
    middle = ktel_dlq(bootstrap, "--from", "-90m", "--to", "-30m")
    assert middle.returncode == 0, middle.stderr
    assert [line.split()[2] for line in middle.stdout.splitlines()] == ["an-hour-ago:"]
    since = ktel_dlq(bootstrap, "--from", "-90m")
    assert [line.split()[2] for line in since.stdout.splitlines()] == ["an-hour-ago:", "now:"]
    later = ktel_dlq(bootstrap, "--from", "2099-01-01T00:00:00Z", "--to", "2099-01-02T00:00:00Z")
    assert (later.returncode, later.stdout) == (0, ""), later.stderr
    assert (
        later.stderr.splitlines()[-1]
        == "ktel dlq: read 0 dead letters from 1 partitions of ktel.dlq; selected 0"
    )


def test_a_listing_whose_reader_goes_away_stops_quietly(private_kafka):
    """`ktel dlq | head`: more lines than a pipe holds, the reader gone after one."""
    bootstrap = private_kafka.bootstrap
    letter = DeadLetter("all", "r" * 200, RAW_TOPIC, 0, 0, b"x")
    asyncio.run(send(bootstrap, DLQ_TOPIC, [dead_letter_record(letter, b"h")] * 1000))
    env = dict(os.environ, KTEL_KAFKA__BOOTSTRAP=bootstrap, KTEL_AGENT__HOST_ID="unused")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ktel.cli", "dlq"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert b" all: ktel.raw[0]@0 key='h' 1 B " in proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(120) == 0, err
    assert "Traceback" not in err
    assert err.splitlines()[-1].endswith("stopped early: the reader of stdout went away")


def test_dead_letters_timed_before_1970_or_past_now_are_listed_by_default(private_kafka):
    """Anyone who may write ktel.dlq gives a record the time it likes (a clock set so,
    or to hide it). Read by default from the first record timed at or after 1970 up to
    now, a listing left out, uncounted, those timed before 1970 (and all the records
    before that first one) and those timed past now."""
    bootstrap = private_kafka.bootstrap
    now_ms = int(time.time() * 1000)
    times = {"before-1970": -86_400_000, "no-time": -1, "now": now_ms, "in-2200": 7_258_118_400_000}

    async def write() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            for stage, ts in times.items():
                key, value = dead_letter_record(DeadLetter(stage, "r", RAW_TOPIC, 0, 0, b"x"), b"h")
                await producer.send_and_wait(DLQ_TOPIC, value, key=key, timestamp_ms=ts)
        finally:
            await producer.stop()

    asyncio.run(write())
    listed = ktel_dlq(bootstrap, "--json")
    assert listed.returncode == 0, listed.stderr
    assert {f["stage"]: f["time"] for f in map(json.loads, listed.stdout.splitlines())} == {
        "before-1970": "1969-12-31T00:00:00.000+00:00",
        "no-time": "1969-12-31T23:59:59.999+00:00",
        "now": format_ns(now_ms * 1_000_000),
        "in-2200": "2200-01-01T00:00:00.000+00:00",
    }
    assert listed.stderr.splitlines()[-1] == (
        "ktel dlq: read 4 dead letters from 1 partitions of ktel.dlq; selected 4"
    )
    # A window given is kept to.
    since = ktel_dlq(bootstrap, "--from", "-1h", "--to", "now")
    assert [line.split()[2] for line in since.stdout.splitlines()] == ["now:"], since.stderr


async def export(run_exporter, cfg: config.Config, records: list[tuple[str, bytes, bytes]], arrived) -> None:
    """Run an exporter (``run_exporter(cfg, stop, group_id=...)``) over ``records`` (topic,
    key, value), each sent once ``await arrived(i)`` says what the one before it made of
    the record before it is done (delivered, dead-lettered)."""
    stop = asyncio.Event()
    exporter = asyncio.create_task(run_exporter(cfg, stop, group_id=f"test-redrive-{uuid.uuid4().hex[:8]}"))
    producer = AIOKafkaProducer(bootstrap_servers=cfg.kafka.bootstrap, acks="all")
    await producer.start()
    try:
        for i, (topic, key, value) in enumerate(records):
            await producer.send_and_wait(topic, value, key=key)
            async with asyncio.timeout(60):  # a guard against hanging, not a timing assertion
                while not await arrived(i):
                    assert not exporter.done(), exporter
                    await asyncio.sleep(0.2)
    finally:
        await producer.stop()
        stop.set()
        await asyncio.wait_for(exporter, 30)


def test_a_sample_prometheus_refused_is_sent_to_it_once_its_out_of_order_window_takes_it(
    private_kafka, tmp_path
):
    """Prometheus holds a host's gauge of now, and refuses its sample of 90 minutes ago,
    older than its head block takes ("out of bounds"): the remote-write exporter
    dead-letters that snapshot. `ktel dlq --redrive` sends it again through the
    exporter's delivery: refused again, it says so and leaves it, not dead-lettered a
    second time; once Prometheus' out-of-order window takes it, it sends it, and
    Prometheus holds both samples. Nothing goes to ktel.metrics, which every exporter
    reads."""
    bootstrap = private_kafka.bootstrap
    run = uuid.uuid4().hex[:12]
    host = f"host-{run}"
    now_ms = time.time_ns() // 1_000_000
    old_ms = now_ms - 90 * 60_000
    labels = {"host.id": host, "ktel.run": run}
    fresh, old = (
        encode_snapshot(MetricSnapshot(ts, [["ktel_redriven", "gauge", labels, value]]))
        for ts, value in ((now_ms, 1), (old_ms, 2))
    )
    query = f'ktel_redriven{{ktel_run="{run}"}}[3h]'
    prom = LocalPrometheus(tmp_path / "prometheus", free_port())
    prom.start()
    try:
        # (The exporter's window takes a snapshot that old: Prometheus refuses it.)
        cfg = config.Config(
            kafka=config.KafkaConfig(bootstrap=bootstrap),
            remote_write=config.RemoteWriteConfig(
                url=prom.remote_write_url, metrics_port=0, max_age_seconds=10800
            ),
        )
        letters: list[DeadLetter] = []

        async def arrived(i: int) -> bool:
            if i == 0:
                return bool(await asyncio.to_thread(prom.query, query))
            letters.extend(await dead_letters_of(bootstrap, run))
            return True

        records = [(METRICS_TOPIC, host.encode(), value) for value in (fresh, old)]
        asyncio.run(export(remote_write.run, cfg, records, arrived))
        [letter] = letters
        assert (letter.stage, letter.topic, letter.payload) == ("remote-write", METRICS_TOPIC, old)
        assert letter.reason == "HTTP 400: out of bounds"

        env = {
            "KTEL_REMOTE_WRITE__URL": prom.remote_write_url,
            "KTEL_REMOTE_WRITE__MAX_AGE_SECONDS": "10800",
        }
        backend = f"remote-write to {prom.remote_write_url}"
        where = f"remote-write: {METRICS_TOPIC}[{letter.partition}]@{letter.offset} key='{host}'"
        again = ktel_dlq(bootstrap, "--redrive", env=env)
        assert again.returncode == 1, again.stderr
        [line] = again.stdout.splitlines()
        assert where in line
        assert line.endswith(
            f"(left: {backend} refused it again: HTTP 400: out of bounds): HTTP 400: out of bounds"
        )
        assert again.stderr.splitlines()[-1].endswith(
            "selected 1; re-published 0; sent 0; refused again 1; left 0"
        )
        assert len(asyncio.run(read_topic(bootstrap, DLQ_TOPIC, idle_s=0.5))) == 1  # not dead-lettered again

        prom.stop()
        prom.out_of_order_window = "3h"  # (the cause removed)
        prom.start()
        sent = ktel_dlq(bootstrap, "--redrive", env=env)
        assert sent.returncode == 0, sent.stderr
        [line] = sent.stdout.splitlines()
        assert where in line and line.endswith(f"(sent: {backend}): HTTP 400: out of bounds")
        assert sent.stderr.splitlines()[-1].endswith(
            f"selected 1; re-published 0; sent 1 (1 {backend}); refused again 0; left 0"
        )
        [series] = prom.query(query)
        assert [(round(float(t) * 1000), float(v)) for t, v in series["values"]] == [
            (old_ms, 2.0),
            (now_ms, 1.0),
        ]
    finally:
        prom.stop()
    assert [r.value for r in asyncio.run(read_topic(bootstrap, METRICS_TOPIC, idle_s=0.5))] == [fresh, old]


def test_a_span_the_collector_refused_is_sent_alone_to_a_collector_that_takes_it(private_kafka, tmp_path):
    """A batch of three spans, one of them larger than the Collector takes (its HTTP
    request body limit): the OTLP exporter delivers the two others and dead-letters the
    large one alone. `ktel dlq --redrive` sends it to the same Collector: refused again,
    it says so and leaves it; to a Collector that takes it (the limit raised), it sends
    that span, and only it: the two the first took are not sent again."""
    bootstrap = private_kafka.bootstrap
    run = uuid.uuid4().hex[:12]
    host = f"host-{run}"
    now = time.time_ns()
    large = span(run, "large", now, {f"a{j}": "x" * 4000 for j in range(25)})  # ~100 KiB: over 64 KiB
    batch = SpanBatch({"host.id": host}, [span(run, "small-0", now), large, span(run, "small-1", now + 1)])
    refusal = "HTTP 400: http: request body too large"

    def names(col: LocalCollector) -> list[str]:
        return sorted(s["name"] for s in col.spans() if s["resource"].get("host.id") == host)

    def env(col: LocalCollector) -> dict[str, str]:
        return {"KTEL_OTLP__PROTOCOL": "http/protobuf", "KTEL_OTLP__ENDPOINT": col.http_endpoint}

    with LimitedCollector(tmp_path / "limited", free_port(), free_port()) as limited:
        cfg = config.Config(
            kafka=config.KafkaConfig(bootstrap=bootstrap),
            otlp=config.OtlpConfig(protocol="http/protobuf", endpoint=limited.http_endpoint, metrics_port=0),
        )
        letters: list[DeadLetter] = []

        async def arrived(i: int) -> bool:
            letters.extend(await dead_letters_of(bootstrap, run))
            return True

        asyncio.run(export(otlp.run, cfg, [(SPANS_TOPIC, host.encode(), encode_spans(batch))], arrived))
        [letter] = letters
        assert (letter.stage, letter.topic, letter.reason) == ("otlp", SPANS_TOPIC, refusal)
        assert decode_spans(letter.payload) == SpanBatch(batch.resource, [large])  # (the others taken)
        asyncio.run(wait_for(lambda: len(names(limited)) == 2, "the small spans at the Collector"))

        again = ktel_dlq(bootstrap, "--redrive", env=env(limited))
        assert again.returncode == 1, again.stderr
        backend = f"OTLP export to {limited.http_endpoint}"
        assert again.stdout.rstrip("\n").endswith(f"(left: {backend} refused it again: {refusal}): {refusal}")
        assert again.stderr.splitlines()[-1].endswith("sent 0; refused again 1; left 0")
        assert names(limited) == ["small-0", "small-1"]
    assert len(asyncio.run(read_topic(bootstrap, DLQ_TOPIC, idle_s=0.5))) == 1  # not dead-lettered again

    with LocalCollector(tmp_path / "raised", free_port(), free_port()) as raised:
        sent = ktel_dlq(bootstrap, "--redrive", env=env(raised))
        assert sent.returncode == 0, sent.stderr
        [line] = sent.stdout.splitlines()
        backend = f"OTLP export to {raised.http_endpoint}"
        assert f"otlp: {SPANS_TOPIC}[{letter.partition}]@{letter.offset} key='{host}'" in line
        assert line.endswith(f"(sent: {backend}): {refusal}")
        assert sent.stderr.splitlines()[-1].endswith(f"sent 1 (1 {backend}); refused again 0; left 0")
        asyncio.run(wait_for(lambda: names(raised), "the large span at the Collector"))
        [got] = [s for s in raised.spans() if s["resource"].get("host.id") == host]
        assert (got["name"], attributes(got["attributes"])) == ("large", large[8])


def test_a_second_redrive_sends_to_the_collector_nothing_the_first_sent_unless_again(private_kafka, tmp_path):
    """An OTLP backend stores twice what it is sent twice: the first `ktel dlq --redrive`
    marks the dead letter it sent on ktel.dlq, keyed as it, in its partition, after it; a
    second over the same dead letters sends nothing, saying it skipped it; `--again` sends
    it once more."""
    bootstrap = private_kafka.bootstrap
    run = uuid.uuid4().hex[:12]
    host = f"host-{run}"
    batch = encode_spans(SpanBatch({"host.id": host}, [span(run, "once", time.time_ns())]))
    [(partition, offset)] = asyncio.run(send(bootstrap, SPANS_TOPIC, [(host.encode(), batch)]))
    letter = DeadLetter("otlp", "HTTP 400: refused for the test", SPANS_TOPIC, partition, offset, batch)
    [(dlq_partition, dlq_offset)] = asyncio.run(
        send(bootstrap, DLQ_TOPIC, [dead_letter_record(letter, host.encode())])
    )
    at = f"ktel.dlq[{dlq_partition}]@{dlq_offset}"

    with LocalCollector(tmp_path / "collector", free_port(), free_port()) as col:
        env = {"KTEL_OTLP__PROTOCOL": "http/protobuf", "KTEL_OTLP__ENDPOINT": col.http_endpoint}
        backend = f"OTLP export to {col.http_endpoint}"

        def spans() -> int:
            return sum(s["resource"].get("host.id") == host for s in col.spans())

        first = ktel_dlq(bootstrap, "--redrive", "--host", host, env=env)
        assert first.returncode == 0, first.stderr
        assert first.stderr.splitlines()[-1].endswith(
            f"selected 1; re-published 0; sent 1 (1 {backend}); refused again 0; left 0"
        )
        asyncio.run(wait_for(lambda: spans() == 1, "the span at the Collector"))
        [dead, marker] = [r for r in asyncio.run(read_topic(bootstrap, DLQ_TOPIC, idle_s=0.5))]
        assert (marker.key, marker.partition) == (dead.key, dead.partition) and marker.offset > dead.offset

        second = ktel_dlq(bootstrap, "--redrive", "--host", host, env=env)
        assert second.returncode == 0, second.stderr
        [line] = second.stdout.splitlines()
        assert line.startswith(f"{format_ns(dead.timestamp * 1_000_000)} {at} otlp: ")
        assert (
            "(skipped: re-driven at " in line
            and f" to {backend} (marked at ktel.dlq[{dead.partition}]@{marker.offset}); "
            "--again re-drives it again)"
            in line
        )
        assert second.stderr.splitlines()[-1].endswith(
            "1 re-drive markers; selected 1; skipped 1 already re-driven (--again re-drives them); "
            "re-published 0; left 0"
        )

        again = ktel_dlq(bootstrap, "--redrive", "--again", "--host", host, env=env)
        assert again.returncode == 0, again.stderr
        assert again.stderr.splitlines()[-1].endswith(f"sent 1 (1 {backend}); refused again 0; left 0")
        asyncio.run(wait_for(lambda: spans() == 2, "the span at the Collector a second time"))
        # (the second run's sent nothing: the Collector has the span from the first and --again)
        third = ktel_dlq(bootstrap, "--redrive", "--host", host, env=env)
        assert third.returncode == 0 and "skipped 1 already re-driven" in third.stderr, third.stderr
        assert spans() == 2
    assert len(asyncio.run(read_topic(bootstrap, DLQ_TOPIC, idle_s=0.5))) == 3  # the dead letter, two markers
