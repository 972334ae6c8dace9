import dataclasses

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ktel import wire
from ktel.wire.codec import SEND_MAX_BYTES
from ktel.wire.control import DEAD_LETTER_KEY_BYTES

text = st.text(max_size=40)
file_event = st.tuples(
    st.just(wire.FILE_CREATED.id),
    st.integers(0, 2**63 - 1),  # ts_ns
    st.integers(0, 2**32 - 1),  # pid
    st.integers(0, 2**32 - 1),  # tid
    st.integers(0, 2**32 - 1),  # uid
    text,  # comm
    text,  # path
    st.integers(0, 2**32 - 1),  # flags
    st.booleans(),  # certain
).map(list)
batches = st.builds(
    wire.RawBatch,
    host_id=text.filter(lambda h: h != "*"),  # ktel.control's every-host target: refused (its own test)
    boot_id=text,
    seq=st.integers(0, 2**63 - 1),
    sent_ns=st.integers(0, 2**63 - 1),
    events=st.lists(file_event, max_size=20),
)
weighted = batches.flatmap(
    lambda b: st.lists(st.floats(0.001, 1e6), min_size=len(b.events), max_size=len(b.events)).map(
        lambda w: RawBatchW(b, w)
    )
)


def RawBatchW(b, w):  # noqa: N802 - a constructor in all but name
    return wire.RawBatch(b.host_id, b.boot_id, b.seq, b.sent_ns, b.events, w)


@given(batches)
def test_batch_round_trips(batch):
    assert wire.decode_batch(wire.encode_batch(batch)) == batch


@given(weighted)
def test_weighted_batch_round_trips(batch):
    assert wire.decode_batch(wire.encode_batch(batch)) == batch


def test_bad_weights_are_rejected():
    ev = [wire.FILE_CREATED.id, 1, 2, 2, 0, "c", "/p", 0, False]
    for w in ([1.0, 2.0], [0], ["x"]):
        obj = msgpack.unpackb(wire.encode_batch(wire.RawBatch("h", "b", 1, 2, [ev])))
        obj["w"] = w
        with pytest.raises(wire.WireError, match="one positive weight .* per event"):
            wire.decode_batch(msgpack.packb(obj))


@given(st.binary(max_size=200))
def test_garbage_is_rejected_with_a_reason_not_a_crash(data):
    try:
        wire.decode_batch(data)
    except wire.WireError as err:
        assert str(err).startswith("raw batch: ")


def test_unknown_schema_version_is_named():
    good = wire.encode_batch(wire.RawBatch("h", "b", 1, 2, []))
    obj = msgpack.unpackb(good)
    obj["v"] = 99
    with pytest.raises(wire.WireError, match="unknown schema version 99"):
        wire.decode_batch(msgpack.packb(obj))


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda o: o.update(events=[[999, 1]]), "unknown kind id 999"),
        (lambda o: o.update(events=[[1, 2, 3]]), "has 2 fields, expected 8"),
        (lambda o: o.update(seq=-1), r"field 'seq' must be within \[0, "),
        (lambda o: o.update(seq="7"), "field 'seq'"),
        (lambda o: o.pop("host"), "field 'host'"),
    ],
)
def test_broken_invariants_are_named(mutate, reason):
    obj = msgpack.unpackb(wire.encode_batch(wire.RawBatch("h", "b", 1, 2, [])))
    mutate(obj)
    with pytest.raises(wire.WireError, match=reason):
        wire.decode_batch(msgpack.packb(obj))


def test_not_a_map_and_truncated():
    with pytest.raises(wire.WireError, match="expected a map"):
        wire.decode_batch(msgpack.packb([1, 2]))
    with pytest.raises(wire.WireError, match="not msgpack"):
        wire.decode_batch(wire.encode_batch(wire.RawBatch("h", "b", 1, 2, []))[:-3])


@given(
    st.lists(
        st.tuples(
            text,
            st.sampled_from(["counter", "gauge"]),
            st.dictionaries(text, text, max_size=3),
            st.integers(0, 2**53) | st.floats(allow_nan=False, allow_infinity=False),
        ).map(lambda r: [*r[:3], abs(r[3]) if r[1] == "counter" else r[3]]),  # (a counter is never below 0)
        max_size=10,
    ),
    st.integers(0, 2**62),
)
def test_snapshot_round_trips(series, ts):
    snap = wire.MetricSnapshot(ts, series)
    assert wire.decode_snapshot(wire.encode_snapshot(snap)) == snap


