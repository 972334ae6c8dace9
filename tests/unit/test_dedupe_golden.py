"""Golden in/out files of the dedupe stage (see tests/golden/dedupe/README.md), run
through the chain `ktel process dedupe` runs."""

import pytest

from ktel.wire import RawBatch
from processors.chain import Chain
from processors.dedupe_core import Dedupe
from tests.unit import golden


def run_case(case: dict) -> dict:
    chain = Chain([Dedupe()])
    table: dict[str, dict] = {}
    first = []
    for b in case["batches"]:
        # A part's events are its indexes in the whole batch, to show which pass on.
        first_event = b["part"][0] if "part" in b else 0
        events = [[first_event + i] for i in range(b.get("events", 0))]
        inc, part = b.get("inc"), b.get("part")
        batch = RawBatch(b["host"], b["boot"], b["seq"], 0, events, incarnation=inc, part=part)
        result = chain.on_batch(table.setdefault(b["host"], {}), batch, 0)
        if "part" in b:  # which of its events pass on
            first.append([ev[0] for ev in result.batch.events] if result.batch else [])
        else:
            assert result.batch in (batch, None)  # passed on as it came, or dropped
            first.append(result.batch is not None)
    return {"first_time": first, "states": {host: value["dedupe"] for host, value in table.items()}}


@pytest.mark.parametrize("name", golden.cases("dedupe"))
def test_golden(name):
    golden.check("dedupe", name, run_case(golden.load("dedupe", name)))
