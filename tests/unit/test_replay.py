"""`ktel replay` without Kafka: times, the filter and its window rule, the output, a run over records."""

import argparse
import asyncio
import dataclasses
import io
import json
import re
from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError

from ktel import cli, config, replay, topic_window
from ktel.replay import NS, Filter, ReplayError, format_ns, parse_duration, parse_kinds, parse_time
from ktel.wire import (
    DNS_SLOW,
    FILE_CREATED,
    KINDS,
    PID_INDEXES,
    RAW_TOPIC,
    TCP_RETRANSMIT,
    RawBatch,
    WireError,
    decode_batch,
    decode_dead_letter,
    encode_batch,
)
from ktel.wire.codec import CONTAINER_BYTES
from ktel.wire.control import DEAD_LETTER_KEY_BYTES
from tests.unit.topic_window_fake import IdleClient, read_through

NOW = 1_750_000_000 * NS  # 2025-06-15T15:06:40Z


def created(ts_ns, path="/tmp/x"):
    return [FILE_CREATED.id, ts_ns, 10, 10, 0, "touch", path, 0o101, True]


def retransmit(ts_ns):
    return [TCP_RETRANSMIT.id, ts_ns, "ipv4", "10.0.0.1", 1234, "10.0.0.2", 80, "ESTABLISHED", 0]


def batch(events, host="host-a", weights=None, sent_ns=NOW):
    return RawBatch(host, "boot-1", 7, sent_ns, events, weights)


# ----------------------------------------------------------------------- times


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-06-15T15:06:40Z", NOW),
        ("2025-06-15T17:06:40+02:00", NOW),
        ("2025-06-15T15:06:40", NOW),  # no zone: UTC, not the replaying machine's zone
        ("2025-06-15 15:06:40.123456Z", NOW + 123_456_000),  # exact to the microsecond
        ("now", NOW),
        ("-15m", NOW - 15 * 60 * NS),
        ("-2h", NOW - 2 * 3600 * NS),
        ("-1.5h", NOW - 5400 * NS),
        ("-90s", NOW - 90 * NS),
        ("-7d", NOW - 7 * 86400 * NS),
    ],
)
def test_times_absolute_and_relative(text, expected):
    assert parse_time(text, NOW) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-06-15T15:06:40.123456789Z", NOW + 123_456_789),  # RFC 3339, as precise as ts_ns
        ("2025-06-15T15:06:40,123456789+00:00", NOW + 123_456_789),
        ("2025-06-15T17:06:40.000000001+02:00", NOW + 1),
        ("20250615T150640.1234567Z", NOW + 123_456_700),
        ("2025-06-15 15:06:40.123456789", NOW + 123_456_789),
        ("1969-12-31T23:59:59.999999999Z", -1),
        # Between two nanoseconds: the later one, which keeps the same events at either end.
        ("2025-06-15T15:06:40.1234567891Z", NOW + 123_456_790),
    ],
)
def test_times_to_the_nanosecond(text, expected):
    assert parse_time(text, NOW) == expected


def test_an_event_a_nanosecond_outside_the_given_times_is_not_kept():
    flt = Filter(
        parse_time("2026-12-06T01:02:03.123456789Z", NOW), parse_time("2026-12-06T01:02:03.123456791Z", NOW)
    )
    at = flt.from_ns - 789  # 2026-12-06T01:02:03.123456Z
    kept = flt.select(batch([created(at + ns) for ns in (788, 789, 790, 791)]))
    assert kept is not None and [e[1] - at for e in kept.events] == [789, 790]


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (NOW, "2025-06-15T15:06:40.000+00:00"),  # milliseconds at the least
        (NOW + 123_000_000, "2025-06-15T15:06:40.123+00:00"),
        (NOW + 123_456_000, "2025-06-15T15:06:40.123456+00:00"),
        (NOW + 1, "2025-06-15T15:06:40.000000001+00:00"),
        (NOW + NS - 1, "2025-06-15T15:06:40.999999999+00:00"),
        (-1, "1969-12-31T23:59:59.999999999+00:00"),
    ],
)
def test_a_formatted_time_reads_back_as_the_same_nanosecond(ns, text):
    assert format_ns(ns) == text
    assert parse_time(text, NOW) == ns