def test_dead_letter_round_trips():
    dl = wire.DeadLetter("aggregate", "raw batch: not msgpack", wire.RAW_TOPIC, 3, 42, b"\xc1junk")
    assert wire.decode_dead_letter(wire.encode_dead_letter(dl)) == dl


def test_a_dead_letter_of_a_tombstone_or_with_a_long_reason_still_decodes():
    # What any consumer may have to dead-letter: a record with no value, and a backend's
    # error text of any length.
    tombstone = wire.DeadLetter("otlp", "spans: expected bytes, got NoneType", "ktel.spans", 0, 7, None)
    assert wire.decode_dead_letter(wire.encode_dead_letter(tombstone)).payload == b""
    long = wire.DeadLetter("otlp", "é" * 10_000, "ktel.spans", 0, 8, b"x")
    assert wire.decode_dead_letter(wire.encode_dead_letter(long)).reason == "é" * 4096


@pytest.mark.parametrize("key", [None, b"h" * 10, b"k" * 50_000])
@pytest.mark.parametrize("reason", ["not msgpack", "é" * 10_000])
def test_any_record_kafka_takes_fits_ktel_dlq_as_a_dead_letter(key, reason):
    """A record as large as Kafka takes by default (1 MiB, key included), dead-lettered:
    key and value within what a producer sends to ktel.dlq, its payload's start kept and
    the reason saying where the whole record is."""
    payload = bytes(range(256)) * 4096  # 1 MiB
    dl = wire.DeadLetter("all", reason, wire.RAW_TOPIC, 3, 42, payload)
    out_key, value = wire.dead_letter_record(dl, key)
    assert len(out_key or b"") + len(value) <= SEND_MAX_BYTES
    assert out_key == (None if key is None else key[:DEAD_LETTER_KEY_BYTES])
    got = wire.decode_dead_letter(value)
    assert got.payload == payload[: len(got.payload)] and len(got.payload) > SEND_MAX_BYTES - 30_000
    assert got.reason.startswith(reason[:100])
    assert got.reason.endswith(f"the record has {len(payload)} bytes, at ktel.raw[3]@42]")
    assert len(got.reason) <= 4096
    # A record that fits goes as it is.
    small = wire.DeadLetter("all", reason, wire.RAW_TOPIC, 3, 42, payload[:1000])
    assert wire.dead_letter_record(small, key)[1] == wire.encode_dead_letter(small)


def test_histogram_series_round_trip_and_bad_layout_is_rejected():
    h = {"count": 3, "sum": 7.5, "bounds": [1.0, 5.0], "counts": [1, 1, 1]}
    snap = wire.MetricSnapshot(1, [["lat_seconds", "histogram", {"host.id": "h"}, h]])
    assert wire.decode_snapshot(wire.encode_snapshot(snap)) == snap
    bad = wire.MetricSnapshot(1, [["lat_seconds", "histogram", {}, {**h, "counts": [1, 1]}]])
    with pytest.raises(wire.WireError, match="item 0 field 'value' histogram must have one count more"):
        wire.decode_snapshot(wire.encode_snapshot(bad))


ids = st.tuples(st.binary(min_size=16, max_size=16), st.binary(min_size=8, max_size=8))


@given(ids, st.sampled_from([b"", b"\x01" * 8]), text, st.integers(0, 2**63 - 6), st.sampled_from([0, 1, 2]))
def test_spans_round_trip(tid_sid, parent, name, ts, status):
    tid, sid = tid_sid
    batch = wire.SpanBatch({"host.id": "h"}, [[tid, sid, parent, name, ts, ts + 5, status, "", {"a": 1}]])
    assert wire.decode_spans(wire.encode_spans(batch)) == batch


