"""`ktel dlq --redrive` of an exporter's dead letters: which it sends, and what of them,
to the exporter's backend (against the real Prometheus and Collector:
tests/integration/test_dlq.py)."""

import argparse
import asyncio
import contextlib
import dataclasses
import io
import logging
import re
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError
from prometheus_client import CollectorRegistry, Counter

from exporters import consume
from exporters.consume import Delivery
from ktel import cli, config, dlq, retry
from ktel.dlq import DlqError, to_send, why_not_redrivable
from ktel.replay import NS
from ktel.wire import (
    DeadLetter,
    LogBatch,
    MetricSnapshot,
    RawBatch,
    SpanBatch,
    dead_letter_record,
    decode_dead_letter,
    decode_snapshot,
    decode_spans,
    encode_batch,
    encode_logs,
    encode_snapshot,
    encode_spans,
    not_part_of,
)
from ktel.wire.codec import MAX_RECORD_BYTES
from ktel.wire.control import DEAD_LETTER_KEY_BYTES
from tests.unit import test_dlq
from tests.unit.test_otlp_mapping import _answering, answering
from tests.unit.topic_window_fake import IdleClient, read_through

NOW = 1_750_000_000 * NS
TS = NOW // 1_000_000
CFG = config.Config(agent=config.AgentConfig(host_id="h"), kafka=config.KafkaConfig(bootstrap="k1:9092"))
STAGE_TOPICS = dlq.stage_topics(CFG)
EXPORTER_TOPICS = {stage: exporter.topics for stage, exporter in dlq.exporters(CFG).items()}

LABELS = {"host.id": "h"}
A = ["a", "gauge", LABELS, 1]
B = ["b", "counter", LABELS, 2]
C = ["c", "histogram", LABELS, {"count": 3, "sum": 1.5, "bounds": [1.0], "counts": [1, 2]}]
SNAPSHOT = MetricSnapshot(TS, [A, B, C])
RESOURCE = {"host.id": "h"}
SPAN = [b"t" * 16, b"s" * 8, b"", "one", NOW, NOW + 5, 0, "", {}]
OTHER_SPAN = [b"t" * 16, b"o" * 8, b"", "two", NOW, NOW + 9, 0, "", {}]
SPANS = SpanBatch(RESOURCE, [SPAN, OTHER_SPAN])
LOG = [NOW, 9, "INFO", "hello", {}, b"", b""]


def test_the_exporters_whose_dead_letters_are_sent_read_their_topics_under_the_prefix():
    assert set(EXPORTER_TOPICS) == {"remote-write", "otlp"}
    assert set(EXPORTER_TOPICS["remote-write"]) == {"ktel.metrics"}
    assert set(EXPORTER_TOPICS["otlp"]) == {"ktel.metrics", "ktel.spans", "ktel.logs"}
    prefixed = config.Config(
        agent=config.AgentConfig(host_id="h"), kafka=config.KafkaConfig(bootstrap="k:1", prefix="eu.")
    )
    assert set(dlq.exporters(prefixed)["otlp"].topics) == {"eu.ktel.metrics", "eu.ktel.spans", "eu.ktel.logs"}


