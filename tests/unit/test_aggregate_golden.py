"""Golden in/out files of the aggregate stage (see tests/golden/aggregate/README.md),
run through the chain `ktel process aggregate` runs: its dedupe guard, then the stage."""

import json

import pytest

from ktel.wire import RawBatch
from processors import aggregate_core
from processors.chain import Chain
from tests.unit import golden

NOW_MS = 1_700_000_000_000


def run(opts: aggregate_core.Options, batches: list[RawBatch]) -> tuple[list[dict], dict[str, list]]:
    """Per batch its outcome, and each host's snapshot rows at the window's end."""
    chain = Chain([aggregate_core.Aggregate(opts)])
    table: dict[str, dict] = {}
    outcomes = []
    for batch in batches:
        result = chain.on_batch(table.setdefault(batch.host_id, {}), batch, NOW_MS)
        outcomes.append(
            {
                "duplicate": result.batch is None,
                "counted": result.counts.get("events", 0),
                "overflowed": result.counts.get("overflowed", 0),
            }
        )
    [aggregate] = chain.timed()
    snapshots: dict[str, list] = {h: [] for h in sorted(table)}  # a host with nothing counted: no record
    for host_id, snap in chain.on_window(aggregate, table, NOW_MS, 1.0).snapshots:
        assert snap.ts_ms == NOW_MS
        snapshots[host_id] = sorted(snap.series, key=json.dumps)
    return outcomes, snapshots


def run_case(case: dict) -> dict:
    batches = [RawBatch(b["host"], b["boot"], b["seq"], 0, b["events"], b.get("w")) for b in case["batches"]]
    outcomes, snapshots = run(aggregate_core.Options(**case["options"]), batches)
    return {"outcomes": outcomes, "snapshots": snapshots}


@pytest.mark.parametrize("name", golden.cases("aggregate"))
def test_golden(name):
    golden.check("aggregate", name, run_case(golden.load("aggregate", name)))


def test_directory_label():
    d = aggregate_core.directory_label
    assert d("/tmp/somewhere/ktel-demo", 3) == "/tmp/somewhere"
    assert d("/a/b/c/d/e", 2) == "/a/b"
    assert d("/file-at-root", 3) == "/"
    assert d("rel/x/y", 3) == "rel"
    assert d("y", 3) == "."


def test_100_000_distinct_label_values_stay_within_the_limit_plus_overflow():
    opts = aggregate_core.Options(directory_depth=3, max_series=500)
    ev = lambda i: [1, 1, 2, 2, 0, "c", f"/d/{i}/f", 0o101, False]  # noqa: E731
    batches = [RawBatch("h", "b", seq, 0, [ev(seq * 1000 + i) for i in range(1000)]) for seq in range(100)]
    outcomes, snapshots = run(opts, batches)
    rows = snapshots["h"]
    assert len(rows) == 501
    overflow = [r for r in rows if r[2].get("otel.metric.overflow") == "true"]
    assert len(overflow) == 1 and overflow[0][3] == 100_000 - 500
    assert sum(o["overflowed"] for o in outcomes) == 100_000 - 500
    assert sum(r[3] for r in rows) == 100_000