def test_bad_span_and_log_are_named():
    with pytest.raises(wire.WireError, match="'spans' item 0 field 'trace_id' must be 16 bytes"):
        wire.decode_spans(
            wire.encode_spans(wire.SpanBatch({}, [[b"short", b"x" * 8, b"", "n", 1, 2, 0, "", {}]]))
        )
    with pytest.raises(wire.WireError, match="'logs' item 0 field 'severity_number' must be within"):
        wire.decode_logs(wire.encode_logs(wire.LogBatch({}, [[1, 99, "X", "body", {}, b"", b""]])))


def test_a_signal_naming_a_host_other_than_its_key_is_refused():
    """A record of the output topics speaks for the host its key names: a series
    labelled with another host.id, or spans and logs of another host's resource, would
    overwrite that host's values in every exporter."""
    snap = wire.MetricSnapshot(1, [["a", "gauge", {"host.id": "h"}, 1], ["b", "gauge", {"x": "1"}, 2]])
    wire.check_keyed(snap, b"h")  # (a series with no host.id names no host)
    with pytest.raises(wire.WireError, match="series 'a' is of host 'h', but the record's key is b'evil'"):
        wire.check_keyed(snap, b"evil")
    with pytest.raises(wire.WireError, match="key is None"):
        wire.check_keyed(snap, None)
    for signal in (wire.SpanBatch({"host.id": "h"}, []), wire.LogBatch({"host.id": "h"}, [])):
        wire.check_keyed(signal, b"h")
        with pytest.raises(wire.WireError, match="its resource is of host 'h'"):
            wire.check_keyed(signal, b"g")
    wire.check_keyed(wire.LogBatch({"service.name": "x"}, []), None)


def test_logs_round_trip():
    batch = wire.LogBatch(
        {"host.id": "h"}, [[5, 13, "WARN", "disk slow", {"k": "v"}, b"\x02" * 16, b"\x03" * 8]]
    )
    assert wire.decode_logs(wire.encode_logs(batch)) == batch


@pytest.mark.parametrize(
    "signal, decode",
    [
        (
            wire.LogBatch(
                {"host.id": "h"}, [[i, 9, "INFO", f"{i:05d}" + "x" * 1000, {}, b"", b""] for i in range(3000)]
            ),
            wire.decode_logs,
        ),
        (
            wire.SpanBatch(
                {"host.id": "h"},
                [[bytes(16), i.to_bytes(8), b"", "s", 1, 2, 0, "", {"a": "v" * 500}] for i in range(3000)],
            ),
            wire.decode_spans,
        ),
        (
            wire.MetricSnapshot(
                7, [["c", "counter", {"host.id": "h" * 256, "i": str(i)}, i] for i in range(5000)], stale=True
            ),
            wire.decode_snapshot,
        ),
    ],
)
def test_a_signal_too_large_for_one_record_is_sent_in_parts_of_its_rows(signal, decode):
    key = b"k" * 256
    parts = wire.encoded_parts(signal, key)
    assert len(parts) > 1 and all(len(key) + len(p) <= SEND_MAX_BYTES for p in parts)
    decoded = [decode(p) for p in parts]
    field = {wire.LogBatch: "logs", wire.SpanBatch: "spans", wire.MetricSnapshot: "series"}[type(signal)]
    assert [row for d in decoded for row in getattr(d, field)] == list(getattr(signal, field))
    # Each part is the whole but for its rows: the resource, or the time and staleness.
    assert all(dataclasses.replace(d, **{field: getattr(signal, field)}) == signal for d in decoded)
    small = dataclasses.replace(signal, **{field: getattr(signal, field)[:3]})
    assert wire.encoded_parts(small, key) == [wire.encode_signal(small)]


attr_value = st.one_of(text, st.integers(-(2**63), 2**63 - 1))
enriched = st.builds(
    lambda b, res, proc: wire.RawBatch(
        b.host_id, b.boot_id, b.seq, b.sent_ns, b.events, resource=res, processes=proc
    ),
    batches,
    st.dictionaries(text, attr_value, max_size=5),
    st.dictionaries(
        st.integers(0, 2**22).map(str), st.dictionaries(text, attr_value, max_size=4), max_size=5
    ),
)


@given(enriched)
def test_enriched_batch_round_trips(batch):
    assert wire.decode_batch(wire.encode_batch(batch)) == batch


