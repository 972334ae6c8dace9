"""Golden in/out files of the aggregate core (see tests/golden/aggregate/README.md)."""

import dataclasses
import json

import pytest

from ktel.wire import RawBatch
from processors import aggregate_core
from tests.unit import golden


def run_case(case: dict) -> dict:
    opts = aggregate_core.Options(**case["options"])
    states: dict[str, dict] = {}
    outcomes = []
    for b in case["batches"]:
        batch = RawBatch(b["host"], b["boot"], b["seq"], 0, b["events"], b.get("w"))
        outcomes.append(
            dataclasses.asdict(aggregate_core.apply(states.setdefault(b["host"], {}), batch, opts))
        )
    snapshots = {h: sorted(aggregate_core.snapshot(h, s), key=json.dumps) for h, s in sorted(states.items())}
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
    state: dict = {}
    ev = lambda i: [1, 1, 2, 2, 0, "c", f"/d/{i}/f", 0o101, False]  # noqa: E731
    for seq in range(100):
        aggregate_core.apply(
            state, RawBatch("h", "b", seq, 0, [ev(seq * 1000 + i) for i in range(1000)]), opts
        )
    rows = aggregate_core.snapshot("h", state)
    assert len(rows) == 501
    overflow = [r for r in rows if r[2].get("otel.metric.overflow") == "true"]
    assert len(overflow) == 1 and overflow[0][3] == 100_000 - 500
    assert sum(r[3] for r in rows) == 100_000
