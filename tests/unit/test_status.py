"""ktel status's pure part: which heartbeat stands for a host, what is stale, the
per-host and per-group rows, and the --json document against its schema."""

import argparse
import asyncio
import contextlib
import io
import json
import os
import signal
import sys

import jsonschema
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from rich.console import Console

from ktel import config, status
from ktel.wire import encode_heartbeat

NOW = 1_800_000_000_000


def hb(host_id: str, ts: int, **extra) -> dict:
    return {
        "ts": ts,
        "host": {
            "host.id": host_id,
            "host.name": f"{host_id}-name",
            "os.version": "6.1.0-13-amd64",
            "ktel.agent.version": "0.1.0",
        },
        "probes": {
            "file_created": {"loaded": True, "reason": "", "sample_every": 10, "command": "cmd-7"},
            "tcp_retransmit": {"loaded": True, "reason": "", "sample_every": 1, "command": None},
            "ktel_api": {"loaded": False, "reason": "this kernel lacks tracepoint(s) ktel:ktel_counter"},
        },
        "counters": {},
        "rates": {
            "ringbuf_drops.file_created": 1.5,
            "ringbuf_drops.tcp_retransmit": 0.5,
            "events_read": 99.0,
        },
        "spool": {"depth_bytes": 4096},
        **extra,
    }


def one_partition(*values: bytes) -> list[list[tuple[int, bytes]]]:
    """A key's records, all on one partition, stamped a millisecond apart."""
    return [[(NOW + i, v) for i, v in enumerate(values)]]


def test_each_keys_newest_good_heartbeat_stands_for_its_host():
    by_key = {
        b"a": one_partition(encode_heartbeat(hb("a", NOW - 5000)), encode_heartbeat(hb("a", NOW - 1000))),
        # The newest does not decode and the one before names another host: both
        # counted, and the one before them stands.
        b"b": one_partition(
            encode_heartbeat(hb("b", NOW - 9000)), encode_heartbeat(hb("a", NOW)), b"garbage"
        ),
        b"c": one_partition(b"garbage"),
    }
    newest, bad = status.newest(by_key)
    assert {h: b["ts"] for h, b in newest.items()} == {"a": NOW - 1000, "b": NOW - 9000}
    assert bad == 3
    assert set(status.newest(by_key, {"b"})[0]) == {"b"}


def test_host_row_reports_probes_drops_spool_and_overrides():
    row = status.host_row(hb("a", NOW - 2000), NOW, stale_after_s=30)
    assert row["host_name"] == "a-name"
    assert row["kernel"] == "6.1.0-13-amd64"
    assert row["agent_version"] == "0.1.0"
    assert row["age_s"] == 2.0
    assert row["stale"] is False
    assert row["probes_loaded"] == ["file_created", "tcp_retransmit"]
    assert row["probes_failed"] == {"ktel_api": "this kernel lacks tracepoint(s) ktel:ktel_counter"}
    assert row["ringbuf_drops_per_s"] == 2.0  # every probe's, nothing else
    assert row["spool_depth_bytes"] == 4096
    assert row["sampling_overrides"] == {"file_created": {"sample_every": 10, "command": "cmd-7"}}


def test_a_host_silent_longer_than_stale_after_is_stale():
    read = status.Read({"a": hb("a", NOW - 31_000), "b": hb("b", NOW - 29_000)}, 0, [])
    doc = status.summarize(read, NOW, since_s=900, stale_after_s=30)
    assert doc["stale_hosts"] == ["a"]
    assert [h["stale"] for h in doc["hosts"]] == [True, False]


def test_a_heartbeat_stamped_further_ahead_than_stale_after_makes_its_host_stale():
    """An agent's clock ahead, or a record written with a forged time: such a heartbeat
    has no age, and would look fresh until this clock caught up, the host dead or not.
    One stamped less far ahead counts as just sent."""
    read = status.Read({"far": hb("far", NOW + 31_000), "near": hb("near", NOW + 29_000)}, 0, [])
    doc = status.summarize(read, NOW, since_s=900, stale_after_s=30)
    jsonschema.validate(doc, status.SCHEMA)
    assert doc["stale_hosts"] == ["far"]
    far, near = doc["hosts"]
    assert (far["stale"], far["clock_ahead"], far["age_s"]) == (True, True, 0.0)
    assert (near["stale"], near["clock_ahead"], near["age_s"]) == (False, False, 0.0)
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(*status.tables(doc))
    assert "STALE: clock 31s ahead" in console.export_text()


