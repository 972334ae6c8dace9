"""A host's table value on the changelog as snapshots and deltas, and folded back
(processors/changelog.py): recovery in offset order, of all of the changelog and of
each key's last record (compaction's, the on-disk copy's), and after the host was
forgotten."""

from __future__ import annotations

import asyncio
import copy
import json
import random
from collections.abc import Awaitable, Callable

from ktel import config
from ktel.wire import FILE_CREATED, HISTOGRAM_DELTA, KTEL_METRIC, PROCESS_EXEC, PROCESS_EXIT, RawBatch
from processors import changelog
from processors.chain import build
from processors.stage import MISSING
from processors.stages import ChangelogAcks, OutputsFirst, Persisted

CFG = config.Config(agent=config.AgentConfig(host_id="t"))
T = 1_700_000_000_000_000_000


def file_created(path: str) -> list:
    return [FILE_CREATED.id, 1, 2, 2, 0, "w", path, 0o101, False]


def traffic(n: int) -> list[RawBatch]:
    """Batches of one host touching a few of many series (counters, a gauge, a
    histogram) and starting and ending processes."""
    rng = random.Random(5)
    out = []
    for seq in range(n):
        events = [file_created(f"/d{rng.randrange(40)}/x/f") for _ in range(rng.randrange(1, 6))]
        events.append([KTEL_METRIC.id, 1, 7, "gauge", "queue_depth", {"q": "a"}, seq])
        if seq % 3 == 0:
            events.append([HISTOGRAM_DELTA.id, 1, 0, "lat", "ns", {"op": "r"}, 2, 30, [1, 1, 0, 0], 1])
        events.append([PROCESS_EXEC.id, 1, 100 + seq, 100 + seq, 1, 0, 0, "p", f"/bin/p{seq}"])
        if seq > 2:
            events.append([PROCESS_EXIT.id, 1, 97 + seq, 97 + seq, 1, 0, 0, "p", 0, 0, 0, 0, 0])
        out.append(RawBatch("h1", "boot", seq, T + seq * 10**10, events))
    return out


class Runner:
    """What the worker writes for one host (processors/stages.py, ``save``), as
    recovery decodes it: (key, record)."""

    def __init__(self, process: str = "all"):
        self.chain = build(process, CFG)
        self.value: dict = {}
        self.kept = Persisted(self.value, b"", 0)
        self.log: list[tuple] = []

    def run(self, batches: list[RawBatch]) -> Runner:
        for b in batches:
            result = self.chain.on_batch(self.value, b, 0)
            if not result.changed:
                continue
            v = self.value[changelog.VERSION] = changelog.version(self.value) + 1
            key = json.loads(changelog.delta_key("h1", v))
            record: tuple = (key, changelog.delta(self.value, result.touched, changelog.head(self.value)))
            if self.kept.snapshot_due(v) or len(json.dumps(record[1])) >= len(json.dumps(self.value)):
                record = ("h1", self.value)
                self.kept.snapshot = v
            self.log.append(json.loads(json.dumps(record)))  # (as decoded from Kafka)
        return self


def persisted(value: dict) -> dict:
    return json.loads(json.dumps(value))


def recover(records: list[tuple]) -> dict:
    data: dict = {}
    for key, value in copy.deepcopy(records):  # (objects of their own, as decoded)
        changelog.fold(data, key, value)
    return data


def compacted(records: list[tuple]) -> list[tuple]:
    """Each key's last record but tombstones, in offset order: the changelog compacted
    whole, as the on-disk copy gives it back to its store (processors/table_store.py)."""
    last = {json.dumps(k): (offset, k, v) for offset, (k, v) in enumerate(records)}
    return [(k, v) for _offset, k, v in sorted(last.values()) if v is not None]


def test_each_batch_writes_one_record_and_a_snapshot_every_slots_versions():
    runner = Runner().run(traffic(40))
    assert len(runner.log) == 40
    snapshots = [i for i, (k, _v) in enumerate(runner.log) if isinstance(k, str)]
    assert snapshots == [0, 16, 32]
    assert {tuple(k) for k, _v in runner.log if isinstance(k, list)} == {
        ("h1", slot) for slot in range(changelog.SLOTS) if slot != 1
    }


def test_the_records_fold_back_to_the_value_after_every_batch_compacted_or_not():
    for process in ("all", "aggregate", "enrich"):
        batches = traffic(40)
        runner = Runner(process)
        for i, b in enumerate(batches):
            runner.run([b])
            assert recover(runner.log)["h1"] == persisted(runner.value), (process, i)
            # Compacted: stale deltas of earlier versions stay, before the snapshot.
            assert recover(compacted(runner.log))["h1"] == persisted(runner.value), (process, i)