def test_bad_enrichment_is_rejected():
    for field, value, reason in (
        ("res", ["host.name"], "'res' must be a map"),
        ("proc", {"12": "bash"}, "field 'proc' entry '12' must be a map"),
    ):
        obj = msgpack.unpackb(wire.encode_batch(wire.RawBatch("h", "b", 1, 2, [])))
        obj[field] = value
        with pytest.raises(wire.WireError, match=reason):
            wire.decode_batch(msgpack.packb(obj))


def test_a_heartbeat_lists_containers_as_cgroup_id_and_string_attributes():
    hb = {"ts": 1, "host": {"host.id": "h"}, "probes": {}, "counters": {}}
    assert "containers" not in wire.decode_heartbeat(wire.encode_heartbeat(hb))  # optional
    good = [[4242, {"container.id": "a" * 64}]]
    assert wire.decode_heartbeat(wire.encode_heartbeat({**hb, "containers": good}))["containers"] == good
    for bad in ({"4242": {}}, [[0, {}]], [[True, {}]], [[4242]], [[4242, {"container.id": 7}]]):
        with pytest.raises(wire.WireError, match="containers"):
            wire.decode_heartbeat(wire.encode_heartbeat({**hb, "containers": bad}))


def test_a_heartbeat_may_say_its_agent_is_stopping():
    """Optional: only the last heartbeat of an agent stopped by a signal carries it, and
    only as a bool (the workers report that host as stopped, not down)."""
    hb = {"ts": 1, "host": {"host.id": "h"}, "probes": {}, "counters": {}}
    assert "stopping" not in wire.decode_heartbeat(wire.encode_heartbeat(hb))
    assert wire.decode_heartbeat(wire.encode_heartbeat({**hb, "stopping": True}))["stopping"] is True
    for bad in (1, "yes", None):
        with pytest.raises(wire.WireError, match="stopping"):
            wire.decode_heartbeat(wire.encode_heartbeat({**hb, "stopping": bad}))


def test_a_heartbeat_may_carry_its_number_in_its_boot():
    """Optional: an older agent's heartbeats carry none, and the workers order those by
    ``ts`` (ktel.wire.control.heartbeat_older)."""
    hb = {"ts": 1, "host": {"host.id": "h"}, "probes": {}, "counters": {}}
    assert "seq" not in wire.decode_heartbeat(wire.encode_heartbeat(hb))
    assert wire.decode_heartbeat(wire.encode_heartbeat({**hb, "seq": 2**63 - 1}))["seq"] == 2**63 - 1
    for bad in (-1, 2**63, 1.5, "7", None):
        with pytest.raises(wire.WireError, match="seq"):
            wire.decode_heartbeat(wire.encode_heartbeat({**hb, "seq": bad}))


def _wrong_values(t) -> list:
    """Values a field of type ``t`` must refuse: the wrong type, and out of range or too big."""
    from ktel import schema

    if isinstance(t, schema.Int):
        # Out of range, where msgpack can carry the number at all.
        out = [n for n in (t.lo - 1, t.hi + 1) if -(2**63) <= n < 2**64]
        return ["7", True, 1.5, *([None] if not t.optional else []), *out]
    if isinstance(t, schema.Str):
        return [
            7,
            b"x",
            *([None] if not t.optional else []),
            "x" * (t.max_len + 1) if t.choices is None else "?",
        ]
    if isinstance(t, schema.Bool):
        return [1, "true", None]
    if isinstance(t, schema.Bytes):
        return ["x", b"x" * (max(t.lengths) + 1)]
    if isinstance(t, schema.Map):
        return [[], {"k": [1]}, {str(i): "v" for i in range(t.max_items + 1)}, {"k": float("nan")}]
    if isinstance(t, schema.IntList):
        return [[0] * (t.length - 1), [-1] * t.length, ["1"] * t.length, {}]
    raise AssertionError(f"no wrong values for {t}")


# Every field of every kind, as the registry declares them.
FIELD_CASES = [
    (kind, i, value)
    for kind in wire.KINDS.values()
    for i, f in enumerate(kind.fields)
    for value in _wrong_values(f.type)
]