def test_group_lag_is_end_minus_committed_per_topic():
    offsets = {
        TopicPartition("ktel.metrics", 0): (10, 15),
        TopicPartition("ktel.metrics", 1): (7, 7),
        TopicPartition("ktel.spans", 0): (0, 3),
    }
    row = status.group_row("ktel-export-otlp", "Stable", 2, offsets)
    assert row == {
        "group": "ktel-export-otlp",
        "state": "Stable",
        "members": 2,
        "lag": 8,
        "lag_by_topic": {"ktel.metrics": 5, "ktel.spans": 3},
    }


def test_the_document_matches_its_schema_and_the_schema_catches_a_wrong_one():
    read = status.Read(
        {"a": hb("a", NOW - 100_000), "b": hb("b", NOW)},
        2,
        [("ktel-all", "Stable", 1, {TopicPartition("ktel.raw", 0): (1, 4)})],
    )
    doc = status.summarize(read, NOW, since_s=900, stale_after_s=30)
    jsonschema.validate(doc, status.SCHEMA)
    assert doc["bad_heartbeats"] == 2
    del doc["hosts"][0]["stale"]
    try:
        jsonschema.validate(doc, status.SCHEMA)
    except jsonschema.ValidationError as err:
        assert "stale" in err.message
    else:
        raise AssertionError("a host without 'stale' passed the schema")


def test_tables_mark_stale_hosts():
    read = status.Read({"a": hb("a", NOW - 100_000)}, 0, [])
    hosts, groups = status.tables(status.summarize(read, NOW, 900, 30))
    assert hosts.row_count == 1 and groups.row_count == 0
    assert hosts.rows[0].style == "bold red"


def test_ctrl_c_ends_a_watch_even_when_a_refresh_swallows_its_cancellation(monkeypatch, capsys):
    """A refresh can lose the cancellation Ctrl-C sends it (Python 3.11's wait_for, inside
    aiokafka, can swallow one): the watch must end anyway, with the last refresh's status,
    not run on."""
    refreshes = 0

    async def once(_cfg, _args, _stale_after_s):
        nonlocal refreshes
        refreshes += 1
        assert refreshes <= 3, "the watch ran on after Ctrl-C"
        if refreshes == 2:
            os.kill(os.getpid(), signal.SIGINT)
            with contextlib.suppress(asyncio.CancelledError):  # lost, as wait_for can lose it
                await asyncio.sleep(1)
        return {"stale_hosts": ["h"] if refreshes == 1 else []}

    monkeypatch.setattr(status, "_once", once)
    args = argparse.Namespace(watch=0.01, json=True, timeout=5.0, stale_after=60.0)
    assert status.main(config.Config(), args) == status.EXIT_STALE  # as of the first refresh
    assert capsys.readouterr().out.count("stale_hosts") == 1


def test_tables_show_what_heartbeats_and_groups_hold_as_it_is():
    """A host name, a probe's failure or a group id is anyone's writing: rich markup in
    one is shown as written, neither breaking the tables nor read as a style."""
    beat = hb("a", NOW)
    beat["host"]["host.name"] = "[/]"
    beat["probes"]["ktel_api"]["reason"] = "[kprobe/do_sys_open] missing"
    read = status.Read({"a": beat}, 0, [("ktel-[/bold]", "Stable", 1, {})])
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(*status.tables(status.summarize(read, NOW, 900, 30)))
    text = console.export_text()
    assert "[/]" in text
    assert "ktel_api: [kprobe/do_sys_open] missing" in text
    assert "ktel-[/bold]" in text


def test_tables_show_control_characters_a_heartbeat_holds_escaped():
    """A terminal escape in a host name, a kernel release or a probe's failure (anyone
    who may write ktel.heartbeats writes them) reaches the terminal escaped: written as
    it was, it cleared the operator's screen, retitled the window, or coloured what
    followed."""
    beat = hb("a", NOW)
    beat["host"]["host.name"] = "evil\x1b[2J\x1b]0;pwned"
    beat["host"]["os.version"] = "6.1\x9b31m"
    beat["probes"]["ktel_api"]["reason"] = "gone\x1b[31m"
    read = status.Read({"a": beat}, 0, [("ktel-\x1b[8m", "Stable", 1, {})])
    out = io.StringIO()
    terminal = Console(width=250, file=out, force_terminal=True)
    terminal.print(*status.tables(status.summarize(read, NOW, 900, 30)))
    shown = out.getvalue()
    for raw in ("\x1b[2J", "\x1b]0;", "\x9b", "\x1b[31m", "\x1b[8m"):
        assert raw not in shown
    for escaped in ("evil\\x1b[2J\\x1b]0;pwned", "6.1\\x9b31m", "ktel_api: gone\\x1b[31m", "ktel-\\x1b[8m"):
        assert escaped in shown