def test_a_batch_changing_one_series_of_many_writes_a_delta_of_that_series():
    runner = Runner("aggregate")
    runner.run([RawBatch("h1", "boot", 0, T, [file_created(f"/d{i}/x/f") for i in range(500)])])
    runner.run([RawBatch("h1", "boot", 1, T + 1, [file_created("/d7/x/f")])])
    [_snapshot, (key, delta)] = runner.log
    assert key == ["h1", 2]
    assert delta["set"] == [[["aggregate", "series", '["file_created_total", [["directory", "/d7/x"]]]'], 2]]
    assert delta["del"] == [] and "series" not in delta["head"]["aggregate"]
    assert len(json.dumps(delta)) < 300


def test_a_snapshot_comes_first_and_every_slots_versions():
    assert Persisted({}, b"", 0).snapshot_due(7)  # (a host's first record here)
    assert not Persisted({}, b"", 0, snapshot=1).snapshot_due(changelog.SLOTS)
    assert Persisted({}, b"", 0, snapshot=1).snapshot_due(1 + changelog.SLOTS)


def test_a_forgotten_host_leaves_nothing_to_recover_and_starts_afresh():
    runner = Runner().run(traffic(20))
    tombstones: list[tuple] = [(["h1", slot], None) for slot in range(changelog.SLOTS)] + [("h1", None)]
    assert recover(runner.log + tombstones) == {}
    assert recover(compacted(runner.log + tombstones)) == {}
    again = Runner().run(traffic(3))
    assert recover(runner.log + tombstones + again.log)["h1"] == persisted(again.value)


def test_a_delta_of_a_forgotten_hosts_earlier_incarnation_is_not_folded_onto_the_next():
    """Killed after the tombstone of a host's snapshot, before those of its deltas, a
    worker leaves them on the changelog. Back afresh at version 3, the host has its
    earlier incarnation's delta of version 4 in slot 4: before the new snapshot in
    offset order, it is left out (a snapshot then deltas by version folded it on)."""
    runner = Runner().run(traffic(10))
    again = Runner().run(traffic(3))
    log = runner.log + [("h1", None)] + again.log
    kept = compacted(log)
    assert [(k, v["v"]) for k, v in kept[:2]] == [(["h1", 4], 4), (["h1", 5], 5)]
    assert [(k, v["v"]) for k, v in kept[-3:]] == [("h1", 1), (["h1", 2], 2), (["h1", 3], 3)]
    assert recover(kept)["h1"] == recover(log)["h1"] == persisted(again.value)


def test_a_value_an_older_ktel_wrote_whole_is_a_snapshot_of_version_0():
    runner = Runner().run(traffic(4))
    older = persisted(runner.value)
    del older["v"]
    delta = (["h1", 1], {"v": 1, "head": {"v": 1, "aggregate": {"seen": {}}}, "set": [], "del": []})
    assert recover([("h1", older), delta])["h1"]["aggregate"]["seen"] == {}


def test_a_refused_record_puts_back_the_head_and_the_entries_it_changed():
    chain = build("all", CFG)
    value: dict = {}
    for b in traffic(4):
        chain.on_batch(value, b, 0)
    before = persisted(value)
    head = persisted(changelog.head(value))
    result = chain.on_batch(value, traffic(6)[5], 0)
    assert any(old is MISSING for old in result.touched.values())  # new series and processes
    assert any(old is not MISSING for old in result.touched.values())
    assert persisted(changelog.restored(head, value, result.touched)) == before


def test_a_boot_forgotten_for_a_newer_one_stays_forgotten_when_folded_back_or_put_back():
    """A host's fifth boot takes the place of its oldest (dedupe_core.MAX_BOOTS): the
    delta's head has no such boot. Folded back, its processes' map was put back as a
    boot of empty tables, the newest of the host's, and the next new boot then took the
    place of two boots. A refused record of a new boot left one alike."""

    def batch(boot: int, seq: int) -> RawBatch:
        pids = range(100 + 20 * seq, 120 + 20 * seq)
        events = [[PROCESS_EXEC.id, 1, p, p, 1, 0, 0, "p", f"/bin/p{p}"] for p in pids]
        return RawBatch("h1", f"boot{boot}", seq, T + (boot * 3 + seq) * 10**9, events)

    for process in ("enrich", "all"):
        runner = Runner(process)
        for boot in range(6):
            for seq in range(3):
                runner.run([batch(boot, seq)])
                assert recover(runner.log)["h1"] == persisted(runner.value), (process, boot, seq)
                assert recover(compacted(runner.log))["h1"] == persisted(runner.value), (process, boot, seq)
        assert list(runner.value["enrich"]["boots"]) == ["boot2", "boot3", "boot4", "boot5"]
        assert any(isinstance(k, list) for k, _v in runner.log[-6:])  # (deltas did it)

        before = persisted(runner.value)
        head = persisted(changelog.head(runner.value))
        result = runner.chain.on_batch(runner.value, batch(6, 0), 0)
        assert persisted(changelog.restored(head, runner.value, result.touched)) == before