def test_from_and_to_a_nanosecond_apart_are_told_apart_in_the_error():
    with pytest.raises(
        ReplayError, match=r"--from \(\S+40\.000000002\+00:00\) must be before --to \(\S+40\.000000001\+"
    ):
        Filter(NOW + 2, NOW + 1)


@pytest.mark.parametrize("text", ["yesterday", "-15", "-15x", "15m", "2025-13-01T00:00:00Z", ""])
def test_a_bad_time_says_what_would_do_with_an_example(text):
    with pytest.raises(ReplayError, match=r"bad time .*2025-06-01T12:00:00Z.*-15m"):
        parse_time(text, NOW)


@pytest.mark.parametrize(
    "text",
    [
        "-3000000d",  # 8,000 years back
        "-99999999999999d",
        "0001-01-01T00:00:00+01:00",  # the year 0 in UTC
        "9999-12-31T23:30:00-01:00",  # the year 10000 in UTC
    ],
)
def test_a_time_outside_the_years_1_to_9999_is_refused_naming_them(text):
    # Every time is one format_ns can show: an error naming --from or --to shows both.
    with pytest.raises(
        ReplayError, match=re.escape(f"bad time {text!r}: not within the years 1 to 9999 UTC")
    ):
        parse_time(text, NOW)
    assert parse_time("0001-01-01T00:00:00Z", NOW) == -62_135_596_800 * NS
    assert format_ns(parse_time("9999-12-31T23:59:59.999999999Z", NOW)).startswith("9999-12-31T23:59:59.9")


def test_durations():
    assert parse_duration("0") == 0
    assert parse_duration("5m") == 300 * NS
    assert parse_duration("0.5s") == NS // 2
    assert parse_duration("0.009m") == 540_000_000  # exact: no float rounding down to ...999
    assert parse_time("-0.009m", NOW) == NOW - 540_000_000
    with pytest.raises(ReplayError, match="like 90s or 15m"):
        parse_duration("5 minutes")


# ----------------------------------------------------------------------- kinds


def test_kind_names_become_ids_and_an_unknown_one_lists_the_valid_ones():
    assert parse_kinds([]) is None
    assert parse_kinds(["file_created", "tcp_retransmit"]) == {FILE_CREATED.id, TCP_RETRANSMIT.id}
    with pytest.raises(ReplayError) as err:
        parse_kinds(["file_created", "file_deleted"])
    msg = str(err.value)
    assert "unknown kind file_deleted" in msg
    assert all(k.name in msg for k in KINDS.values())


# ---------------------------------------------------------------------- filter


def test_from_must_be_before_to():
    with pytest.raises(ReplayError, match=r"--from \(2025-06-15T15:06:40.000\+00:00\) must be before --to"):
        Filter(NOW, NOW)
    with pytest.raises(ReplayError, match="must be before"):
        Filter(NOW, NOW - 1)


def test_events_are_judged_by_their_own_time_from_kept_to_excluded():
    flt = Filter(NOW, NOW + 10 * NS)
    events = [created(NOW - 1), created(NOW), created(NOW + 10 * NS - 1), created(NOW + 10 * NS)]
    kept = flt.select(batch(events, weights=[1.0, 2.0, 3.0, 4.0]))
    assert kept is not None
    assert [e[1] for e in kept.events] == [NOW, NOW + 10 * NS - 1]
    assert kept.weights == [2.0, 3.0]  # weights stay with their events
    assert (kept.host_id, kept.boot_id, kept.seq, kept.sent_ns) == ("host-a", "boot-1", 7, NOW)


def test_a_batch_sent_inside_the_window_with_older_events_keeps_none():
    # The record timestamp only bounds the read; the events' own ts_ns decide.
    flt = Filter(NOW, NOW + 10 * NS)
    assert flt.select(batch([created(NOW - NS)], sent_ns=NOW + NS)) is None