@pytest.mark.parametrize(("kind", "i", "value"), FIELD_CASES, ids=lambda x: getattr(x, "name", repr(x)[:20]))
def test_every_field_of_every_kind_refuses_a_wrong_value_and_names_it(kind, i, value):
    from tests.unit.test_wire_golden import EVENTS

    event = list(next(ev for ev in EVENTS if ev[0] == kind.id))
    assert kind.valid(event)
    event[i + 1] = value
    with pytest.raises(wire.WireError, match=rf"event 0 \({kind.name}\) field '{kind.fields[i].name}' "):
        wire.decode_batch(wire.encode_batch(wire.RawBatch("h", "b", 1, 2, [event])))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 0.0, 2.0**60, True, "1"])
def test_weights_must_be_finite_positive_and_bounded(value):
    ev = [wire.FILE_CREATED.id, 1, 2, 2, 0, "c", "/p", 0, False]
    obj = msgpack.unpackb(wire.encode_batch(wire.RawBatch("h", "b", 1, 2, [ev])))
    obj["w"] = [value]
    with pytest.raises(wire.WireError, match="one positive weight"):
        wire.decode_batch(msgpack.packb(obj))


HIST_1 = {"count": 1, "sum": 1.0, "counts": [1]}


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (wire.MetricSnapshot(1, [["x", "counter", {}, float("nan")]]), "field 'value' must be finite"),
        (
            wire.MetricSnapshot(1, [["x", "gauge", {"l": ["a"]}, 1]]),
            "field 'labels' entry 'l' must be a string",
        ),
        (wire.MetricSnapshot(2**63, []), "field 'ts' must be within"),
        (
            wire.MetricSnapshot(
                1, [["x", "counter", {}, {"count": 1, "sum": 1.0, "bounds": [], "counts": [1]}]]
            ),
            "is a counter with a value",
        ),
        (wire.MetricSnapshot(1, [["x", "histogram", {}, 3]]), "is a histogram with a value"),
    ],
)
def test_snapshots_refuse_non_finite_values_wrong_labels_and_mixed_types(record, reason):
    with pytest.raises(wire.WireError, match=reason):
        wire.decode_snapshot(wire.encode_snapshot(record))


def test_a_batch_of_host_star_is_refused_its_anomaly_would_command_every_host():
    batch = wire.encode_batch(wire.RawBatch("*", "boot", 0, 1, []))
    with pytest.raises(wire.WireError, match="host id '\\*' is ktel.control's every-host target"):
        wire.decode_batch(batch)


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        (b"3f2a9c", None),
        (b"", None),  # (a batch may carry an empty host id; an agent refuses to run with one)
        ("é".encode() * 256, None),  # 256 characters, 512 bytes
        ("é".encode() * 257, "host id of 257 characters is longer than the 256 a host id may take"),
        (b"h" * 990_000, "host id of 990000 characters is longer than the 256 a host id may take"),
        (b"\xffa", "a host id is UTF-8, and this key is not"),
        (b"*", "host id '*' is ktel.control's every-host target, not a host's"),
    ],
)
def test_a_key_is_a_host_id_by_the_rule_a_batch_is_held_to(key, problem):
    assert wire.key_problem(key) == problem
    try:
        host_id = key.decode()
    except UnicodeDecodeError:
        return
    # The same rule: a batch of that host id decodes when its key is one.
    batch = wire.encode_batch(wire.RawBatch(host_id, "boot", 0, 1, []))
    if problem is None:
        assert wire.decode_batch(batch).key == key
    else:
        with pytest.raises(wire.WireError):
            wire.decode_batch(batch)


def test_a_record_too_big_to_be_ktels_is_refused_before_it_is_unpacked():
    with pytest.raises(wire.WireError, match="more than"):
        wire.decode_batch(b"\x00" * (wire.codec.MAX_RECORD_BYTES + 1))


def _nested_bytes(record: dict, depth: int) -> bytes:
    """``record`` packed with its "@@@@" value nested ``depth`` arrays deep (more than
    msgpack's packer nests, so the bytes are spliced)."""
    return msgpack.packb(record).replace(b"\xa4@@@@", b"\x91" * depth + b"\xa1x")


