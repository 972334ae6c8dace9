"""A host's table value split into changelog records and folded back
(processors/changelog.py): what recovery makes of any prefix of the records, and
the counting stage skipping what a partly written batch already counted."""

from __future__ import annotations

import copy
import json
import random

from ktel import config
from ktel.wire import FILE_CREATED, HISTOGRAM_DELTA, KTEL_METRIC, PROCESS_EXEC, RawBatch
from processors import changelog
from processors.chain import build
from processors.stage import MISSING, Touched

CFG = config.Config(agent=config.AgentConfig(host_id="t"))
T = 1_700_000_000_000_000_000


def file_created(path: str) -> list:
    return [FILE_CREATED.id, 1, 2, 2, 0, "w", path, 0o101, False]


def traffic(n: int) -> list[RawBatch]:
    """Batches of one host touching a few of many series: counters, a gauge, a histogram."""
    rng = random.Random(5)
    out = []
    for seq in range(n):
        events = [file_created(f"/d{rng.randrange(40)}/x/f") for _ in range(rng.randrange(1, 6))]
        events.append([KTEL_METRIC.id, 1, 7, "gauge", "queue_depth", {"q": "a"}, seq])
        if seq % 3 == 0:
            events.append([HISTOGRAM_DELTA.id, 1, 0, "lat", "ns", {"op": "r"}, 2, 30, [1, 1, 0, 0], 1])
        events.append([PROCESS_EXEC.id, 1, 100 + seq, 100 + seq, 1, 0, 0, "p", f"/bin/p{seq}"])
        out.append(RawBatch("h1", "boot", seq, T + seq, events))
    return out


def written(host: str, value: dict, touched: Touched, mark, rewrite=False) -> list[tuple]:
    """The records a worker writes for one record's change, as recovery decodes them:
    the entries', then the head's."""
    records, _size = changelog.records(host, value, touched, mark, 0, rewrite)
    out = [(json.loads(k), None if v is None else json.loads(v)) for k, v in records]
    return [*out, (host, json.loads(json.dumps(changelog.head(value))))]


def persisted(value: dict) -> dict:
    out = copy.deepcopy(changelog.head(value))
    for path, entry in changelog.entries(value):
        changelog.put(out, path, copy.deepcopy(entry))
    return out


def run(process: str, batches: list[RawBatch]) -> tuple[dict, list[tuple]]:
    chain = build(process, CFG)
    value: dict = {}
    log: list[tuple] = []
    for b in batches:
        result = chain.on_batch(value, b, 0)
        if result.changed:
            log += written("h1", value, result.touched, changelog.mark_of(b))
    return value, log


def recover(records: list[tuple]) -> dict:
    data: dict = {}
    for key, value in copy.deepcopy(records):  # (as decoded from Kafka: objects of their own)
        changelog.fold(data, key, value)
    return data


def test_the_records_folded_back_are_the_value_in_write_order_and_in_key_order():
    for process in ("all", "aggregate", "enrich"):
        value, log = run(process, traffic(30))
        assert persisted(recover(log)["h1"]) == persisted(value)
        # The on-disk copy keeps each key's last record and gives them in key order.
        last = {json.dumps(k): (k, v) for k, v in log}
        assert persisted(recover([last[k] for k in sorted(last)])["h1"]) == persisted(value)


def test_a_batch_changing_one_series_writes_that_series_and_the_head_only():
    chain = build("aggregate", CFG)
    value: dict = {}
    many = RawBatch("h1", "boot", 0, T, [file_created(f"/d{i}/x/f") for i in range(500)])
    chain.on_batch(value, many, 0)
    one = RawBatch("h1", "boot", 1, T + 1, [file_created("/d7/x/f")])
    result = chain.on_batch(value, one, 0)
    [(key, entry), head] = written("h1", value, result.touched, changelog.mark_of(one))
    assert key == ["h1", "aggregate", "series", '["file_created_total", [["directory", "/d7/x"]]]']
    assert entry == [2, ["boot", 1, None]]
    assert "series" not in head[1]["aggregate"] and "series_bytes" not in head[1]["aggregate"]


def test_a_batch_partly_written_before_a_crash_is_counted_once_when_read_again():
    batches = traffic(12)
    whole, log = run("all", batches)
    heads = [i for i, (k, _v) in enumerate(log) if isinstance(k, str)]
    for crash in range(heads[-2] + 1, heads[-1]):  # after any of the last batch's entries
        data = recover(log[:crash])
        value = data["h1"]
        chain = build("all", CFG)
        chain.on_batch(value, batches[-1], 0)  # read again: its offset was not committed
        assert persisted(value)["aggregate"] == persisted(whole)["aggregate"], crash
        assert changelog.APPLIED not in value["aggregate"]


def test_parts_of_one_split_batch_are_marked_apart():
    events = [file_created("/a/x/f"), file_created("/b/x/f")]
    first = RawBatch("h1", "boot", 4, T, events[:1], part=(0, 2))
    second = RawBatch("h1", "boot", 4, T, events[1:], part=(1, 2))
    assert changelog.mark_of(first) != changelog.mark_of(second)
    assert changelog.mark_of(RawBatch("h1", "boot", 4, T, events)) == ("boot", 4, None)


def test_a_forgotten_host_leaves_nothing_to_recover():
    value, log = run("all", traffic(5))
    tombstones = [(["h1", *path], None) for path, _ in changelog.entries(value)] + [("h1", None)]
    assert recover(log + tombstones) == {}
    # Back again afterwards, it starts afresh.
    again, more = run("aggregate", traffic(1))
    assert persisted(recover(log + tombstones + more)["h1"]) == persisted(again)


def test_a_refused_record_puts_back_the_head_and_the_entries_it_changed():
    chain = build("all", CFG)
    value: dict = {}
    for b in traffic(4):
        chain.on_batch(value, b, 0)
    before = persisted(value)
    head = json.loads(json.dumps(changelog.head(value)))
    result = chain.on_batch(value, traffic(6)[5], 0)
    assert any(old is MISSING for old in result.touched.values())  # new series and processes
    assert persisted(changelog.restored(head, value, result.touched)) == before


def test_the_sizes_follow_what_the_entries_take():
    value, _log = run("all", traffic(8))
    records, total = changelog.records("h1", value, Touched(), ("boot", 9, None), 0, rewrite=True)
    assert total == 0  # only changes count here: a rewrite leaves the size as it was
    assert len(records) == len(list(changelog.entries(value)))
    measured = sum(changelog.size("h1", p, e) for p, e in changelog.entries(value))
    chain = build("all", CFG)
    result = chain.on_batch(value, traffic(9)[8], 0)
    _records, after = changelog.records("h1", value, result.touched, ("boot", 8, None), measured, False)
    assert after == sum(changelog.size("h1", p, e) for p, e in changelog.entries(value))