@pytest.mark.parametrize(
    ("part", "whole", "why"),
    [
        (SNAPSHOT, SNAPSHOT, None),
        (MetricSnapshot(TS, [C, A]), SNAPSHOT, None),  # (in any order)
        (MetricSnapshot(TS, []), SNAPSHOT, None),
        (MetricSnapshot(TS, [["a", "gauge", LABELS, 5]]), SNAPSHOT, "its series 0 is not in the record"),
        (MetricSnapshot(TS, [B, ["a", "gauge", {}, 1]]), SNAPSHOT, "its series 1 is not in the record"),
        (MetricSnapshot(TS, [A, B, A]), SNAPSHOT, "its series 2 is not in the record as often"),
        # The same number, of another type: another value (OTLP sends it as a double).
        (MetricSnapshot(TS, [["a", "gauge", LABELS, 1.0]]), SNAPSHOT, "its series 0 is not in the record"),
        (MetricSnapshot(TS + 1, [A]), SNAPSHOT, "its timestamp or staleness is not the record's"),
        (MetricSnapshot(TS, [A], stale=True), SNAPSHOT, "its timestamp or staleness is not the record's"),
        (SpanBatch(RESOURCE, [OTHER_SPAN]), SPANS, None),
        (SpanBatch({"host.id": "h", "x": "y"}, [SPAN]), SPANS, "its resource is not the record's"),
        (SpanBatch(RESOURCE, [[*SPAN[:3], "renamed", *SPAN[4:]]]), SPANS, "its span 0 is not in the record"),
        (LogBatch(RESOURCE, [LOG]), LogBatch(RESOURCE, [LOG, LOG]), None),
        (LogBatch(RESOURCE, [LOG]), SPANS, "it is a log batch, the record a span batch"),
    ],
)
def test_a_part_of_a_record_is_some_of_its_rows_as_they_are(part, whole, why):
    assert not_part_of(part, whole) == why


def letter(
    stage="remote-write", topic="ktel.metrics", payload=None, reason="HTTP 400: out of bounds", offset=7
):
    return DeadLetter(
        stage, reason, topic, 2, offset, encode_snapshot(SNAPSHOT) if payload is None else payload
    )


@pytest.mark.parametrize(
    ("dl", "key", "why"),
    [
        (letter(), b"h", None),
        (letter(payload=encode_snapshot(MetricSnapshot(TS, [B]))), b"h", None),
        (letter(stage="otlp", topic="ktel.spans", payload=encode_spans(SPANS)), b"h", None),
        (letter(stage="otlp", topic="ktel.logs", payload=encode_logs(LogBatch(RESOURCE, [LOG]))), b"h", None),
        (letter(stage="otlp"), b"h", None),
        (
            letter(topic="ktel.spans", payload=encode_spans(SPANS)),
            b"h",
            "'ktel.spans' is not a topic the 'remote-write' exporter reads",
        ),
        (
            letter(stage="pull"),
            b"h",
            "the pull endpoint sends nowhere: it serves the series it reads, and the next snapshots "
            "hold them",
        ),
        (
            letter(stage="export-otlp"),
            b"h",
            "'ktel.metrics' is not a topic a ktel stage reads (every exporter reads it), and 'export-otlp' "
            "not an exporter whose backend --redrive sends to (otlp, remote-write)",
        ),
        (letter(stage="otlp", topic="payments"), b"h", "'payments' is not a topic the 'otlp' exporter reads"),
        (letter(payload=b""), b"h", "it has no payload (a tombstone)"),
        (
            letter(),
            b"k" * DEAD_LETTER_KEY_BYTES,
            "its key is 1024 bytes, the most a dead letter keeps, so may have been cut",
        ),
        # What the exporter would only dead-letter again:
        (
            letter(payload=b"junk"),
            b"h",
            "it does not decode (metric snapshot: not msgpack (ExtraData: unpack(b) received extra data.))",
        ),
        (
            letter(),
            b"g",
            "it speaks for a host its key does not name (metric snapshot: its series 'a' is of host 'h', but "
            "the record's key is b'g')",
        ),
    ],
)
def test_which_exporters_dead_letters_can_be_sent_again(dl, key, why):
    assert why_not_redrivable(dl, key, STAGE_TOPICS, EXPORTER_TOPICS) == why


def original(value, key=b"h"):
    return SimpleNamespace(key=key, value=value, offset=7)