@pytest.mark.parametrize("depth", [600, 5000, 100_000])
def test_a_value_nested_thousands_deep_is_refused_with_a_short_reason(depth):
    """Where msgpack unpacks it, the reason shows a few levels of it and no recursion
    happens; deeper, msgpack itself refuses it. Either way a WireError, never a crash."""
    ev = [wire.FILE_CREATED.id, 1, 2, 2, 0, "c", "@@@@", 0, False]
    batch = _nested_bytes({"v": 1, "host": "h", "boot": "b", "seq": 1, "sent": 1, "events": [ev]}, depth)
    with pytest.raises(wire.WireError) as err:
        wire.decode_batch(batch)
    assert len(str(err.value)) < 300
    snap = _nested_bytes({"v": 1, "ts": 1, "series": [["x", "gauge", {}, "@@@@"]]}, depth)
    with pytest.raises(wire.WireError):
        wire.decode_snapshot(snap)


def test_nested_maps_lists_and_shapes_are_checked_whole_by_one_compiled_expression():
    """A map of maps (or lists of rows) nests one generated loop in another: each loop
    has its own variables, so an inner one cannot hide a bad entry of the outer."""
    from ktel.schema import Int, Key, ListOf, MapOf, Shape, Str

    shape = Shape(
        (Key("m", MapOf(MapOf(Int(0, 9), 4), 4)), Key("l", ListOf(ListOf(Str(3), 2), 2), required=False))
    )
    assert shape.problem({"m": {"a": {"x": 1}, "b": {}}, "l": [["abc"], []]}) is None
    assert (
        shape.problem({"m": {"a": {"x": 1}, "b": {"y": 10}}})
        == "field 'm' entry 'b' entry 'y' must be within [0, 9], got 10"
    )
    assert shape.problem({"m": {"a": {"x": 1}}, "l": [["abc"], ["toolong"]]}) is not None
    assert shape.problem({"m": {"a": {"x": 1}}, "l": None}) is not None
    assert shape.problem({"l": []}) == "field 'm' is missing"
    assert Shape((Key("s", shape),)).check({"s": {"m": {"k": {"x": True}}}}) is False  # (a bool is no int)


def test_a_snapshot_with_a_counter_below_zero_or_histogram_bounds_out_of_order_is_refused():
    """What a scrape refuses whole (OpenMetrics: a negative counter, buckets out of order)
    and no aggregate sends: refused when read, by every exporter alike."""
    labels = {"host.id": "h"}
    hist = {"count": 2, "sum": 1.0, "bounds": [1.0, 2.0], "counts": [1, 1, 0]}
    wire.decode_snapshot(wire.encode_snapshot(wire.MetricSnapshot(1, [["c_total", "counter", labels, 0]])))
    wire.decode_snapshot(wire.encode_snapshot(wire.MetricSnapshot(1, [["h", "histogram", labels, hist]])))
    with pytest.raises(wire.WireError, match="series 0 is a counter below zero, -5"):
        wire.decode_snapshot(
            wire.encode_snapshot(wire.MetricSnapshot(1, [["c_total", "counter", labels, -5]]))
        )
    backwards = {**hist, "bounds": [2.0, 1.0]}
    with pytest.raises(wire.WireError, match=r"histogram bounds must increase, got list \[2.0, 1.0\]"):
        wire.decode_snapshot(
            wire.encode_snapshot(wire.MetricSnapshot(1, [["h", "histogram", labels, backwards]]))
        )
    wire.decode_snapshot(
        wire.encode_snapshot(wire.MetricSnapshot(1, [["g", "gauge", labels, -5]]))
    )  # (a gauge may)
    # Integers apart that are one double (as every exporter sends a bound) are not in order.
    one_double = {**hist, "bounds": [2**53, 2**53 + 1]}
    with pytest.raises(wire.WireError, match=r"histogram bounds must increase, got list \[9007199254740992"):
        wire.decode_snapshot(
            wire.encode_snapshot(wire.MetricSnapshot(1, [["h", "histogram", labels, one_double]]))
        )


