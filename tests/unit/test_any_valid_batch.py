"""Any batch the wire accepts goes through every processing stage without an
exception, and what the stages make of it is itself valid on the wire: the
shapes are the contract between the consumers, so a record that passes
``decode_batch`` can never crash a worker or poison the next topic."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ktel import config, schema, wire
from processors import chain as chain_mod

NOW_MS = 1_700_000_000_000


def values(t: schema.Type) -> st.SearchStrategy[Any]:
    """Values of a field type, edges included (a few small sizes: enough to hit the code)."""
    if isinstance(t, schema.Int):
        s: st.SearchStrategy[Any] = st.integers(t.lo, t.hi)
    elif isinstance(t, schema.Str):
        s = st.sampled_from(sorted(t.choices)) if t.choices else st.text(max_size=min(t.max_len, 12))
    elif isinstance(t, schema.Bool):
        s = st.booleans()
    elif isinstance(t, schema.Bytes):
        s = st.sampled_from(t.lengths).flatmap(lambda n: st.binary(min_size=n, max_size=n))
    elif isinstance(t, schema.Map):
        v = st.text(max_size=8) | st.integers(-(2**63), 2**64 - 1) if t.ints else st.text(max_size=8)
        s = st.dictionaries(st.text(max_size=8), v, max_size=min(t.max_items, 3))
    elif isinstance(t, schema.IntList):
        s = st.lists(st.integers(t.lo, min(t.hi, 2**40)), min_size=t.length, max_size=t.length)
    else:
        raise AssertionError(f"no strategy for {t}")
    return st.none() | s if getattr(t, "optional", False) else s


def events() -> st.SearchStrategy[list]:
    return (
        st.sampled_from(sorted(wire.KINDS))
        .flatmap(lambda k: st.tuples(st.just(k), *(values(f.type) for f in wire.KINDS[k].fields)).map(list))
        .map(counted)
    )


def counted(ev: list) -> list:
    """A histogram_delta's count is the sum of its buckets (the wire refuses another)."""
    delta = wire.HISTOGRAM_DELTA
    if ev[0] == delta.id:
        ev[delta.index("count")] = sum(ev[delta.index("buckets")])
    return ev


batches = st.builds(
    lambda evs, seq, weights: wire.RawBatch(
        "h", "b", seq, 1, evs, [float(w) for w in weights[: len(evs)]] if weights else None
    ),
    st.lists(events(), min_size=1, max_size=8),
    st.integers(0, 2**40),
    st.none() | st.lists(st.integers(1, 2**20), min_size=8, max_size=8),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(batches, min_size=1, max_size=3))
def test_every_valid_batch_goes_through_every_stage_into_valid_records(sent):
    cfg = config.Config(agent=config.AgentConfig(host_id="t"))
    chain = chain_mod.build("all", cfg)
    value: dict[str, Any] = {}
    for batch in sent:
        # What the wire accepts, exactly as a worker gets it.
        got = wire.decode_batch(wire.encode_batch(batch))
        result = chain.on_batch(value, got, NOW_MS)
        for sb in result.spans:
            wire.decode_spans(wire.encode_spans(sb))
        for lb in result.logs:
            wire.decode_logs(wire.encode_logs(lb))
        for cmd in result.commands:
            wire.decode_command(wire.encode_command(cmd))
    for stage in chain.timed():
        out = chain.on_window(stage, {"h": value}, NOW_MS + 60_000, 1.0)
        for _host, snap in out.snapshots:
            wire.decode_snapshot(wire.encode_snapshot(snap))
        for cmd in out.commands:
            wire.decode_command(wire.encode_command(cmd))