def test_what_is_sent_of_a_dead_letter_is_what_its_record_was():
    whole = encode_snapshot(SNAPSHOT)
    part = encode_snapshot(MetricSnapshot(TS, [C]))
    # Whole: the record, as read.
    assert to_send(letter(), b"h", original(whole), decode_snapshot) == (SNAPSHOT, whole)
    # A part: those rows alone.
    assert to_send(letter(payload=part), b"h", original(whole), decode_snapshot) == (
        MetricSnapshot(TS, [C]),
        part,
    )
    # Cut to fit ktel.dlq: the record whole, from its topic.
    big = encode_snapshot(
        MetricSnapshot(TS, [["g", "gauge", {"host.id": "h", "x": "v" * 4000}, i] for i in range(300)])
    )
    assert len(big) < MAX_RECORD_BYTES
    key, value = dead_letter_record(letter(payload=big), b"h")
    cut = decode_dead_letter(value)
    assert 0 < len(cut.payload) < len(big)
    assert to_send(cut, key, original(big), decode_snapshot) == (decode_snapshot(big), big)
    # A record of some of its items, cut: what it held is not known.
    some = encode_snapshot(dataclasses.replace(decode_snapshot(big), series=decode_snapshot(big).series[1:]))
    key, value = dead_letter_record(letter(payload=some), b"h")
    assert to_send(decode_dead_letter(value), key, original(big), decode_snapshot) == (
        "its payload, cut to fit ktel.dlq, is not the start of the record at ktel.metrics[2]@7: a record "
        "of some of its items, cut, cannot be checked against it item by item"
    )


@pytest.mark.parametrize(
    ("dl", "rec", "why"),
    [
        (letter(), None, "no record is at ktel.metrics[2]@7 now (retention took it, or there never was one)"),
        (
            letter(),
            original(encode_snapshot(SNAPSHOT), key=b"g"),
            "the record at ktel.metrics[2]@7 is not the one it carries (not an exporter's dead letter?)",
        ),
        (
            letter(payload=encode_snapshot(MetricSnapshot(TS, [["a", "gauge", LABELS, 99]]))),
            original(encode_snapshot(SNAPSHOT)),
            "the record at ktel.metrics[2]@7 does not hold what it carries: its series 0 is not in the "
            "record (not an exporter's dead letter?)",
        ),
        (
            letter(payload=encode_snapshot(MetricSnapshot(TS, [A, A]))),
            original(encode_snapshot(SNAPSHOT)),
            "the record at ktel.metrics[2]@7 does not hold what it carries: its series 1 is not in the "
            "record as often (not an exporter's dead letter?)",
        ),
        (
            letter(reason="r [payload cut to fit ktel.dlq: ...]", payload=b"\x83\xa1x"),  # (not its start)
            original(encode_snapshot(SNAPSHOT)),
            "its payload, cut to fit ktel.dlq, is not the start of the record at ktel.metrics[2]@7: a record "
            "of some of its items, cut, cannot be checked against it item by item",
        ),
        (
            letter(payload=encode_snapshot(MetricSnapshot(TS, [A]))),
            original(encode_snapshot(MetricSnapshot(TS, [A, ["x", "gauge", {"host.id": "victim"}, 1]]))),
            "the record at ktel.metrics[2]@7 is not one its exporter sends (metric snapshot: its series "
            "'x' is of host 'victim', but the record's key is b'h')",
        ),
    ],
)
def test_a_dead_letter_its_record_does_not_bear_out_is_not_sent(dl, rec, why):
    assert to_send(dl, b"h", rec, decode_snapshot) == why


class Backend:
    """An exporter's delivery, as ``ktel dlq`` uses it: what it was given, and what it
    refuses (as the exporter does: consume.refuse) or answers it holds already."""

    def __init__(self) -> None:
        registry = CollectorRegistry()
        self.acknowledged = Counter("acknowledged", "", registry=registry)
        self.unstored = Counter("unstored", "", registry=registry)
        self.given: list[consume.Record] = []
        self.refuse: set[str] = set()  # series names refused
        self.held: set[str] = set()  # series names the backend says it holds newer samples of
        self.hang = False

    async def deliver(self, records, producer):
        if self.hang:
            await asyncio.Event().wait()
        for rec in records:
            self.given.append(rec)
            refused = [(row, f"HTTP 400: no {row[0]}") for row in rec.item.series if row[0] in self.refuse]
            if refused:
                await consume.refuse_series(producer, "remote-write", rec, refused, signal="samples", items=1)
            for row in rec.item.series:
                if row[0] in self.held:
                    self.unstored.inc()
                elif row[0] not in self.refuse:
                    self.acknowledged.inc()

    def exporter(self) -> dlq.Exporter:
        @contextlib.asynccontextmanager
        async def delivery():
            yield Delivery(self.deliver, "remote-write to http://prom")

        return dlq.Exporter(
            {"ktel.metrics": decode_snapshot}, delivery, "samples", self.acknowledged, self.unstored, "held"
        )


