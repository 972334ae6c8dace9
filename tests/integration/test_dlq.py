"""`ktel dlq` against a real broker: dead letters listed, and re-published to the topics
they came from with their keys, except those it cannot re-drive, each said why.

The dead letters are written here as stages write them (``dead_letter_record``); that a
re-driven record is then counted, once however often it is re-driven:
tests/integration/test_processing_stages.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from ktel.topics import topic_partitions
from ktel.wire import (
    DLQ_TOPIC,
    FILE_CREATED,
    HEARTBEATS_TOPIC,
    METRICS_TOPIC,
    RAW_TOPIC,
    DeadLetter,
    RawBatch,
    dead_letter_record,
    encode_batch,
    encode_heartbeat,
)
from ktel.wire.codec import MAX_RECORD_BYTES
from tests.integration.agent_harness import read_topic

pytestmark = pytest.mark.kafka

REFUSED = "host 'b': not one of the 1 hosts this worker holds, and process.max_hosts = 1"
BATCH = encode_batch(
    RawBatch("b", "boot", 0, 1, [[FILE_CREATED.id, 1, 2, 2, 0, "w", "/a/b/f", 0o101, False]])
)
BEAT = encode_heartbeat({"ts": 1, "host": {"host.id": "b", "boot.id": "boot"}, "probes": {}, "counters": {}})
JUNK = b"\xc1 not a dead letter"


def ktel_dlq(bootstrap: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KTEL_KAFKA__BOOTSTRAP=bootstrap, KTEL_AGENT__HOST_ID="unused")
    return subprocess.run(
        [sys.executable, "-m", "ktel.cli", "dlq", *args], env=env, capture_output=True, text=True, timeout=120
    )


async def write_dead_letters(bootstrap: str) -> None:
    letters = [
        (DeadLetter("all", REFUSED, RAW_TOPIC, 0, 10, BATCH), b"b"),
        (DeadLetter("all", REFUSED, HEARTBEATS_TOPIC, 1, 11, BEAT), b"b"),
        (DeadLetter("export-otlp", "backend refused: 400", METRICS_TOPIC, 0, 12, b"snapshot"), None),
        (DeadLetter("all", "hostile", "payments", 0, 13, b"charge"), b"b"),
        (DeadLetter("all", "too large", RAW_TOPIC, 2, 14, b"x" * MAX_RECORD_BYTES), b"big"),
        (DeadLetter("dedupe", "raw batch: a tombstone", RAW_TOPIC, 0, 15, None), b"c"),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=MAX_RECORD_BYTES)
    await producer.start()
    try:
        for dl, key in letters:
            k, v = dead_letter_record(dl, key)
            await producer.send_and_wait(DLQ_TOPIC, v, key=k)
        await producer.send_and_wait(DLQ_TOPIC, JUNK, key=b"j")  # what a hostile client may write
    finally:
        await producer.stop()


def test_dead_letters_are_listed_and_re_driven_to_their_topics_except_those_that_cannot_be(private_kafka):
    bootstrap = private_kafka.bootstrap
    asyncio.run(write_dead_letters(bootstrap))

    listed = ktel_dlq(bootstrap, "--json")
    assert listed.returncode == 0, listed.stderr
    found = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(f["stage"], f["topic"], f["offset"], f["left_because"]) for f in found] == [
        ("all", RAW_TOPIC, 10, None),
        ("all", HEARTBEATS_TOPIC, 11, None),
        ("export-otlp", METRICS_TOPIC, 12, "'ktel.metrics' is not a topic a ktel stage reads"),
        ("all", "payments", 13, "'payments' is not a topic a ktel stage reads"),
        (
            "all",
            RAW_TOPIC,
            14,
            "its payload was cut; the whole record is at ktel.raw[2]@14 until retention takes it",
        ),
        ("dedupe", RAW_TOPIC, 15, "it has no payload (a tombstone)"),
    ]
    assert (found[0]["key"], bytes.fromhex(found[0]["payload"]), found[0]["reason"]) == ("b", BATCH, REFUSED)
    assert "ktel.dlq[0]@6: dead letter: " in listed.stderr  # the junk, named where it is
    assert listed.stderr.splitlines()[-1] == (
        "ktel dlq: read 7 dead letters from 1 partitions of ktel.dlq; 1 not dead letters; selected 6"
    )
    # Nothing was written by listing.
    assert asyncio.run(read_topic(bootstrap, RAW_TOPIC, idle_s=0.5)) == []

    only = ktel_dlq(bootstrap, "--reason", r"max_hosts = \d", "--source", HEARTBEATS_TOPIC)
    assert only.returncode == 0, only.stderr
    [line] = only.stdout.splitlines()
    assert f"all: {HEARTBEATS_TOPIC}[1]@11 key='b' {len(BEAT)} B (can be re-driven): {REFUSED}" in line

    redriven = ktel_dlq(bootstrap, "--redrive")
    assert redriven.returncode == 1, redriven.stderr  # some were left
    assert redriven.stderr.splitlines()[-1].endswith(
        "selected 6; re-published 2 (1 to ktel.heartbeats, 1 to ktel.raw); left 4"
    )
    raw = asyncio.run(read_topic(bootstrap, RAW_TOPIC, idle_s=0.5))
    beats = asyncio.run(read_topic(bootstrap, HEARTBEATS_TOPIC, idle_s=0.5))
    assert [(r.key, r.value) for r in raw] == [(b"b", BATCH)]
    assert [(r.key, r.value) for r in beats] == [(b"b", BEAT)]
    # On the partition its key hashes to, as an agent sends it, whichever it was read from.
    for rec, topic in ((raw[0], RAW_TOPIC), (beats[0], HEARTBEATS_TOPIC)):
        partitions = asyncio.run(topic_partitions(bootstrap, topic))
        assert partitions > 1
        assert rec.partition == (murmur2(b"b") & 0x7FFFFFFF) % partitions
    assert list(raw[0].headers) == [("ktel-redriven-from", b"ktel.dlq[0]@0")]
    assert list(beats[0].headers) == [("ktel-redriven-from", b"ktel.dlq[0]@1")]
    assert asyncio.run(read_topic(bootstrap, METRICS_TOPIC, idle_s=0.5)) == []


def test_a_window_reads_only_the_dead_letters_written_in_it(private_kafka):
    bootstrap = private_kafka.bootstrap
    asyncio.run(write_dead_letters(bootstrap))
    later = ktel_dlq(bootstrap, "--from", "2099-01-01T00:00:00Z", "--to", "2099-01-02T00:00:00Z")
    assert (later.returncode, later.stdout) == (0, ""), later.stderr
    assert (
        later.stderr.splitlines()[-1]
        == "ktel dlq: read 0 dead letters from 1 partitions of ktel.dlq; selected 0"
    )
    earlier = ktel_dlq(bootstrap, "--from", "-1h", "--to", "-59m")
    assert earlier.stdout == "" and "read 0 dead letters" in earlier.stderr
