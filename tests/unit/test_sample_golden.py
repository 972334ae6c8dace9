"""Golden in/out files of the sample stage (see tests/golden/sample/README.md), run
through the chain `ktel process sample` runs."""

import pytest

from ktel.wire import RawBatch
from processors import sample_core
from processors.chain import Chain
from tests.unit import golden


def options(o: dict) -> sample_core.Options:
    o = dict(o)
    if "keep_kinds" in o:
        o["keep_kinds"] = frozenset(o["keep_kinds"])
    if "keep_slow" in o:
        o["keep_slow"] = {kind: tuple(rule) for kind, rule in o["keep_slow"].items()}
    return sample_core.Options(**o)


def run_case(case: dict) -> dict:
    stage = sample_core.Sample(options(case["options"]))
    chain, sampler = Chain([stage]), stage.sampler
    steps: list[dict] = []
    for step in case["steps"]:
        if "end_window" in step:
            assert chain.on_window(stage, {}, 0, step["end_window"]).commands == []
            steps.append({"keep_p": {str(k): p for k, p in sorted(sampler.kind_p.items())}})
            continue
        b = step["batch"]
        batch = RawBatch(
            b["host"], b["boot"], b["seq"], 0, b["events"], b.get("w"), b.get("res"), b.get("proc")
        )
        out = chain.on_batch({}, batch, 0).batch
        assert out is not None
        steps.append({"events": out.events, "w": out.weights, "res": out.resource, "proc": out.processes})
    return {"steps": steps, "kept": sampler.kept, "sampled_out": sampler.sampled_out}


@pytest.mark.parametrize("name", golden.cases("sample"))
def test_golden(name):
    golden.check("sample", name, run_case(golden.load("sample", name)))