def args(**kw):
    return test_dlq.args(**{"redrive": True, **kw})


def kafka(monkeypatch, letters, record=None):
    """A Kafka whose ktel.dlq holds ``letters`` (dead letter, key), each naming a record that
    is ``record`` (SNAPSHOT's bytes unless given; at ktel.metrics[2], any offset); what is
    re-published to it (topic, value)."""
    tp = TopicPartition("ktel.dlq", 0)
    record = encode_snapshot(SNAPSHOT) if record is None else record

    async def read(consumer, parts, start_ms, bootstrap):
        for offset, (dl, key) in enumerate(letters):
            key, value = dead_letter_record(dl, key)
            yield tp, SimpleNamespace(key=key, value=value, offset=offset, timestamp=TS)

    published = []

    class Producer(IdleClient):
        async def send(self, topic, value, key=None, headers=None, partition=None):
            if topic != "ktel.dlq":  # (the re-drive markers: tests/integration/test_dlq.py)
                published.append((topic, value))
            return asyncio.ensure_future(asyncio.sleep(0))

    class Originals:
        def __init__(self, opts):
            self.reader = IdleClient()

        async def record(self, topic, partition, offset):
            return original(record) if (topic, partition) == ("ktel.metrics", 2) else None

    read_through(monkeypatch, tp, read)
    monkeypatch.setattr(dlq, "Originals", Originals)
    monkeypatch.setattr(dlq, "AIOKafkaProducer", Producer)
    return published


async def redrive(monkeypatch, letters, backend, summary=None, **kw):
    """``ktel dlq --redrive`` (and the arguments ``kw``) over ``letters`` (dead letter,
    key), each naming a record that is SNAPSHOT (at ktel.metrics[2], any offset): (the
    lines, the summary, what was re-published to Kafka)."""
    published = kafka(monkeypatch, letters)
    opts = dataclasses.replace(
        dlq.options(CFG, args(**kw), now_ns=NOW), exporters={"remote-write": backend.exporter()}
    )
    summary, lines = summary or dlq.Summary(), []
    await dlq.run(opts, summary, lines.append, [].append)
    return lines, summary, published


async def test_an_exporters_dead_letters_go_to_its_backend_and_never_to_a_topic(monkeypatch):
    backend = Backend()
    backend.refuse = {"c"}
    part = encode_snapshot(MetricSnapshot(TS, [B]))
    forged = encode_snapshot(MetricSnapshot(TS, [["b", "counter", LABELS, 1000]]))
    lines, summary, published = await redrive(
        monkeypatch,
        [
            (letter(payload=part), b"h"),
            (letter(payload=forged), b"h"),
            (letter(offset=8), b"h"),  # whole: its c refused again
            (letter(stage="pull"), b"h"),
        ],
        backend,
    )
    assert published == []  # (not to ktel.metrics: every exporter reads it)
    # As the exporter read it, from where the dead letter says: just the part, or the whole.
    assert [(r.topic, r.partition, r.offset, r.key, r.item) for r in backend.given] == [
        ("ktel.metrics", 2, 7, b"h", MetricSnapshot(TS, [B])),
        ("ktel.metrics", 2, 8, b"h", SNAPSHOT),
    ]
    assert lines[0].endswith("(sent: remote-write to http://prom): HTTP 400: out of bounds")
    assert "(left: the record at ktel.metrics[2]@7 does not hold what it carries: " in lines[1]
    assert (
        "(left: remote-write to http://prom refused it again: HTTP 400: no c; it took 2 other samples of it)"
        in lines[2]
    )
    assert "(left: the pull endpoint sends nowhere" in lines[3]
    assert (dict(summary.sent), summary.refused, summary.left) == ({"remote-write to http://prom": 1}, 1, 2)
    assert summary.line("ktel.dlq", True).endswith(
        "selected 4; re-published 0; sent 1 (1 remote-write to http://prom); refused again 1; left 2"
    )