def test_what_the_entries_take_follows_each_record():
    def encoded(value: dict) -> int:  # each entry's path and value, one encode each
        return sum(len(json.dumps(["h1", *p])) + len(json.dumps(e)) for p, e in changelog.entries(value))

    runner = Runner().run(traffic(8))
    total = changelog.sizes("h1", changelog.entries(runner.value))
    assert total == encoded(runner.value) > 0
    chain = runner.chain
    for b in traffic(30)[8:]:
        result = chain.on_batch(runner.value, b, 0)
        total = changelog.entries_size("h1", runner.value, result.touched, total)
        assert total == encoded(runner.value)


def test_the_encoded_length_of_a_list_of_items_is_that_of_each_item_encoded_alone():
    items = [{"a, b": [1, 2.5, None]}, 'é, "quoted"', [], {}, 0, ["x", {"y": "z"}]]
    assert changelog.encoded_len(items) == sum(len(json.dumps(x)) for x in items)
    assert changelog.encoded_len(items[:1]) == len(json.dumps(items[0]))
    assert changelog.encoded_len([]) == 0


def test_a_window_waits_for_every_changelog_record_sent_before_it_and_no_later_one():
    """``ChangelogAcks.wait(n)`` returns once Kafka has records 1 to n, in whatever order
    their acknowledgements come; a record sent after it began is not waited for."""

    async def scenario() -> list[str]:
        acks, seen = ChangelogAcks(), []
        first, second = acks.sent(), acks.sent()
        waiting = asyncio.ensure_future(acks.wait(acks.last))
        later = acks.sent()
        await asyncio.sleep(0)
        second(None)
        await asyncio.sleep(0)
        seen.append(f"done after the second: {waiting.done()}")
        first(None)
        await asyncio.sleep(0)
        seen.append(f"done after the first: {waiting.done()}")
        await acks.wait(acks.last - 1)  # (the later one still on its way)
        later(None)
        await acks.wait(acks.last)
        return seen

    assert asyncio.run(scenario()) == ["done after the second: False", "done after the first: True"]


def recorder(seen: list[str]) -> Callable[[str], Callable[[], Awaitable[None]]]:
    """A held changelog record's send named ``name``: it appends the name to ``seen``."""

    def record(name: str) -> Callable[[], Awaitable[None]]:
        async def send() -> None:
            seen.append(name)

        return send

    return record


def test_held_changelog_records_go_once_kafka_has_the_outputs_before_them_and_in_order():
    """``OutputsFirst.release`` sends the held changelog records only once Kafka has every
    output sent before they were held, in the order they were held; an output sent after
    the release began is not waited for."""

    async def scenario() -> list[str]:
        first = OutputsFirst()
        seen: list[str] = []
        record = recorder(seen)
        spans, logs = first.output(), first.output()
        first.hold(record("h1 v1"))
        first.hold(record("h1 v2"))
        releasing = asyncio.ensure_future(first.release())
        await asyncio.sleep(0)  # (the release begins)
        first.output()  # (another list's, never acknowledged here)
        spans(None)
        for _ in range(3):
            await asyncio.sleep(0)
        seen.append(f"sent before the logs: {releasing.done()}")
        logs(None)
        await releasing
        return seen

    assert asyncio.run(scenario()) == ["sent before the logs: False", "h1 v1", "h1 v2"]


def test_held_changelog_records_of_a_release_cut_off_go_with_the_next_one():
    """A release whose task is cancelled (a window's, at a stop) while it waits leaves
    what it held for the next release, in order, ahead of what was held since."""

    async def scenario() -> list[str]:
        first = OutputsFirst()
        seen: list[str] = []
        record = recorder(seen)
        output = first.output()
        first.hold(record("h1 v1"))
        cut = asyncio.ensure_future(first.release())
        await asyncio.sleep(0)
        cut.cancel()
        await asyncio.gather(cut, return_exceptions=True)
        first.hold(record("h1 v2"))
        output(None)
        await first.release()
        return seen

    assert asyncio.run(scenario()) == ["h1 v1", "h1 v2"]