def test_a_restore_reads_as_the_normal_rate_for_a_ttl_to_an_agent_that_predates_restores():
    from ktel.schema import Shape
    from ktel.wire.codec import unpack
    from ktel.wire.control import COMMAND_SHAPE

    restore = wire.ControlCommand("r", "h1", "file_created", 10, 1000 + 300_000, 300_000, restore=True)
    data = wire.encode_command(restore)
    assert wire.decode_command(data) == restore
    older = Shape(tuple(k for k in COMMAND_SHAPE.keys if k.name != "restore"))
    obj = unpack(data, "control command", older)
    assert (obj["sample_every"], obj["ttl_ms"], obj["until_ms"]) == (10, 300_000, 301_000)
    # A command that is no restore keeps the bytes it had before restores.
    plain = dataclasses.replace(restore, restore=False)
    assert "restore" not in msgpack.unpackb(wire.encode_command(plain))


def _empty_maps(n: int) -> bytes:
    """``{"v": [{}, {}, ...]}``: n empty maps, a byte each."""
    return b"\x81\xa1v\xdd" + n.to_bytes(4, "big") + b"\x80" * n


@pytest.mark.parametrize("decode", [wire.decode_batch, wire.decode_heartbeat, wire.decode_snapshot])
def test_a_record_of_tiny_maps_is_refused_before_it_takes_hundreds_of_megabytes(decode):
    import tracemalloc

    from ktel.wire.codec import CONTAINER_BYTES, MAX_RECORD_BYTES, compress

    data = _empty_maps(MAX_RECORD_BYTES - 8)  # (MAX_RECORD_BYTES in all)
    record = compress(data) if decode is wire.decode_batch else data  # (an agent's zstd: 282 bytes)
    tracemalloc.start()
    try:
        with pytest.raises(wire.WireError, match=f"arrays and maps in {len(data)} bytes"):
            decode(record)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # (unbounded: about 600 MB; bounded: the maps one per CONTAINER_BYTES, 72 bytes each)
    assert peak < 80 * len(data) // CONTAINER_BYTES + (16 << 20)


def test_the_densest_records_ktel_writes_are_within_the_bound_on_arrays_and_maps():
    from edge_agent.redact import Redactor
    from ktel.config import RedactRule

    ts = 1_700_000_000_000_000_000
    hist = [wire.HISTOGRAM_DELTA.id, ts, ts - 1, "m", "ns", {}, 1, 1, [1] + [0] * 39, 1]
    events = [[wire.FILE_CREATED.id, ts, 1, 1, 0, "c", "/", 0, False] for _ in range(50_000)]
    raw = wire.RawBatch("h", "b", 0, ts, events + [list(hist) for _ in range(50_000)])
    assert len(wire.decode_batch(wire.encode_batch(raw)).events) == 100_000
    # Two containers in 14 bytes: a log event whose time agent.redact made 0.
    logs = [[wire.KTEL_LOG.id, ts, 0, 0, 6, "", {}, b"", b""] for _ in range(100_000)]
    Redactor([RedactRule(kind="ktel_log", field="ts_ns", pattern=".*")]).apply(logs)
    assert logs[0][1] == 0
    assert len(wire.decode_batch(wire.encode_batch(wire.RawBatch("h", "b", 0, ts, logs))).events) == 100_000
    # A log row of no attributes, as the aggregate sends it.
    rows = [[ts, 0, "", "", {}, b"", b""] for _ in range(100_000)]
    assert len(wire.decode_logs(wire.encode_logs(wire.LogBatch({"host.id": "h"}, rows))).logs) == 100_000


def test_records_from_the_size_counted_on_are_held_to_the_bound_and_smaller_ones_make_little():
    import tracemalloc

    from ktel.wire.codec import COUNTED_FROM

    counted = _empty_maps(COUNTED_FROM - 8)  # (COUNTED_FROM bytes in all)
    with pytest.raises(wire.WireError, match=f"arrays and maps in {COUNTED_FROM} bytes"):
        wire.decode_heartbeat(counted)
    smaller = _empty_maps(COUNTED_FROM - 9)
    tracemalloc.start()
    try:
        with pytest.raises(wire.WireError, match="unknown schema version"):
            wire.decode_heartbeat(smaller)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 80 * COUNTED_FROM
