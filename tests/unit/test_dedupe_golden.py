"""Golden in/out files of the dedupe core (see tests/golden/dedupe/README.md)."""

import pytest

from ktel.wire import RawBatch
from processors import dedupe_core
from tests.unit import golden


def run_case(case: dict) -> dict:
    states: dict[str, dict] = {}
    first = []
    for b in case["batches"]:
        batch = RawBatch(b["host"], b["boot"], b["seq"], 0, [])
        first.append(dedupe_core.first_time(states.setdefault(b["host"], {}), batch))
    return {"first_time": first, "states": states}


@pytest.mark.parametrize("name", golden.cases("dedupe"))
def test_golden(name):
    golden.check("dedupe", name, run_case(golden.load("dedupe", name)))