async def test_samples_the_receiver_says_it_holds_are_not_said_sent(monkeypatch):
    backend = Backend()
    backend.held = {"a"}
    lines, summary, _ = await redrive(monkeypatch, [(letter(), b"h")], backend)
    assert (
        "(left: remote-write to http://prom answered for 1 held; it took 2 other samples of it)" in lines[0]
    )
    assert (dict(summary.sent), summary.refused) == ({}, 1)


def on_the_second_delivery(backend: Backend, first: Callable[[], None]) -> None:
    """The backend's delivery, calling ``first`` before its second one."""
    calls = 0
    deliver = backend.deliver

    async def counted(records, producer):
        nonlocal calls
        calls += 1
        if calls == 2:
            first()
        await deliver(records, producer)

    backend.deliver = counted


async def test_a_backend_that_does_not_answer_ends_the_redrive_with_what_was_sent_counted(monkeypatch):
    backend = Backend()
    on_the_second_delivery(backend, lambda: setattr(backend, "hang", True))
    summary = dlq.Summary()
    with pytest.raises(DlqError) as raised:
        await redrive(
            monkeypatch, [(letter(), b"h"), (letter(offset=8), b"h")], backend, summary, backend_wait=0.05
        )
    # (saying how to wait longer)
    assert str(raised.value).startswith("remote-write to http://prom did not take ktel.dlq[0]@1 in 0.05 s")
    assert str(raised.value).endswith("; --backend-wait SECONDS waits longer")
    assert (len(backend.given), dict(summary.sent)) == (1, {"remote-write to http://prom": 1})


async def test_a_backend_that_does_not_answer_ends_the_redrive_once_kafka_answered_what_it_re_published(
    monkeypatch,
):
    """A stage's dead letter re-published, Kafka refusing it, then an exporter's whose
    backend does not answer: the summary printed counts the first failed, not
    re-published, as when the read fails midway."""
    backend = Backend()
    backend.hang = True
    tp = TopicPartition("ktel.dlq", 0)
    batch = encode_batch(RawBatch("h", "boot", 0, 1, []))
    letters = [
        (DeadLetter("aggregate", "refused", "ktel.raw", 0, 3, batch), b"h"),
        (letter(), b"h"),
    ]

    async def read(consumer, parts, start_ms, bootstrap):
        for offset, (dl, key) in enumerate(letters):
            key, value = dead_letter_record(dl, key)
            yield tp, SimpleNamespace(key=key, value=value, offset=offset, timestamp=TS)

    class Producer(IdleClient):
        async def send(self, topic, value, key=None, headers=None):
            async def refused():
                await asyncio.sleep(0)
                raise KafkaConnectionError("the leader went away")

            return asyncio.ensure_future(refused())

    class Originals:
        def __init__(self, opts):
            self.reader = IdleClient()

        async def record(self, topic, partition, offset):
            return original(batch if topic == "ktel.raw" else encode_snapshot(SNAPSHOT))

    read_through(monkeypatch, tp, read)
    monkeypatch.setattr(dlq, "Originals", Originals)
    monkeypatch.setattr(dlq, "AIOKafkaProducer", Producer)
    opts = dataclasses.replace(
        dlq.options(CFG, args(backend_wait=0.05), now_ns=NOW), exporters={"remote-write": backend.exporter()}
    )
    summary = dlq.Summary()
    with pytest.raises(DlqError, match="did not take"):
        await dlq.run(opts, summary, [].append, [].append)
    assert (sum(summary.redriven.values()), summary.failed, dict(summary.sent)) == (0, 1, {})


