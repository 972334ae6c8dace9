"""The pure parts of `ktel dlq`: which dead letters it selects, which it can re-drive and
why not, its lines and its arguments (against Kafka: tests/integration/test_dlq.py)."""

import argparse
import asyncio
import io
import json
import re
from types import SimpleNamespace

import msgpack
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, OffsetOutOfRangeError

from ktel import cli, config, dlq, topic_window
from ktel import retry as retry_mod
from ktel.dlq import DlqError, Found, Selection, why_not_redrivable
from ktel.replay import NS, format_ns
from ktel.wire import (
    FILE_CREATED,
    DeadLetter,
    RawBatch,
    Redriven,
    dead_letter_record,
    decode_dead_letter,
    decode_dlq_record,
    encode_batch,
    encode_heartbeat,
    encode_redriven,
)
from ktel.wire.codec import MAX_RECORD_BYTES, pack
from ktel.wire.control import DEAD_LETTER_KEY_BYTES
from tests.unit.topic_window_fake import IdleClient, read_through

NOW = 1_750_000_000 * NS  # 2025-06-15T15:06:40Z
CFG = config.Config(agent=config.AgentConfig(host_id="h"), kafka=config.KafkaConfig(bootstrap="k1:9092"))
STAGE_TOPICS = dlq.stage_topics(CFG)
EXPORTER_TOPICS = {stage: exporter.topics for stage, exporter in dlq.exporters(CFG).items()}
REFUSED = "host 'b': not one of the 1 hosts this worker holds, and process.max_hosts = 1"


BATCH = encode_batch(
    RawBatch("b", "boot", 0, 1, [[FILE_CREATED.id, 1, 2, 2, 0, "w", "/a/b/f", 0o101, False]])
)
BEAT = encode_heartbeat({"ts": 1, "host": {"host.id": "b", "boot.id": "boot"}, "probes": {}, "counters": {}})


def letter(topic="ktel.raw", reason=REFUSED, payload=BATCH, stage="aggregate"):
    return DeadLetter(stage, reason, topic, 3, 41, payload)


def test_the_stages_topics_are_the_only_ones_re_driven_to_and_follow_the_prefix():
    assert {"ktel.raw", "ktel.deduped", "ktel.enriched", "ktel.sampled", "ktel.heartbeats"} == set(
        STAGE_TOPICS
    )
    prefixed = config.Config(
        agent=config.AgentConfig(host_id="h"), kafka=config.KafkaConfig(bootstrap="k:1", prefix="eu.")
    )
    assert "eu.ktel.raw" in dlq.stage_topics(prefixed)
    assert "ktel.raw" not in dlq.stage_topics(prefixed)


@pytest.mark.parametrize(
    ("dl", "key", "why"),
    [
        (letter(), b"b", None),
        (letter(topic="ktel.sampled"), b"b", None),
        (letter(topic="ktel.heartbeats", payload=BEAT), b"b", None),
        (
            letter(topic="ktel.metrics"),
            b"b",
            "'ktel.metrics' is not a topic a ktel stage reads (every exporter reads it), and 'aggregate' "
            "not an exporter whose backend --redrive sends to (otlp, remote-write)",
        ),
        (letter(topic="ktel.dlq"), b"b", "'ktel.dlq' is not a topic a ktel stage reads"),
        (letter(topic="payments"), b"b", "'payments' is not a topic a ktel stage reads"),
        (letter(payload=b""), b"b", "it has no payload (a tombstone)"),
        (letter(payload=None), None, "it has no payload (a tombstone)"),
        (  # (a reader's stand-in for a batch it did not expand: ktel/kafka_batches.py)
            letter(payload=b"", reason="raw batch: a Kafka record batch not read (offsets 3 to 7): why"),
            None,
            "its Kafka record batch was not read (see the reason): it carries none of its records",
        ),
        # What the stages would only dead-letter again:
        (
            letter(payload=b"junk"),
            b"b",
            "it does not decode (raw batch: not msgpack (ExtraData: unpack(b) received extra data.))",
        ),
        (letter(topic="ktel.heartbeats"), b"b", "it does not decode (heartbeat: field 'ts' is missing)"),
        (letter(), b"a", "its key b'a' is not its host id 'b'"),
        (letter(), None, "its key None is not its host id 'b'"),
        (letter(topic="ktel.heartbeats", payload=BEAT), b"c", "its key b'c' is not its host id 'b'"),
        (
            letter(),
            b"k" * DEAD_LETTER_KEY_BYTES,
            "its key is 1024 bytes, the most a dead letter keeps, so may have been cut",
        ),
    ],
)
def test_what_can_be_re_driven(dl, key, why):
    assert why_not_redrivable(dl, key, STAGE_TOPICS, EXPORTER_TOPICS) == why