def _shown(monkeypatch, docs):
    """status._once replaced by one returning each of ``docs`` in turn."""
    docs = iter(docs)

    async def once(_cfg, _args, _stale_after_s):
        return next(docs)

    monkeypatch.setattr(status, "_once", once)


def test_a_character_the_outputs_encoding_lacks_is_written_escaped(monkeypatch):
    beat = hb("a", NOW)
    beat["host"]["host.name"] = "n\u2603de"
    _shown(monkeypatch, [status.summarize(status.Read({"a": beat}, 0, []), NOW, 900, 30)])
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="latin-1"))
    args = argparse.Namespace(watch=None, json=False, timeout=5.0, stale_after=60.0)
    assert status.main(config.Config(), args) == status.EXIT_OK
    sys.stdout.flush()
    assert b"n\\u2603de" in raw.getvalue()


def test_a_watch_ends_when_its_reader_goes(monkeypatch):
    """`ktel status --watch --json | head -1`: the watch ends at the first write after the
    reader has gone, with that refresh's status, rather than with a traceback."""
    stale = status.summarize(status.Read({"a": hb("a", NOW - 100_000)}, 0, []), NOW, 900, 30)
    _shown(monkeypatch, [stale] * 3)
    read_end, write_end = os.pipe()
    os.close(read_end)
    out = io.TextIOWrapper(io.FileIO(write_end, "w"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", out)
    try:
        args = argparse.Namespace(watch=0.01, json=True, timeout=5.0, stale_after=60.0)
        assert status.main(config.Config(), args) == status.EXIT_STALE
        out.write("more\n")
        out.flush()  # what the interpreter does at exit: no BrokenPipeError
    finally:
        out.close()


class _Meta:
    def __init__(self, offset: int):
        self.offset = offset


class _Described:
    def __init__(self, group: str):
        self.group = group

    def to_object(self):
        return {"groups": [{"group": self.group, "state": "Stable", "members": [{}]}]}


class _Admin:
    """The admin calls status._groups makes, on a cluster of ktel.raw (3 partitions, the
    third added after the group's last commit) and ktel.metrics (2)."""

    async def list_consumer_groups(self):
        return [("ktel-all", "consumer"), ("someone-else", "consumer")]

    async def describe_consumer_groups(self, groups):
        return [_Described(g) for g in groups]

    async def list_consumer_group_offsets(self, group):
        raw = TopicPartition("ktel.raw", 0), TopicPartition("ktel.raw", 1)
        return {raw[0]: _Meta(10), raw[1]: _Meta(-1)}

    async def describe_topics(self):
        return [
            {"topic": "ktel.raw", "error_code": 0, "partitions": [{"partition": p} for p in range(3)]},
            {"topic": "ktel.metrics", "error_code": 0, "partitions": [{"partition": p} for p in range(2)]},
        ]


class _Consumer:
    async def beginning_offsets(self, parts):
        return {tp: 100 * tp.partition for tp in parts}

    async def end_offsets(self, parts):
        return {tp: 100 * tp.partition + 12 for tp in parts}


def test_a_partition_the_group_has_not_committed_in_lags_by_all_its_records():
    """ktel's groups read such a partition from its beginning: its records are all to
    be read, not none (a partition ktel.raw gained, one the group has not reached a
    commit in); a topic the group does not consume is not its lag."""
    [group] = asyncio.run(status._groups(_Consumer(), _Admin(), "ktel-"))
    row = status.group_row(*group)
    assert row["lag_by_topic"] == {"ktel.raw": 2 + 12 + 12}
    assert row["group"] == "ktel-all" and row["members"] == 1


def test_a_group_that_never_committed_lags_by_the_backlog_of_the_topics_it_is_assigned():
    """An exporter whose backend has been down since it was deployed commits nothing: its
    lag came only from its commits, so it showed 0 while its backlog grew. Its members'
    assignment names what it reads (a Faust worker's changelog, which its group never
    commits in, is not its lag; a member whose assignment does not decode names none)."""
    from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

    assignment = ConsumerProtocolMemberAssignment(
        0, [("ktel.metrics", [0, 1]), ("ktel-export-otlp-changelog", [0])], b""
    ).encode()

    class Described(_Described):
        def to_object(self):
            members = [{"member_assignment": assignment}, {"member_assignment": b"\xff"}]
            return {"groups": [{"group": self.group, "state": "Stable", "members": members}]}

    class Admin(_Admin):
        async def list_consumer_groups(self):
            return [("ktel-export-otlp", "consumer")]

        async def describe_consumer_groups(self, groups):
            return [Described(g) for g in groups]

        async def list_consumer_group_offsets(self, group):
            return {}

    [group] = asyncio.run(status._groups(_Consumer(), Admin(), "ktel-"))
    row = status.group_row(*group)
    assert row["lag_by_topic"] == {"ktel.metrics": 12 + 12} and row["lag"] == 24


def test_ages_are_as_of_when_the_heartbeats_were_read(monkeypatch):
    """A read that takes a while (retries while a broker restarts, a large fleet's
    heartbeats) does not make the hosts look younger by its duration."""
    clock = [NOW * 1_000_000]

    async def read(_kafka, _since_s, _hosts):
        clock[0] += 25_000_000_000  # the read takes 25 s
        return status.Read({"a": hb("a", NOW - 10_000)}, 0, [])

    monkeypatch.setattr(status, "read", read)
    monkeypatch.setattr(status.time, "time_ns", lambda: clock[0])
    args = argparse.Namespace(host=None, since=900.0, timeout=60.0)
    doc = asyncio.run(status._once(config.Config(), args, stale_after_s=30))
    assert doc["hosts"][0]["age_s"] == 35.0
    assert doc["stale_hosts"] == ["a"]


class _HeartbeatsConsumer:
    """A group-less consumer over an empty ktel.raw, refusing a negative time as
    aiokafka's offsets_for_times does."""

    def __init__(self):
        self.asked: list[int] = []

    def assign(self, parts):
        self.parts = parts

    async def end_offsets(self, parts):
        return {tp: 0 for tp in parts}

    async def offsets_for_times(self, timestamps):
        if any(t < 0 for t in timestamps.values()):
            raise ValueError("The target time cannot be negative.")
        self.asked.extend(timestamps.values())
        return {tp: None for tp in timestamps}

    def seek(self, tp, offset):
        pass

    async def position(self, tp):
        return 0


def test_a_since_reaching_past_the_epoch_reads_every_heartbeat():
    consumer = _HeartbeatsConsumer()
    assert asyncio.run(status._heartbeats(consumer, _Admin(), "ktel.raw", since_s=1e13)) == {}
    assert consumer.asked == [0, 0, 0]


def test_a_heartbeats_topic_it_cannot_see_is_an_error_not_a_fleet_of_no_host(monkeypatch, caplog):
    """A wrong kafka.prefix or cluster, or a principal that may not describe the topic:
    `ktel status` said "hosts: 0", every host fresh, exit 0, and a check of it never
    fired. It says why and exits 2, without waiting out --timeout."""
    with pytest.raises(status.NoTopic, match="ktel.heartbeats is not on this Kafka"):
        asyncio.run(status._heartbeats(_HeartbeatsConsumer(), _Admin(), "ktel.heartbeats", since_s=900))

    class Leaderless(_Admin):
        async def describe_topics(self):
            return [{"topic": "ktel.heartbeats", "error_code": 5, "partitions": []}]  # (being made)

    with pytest.raises(KafkaError) as listed:  # (asked again until --timeout)
        asyncio.run(status._heartbeats(_HeartbeatsConsumer(), Leaderless(), "ktel.heartbeats", since_s=900))
    assert not isinstance(listed.value, status.NoTopic)
    tries = []

    async def unseen(_kafka, _since_s, _hosts=None):
        tries.append(1)
        raise status.NoTopic("topic ktel.heartbeats is not on this Kafka")

    monkeypatch.setattr(status, "read", unseen)
    args = argparse.Namespace(watch=None, json=False, timeout=30.0, stale_after=60.0, since=900.0, host=None)
    assert status.main(config.Config(), args) == status.EXIT_UNREADABLE
    assert tries == [1]
    assert "ktel.heartbeats is not on this Kafka" in caplog.text


def test_a_read_its_acls_refuse_is_said_at_once_naming_them(monkeypatch, caplog):
    """`ktel status` with a principal that may not read the heartbeats (the agent's): the
    refusal was retried for the whole --timeout, then reported. Asked once, it says so."""
    from aiokafka.errors import TopicAuthorizationFailedError

    tries = []

    async def refused(_kafka, _since_s, _hosts=None):
        tries.append(1)
        raise TopicAuthorizationFailedError("ktel.heartbeats")

    monkeypatch.setattr(status, "read", refused)
    args = argparse.Namespace(watch=None, json=False, timeout=30.0, stale_after=60.0, since=900.0, host=None)
    assert status.main(config.Config(), args) == status.EXIT_UNREADABLE
    assert tries == [1]
    assert "`ktel acls`" in caplog.text


def test_a_duration_option_is_a_finite_number_above_0():
    from ktel import cli

    assert cli._seconds("1e13") == 1e13
    for bad in ("inf", "nan", "0", "-1"):
        try:
            cli._seconds(bad)
        except argparse.ArgumentTypeError:
            continue
        raise AssertionError(f"{bad} taken")


def test_a_host_asked_for_without_a_heartbeat_in_since_is_stale():
    """`ktel status --host X || page`: X silent for longer than --since (or gone for
    good) has no heartbeat to show, and is stale, not left out with exit status 0."""
    read = status.Read({"a": hb("a", NOW - 1000)}, 0, [])
    doc = status.summarize(read, NOW, since_s=900, stale_after_s=30, asked={"a", "gone"})
    jsonschema.validate(doc, status.SCHEMA)
    assert doc["unseen_hosts"] == ["gone"]
    assert doc["stale_hosts"] == ["gone"]
    assert [h["host_id"] for h in doc["hosts"]] == ["a"]
    hosts, _groups = status.tables(doc)
    assert hosts.row_count == 2 and hosts.rows[1].style == "bold red"
    # Without --host, every host seen is judged, and none is missing.
    assert status.summarize(read, NOW, 900, 30)["unseen_hosts"] == []


def test_a_heartbeats_rates_adding_up_past_a_double_keep_the_document_json():
    beat = hb("a", NOW)
    beat["rates"] = {"ringbuf_drops.file_created": 1e308, "ringbuf_drops.tcp_retransmit": 1e308}
    read = status.Read(status.newest({b"a": one_partition(encode_heartbeat(beat))})[0], 0, [])
    doc = status.summarize(read, NOW, 900, 30)
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc


class _Record:
    def __init__(self, offset: int, key: bytes, value: bytes, timestamp: int):
        self.offset, self.key, self.value, self.timestamp = offset, key, value, timestamp


class _MovedHostConsumer(_HeartbeatsConsumer):
    """ktel.raw after it gained partitions: host a's heartbeats were on partition 0 and
    are on 2 now; the fetch hands partition 2's over first."""

    def __init__(self):
        super().__init__()
        tp = [TopicPartition("ktel.raw", p) for p in range(3)]
        old = [_Record(i, b"a", encode_heartbeat(hb("a", NOW - 60_000 + i * 1000)), NOW - 60_000 + i * 1000)
               for i in range(3)]  # fmt: skip
        new = [_Record(i, b"a", encode_heartbeat(hb("a", NOW - 2000 + i * 1000)), NOW - 2000 + i * 1000)
               for i in range(2)]  # fmt: skip
        self.fetches = [{tp[2]: new}, {tp[0]: old}]
        self.ends = {tp[0]: 3, tp[1]: 0, tp[2]: 2}
        self.read = {t: 0 for t in tp}

    async def end_offsets(self, parts):
        return {tp: self.ends[tp] for tp in parts}

    async def offsets_for_times(self, timestamps):
        return {tp: (_Record(0, b"", b"", 0) if self.ends[tp] else None) for tp in timestamps}

    async def position(self, tp):
        return self.read[tp]

    async def getmany(self, timeout_ms):
        fetch = self.fetches.pop(0)
        for tp, records in fetch.items():
            self.read[tp] = records[-1].offset + 1
        return fetch


def test_a_host_moved_to_another_partition_is_its_latest_heartbeat():
    by_key = asyncio.run(status._heartbeats(_MovedHostConsumer(), _Admin(), "ktel.raw", since_s=900))
    heartbeats, bad = status.newest(by_key)
    assert (heartbeats["a"]["ts"], bad) == (NOW - 1000, 0)


def test_a_record_that_is_no_heartbeat_on_a_hosts_old_partition_does_not_bring_back_its_old_heartbeat():
    """Any client may write ktel.heartbeats: one record keyed as the host, no heartbeat,
    stamped after its newest, on the partition of its heartbeats of before the topic
    gained partitions, made that partition the host's, and its older heartbeat shown,
    stale, for as long as the record was within --since."""
    consumer = _MovedHostConsumer()
    tp0 = TopicPartition("ktel.raw", 0)
    consumer.fetches[1][tp0].append(_Record(3, b"a", b"x", NOW))
    consumer.ends[tp0] = 4
    by_key = asyncio.run(status._heartbeats(consumer, _Admin(), "ktel.raw", since_s=900))
    heartbeats, bad = status.newest(by_key)
    assert (heartbeats["a"]["ts"], bad) == (NOW - 1000, 1)


def test_a_key_that_is_not_its_host_ids_bytes_is_no_host():
    """The stages refuse a heartbeat whose key is not its host id's bytes: one keyed with
    bytes that are not UTF-8 was shown as the host id its heartbeat names (the key read
    with replacement characters), and two such keys as one host."""
    forged = encode_heartbeat(hb("h\ufffd", NOW))
    assert status.newest({b"h\xff": one_partition(forged), b"h\xfe": one_partition(forged)}) == ({}, 2)


class _CutBackConsumer(_HeartbeatsConsumer):
    """ktel.raw whose partition 0 ended at offset 10 when the read began, then at 6: an
    unclean leader election cut its log back (the new leader lacked its last 4 records).
    Its fetch brings records up to offset 6 from ``start``, or, from past the new end,
    resets the position to it (aiokafka's "latest", out of range). Partition 1 is a live
    fleet's: every fetch brings a newer heartbeat than the end the read waits for; 2 is empty."""

    def __init__(self, start: int):
        super().__init__()
        self.tp = [TopicPartition("ktel.raw", p) for p in range(3)]
        self.pos = {self.tp[0]: start, self.tp[1]: 0, self.tp[2]: 0}
        self.ends_asked = 0

    def record(self, offset: int, host: str) -> _Record:
        ts = NOW - 20_000 + offset * 1000
        return _Record(offset, host.encode(), encode_heartbeat(hb(host, ts)), ts)

    async def end_offsets(self, parts):
        self.ends_asked += 1
        first = {self.tp[0]: 10, self.tp[1]: 2, self.tp[2]: 0}
        return {tp: first[tp] if self.ends_asked == 1 or tp != self.tp[0] else 6 for tp in parts}

    async def offsets_for_times(self, timestamps):
        return {tp: _Record(self.pos[tp], b"", b"", 0) for tp in timestamps}

    async def position(self, tp):
        return self.pos[tp]

    async def getmany(self, timeout_ms):
        await asyncio.sleep(0.001)
        cut, live, _ = self.tp
        fetched = {live: [self.record(self.pos[live], "b")]}
        self.pos[live] += 1
        if self.pos[cut] > 6:
            self.pos[cut] = 6  # out of range: reset to the end
        elif self.pos[cut] < 6:
            fetched[cut] = [self.record(o, "a") for o in range(self.pos[cut], 6)]
            self.pos[cut] = 6
        return fetched


@pytest.mark.parametrize("start", [0, 8], ids=["fetched-to-the-new-end", "reset-to-the-new-end"])
def test_a_partition_whose_end_moved_back_is_read_to_its_end(start, caplog):
    """Its position never reaches the end taken at the start: the read waited until
    --timeout for records that were gone, and the status said Kafka gave none. The
    partition is read to its end, with a line saying its end moved back."""
    consumer = _CutBackConsumer(start)
    read = status._heartbeats(consumer, _Admin(), "ktel.raw", since_s=900)
    by_key = asyncio.run(asyncio.wait_for(read, 10.0))
    heartbeats, bad = status.newest(by_key)
    assert bad == 0
    assert heartbeats["b"]["ts"] == NOW - 20_000 + 1000  # (offset 1: its end at the start was 2)
    if start == 0:
        assert heartbeats["a"]["ts"] == NOW - 20_000 + 5000
    else:
        assert "a" not in heartbeats
    assert "ktel.raw[0] ends at offset 6, below the 10" in caplog.text