# Records of the wrong shape (a processor bug, a mixed-version deployment, another
# writer), as recovery decodes them: (key, record).
MALFORMED_DELTAS = [
    (["h1", 1], "x"),
    ([], {"v": 1, "head": {}, "set": [], "del": []}),
    (["h1"], {"v": 1, "head": {}, "set": [], "del": []}),
    ([["h1"], 1], {"v": 1, "head": {}, "set": [], "del": []}),
    ({"h1": 1}, {"v": 1}),
    (["h1", 1], {"v": "1", "head": {}, "set": [], "del": []}),
    (["h1", 1], {"head": {}, "set": [], "del": []}),
    (["h1", 1], {"v": 1, "head": 3, "set": [], "del": []}),
    (["h1", 1], {"v": 1, "head": {"aggregate": 5}, "set": [], "del": []}),
    (["h1", 1], {"v": 1, "head": {}, "set": [[1, 2]], "del": []}),
    (["h1", 1], {"v": 1, "head": {}, "set": [[["aggregate"], 2]], "del": []}),
    (["h1", 1], {"v": 1, "head": {}, "set": [[["x", "y", "z"], 2]], "del": []}),
    (["h1", 1], {"v": 1, "head": {}, "set": [[["aggregate", "series", "k"], "x"]], "del": []}),
    (["h1", 1], {"v": 1, "head": {}, "set": [], "del": [["aggregate"]]}),
    (["h1", 1], {"v": 1, "head": {}, "set": "x", "del": []}),
    (["h1", 1], {"v": 1, "head": {"aggregate": {"series": {"k": 1}}}, "set": [], "del": []}),
]
SERIES = '["file_created", [["directory", "/d"]]]'
MALFORMED_SNAPSHOTS = [
    5,
    "x",
    [],
    {"aggregate": 5},
    {"v": "x"},
    {"v": True},
    {"aggregate": {"series": []}},
    {"aggregate": {"series": {SERIES: "x"}}},
    {"aggregate": {"series": {SERIES: {"count": 1}}}},
    {"aggregate": {"series": {SERIES: {"count": 1, "sum": 1, "buckets": [float("inf")]}}}},
    {"aggregate": {"series": {SERIES: 2**70}}},
    {"aggregate": {"series": {"not json": 1}}},
    {"aggregate": {"last_ms": "x"}},
    {"aggregate": {"seen": []}},
    {"enrich": {"boots": {"b": 5}}},
    {"enrich": {"boots": {"b": {"procs": []}}}},
]


def test_each_malformed_delta_is_left_out_and_named_and_the_records_around_it_still_fold():
    good = Runner().run(traffic(40)).log
    bad = copy.deepcopy(MALFORMED_DELTAS)
    # Each just before a delta of h1 that follows on from its value then.
    records = [r for i, record in enumerate(good) for r in ([bad[i % len(bad)]] if i % 2 else []) + [record]]
    data: dict = {}
    refused = []
    for key, record in copy.deepcopy(records):
        if isinstance(record, dict) and isinstance(record.get("v"), int) and "h1" in data:
            record["v"] = changelog.version(data["h1"]) + 1  # (one that would be applied)
        host_id, why = changelog.fold(data, key, record)
        if why is not None:
            refused.append((key, why))
    assert data == recover(good)
    assert len(refused) == 20


def test_a_snapshot_the_stages_could_not_use_drops_the_host_and_no_window_fails_on_it():
    chain = build("all", CFG)
    good = Runner().run(traffic(5)).log
    for record in MALFORMED_SNAPSHOTS:
        data = recover(good)
        data["h2"] = copy.deepcopy(data["h1"])
        host_id, why = changelog.fold(data, "h2", copy.deepcopy(record))
        assert host_id == "h2" and why is not None, record
        assert "h2" not in data  # (as if it were new)
        assert data == recover(good)
        for stage in chain.timed():
            chain.on_window(stage, data, 1, 1.0)


def test_the_records_that_raised_or_left_a_value_no_stage_can_use_are_left_out():
    """Before fold checked them, the first three raised (Faust's recovery never ended),
    and the others became the host's value (every window of the host failed)."""
    delta = {"v": 1, "head": {}, "set": [], "del": []}
    for key, record in [
        (("h", 1), "x"),
        ((), delta),
        (("h", 1), {**delta, "set": [[1, 2]]}),
        ("h", 5),
        ("h", {"aggregate": 5}),
        (("h", 1), {**delta, "head": 3}),
    ]:
        data = {"h": {"v": 0}}
        host_id, why = changelog.fold(data, key, record)
        assert why is not None
        assert data == ({} if key == "h" else {"h": {"v": 0}})


def test_a_delta_under_a_key_or_with_a_head_ktel_does_not_write_is_left_out():
    """A delta under another slot than its version's outlived the host's tombstones
    (they name its slots) and was folded onto the host's next incarnation once its
    versions came to it; one whose head has another version left the host's value at
    that version, and the deltas after it out."""
    head = {"v": 2, "aggregate": {"last_ms": 2}}
    for key, record in [
        (["h", 9], {"v": 2, "head": head, "set": [], "del": []}),
        (["h", 2], {"v": 2, "head": {**head, "v": 7}, "set": [], "del": []}),
    ]:
        data = {"h": {"v": 1}}
        host_id, why = changelog.fold(data, key, record)
        assert host_id == "h" and why is not None
        assert data == {"h": {"v": 1}}