def test_a_dead_letter_whose_payload_was_cut_is_judged_by_its_record_on_its_topic():
    # (its record is read back to re-drive it: tests/integration/test_dlq.py)
    key, value = dead_letter_record(letter(payload=b"x" * MAX_RECORD_BYTES), b"b")
    cut = decode_dead_letter(value)
    assert 0 < len(cut.payload) < MAX_RECORD_BYTES
    assert why_not_redrivable(cut, key, STAGE_TOPICS, EXPORTER_TOPICS) is None


def test_what_a_dead_letters_writer_put_in_its_fields_cannot_fake_or_garble_a_line():
    forged = DeadLetter("all\n2025-06-15T15:06:40 fake", "r\x1b[2J", "t\r", 0, 0, b"x")
    line = Found("ktel.dlq[0]@1", NOW // 1_000_000, None, forged, None).line()
    assert "\n" not in line and "\x1b" not in line and "\r" not in line
    assert "all\\n2025-06-15T15:06:40 fake: t\\r[0]@0" in line and line.endswith("r\\x1b[2J")
    assert (
        why_not_redrivable(forged, None, STAGE_TOPICS, EXPORTER_TOPICS)
        == "'t\\r' is not a topic a ktel stage reads"
    )


@pytest.mark.parametrize("ms", [-(2**63), -1, 0, NOW // 1_000_000, 2**63 - 1])
def test_by_default_a_dead_letter_is_in_the_window_whatever_time_its_record_carries(ms):
    # A writer of ktel.dlq gives its record any time: one before 1970 or past now is not
    # hidden from a listing, nor from a --redrive.
    assert Selection().within(ms)
    assert Selection(to_ms=2**63 - 1).within(ms) == (ms < 2**63 - 1)
    assert Selection(from_ms=0).within(ms) == (ms >= 0)
    # Its time shown as a time where one can be, else as it is.
    found = Found("ktel.dlq[0]@7", ms, None, letter(), None)
    shown = f"{ms} ms since 1970" if abs(ms) > 2**62 else format_ns(ms * 1_000_000)
    assert found.line().startswith(f"{shown} ktel.dlq[0]@7 ")
    assert json.loads(found.json())["time"] == shown


async def test_a_listing_reads_every_partition_from_its_oldest_record_and_counts_each(monkeypatch):
    """Dead letters timed before 1970 and past now: ``--from`` defaulted to 0, where
    each partition's read began, and its window dropped them uncounted."""
    tp = TopicPartition("ktel.dlq", 0)
    starts = []

    async def read(consumer, parts, start_ms, bootstrap):
        starts.append(start_ms)
        for offset, ms in enumerate((-(2**63), -1, NOW // 1_000_000, 2**63 - 1)):
            key, value = dead_letter_record(letter(reason=f"at {ms}"), b"b")
            yield tp, SimpleNamespace(key=key, value=value, offset=offset, timestamp=ms)

    read_through(monkeypatch, tp, read)
    summary, lines = dlq.Summary(), []
    await dlq.run(dlq.options(CFG, args(), now_ns=NOW), summary, lines.append, [].append)
    assert starts == [None]  # (topic_window.records: from each partition's oldest record)
    assert [line.rsplit(": ", 1)[1] for line in lines] == [
        f"at {ms}" for ms in (-(2**63), -1, NOW // 1_000_000, 2**63 - 1)
    ]
    assert summary.line("ktel.dlq", False) == "read 4 dead letters from 1 partitions of ktel.dlq; selected 4"


@pytest.mark.parametrize(
    "failure", [topic_window.ReadError("its end moved back"), KafkaConnectionError("gone")]
)
async def test_a_redrive_cut_short_counts_what_kafka_took_and_refused(monkeypatch, failure):
    """The summary printed after a read that failed midway (or a Kafka gone) counts as
    re-published only the records Kafka acknowledged, and as failed those it refused: the
    sends in flight were counted re-published as sent, and never waited for."""
    tp = TopicPartition("ktel.dlq", 0)
    reads = []

    async def read(consumer, parts, start_ms, bootstrap):
        reads.append(start_ms)
        for offset in range(2):
            key, value = dead_letter_record(letter(), b"b")
            yield tp, SimpleNamespace(key=key, value=value, offset=offset, timestamp=NOW // 1_000_000)
        if len(reads) == 2:  # (the read of the dead letters, after that of the re-drive markers)
            raise failure

    class Client(IdleClient):
        """A consumer, and a producer as far as --redrive uses it: the first record sent
        is acknowledged, the second refused."""

        def __init__(self, **kw):
            self.sent = 0

        async def send(self, topic, value, key=None, headers=None, partition=None):
            self.sent += 1
            refused = self.sent == 2

            async def acknowledged():
                await asyncio.sleep(0)
                if refused:
                    raise KafkaConnectionError("the leader went away")

            return asyncio.ensure_future(acknowledged())

    class Originals:
        def __init__(self, opts):
            self.reader = Client()

        async def record(self, topic, partition, offset):
            return SimpleNamespace(key=b"b", value=BATCH, offset=offset)

    read_through(monkeypatch, tp, read, Client())
    monkeypatch.setattr(dlq, "Originals", Originals)
    monkeypatch.setattr(dlq, "AIOKafkaProducer", Client)
    summary = dlq.Summary()
    with pytest.raises((topic_window.ReadError, DlqError)):
        await dlq.run(dlq.options(CFG, args(redrive=True), now_ns=NOW), summary, [].append, [].append)
    assert (summary.selected, sum(summary.redriven.values()), summary.failed) == (2, 1, 1)


def test_selection_by_stage_source_host_and_reason():
    dl = letter()
    assert Selection().takes(dl, None)
    assert Selection(stages=frozenset({"aggregate", "x"})).takes(dl, b"b")
    assert not Selection(stages=frozenset({"enrich"})).takes(dl, b"b")
    assert Selection(sources=frozenset({"ktel.raw"})).takes(dl, b"b")
    assert not Selection(sources=frozenset({"ktel.heartbeats"})).takes(dl, b"b")
    assert Selection(hosts=frozenset({"b"})).takes(dl, b"b")
    assert not Selection(hosts=frozenset({"b"})).takes(dl, b"a")
    assert not Selection(hosts=frozenset({"b"})).takes(dl, None)
    assert Selection(reason=re.compile(r"max_hosts = \d")).takes(dl, b"b")
    assert not Selection(reason=re.compile("^max_hosts")).takes(dl, b"b")


def test_a_line_and_a_json_object_per_dead_letter():
    found = Found("ktel.dlq[0]@7", NOW // 1_000_000, b"b\xff", letter(payload=b"batch"), None)
    assert found.line() == (
        f"2025-06-15T15:06:40.000+00:00 ktel.dlq[0]@7 aggregate: ktel.raw[3]@41 key='b\\\\xff' 5 B "
        f"(can be re-driven): {REFUSED}"
    )
    left = Found(
        "ktel.dlq[0]@8",
        NOW // 1_000_000,
        None,
        letter(topic="x", payload=b"batch"),
        "'x' is not a topic a ktel stage reads",
    )
    assert "ktel.dlq[0]@8 aggregate: x[3]@41 5 B (left: 'x' is not a topic a ktel stage reads)" in left.line()
    obj = json.loads(found.json())
    assert obj == {
        "dlq": "ktel.dlq[0]@7",
        "time": "2025-06-15T15:06:40.000+00:00",
        "stage": "aggregate",
        "topic": "ktel.raw",
        "partition": 3,
        "offset": 41,
        "key": "b\\xff",
        "reason": REFUSED,
        "payload_bytes": 5,
        "payload": b"batch".hex(),
        "redrive": True,
        "left_because": None,
        "sent_to": None,
        "sent_already": None,
        "redriven": None,  # (the marker of an earlier --redrive that delivered it, which skips it)
    }


def args(**kw):
    base = dict(
        from_=None,
        to=None,
        stage=None,
        source=None,
        host=None,
        reason=None,
        json=False,
        redrive=False,
        again=False,
        backend_wait=None,
    )
    return argparse.Namespace(**{**base, **kw})


def test_options_from_arguments():
    opts = dlq.options(CFG, args(), now_ns=NOW)
    assert (opts.selection.from_ms, opts.selection.to_ms) == (None, None)  # every dead letter
    assert dlq.options(CFG, args(to="now"), now_ns=NOW).selection.to_ms == NOW // 1_000_000
    assert (opts.dlq_topic, opts.bootstrap, opts.redrive) == ("ktel.dlq", "k1:9092", False)
    opts = dlq.options(
        CFG,
        args(
            from_="-1h",
            stage=["sample"],
            source=["ktel.enriched"],
            host=["b"],
            reason="max_hosts",
            redrive=True,
        ),
        now_ns=NOW,
    )
    sel = opts.selection
    assert sel.from_ms == (NOW - 3600 * NS) // 1_000_000
    assert (sel.stages, sel.sources, sel.hosts) == ({"sample"}, {"ktel.enriched"}, {"b"})
    assert sel.reason is not None and sel.reason.pattern == "max_hosts"
    assert dlq.options(CFG, args(redrive=True, json=True), now_ns=NOW).redrive
    lz4 = CFG.model_copy(update={"agent": CFG.agent.model_copy(update={"compression": "lz4"})})
    assert dlq.options(lz4, args(), now_ns=NOW).compression == "lz4"  # as the agents send


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(from_="yesterday"), "bad time 'yesterday'"),
        (dict(from_="-1h", to="-2h"), r"--from \(\S+\) must be before --to \(\S+\)"),
        (dict(from_="2025-06-01", to="-1000000d"), "bad time '-1000000d': not within the years 1 to 9999"),
        (dict(reason="max_hosts = ("), re.escape("--reason 'max_hosts = (' is not a regular expression")),
    ],
)
def test_bad_arguments_say_what_is_wrong(kw, message):
    with pytest.raises(DlqError, match=message):
        dlq.options(CFG, args(**kw), now_ns=NOW)


def test_the_command_rejects_bad_arguments_before_touching_kafka(monkeypatch, capsys):
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "h")
    monkeypatch.setenv("KTEL_KAFKA__BOOTSTRAP", "127.0.0.1:1")  # nothing listens: must not be reached
    with pytest.raises(SystemExit) as exit_:
        cli.main(["dlq", "--from", "-1h", "--reason", "(", "--redrive"])
    assert exit_.value.code == 2
    (err,) = capsys.readouterr().err.splitlines()
    assert err.startswith("ktel dlq: --reason '(' is not a regular expression: ")


def test_an_unreachable_kafka_is_named_with_the_setting_to_fix(monkeypatch, capsys):
    from ktel.stack.proc import free_port

    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there: refused at once
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "h")
    monkeypatch.setenv("KTEL_KAFKA__BOOTSTRAP", bootstrap)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["dlq", "--from", "-1h"])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"ktel dlq: cannot reach Kafka at {bootstrap} (")
    assert last.endswith("check kafka.bootstrap and kafka.security_protocol")


@pytest.mark.parametrize("as_json", [False, True])
def test_a_listing_writes_on_a_stdout_that_is_not_utf_8(as_json, monkeypatch):
    """LANG=C without UTF-8 mode, PYTHONIOENCODING=ascii: a dead letter's text in
    characters the encoding has no bytes for raised UnicodeEncodeError, ending the
    listing at the first one."""
    forged = DeadLetter("étape", "raison: ü \u2603 \U0001f600", "ktel.raw", 0, 0, b"x")

    async def run(opts, summary, write, report):
        for key in (b"h\xc3\xa9", b"plain"):
            summary.records += 1
            write(
                getattr(
                    Found("ktel.dlq[0]@1", NOW // 1_000_000, key, forged, None), "json" if as_json else "line"
                )()
            )

    monkeypatch.setattr(dlq, "run", run)
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    assert dlq.main(CFG, args(json=as_json), stdout=out, stderr=io.StringIO()) == 0
    out.flush()
    first, second = out.buffer.getvalue().decode("ascii").splitlines()
    if as_json:
        assert json.loads(first)["reason"] == forged.reason
    else:
        assert first.startswith(
            "2025-06-15T15:06:40.000+00:00 ktel.dlq[0]@1 \\xe9tape: ktel.raw[0]@0 key='h\\xe9' "
        )
        assert first.endswith("raison: \\xfc \\u2603 \\U0001f600")
    assert "plain" in second


class Partition:
    """A partition of a stage's topic holding offsets [first, end) as its leader tells,
    and a consumer of it: each getmany answers with the next of ``answers`` ("out of
    range", as a replica behind the leader does; "nothing"; a KafkaError to raise; or
    "record", the record at the position), then with the record; ``fetches`` counts
    them."""

    def __init__(self, first: int, end: int, answers: list) -> None:
        self.first, self.end = first, end
        self.answers = list(answers)
        self.fetches = 0
        self.at = 0

    async def start(self):
        pass

    async def stop(self):
        pass

    async def beginning_offsets(self, parts):
        return dict.fromkeys(parts, self.first)

    async def end_offsets(self, parts):
        return dict.fromkeys(parts, self.end)

    def assign(self, parts) -> None:
        pass

    def seek(self, tp, offset) -> None:
        self.at = offset

    async def position(self, tp) -> int:
        return self.at

    async def getmany(self, tp, timeout_ms):
        self.fetches += 1
        answer = self.answers.pop(0) if self.answers else "record"
        if answer == "out of range":
            raise OffsetOutOfRangeError({tp: self.at})
        if isinstance(answer, Exception):
            raise answer
        if answer == "nothing":
            return {}
        self.at += 1
        return {tp: [SimpleNamespace(offset=self.at - 1, key=b"b", value=BATCH)]}


@pytest.fixture
def originals_of(monkeypatch):
    """Originals reading back from a Partition, the retries not waiting."""
    waits = []

    async def no_wait(delay):
        waits.append(delay)

    async def partitions(client, bootstrap, topic):
        return [TopicPartition(topic, 0)]

    monkeypatch.setattr(retry_mod, "_sleep", no_wait)
    monkeypatch.setattr(topic_window, "partitions", partitions)

    def make(part: Partition) -> dlq.Originals:
        monkeypatch.setattr(topic_window, "consumer", lambda client, bootstrap: part)
        return dlq.Originals(dlq.options(CFG, args(redrive=True), now_ns=NOW))

    return make


@pytest.mark.parametrize(
    "answers",
    [
        ["out of range"],  # a replica behind the leader answered
        ["out of range", "nothing", "out of range"],
        [KafkaConnectionError("the leader went away")],
    ],
)
async def test_a_record_read_back_out_of_range_or_failing_for_a_while_is_asked_again(originals_of, answers):
    part = Partition(0, 10, answers)
    rec = await originals_of(part).record("ktel.raw", 0, 5)
    assert rec is not None and rec.offset == 5
    assert part.fetches == len(answers) + 1


class SlowFetch(Partition):
    """A Partition whose fetch takes longer than a getmany waits, its record brought at
    the second getmany since it was assigned or sought: as in aiokafka, an assign (a new
    assignment) or a seek drops what was fetched or in flight, and fetches again."""

    def __init__(self, first: int, end: int) -> None:
        super().__init__(first, end, [])
        self.waited = 0

    def assign(self, parts) -> None:
        self.waited = 0

    def seek(self, tp, offset) -> None:
        super().seek(tp, offset)
        self.waited = 0

    async def getmany(self, tp, timeout_ms):
        await asyncio.sleep(0)  # (a getmany waits on the loop: the read's timeout can fire)
        self.waited += 1
        if self.waited < 2:
            self.fetches += 1
            return {}
        return await super().getmany(tp, timeout_ms)


async def test_a_record_whose_fetch_takes_longer_than_a_getmany_is_read_back(originals_of, monkeypatch):
    """A large record, or a Kafka far off: asked again, the fetch made is waited for, not
    dropped and made anew at each attempt, which would never bring it."""
    monkeypatch.setattr(topic_window, "STALL_S", 1.0)  # (the error, if it came, sooner)
    part = SlowFetch(0, 10)
    rec = await originals_of(part).record("ktel.raw", 0, 5)
    assert rec is not None and rec.offset == 5


@pytest.mark.parametrize(
    ("first", "end", "answer"),
    [
        (6, 10, "out of range"),  # retention took it
        (0, 4, "out of range"),  # the end moved back below it
        (0, 5, "nothing"),  # the end moved back to it: no fetch is out of range
    ],
)
async def test_a_record_the_leader_no_longer_holds_is_none_at_once(originals_of, first, end, answer):
    part = Partition(0, 10, [])
    originals = originals_of(part)
    # (Its bounds are cached where it was first asked; they change after.)
    assert (await originals.record("ktel.raw", 0, 4)) is not None
    part.first, part.end = first, end
    part.answers = [answer]
    assert await originals.record("ktel.raw", 0, 5) is None
    assert part.fetches == 2


@pytest.mark.parametrize("again", [False, True])
async def test_a_redrive_skips_what_a_marker_says_it_delivered_and_ignores_markers_that_cannot_say_so(
    monkeypatch, again
):
    """Anyone who may write ktel.dlq can write a re-drive marker: one that marks a dead
    letter before it in its partition, keyed as it, skips that dead letter (unless
    --again); one that does not decode, names no record before it in its partition, or is
    keyed otherwise marks nothing, and is reported; none crashes the run or is re-driven.
    Each dead letter re-published is marked, keyed as it, in its partition."""
    tp = TopicPartition("ktel.dlq", 0)
    _, dead = dead_letter_record(letter(), b"b")

    def marker(partition, offset):
        return encode_redriven(Redriven(partition, offset, NOW // 1_000_000, "ktel.raw"))

    records = [
        (b"b", dead),  # @0: marked below
        (b"b", dead),  # @1: marked by a marker keyed otherwise
        (b"b", dead),  # @2
        (b"b", marker(0, 0)),
        (b"b", pack({"redriven": {"partition": "0", "offset": 2}})),  # (does not decode)
        (b"b", marker(0, 9)),  # (names a record after it)
        (b"other", marker(0, 1)),
        (b"b", marker(1, 2)),  # (another partition)
        (b"b", b"\xc1 redriven"),
        (b"b", pack({**msgpack.unpackb(dead), "redriven": 0})),  # (a dead letter's fields: still a marker)
    ]

    async def read(consumer, parts, start_ms, bootstrap):
        for offset, (key, value) in enumerate(records):
            yield tp, SimpleNamespace(key=key, value=value, offset=offset, timestamp=NOW // 1_000_000)

    sent = []

    class Client(IdleClient):
        async def send(self, topic, value, key=None, headers=None, partition=None):
            sent.append((topic, key, partition, value))
            return asyncio.ensure_future(asyncio.sleep(0))

    class Originals:
        def __init__(self, opts):
            self.reader = Client()

        async def record(self, topic, partition, offset):
            return SimpleNamespace(key=b"b", value=BATCH, offset=offset)

    read_through(monkeypatch, tp, read, Client())
    monkeypatch.setattr(dlq, "Originals", Originals)
    monkeypatch.setattr(dlq, "AIOKafkaProducer", Client)
    summary, lines, reported = dlq.Summary(), [], []
    opts = dlq.options(CFG, args(redrive=True, again=again), now_ns=NOW)
    await dlq.run(opts, summary, lines.append, reported.append)

    redriven = [0, 1, 2] if again else [1, 2]
    assert [(t, k, v) for t, k, _, v in sent if t == "ktel.raw"] == [("ktel.raw", b"b", BATCH)] * len(
        redriven
    )
    markers = [(k, p, decode_dlq_record(v)) for t, k, p, v in sent if t == "ktel.dlq"]
    assert [(k, p, m.partition, m.offset, m.to) for k, p, m in markers] == [
        (b"b", 0, 0, offset, "ktel.raw") for offset in redriven
    ]
    assert (summary.records, summary.markers, summary.undecodable) == (6, 4, 3)
    assert (summary.already, sum(summary.redriven.values())) == (0 if again else 1, len(redriven))
    assert len(lines) == 3 and all(": ktel.raw[3]@41 key='b' " in line for line in lines)
    said = "\n".join(reported)
    if not again:
        assert (
            "(skipped: re-driven at 2025-06-15T15:06:40.000+00:00 to ktel.raw (marked at ktel.dlq[0]@3)"
            in lines[0]
        )
        assert "ktel.dlq[0]@6: a re-drive marker of ktel.dlq[0]@1, keyed otherwise than it: ignored" in said
    assert "ktel.dlq[0]@4: re-drive marker: field 'redriven' field 'partition' must be an integer" in said
    assert "ktel.dlq[0]@9: re-drive marker: field 'redriven' must be a map" in said
    assert "ktel.dlq[0]@8: dead letter: not msgpack" in said
    for at, names in (("5", "ktel.dlq[0]@9"), ("7", "ktel.dlq[1]@2")):
        assert (
            f"ktel.dlq[0]@{at}: a re-drive marker naming {names}, not a record before it in its partition: "
            "ignored" in said
        )


def test_again_goes_with_redrive():
    with pytest.raises(DlqError, match="--again goes with --redrive"):
        dlq.options(CFG, args(again=True), now_ns=NOW)
    assert dlq.options(CFG, args(redrive=True, again=True), now_ns=NOW).again


@pytest.mark.parametrize("forged_first", [False, True])
async def test_a_marker_keyed_otherwise_does_not_undo_the_marker_of_its_dead_letter(
    monkeypatch, forged_first
):
    """A marker keyed otherwise than the dead letter it names is ignored, and must not
    hide that dead letter's own marker, before or after it: it would make --redrive send
    again what an earlier one delivered (an OTLP backend stores it twice), which a marker,
    forged or not, must never do."""
    tp = TopicPartition("ktel.dlq", 0)
    _, dead = dead_letter_record(letter(), b"b")
    marker = encode_redriven(Redriven(0, 0, NOW // 1_000_000, "ktel.raw"))
    markers = [(b"other", marker), (b"b", marker)]
    records = [(b"b", dead), *(markers if forged_first else reversed(markers))]

    async def read(consumer, parts, start_ms, bootstrap):
        for offset, (key, value) in enumerate(records):
            yield tp, SimpleNamespace(key=key, value=value, offset=offset, timestamp=NOW // 1_000_000)

    sent = []

    class Client(IdleClient):
        async def send(self, topic, value, key=None, headers=None, partition=None):
            sent.append(topic)
            return asyncio.ensure_future(asyncio.sleep(0))

    class Originals:
        def __init__(self, opts):
            self.reader = Client()

        async def record(self, topic, partition, offset):
            return SimpleNamespace(key=b"b", value=BATCH, offset=offset)

    read_through(monkeypatch, tp, read, Client())
    monkeypatch.setattr(dlq, "Originals", Originals)
    monkeypatch.setattr(dlq, "AIOKafkaProducer", Client)
    summary, lines, reported = dlq.Summary(), [], []
    await dlq.run(dlq.options(CFG, args(redrive=True), now_ns=NOW), summary, lines.append, reported.append)
    assert sent == []
    assert (summary.already, sum(summary.redriven.values())) == (1, 0)
    [line] = lines
    assert "(skipped: re-driven at " in line and f"(marked at ktel.dlq[0]@{1 + forged_first})" in line
    at = 1 + (not forged_first)
    assert reported == [
        f"ktel dlq: ktel.dlq[0]@{at}: a re-drive marker of ktel.dlq[0]@0, keyed otherwise than it: ignored"
    ]