def test_kinds_and_hosts_filter():
    flt = Filter(NOW, NOW + NS, hosts=frozenset({"host-a"}), kinds=frozenset({FILE_CREATED.id}))
    whole = batch([created(NOW), retransmit(NOW), created(NOW + 1)])
    kept = flt.select(whole)
    assert kept is not None and [e[0] for e in kept.events] == [FILE_CREATED.id, FILE_CREATED.id]
    assert kept.weights is None
    assert flt.select(batch([created(NOW)], host="host-b")) is None
    assert flt.select(batch([retransmit(NOW)])) is None
    everything = Filter(NOW, NOW + NS)
    assert everything.select(whole) is whole  # nothing dropped: the batch as it was


def test_a_kept_batch_names_only_the_processes_its_kept_events_name():
    [pid_at] = PID_INDEXES[FILE_CREATED.id]
    early, late = created(NOW - NS), created(NOW)
    early[pid_at], late[pid_at] = 11, 22
    enriched = dataclasses.replace(
        batch([early, late]), processes={"11": {"process.command": "a"}, "22": {"process.command": "b"}}
    )
    kept = Filter(NOW, NOW + NS).select(enriched)
    assert kept is not None and kept.events == [late]
    assert kept.processes == {"22": {"process.command": "b"}}


def test_a_record_keyed_otherwise_than_its_host_id_is_of_both_hosts():
    # The processors dead-letter such a record; whoever asks for either host sees it.
    claims_b = batch([created(NOW)], host="host-b")
    for wanted in ("host-a", "host-b"):
        assert Filter(NOW, NOW + NS, hosts=frozenset({wanted})).select(claims_b, b"host-a") is claims_b
    assert Filter(NOW, NOW + NS, hosts=frozenset({"host-c"})).select(claims_b, b"host-a") is None
    # Without a key, only its batch names its host.
    assert Filter(NOW, NOW + NS, hosts=frozenset({"host-a"})).select(claims_b, None) is None
    assert Filter(NOW, NOW + NS, hosts=frozenset({"host-b"})).select(claims_b, None) is claims_b


def test_keys_worth_decoding():
    flt = Filter(NOW, NOW + NS, hosts=frozenset({"host-a"}))
    assert flt.wants_key(b"host-a")
    assert not flt.wants_key(b"host-b")
    assert flt.wants_key(None)  # no key: its batch says which host it is from
    assert not flt.wants_key(b"\xff\xfe")
    assert Filter(NOW, NOW + NS).wants_key(b"anything")
    # A batch that decodes names its host too.
    assert flt.wants_key(b"\xff\xfe", "host-a")
    assert not flt.wants_key(b"\xff\xfe", "host-b")