def test_backend_wait_is_a_number_of_seconds_above_0(capsys):
    parser = cli.build_parser()
    given = parser.parse_args(["dlq", "--redrive", "--backend-wait", "600"]).backend_wait
    assert given == 600.0
    assert dlq.options(CFG, args(backend_wait=given), now_ns=NOW).backend_wait == 600.0
    # Not given: BACKEND_WAIT_S, as the option's help says.
    assert parser.parse_args(["dlq", "--redrive"]).backend_wait is None
    assert dlq.options(CFG, args(), now_ns=NOW).backend_wait == dlq.BACKEND_WAIT_S == 120.0
    [dlq_parser] = [a.choices["dlq"] for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    [option] = [a for a in dlq_parser._actions if "--backend-wait" in a.option_strings]
    assert option.help.endswith(f"(default {dlq.BACKEND_WAIT_S:g})")
    for bad in ("0", "-5", "nan", "inf", "two"):
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(["dlq", "--redrive", "--backend-wait", bad])
        assert exited.value.code == 2
        assert "ktel dlq: error: argument --backend-wait: " in capsys.readouterr().err


def fresh() -> bytes:
    """SNAPSHOT's series at the exporters' clock's now, within their window."""
    return encode_snapshot(MetricSnapshot(time.time_ns() // 1_000_000, [A, B, C]))


def sent_to(stage: str, url: str) -> tuple[config.Config, str]:
    """A configuration whose ``stage`` exporter sends to ``url`` (over HTTP), and the
    backend as ktel dlq names it."""
    if stage == "remote-write":
        rw = config.RemoteWriteConfig(url=f"{url}/api/v1/write")
        return CFG.model_copy(update={"remote_write": rw}), f"remote-write to {url}/api/v1/write"
    to = config.OtlpConfig(protocol="http/protobuf", endpoint=url)
    return CFG.model_copy(update={"otlp": to}), f"OTLP export to {url}"


@pytest.mark.parametrize("stage", ["remote-write", "otlp"])
@pytest.mark.parametrize(("asked", "backend_wait"), [(600, None), (3, 2.0)])
def test_a_backend_asking_for_a_wait_past_backend_wait_stops_the_redrive_at_once(
    monkeypatch, stage, asked, backend_wait
):
    """A real backend answering 503 with a Retry-After past what is left of --backend-wait
    (120 s unless given): the run stops at once, exit status 2, saying what the backend
    asked for and the --backend-wait that waits for it, rather than waiting for nothing
    until the limit; the backend is not asked again."""
    record = fresh()
    kafka(monkeypatch, [(letter(stage=stage, payload=record), b"h")], record)
    stdout, stderr = io.StringIO(), io.StringIO()
    waits: list[float] = []  # the retries' waits (ktel/retry.py), each still waited
    real_sleep = retry._sleep
    monkeypatch.setattr(retry, "_sleep", lambda delay: (waits.append(delay), real_sleep(delay))[1])
    with answering() as (url, answers, received):
        answers.append((503, {"Retry-After": str(asked)}, b"busy"))
        cfg, backend = sent_to(stage, url)
        start = time.monotonic()
        status = dlq.main(cfg, args(backend_wait=backend_wait), stdout=stdout, stderr=stderr)
        took = time.monotonic() - start
    limit = backend_wait or dlq.BACKEND_WAIT_S
    assert status == 2 and len(received) == 1
    assert waits == []  # (stopped without waiting)
    summary, said = stderr.getvalue().splitlines()[-2:]
    assert summary.endswith("selected 1; re-published 0; left 0")
    stopped = re.fullmatch(
        re.escape(
            f"ktel dlq: {backend} asked to be sent ktel.dlq[0]@0 again in {asked} s (HTTP 503: busy), past "
            f"the --backend-wait of {limit:g} s ("
        )
        + r"(\d+)"
        + re.escape(
            " s of it left): stopped there without waiting, the dead letters from it on left; --backend-wait "
        )
        + r"(\d+) or more waits for it",
        said,
    )
    assert stopped, said
    left, enough = map(int, stopped.groups())
    assert limit - 1 - took <= left <= limit
    assert asked < enough <= asked + 1 + took


@pytest.mark.parametrize("stage", ["remote-write", "otlp"])
def test_a_wait_a_backend_asks_for_within_backend_wait_is_waited(monkeypatch, stage):
    record = fresh()
    kafka(monkeypatch, [(letter(stage=stage, payload=record), b"h")], record)
    stdout, stderr = io.StringIO(), io.StringIO()
    with answering() as (url, answers, received):
        answers += [(503, {"Retry-After": "1"}, b"busy"), (200, {}, b"")]
        cfg, backend = sent_to(stage, url)
        start = time.monotonic()
        status = dlq.main(cfg, args(backend_wait=3.0), stdout=stdout, stderr=stderr)
        took = time.monotonic() - start
    assert status == 0, stderr.getvalue()
    assert len(received) == 2 and took >= 1
    assert f"(sent: {backend})" in stdout.getvalue()
    assert stderr.getvalue().splitlines()[-1].endswith(f"sent 1 (1 {backend}); refused again 0; left 0")


@pytest.mark.parametrize("error", [TimeoutError("read timed out"), ValueError("not a sample")])
async def test_a_delivery_that_fails_ends_the_redrive_saying_why_with_what_was_sent_counted(
    monkeypatch, error
):
    """An exception from the exporter's delivery (a TimeoutError of its own among them,
    well within BACKEND_WAIT_S) is not the backend not answering: the run ends there
    naming it, what was sent before counted for the summary ``main`` prints."""
    backend = Backend()

    def fail() -> None:
        raise error

    on_the_second_delivery(backend, fail)
    summary = dlq.Summary()
    with pytest.raises(DlqError) as raised:
        await redrive(monkeypatch, [(letter(), b"h"), (letter(offset=8), b"h")], backend, summary)
    assert str(raised.value) == (
        f"sending ktel.dlq[0]@1 to remote-write to http://prom failed: {type(error).__name__}: {error}: "
        "stopped there, the dead letters from it on left"
    )
    assert dict(summary.sent) == {"remote-write to http://prom": 1}


def test_a_redrive_logs_the_exporters_warnings_but_those_of_what_they_would_dead_letter(monkeypatch, caplog):
    """What an OTLP backend said of the items it rejected in a partial success is on
    stderr (the dead letter's line counts them, without its words); the exporter's
    warning of the dead letter it would write is not (the line says why)."""
    sender, _ = _answering(1, "span too old")
    now = time.time_ns()
    rows = [[bytes([i + 1]) * 16, b"s" * 8, b"", f"s{i}", now, now + 1, 0, "", {}] for i in range(3)]
    rows[2][0] = b"\0" * 16  # (a trace id OTLP does not allow: refused by the exporter)
    value = encode_spans(SpanBatch(RESOURCE, rows))

    async def run(opts, summary, write, report):
        rec = consume.Record(decode_spans(value), "ktel.spans", 0, 7, b"h", value, "ktel.dlq")
        refused = dlq.Refused()
        await sender.deliver([rec], refused)
        assert refused.reasons == ["a trace id of all zeros, which OTLP does not allow"]

    monkeypatch.setattr(dlq, "run", run)
    caplog.set_level(logging.INFO)
    try:
        dlq.main(CFG, args(), stdout=io.StringIO(), stderr=io.StringIO())
    finally:
        sender.shutdown()
    assert "OTLP backend took 1 of 2 spans, rejected 1: span too old" in caplog.text
    assert "dead letter" not in caplog.text


@pytest.mark.parametrize(("sent", "refused", "status"), [(1, 0, 0), (1, 1, 1), (0, 1, 1)])
def test_a_dead_letter_its_backend_refused_again_is_told_by_the_exit_status(
    monkeypatch, sent, refused, status
):
    async def run(opts, summary, write, report):
        summary.sent["remote-write to http://prom"] += sent
        summary.refused += refused

    monkeypatch.setattr(dlq, "run", run)
    assert dlq.main(CFG, args(), stdout=io.StringIO(), stderr=io.StringIO()) == status


async def test_items_two_dead_letters_carry_are_sent_once_in_a_run(monkeypatch):
    """An exporter restarted before committing a record dead-letters its items again (and
    anyone who may write ktel.dlq can copy a dead letter): within a run, each of a
    record's items is sent once. A dead letter of items all sent already is left, saying
    with which; one of some sent already sends the rest. What the backend refused again
    was sent: it is not sent again either."""
    backend = Backend()
    backend.refuse = {"c"}
    a, b, c = (encode_snapshot(MetricSnapshot(TS, rows)) for rows in ([A], [B], [C]))
    lines, summary, _ = await redrive(
        monkeypatch,
        [
            (letter(payload=b), b"h"),
            (letter(payload=b), b"h"),  # (written again)
            (letter(), b"h"),  # the record: a and c left to send
            (letter(payload=a), b"h"),
            (letter(payload=c), b"h"),  # (refused again above)
            (letter(), b"h"),
        ],
        backend,
    )
    assert [r.item for r in backend.given] == [MetricSnapshot(TS, [B]), MetricSnapshot(TS, [A, C])]
    # (what it is given is the items' own record, as a dead letter of some of them gives it)
    assert decode_snapshot(backend.given[1].value) == MetricSnapshot(TS, [A, C])
    assert "(sent: remote-write to http://prom)" in lines[0]
    sent_already = "(left: all it carries was sent in this run already, with ktel.dlq[0]@0 (its items"
    assert sent_already in lines[1]
    assert lines[2].endswith(
        "(left: remote-write to http://prom refused it again: HTTP 400: no c; it took 1 other samples of it; "
        "less what ktel.dlq[0]@0 sent of its record in this run): HTTP 400: out of bounds"
    )
    for line in lines[3:]:
        assert "(left: all it carries was sent in this run already, with ktel.dlq[0]@0 and 1 more (" in line
    assert (dict(summary.sent), summary.refused, summary.left) == ({"remote-write to http://prom": 1}, 1, 4)


async def test_a_dead_letter_of_other_items_of_a_record_sent_before_is_sent_as_it_is(monkeypatch):
    """Two dead letters of one record's items, none in both (a series the exporter
    dead-lettered apart, the rest its receiver refused): the second is sent whole, its
    line not saying that some of it was sent before."""
    backend = Backend()
    b, ac = (encode_snapshot(MetricSnapshot(TS, rows)) for rows in ([B], [A, C]))
    lines, summary, _ = await redrive(
        monkeypatch, [(letter(payload=b), b"h"), (letter(payload=ac), b"h")], backend
    )
    assert [r.item for r in backend.given] == [MetricSnapshot(TS, [B]), MetricSnapshot(TS, [A, C])]
    assert all("(sent: remote-write to http://prom)" in line for line in lines)
    assert dict(summary.sent) == {"remote-write to http://prom": 2}


def test_items_sent_before_are_counted_as_often_as_they_were_sent():
    """Two log records alike are two items: one sent, the other is still to send."""
    sent = dlq.SentBefore()
    one, two = LogBatch(RESOURCE, [LOG]), LogBatch(RESOURCE, [LOG, LOG])
    assert sent.rest(two) is two
    sent.add(one, False, "ktel.dlq[0]@0")
    assert (sent.rest(one), sent.rest(two)) == (None, one)
    # The same values, told apart by type (1.0 for 1): another item.
    sent.add(SNAPSHOT, False, "ktel.dlq[0]@1")
    assert sent.rest(MetricSnapshot(TS, [A, ["a", "gauge", LABELS, 1.0]])) == MetricSnapshot(
        TS, [["a", "gauge", LABELS, 1.0]]
    )
    sent.add(SPANS, True, "ktel.dlq[0]@2")
    assert sent.rest(SpanBatch(RESOURCE, [SPAN])) is None