def test_read_bounds_start_at_from_and_stop_a_margin_after_to():
    flt = Filter(NOW, NOW + 10 * NS)
    assert replay.read_bounds(flt, 60 * NS) == (NOW // 1_000_000, (NOW + 70 * NS) // 1_000_000)


# ---------------------------------------------------------------------- output


def test_event_lines_name_fields_and_hex_bytes_and_the_batch_is_not_shadowed():
    dns = [DNS_SLOW.id, NOW, 5, 5, "curl", "example.org", 2_000_000, 0]
    b = RawBatch("host-a", "boot-1", 3, NOW, [created(NOW, "/tmp/a"), dns], [1.0, 4.0])
    first, second = (json.loads(line) for line in replay.event_lines(b, b"host-a"))
    assert first == {
        "host.id": "host-a",
        "boot.id": "boot-1",
        "batch.seq": 3,
        "kind": "file_created",
        "ts_ns": NOW,
        "pid": 10,
        "tid": 10,
        "uid": 0,
        "comm": "touch",
        "path": "/tmp/a",
        "flags": 0o101,
        "certain": True,
        "sample.weight": 1.0,
    }
    assert (second["host.id"], second["host"], second["sample.weight"]) == ("host-a", "example.org", 4.0)
    assert replay._jsonable({"id": b"\x01\xab", "nested": [b"\xff"]}) == {"id": "01ab", "nested": ["ff"]}


def test_the_lines_of_a_record_keyed_otherwise_than_its_host_id_name_its_key():
    b = batch([created(NOW)], host="host-b")
    key_field = "messaging.kafka.message.key"
    assert key_field not in json.loads(next(replay.event_lines(b, b"host-b")))
    for key, shown in ((b"host-a", "host-a"), (None, None), (b"\xffa", "\\xffa")):
        line = json.loads(next(replay.event_lines(b, key)))
        assert (line["host.id"], line[key_field]) == ("host-b", shown)


# ------------------------------------------------------------------------ run

OPTS = replay.Options("k1:9092", Filter(NOW, NOW + NS, hosts=frozenset({"host-a"})), jsonl=True)


async def replay_of(records, monkeypatch, opts=OPTS):
    """``replay.replay`` over ``records`` ((key, value) on one partition), without Kafka."""
    tp = TopicPartition(RAW_TOPIC, 0)

    async def read(consumer, parts, start_ms, bootstrap):
        for offset, (key, value) in enumerate(records):
            yield tp, SimpleNamespace(key=key, value=value, offset=offset, timestamp=NOW // 1_000_000)

    read_through(monkeypatch, tp, read)
    lines, reports = [], []
    summary = await replay.replay(opts, lines.append, reports.append)
    return [json.loads(line) for line in lines], reports, summary


async def test_records_keyed_otherwise_than_their_host_id_are_shown_and_counted(monkeypatch):
    def value(host, path):
        return encode_batch(batch([created(NOW, path)], host=host))

    records = [
        (b"host-a", value("host-a", "/a")),
        (b"host-a", value("host-b", "/keyed-a-claims-b")),
        (b"host-b", value("host-a", "/keyed-b-claims-a")),
        (None, value("host-a", "/no-key")),
        (b"host-b", value("host-b", "/b")),
        (b"host-c", b"garbage of another host"),  # not this replay's to report
        (b"host-a", b"garbage"),
    ]
    lines, reports, summary = await replay_of(records, monkeypatch)
    assert [(e["path"], e["host.id"], e.get("messaging.kafka.message.key", "")) for e in lines] == [
        ("/a", "host-a", ""),
        ("/keyed-a-claims-b", "host-b", "host-a"),
        ("/keyed-b-claims-a", "host-a", "host-b"),
        ("/no-key", "host-a", None),
    ]
    assert (summary.records, summary.batches, summary.events, summary.decode_failures) == (7, 4, 4, 1)
    assert summary.keyed_otherwise == 3
    assert len(reports) == 1 and "@6: raw batch" in reports[0]
    assert "matched 4 batches (3 keyed otherwise than their host id), 4 events;" in summary.line(OPTS)
    assert "keyed otherwise" not in replay.Summary().line(OPTS)


async def test_a_record_keyed_with_no_host_id_is_reported_once_not_on_each_line(monkeypatch):
    """A key is any bytes up to the record's size. Echoed on each event's line, 990 KB of
    key beside 100,000 small compressed events made 100 GB of output from one record."""
    many = batch([created(NOW, f"/{i}") for i in range(1000)])
    huge = b"\x1b[2J\n" + b"k" * 990_000
    records = [
        (huge, encode_batch(many)),
        (b"\xffa", encode_batch(batch([created(NOW, "/not-utf-8")]))),
        (b"*", encode_batch(batch([created(NOW, "/every-host")]))),
        (b"host-a", encode_batch(batch([created(NOW, "/a")]))),
        (b"x" * 300, encode_batch(batch([created(NOW, "/of-b")], host="host-b"))),  # not host-a's
    ]
    lines, reports, summary = await replay_of(records, monkeypatch)
    assert [e["path"] for e in lines] == ["/a"]
    assert "messaging.kafka.message.key" not in lines[0]  # a record keyed by its host: as before
    assert (summary.records, summary.batches, summary.events) == (5, 1, 1)
    assert (summary.bad_keys, summary.decode_failures) == (3, 0)
    assert reports == [
        f"ktel replay: {RAW_TOPIC}[0]@0: its key of {len(huge)} bytes, "
        "b'\\x1b[2J\\n" + "k" * (replay.KEY_SHOWN - 5) + "'..., is no host id: "
        f"host id of {len(huge)} characters is longer than the 256 a host id may take",
        f"ktel replay: {RAW_TOPIC}[0]@1: its key of 2 bytes, b'\\xffa', is no host id: "
        "a host id is UTF-8, and this key is not",
        f"ktel replay: {RAW_TOPIC}[0]@2: its key of 1 bytes, b'*', is no host id: "
        "host id '*' is ktel.control's every-host target, not a host's",
    ]
    assert "decode failures 0; 3 keyed with no host id" in summary.line(OPTS)
    assert "keyed with no host id" not in replay.Summary().line(OPTS)
    # Without --host, every host's is reported.
    _, reports, summary = await replay_of(
        records, monkeypatch, dataclasses.replace(OPTS, filter=Filter(NOW, NOW + NS))
    )
    assert summary.bad_keys == 4 and len(reports) == 4


async def test_a_record_keyed_with_no_host_id_is_dead_lettered_with_dlq(monkeypatch):
    sent = []

    class Producer(IdleClient):
        async def send_and_wait(self, topic, value, key=None):
            sent.append((topic, key, decode_dead_letter(value)))

    monkeypatch.setattr(replay, "AIOKafkaProducer", Producer)
    value = encode_batch(batch([created(NOW)]))
    huge = b"k" * 990_000
    _, _, summary = await replay_of([(huge, value)], monkeypatch, dataclasses.replace(OPTS, dlq=True))
    [(topic, key, dl)] = sent
    assert (topic, dl.stage, dl.topic, dl.offset, dl.payload) == ("ktel.dlq", "replay", RAW_TOPIC, 0, value)
    assert key == huge[:DEAD_LETTER_KEY_BYTES]  # (as a dead letter keeps a key)
    assert dl.reason.startswith("its key of 990000 bytes, b'kkk") and dl.reason.endswith(
        "is no host id: host id of 990000 characters is longer than the 256 a host id may take"
    )
    assert (summary.bad_keys, summary.dead_lettered) == (1, 1)


async def test_a_batch_too_large_to_re_publish_is_reported_and_the_others_re_published(monkeypatch):
    """A record no agent writes: a batch of nearly the most a record decodes to, written
    back larger than it came (32-bit floats take 64 bits). aiokafka refuses it before
    sending it (as here), and it ended the replay of the window with "Kafka failed".
    (Here the limit is made small, not the batch large.)"""
    sent = []

    class Producer(IdleClient):
        """aiokafka's producer as far as replay uses it, refusing as it does what is
        larger than max_request_size."""

        def __init__(self, **kw):
            self.max_request_size = kw["max_request_size"]

        async def send(self, topic, value, key=None, timestamp_ms=None):
            if len(key or b"") + len(value) > self.max_request_size:
                raise MessageSizeTooLargeError("larger than max_request_size")
            sent.append((topic, key))
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

    monkeypatch.setattr(replay, "AIOKafkaProducer", Producer)
    value = encode_batch(batch([created(NOW)]))
    large = encode_batch(batch([created(NOW, f"/{i}") for i in range(100)]))
    monkeypatch.setattr(replay, "REPUBLISH_MAX_BYTES", len(large) - 1)
    records = [(b"host-a", value), (b"host-a", large), (b"host-a", value)]
    opts = dataclasses.replace(OPTS, to_topic="incident-42", jsonl=False)
    _, reports, summary = await replay_of(records, monkeypatch, opts)
    assert sent == [("incident-42", b"host-a")] * 2
    assert (summary.batches, summary.republished, summary.not_republished) == (3, 2, 1)
    assert reports == [
        f"ktel replay: {RAW_TOPIC}[0]@1: not re-published to incident-42: its key and batch take "
        f"{len(large) + 6} bytes and Kafka's framing, more than the {len(large) - 1} "
        "a record replay writes may"
    ]
    assert "re-published 2 batches to incident-42; not re-published 1 too large" in summary.line(opts)


def test_a_read_that_fails_midway_prints_the_summary_of_what_it_did_then_the_error(monkeypatch):
    """A partition whose end moved back, or a Kafka gone midway, ends the read once the
    rest is read: what was read and written before it is told, as at a window's end."""
    tp = TopicPartition(RAW_TOPIC, 0)
    records = [encode_batch(batch([created(NOW, "/a")])), b"garbage"]

    async def read(consumer, parts, start_ms, bootstrap):
        for offset, value in enumerate(records):
            yield tp, SimpleNamespace(key=b"host-a", value=value, offset=offset, timestamp=NOW // 1_000_000)
        raise topic_window.ReadError("partition 0 of ktel.raw: its end moved back")

    read_through(monkeypatch, tp, read)
    monkeypatch.setattr(replay.time, "time_ns", lambda: NOW + NS)
    stdout, stderr = io.StringIO(), io.StringIO()
    status = replay.main(CFG, args(from_="-15m", to="now"), stdout, stderr)
    assert status == 2
    assert [json.loads(line)["path"] for line in stdout.getvalue().splitlines()] == ["/a"]
    assert stderr.getvalue().splitlines()[-2:] == [
        "ktel replay: read 2 records from 1 partitions of ktel.raw; matched 1 batches, 1 events; "
        "decode failures 1; stopped early by the error below",
        "ktel replay: partition 0 of ktel.raw: its end moved back",
    ]


async def test_batches_re_published_before_a_read_fails_are_counted(monkeypatch):
    tp = TopicPartition(RAW_TOPIC, 0)
    value = encode_batch(batch([created(NOW)]))

    async def read(consumer, parts, start_ms, bootstrap):
        yield tp, SimpleNamespace(key=b"host-a", value=value, offset=0, timestamp=NOW // 1_000_000)
        raise topic_window.ReadError("partition 0 of ktel.raw: its end moved back")

    class Client(IdleClient):
        """aiokafka's consumer and producer as far as replay uses them: a send is
        acknowledged once awaited after the read."""

        async def send(self, topic, value, key=None, timestamp_ms=None):
            return asyncio.ensure_future(asyncio.sleep(0))

    read_through(monkeypatch, tp, read, Client())
    monkeypatch.setattr(replay, "AIOKafkaProducer", Client)
    summary = replay.Summary()
    opts = dataclasses.replace(OPTS, to_topic="incident-42", jsonl=False)
    with pytest.raises(ReplayError, match="its end moved back"):
        await replay.replay(opts, print, print, summary)
    assert (summary.batches, summary.republished) == (1, 1)


@pytest.mark.parametrize("failing", ["dead letter", "re-publish"])
async def test_batches_re_published_before_kafka_fails_midway_are_counted(monkeypatch, failing):
    """The summary printed after Kafka failed midway counts what Kafka acknowledged: the
    batches sent before it (aiokafka writes them whatever becomes of the replay), and
    those the same wait for acknowledgements got when another of them failed."""
    tp = TopicPartition(RAW_TOPIC, 0)
    value = encode_batch(batch([created(NOW)]))
    if failing == "dead letter":
        monkeypatch.setattr(replay, "MAX_IN_FLIGHT", 1000)
        records = [value, value, b"garbage"]  # the dead letter's send fails
    else:
        monkeypatch.setattr(replay, "MAX_IN_FLIGHT", 3)
        records = [value, b"refused", value]  # the second batch is refused

    async def read(consumer, parts, start_ms, bootstrap):
        for offset, v in enumerate(records):
            yield tp, SimpleNamespace(key=b"host-a", value=v, offset=offset, timestamp=NOW // 1_000_000)

    class Client(IdleClient):
        """aiokafka's consumer and producers as far as replay uses them: a batch sent is
        acknowledged once awaited; a dead letter's send, or re-publishing b"refused", fails."""

        async def send(self, topic, value, key=None, timestamp_ms=None):
            async def acknowledged():
                await asyncio.sleep(0)
                if decode_batch(value).events[0][6] == "/refused":
                    raise KafkaConnectionError("the leader went away")

            return asyncio.ensure_future(acknowledged())

        async def send_and_wait(self, topic, value, key=None):
            raise KafkaConnectionError("the leader went away")

    if failing == "re-publish":
        records[1] = encode_batch(batch([created(NOW, "/refused")]))
    read_through(monkeypatch, tp, read, Client())
    monkeypatch.setattr(replay, "AIOKafkaProducer", Client)
    summary = replay.Summary()
    opts = dataclasses.replace(OPTS, to_topic="incident-42", jsonl=False, dlq=True)
    with pytest.raises(ReplayError, match="Kafka failed"):
        await replay.replay(opts, print, print, summary)
    assert summary.republished == 2


def test_an_error_before_the_read_began_prints_no_summary(monkeypatch):
    async def partitions(client, bootstrap, topic):
        raise topic_window.ReadError(f"topic {topic} is not on {bootstrap}")

    monkeypatch.setattr(topic_window, "partitions", partitions)
    stdout, stderr = io.StringIO(), io.StringIO()
    assert replay.main(CFG, args(), stdout, stderr) == 2
    assert stderr.getvalue().splitlines() == ["ktel replay: topic ktel.raw is not on k1:9092"]


# ------------------------------------------------------------------- arguments


def args(**kw):
    base = dict(
        from_="-15m",
        to="now",
        host=None,
        kind=None,
        margin="5m",
        topic=RAW_TOPIC,
        format=None,
        to_topic=None,
        to_bootstrap=None,
        dlq=False,
    )
    return argparse.Namespace(**{**base, **kw})


CFG = config.Config(agent=config.AgentConfig(host_id="h"), kafka=config.KafkaConfig(bootstrap="k1:9092"))


def test_options_from_arguments():
    opts = replay.options(CFG, args(host=["a", "b"], kind=["oom_kill"]), now_ns=NOW)
    assert (opts.filter.from_ns, opts.filter.to_ns) == (NOW - 900 * NS, NOW)
    assert opts.filter.hosts == {"a", "b"}
    assert opts.jsonl and opts.to_topic is None and opts.bootstrap == "k1:9092"
    # Re-publishing: no stdout by default, and a new topic is laid out like ktel.raw.
    opts = replay.options(CFG, args(to_topic="incident-42"), now_ns=NOW)
    assert not opts.jsonl
    spec = opts.to_topic_spec
    assert spec is not None
    assert (spec.name, spec.partitions) == ("incident-42", CFG.kafka.raw_partitions)
    assert spec.retention_ms == int(CFG.kafka.raw_retention_hours * 3_600_000)
    assert opts.to_bootstrap == "k1:9092"
    assert replay.options(CFG, args(to_topic="x", format="jsonl"), now_ns=NOW).jsonl


def test_every_ktel_topic_and_the_source_are_protected_on_the_cluster_replay_reads():
    # Which cluster --to-bootstrap is, is asked of Kafka (tests/integration/test_replay.py).
    opts = replay.options(CFG, args(to_topic=RAW_TOPIC, to_bootstrap="scratch:9092", topic="t"), now_ns=NOW)
    assert opts.to_bootstrap == "scratch:9092"
    internal = {
        "ktel.raw",
        "ktel.deduped",
        "ktel.enriched",
        "ktel.sampled",
        "ktel.control",
        "ktel.heartbeats",
    }
    assert internal | {"ktel.metrics", "ktel.spans", "ktel.logs", "ktel.dlq", "t"} == opts.protected_topics
    with pytest.raises(ReplayError, match="--to-bootstrap needs --to-topic"):
        replay.options(CFG, args(to_bootstrap="scratch:9092"), now_ns=NOW)


@pytest.mark.parametrize(
    ("bootstrap", "why"),
    [("scratch:9o92", "is not host:port"), ("PLAINTEXT://scratch:9092", "without a scheme")],
)
def test_a_to_bootstrap_that_is_not_host_port_is_refused_before_any_client_is_made(bootstrap, why):
    """As kafka.bootstrap is: a typo in the port was a traceback from the client, a
    listener's URL a bootstrap that never connected."""
    with pytest.raises(ReplayError, match=f"--to-bootstrap '{re.escape(bootstrap)}': .*{why}"):
        replay.options(CFG, args(to_topic="incident-42", to_bootstrap=bootstrap), now_ns=NOW)


def test_relative_times_on_the_command_line_are_values_not_options():
    assert cli._relative_times(["replay", "--from", "-15m", "--to", "-1.5h", "--host", "-x"]) == [
        "replay",
        "--from=-15m",
        "--to=-1.5h",
        "--host",
        "-x",
    ]


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--from", "yesterday"], re.escape(f"bad time 'yesterday': use {replay.TIME_EXAMPLES}")),
        (["--from", "-1h", "--to", "-2h"], r"--from \(\S+\) must be before --to \(\S+\)"),
        (
            ["--from", "2025-06-01", "--to", "-1000000d"],
            re.escape("bad time '-1000000d': not within the years 1 to 9999 UTC"),
        ),
        (
            ["--from", "-1h", "--kind", "file_made"],
            re.escape(
                "unknown kind file_made; the kinds are: " + ", ".join(sorted(k.name for k in KINDS.values()))
            ),
        ),
        (
            ["--from", "-1h", "--margin", "lots"],
            re.escape("bad duration 'lots': use a number and a unit s, m, h or d, like 90s or 15m"),
        ),
    ],
)
def test_the_command_rejects_bad_arguments_before_touching_kafka(argv, line, monkeypatch, capsys):
    """Each error is one line that names the bad value and what to give instead."""
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "h")
    monkeypatch.setenv("KTEL_KAFKA__BOOTSTRAP", "127.0.0.1:1")  # nothing listens: must not be reached
    with pytest.raises(SystemExit) as exit_:
        cli.main(["replay", *argv])
    assert exit_.value.code == 2
    (err,) = capsys.readouterr().err.splitlines()
    assert re.fullmatch(f"ktel replay: {line}", err)
    assert "Kafka" not in err


def test_an_unreachable_kafka_is_named_with_the_setting_to_fix(monkeypatch, capsys):
    from ktel.stack.proc import free_port

    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there: refused at once
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "h")
    monkeypatch.setenv("KTEL_KAFKA__BOOTSTRAP", bootstrap)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["replay", "--from", "-1h"])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"ktel replay: cannot reach Kafka at {bootstrap} (")
    assert last.endswith("check kafka.bootstrap and kafka.security_protocol")


def nested_too_deeply(depth: int = 1000) -> bytes:
    """A raw batch whose file_created path is an array ``depth`` deep (msgpack's packer
    refuses such a value, so its bytes are spliced in), with resource attributes enough
    for its arrays' count (ktel.wire.codec.CONTAINER_BYTES)."""
    pad = {f"pad{i}": "x" * 1000 for i in range(depth * CONTAINER_BYTES // 1000 + 1)}
    batch = RawBatch("h", "b", 1, 1, [[FILE_CREATED.id, 1, 2, 2, 0, "c", "PATH", 0o101, True]], resource=pad)
    return encode_batch(batch).replace(b"\xa4PATH", b"\x91" * depth + b"\xa1x")


def test_a_value_nested_deep_is_a_record_that_does_not_decode_with_a_short_reason():
    # Deeper than Python's recursion limit: the reason shows a few levels of it.
    with pytest.raises(WireError) as err:
        decode_batch(nested_too_deeply())
    assert (
        str(err.value)
        == "raw batch: event 0 (file_created) field 'path' must be a string, got list [[[...]]]"
    )


@pytest.mark.parametrize(
    ("ids", "refused"),
    [
        ({"live:9092": "A", "scratch:9092": "B"}, False),
        ({"live:9092": "A", "scratch:9092": "A"}, True),  # another address of the same cluster
        ({"live:9092": "A", "scratch:9092": None}, True),  # a broker that cannot tell
    ],
)
async def test_the_live_cluster_is_told_by_its_id(monkeypatch, ids, refused):
    async def cluster_id(client, bootstrap: str, what: str) -> str | None:
        return ids[bootstrap]

    monkeypatch.setattr(replay, "cluster_id", cluster_id)
    if refused:
        with pytest.raises(ReplayError, match="--to-topic ktel.raw: ktel's own topic"):
            await replay._refuse_the_live_cluster(
                config.KafkaConfig(), "live:9092", "scratch:9092", "ktel.raw"
            )
    else:
        await replay._refuse_the_live_cluster(config.KafkaConfig(), "live:9092", "scratch:9092", "ktel.raw")
