"""The agent holds its events packed: file_created records are packed by compiled code
(ktel/probes/file_created_pack.c) and batches sealed around packed events
(ktel/wire/raw.py, encode_packed). Both must give exactly the bytes of the Python
path they replace: decode_run's events, packed, in a batch encode_batch writes."""

from __future__ import annotations

import dataclasses
import os
from array import array

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ktel import wire
from ktel.probes import file_created
from ktel.probes.decode import PackedEvents, frame, pack_event
from ktel.wire.raw import encode_packed
from tests.unit.test_any_valid_batch import batches
from tests.unit.test_wire_golden import GOLDEN


def test_the_compiled_packer_is_built_for_this_record_layout():
    if file_created._native is None:
        pytest.skip("ktel.probes._file_created_pack is not built: pip install -e . (or make) builds it")
    assert file_created.LAYOUT.size == file_created._native.RECORD_SIZE
    assert file_created.ABS_SIZE == file_created._native.ABS_SIZE
    assert file_created.DIR_IN_ROOT == file_created._native.DIR_IN_ROOT
    assert file_created.PATH_TRUNCATED == file_created._native.PATH_TRUNCATED


def packed_run(size: int, data: bytes, offset: int) -> list[bytes]:
    out = PackedEvents()
    file_created.pack_run(size, data, offset, out)
    return list(out)


def c_field(length: int) -> st.SearchStrategy[bytes]:
    """A char array as the kernel leaves it: text (ASCII, other UTF-8, or any bytes),
    a NUL unless it fills the field, then whatever the buffer held."""
    text = st.one_of(
        st.text(st.characters(max_codepoint=127, exclude_characters="\0"), max_size=length),
        st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)), max_size=length // 4),
        st.binary(max_size=length).map(lambda b: b.replace(b"\0", b"x")),
    ).map(lambda b: b if isinstance(b, bytes) else b.encode())
    return st.tuples(text, st.binary(min_size=length, max_size=length)).map(
        lambda t: (t[0][:length] + b"\0" + t[1])[:length]
    )


paths = st.one_of(
    c_field(255).map(lambda b: (b"/" + b)[:256]),  # absolute, the common case
    st.just(b"/" + b"p" * 255),  # the whole field, no NUL: a str16
    c_field(256),  # relative, or empty: joined in Python
)
records = st.builds(
    lambda ts, ids, dirfd, flags, certain, dir_state, comm, path, dir_: file_created.LAYOUT.pack(
        ts, *ids, dirfd, flags, certain, dir_state, len(dir_.rstrip(b"\0")), comm, path, dir_
    ),
    # Up to past INT64_MAX (the compiled packer leaves those to Python's integers), and
    # below 2**63 + 2**62 so that with the largest offset drawn it stays a msgpack uint64.
    st.integers(0, 2**63 + 2**62 - 1) | st.sampled_from([0, 127, 128, 255, 256, 2**32, 2**63 - 1, 2**63]),
    st.tuples(*(st.integers(0, 2**32 - 1) | st.sampled_from([0, 127, 128, 65535, 65536]),) * 3),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 255),
    st.sampled_from([0, file_created.DIR_OK, 2]).flatmap(
        lambda d: st.sampled_from([d, d | file_created.DIR_IN_ROOT])  # opened in a root, or not
    )
    | st.sampled_from([0, file_created.DIR_OK, 2]).map(lambda d: d | file_created.PATH_TRUNCATED),  # cut
    c_field(16),
    paths,
    st.binary(max_size=64).map(lambda b: b.replace(b"\0\0", b"\0").ljust(512, b"\0")),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(records, min_size=1, max_size=12),
    # Wall offsets that keep every timestamp a 64-bit msgpack integer, negative ones included.
    st.integers(-(2**62), 2**62) | st.sampled_from([0, -(2**31), -100, 1_764_000_000 * 10**9]),
    # Records without dir (for an absolute path, but a caller can rewrite its path between
    # the kernel's two reads, so any path), or whole ones.
    st.sampled_from(file_created.SIZES),
)
def test_packing_a_run_gives_the_bytes_of_its_decoded_events_packed(recs, offset, size):
    data = b"".join(frame(r[:size])[1] for r in recs)
    events = file_created.decode_run(size, data, offset)
    # Appended after what the agent holds already, as from a tick's earlier runs.
    held = pack_event([1, 2, 3])
    packed = PackedEvents([held])
    file_created.pack_run(size, data, offset, packed)
    assert list(packed) == [held] + [pack_event(ev) for ev in events]
    assert [msgpack.unpackb(p) for p in packed][1:] == events


@pytest.mark.parametrize("run", [packed_run, file_created.decode_run])
def test_a_record_of_another_size_is_refused(run):
    with pytest.raises(ValueError, match="expected 304 or 816"):
        run(8, frame(b"12345678")[1], 0)


def test_the_compiled_packer_refuses_a_size_it_was_not_built_for():
    if file_created._native is None:
        pytest.skip("ktel.probes._file_created_pack is not built: pip install -e . (or make) builds it")
    with pytest.raises(ValueError, match="size is RECORD_SIZE or ABS_SIZE"):
        file_created._native.pack(bytes(824), 808, 0, 0, 1, bytearray(), array("I"))


def test_a_record_without_dir_never_reads_one(monkeypatch):
    """A short record that says KTEL_DIR_OK (the kernel never writes one) is resolved
    from /proc, not from bytes past its end (the next record's)."""
    monkeypatch.setattr(file_created, "_resolve", lambda path, pid, dirfd: f"resolved:{path}")
    rec = file_created.LAYOUT.pack(5, 1, 1, 0, -100, 0o100, 0, file_created.DIR_OK, 2, b"sh", b"rel", b"a\0")
    nxt = file_created.LAYOUT.pack(6, 1, 1, 0, -100, 0o100, 0, 0, 0, b"sh", b"/abs", b"")
    size = file_created.ABS_SIZE
    data = frame(rec[:size])[1] + frame(nxt[:size])[1]
    [one, two] = file_created.decode_run(size, data, 0)
    assert (one[6], two[6]) == ("resolved:rel", "/abs")
    assert packed_run(size, data, 0) == [pack_event(one), pack_event(two)]


IN_ROOT = file_created.DIR_IN_ROOT


@pytest.mark.parametrize(
    ("size", "dir_state", "path", "want"),
    [
        # The kernel walked the file's own path: the path as passed does not count.
        (file_created.LAYOUT.size, IN_ROOT | file_created.DIR_OK, b"/etc/link/x", "/a/etc/x"),
        # Not walked (no BTF, or too deep): inside dirfd, ".." stopping at it.
        (file_created.LAYOUT.size, IN_ROOT | 2, b"//etc/../../../x", "resolved:x"),
        (file_created.ABS_SIZE, IN_ROOT, b"rel/../../x", "resolved:x"),
        (file_created.ABS_SIZE, IN_ROOT, b"/", "resolved:."),
    ],
)
def test_a_file_opened_in_a_root_is_named_by_the_kernels_walk_or_inside_dirfd(
    monkeypatch, size, dir_state, path, want
):
    """openat2's RESOLVE_IN_ROOT (bpf/file_created.h, KTEL_DIR_IN_ROOT): the path as
    passed names a file inside dirfd's directory, not the host's file of that name."""
    monkeypatch.setattr(file_created, "_resolve", lambda path, pid, dirfd: f"resolved:{path}")
    rec = file_created.LAYOUT.pack(5, 1, 1, 0, 3, 0o100, 0, dir_state, 8, b"runc", path, b"x\0etc\0a\0")
    data = frame(rec[:size])[1]
    [event] = file_created.decode_run(size, data, 0)
    assert event[6] == want
    assert packed_run(size, data, 0) == [pack_event(event)]


@pytest.mark.parametrize("size", file_created.SIZES)
@pytest.mark.parametrize("dir_state", [0, file_created.DIR_OK, 2, IN_ROOT, IN_ROOT | 2])
@pytest.mark.parametrize("path", [b"/" + b"p" * 255, b"r" * 256])
def test_a_path_cut_to_fit_the_record_is_named_by_its_start_as_it_would_be_unmarked(
    monkeypatch, size, dir_state, path
):
    """KTEL_PATH_TRUNCATED (bpf/file_created.h) says only that path is the start of a
    longer one: the event is the one the same record unmarked gives (the start, joined
    with dir or resolved as any other), whoever packs it."""
    monkeypatch.setattr(file_created, "_resolve", lambda path, pid, dirfd: f"resolved:{path}")

    def run(state: int) -> bytes:
        rec = file_created.LAYOUT.pack(5, 1, 1, 0, -100, 0o100, 0, state, 4, b"sh", path, b"b\0a\0")
        return frame(rec[:size])[1]

    [plain] = file_created.decode_run(size, run(dir_state), 0)
    [cut] = file_created.decode_run(size, run(dir_state | file_created.PATH_TRUNCATED), 0)
    assert cut == plain
    assert packed_run(size, run(dir_state | file_created.PATH_TRUNCATED), 0) == [pack_event(plain)]


def test_a_path_opened_in_a_root_that_cannot_be_resolved_stays_as_passed(monkeypatch):
    monkeypatch.setattr(file_created, "_resolve", lambda path, pid, dirfd: path)  # the process is gone
    rec = file_created.LAYOUT.pack(5, 1, 1, 0, 3, 0o100, 0, IN_ROOT, 0, b"runc", b"/etc/../x", b"")
    [event] = file_created.decode_run(file_created.ABS_SIZE, frame(rec[: file_created.ABS_SIZE])[1], 0)
    assert event[6] == "/etc/../x"


@pytest.mark.parametrize("size", file_created.SIZES)
def test_a_path_relative_to_no_directory_is_never_resolved(monkeypatch, size):
    """dirfd KTEL_DIRFD_NONE (bpf/file_created.h), filewatcher's records: the path is
    the module's text ("(d_path failed)"), sent as it is, whatever /proc would say."""
    monkeypatch.setattr(file_created, "_resolve", lambda path, pid, dirfd: f"resolved:{path}")
    rec = file_created.LAYOUT.pack(
        5, os.getpid(), 1, 0, file_created.DIRFD_NONE, 0o100, 1, 0, 0, b"sh", b"(d_path failed)", b""
    )
    data = frame(rec[:size])[1]
    [event] = file_created.decode_run(size, data, 0)
    assert event[6] == "(d_path failed)"
    assert packed_run(size, data, 0) == [pack_event(event)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches,
    st.none() | st.text(max_size=8),
    st.none() | st.tuples(st.integers(0, 4), st.integers(8, 100)).map(list),
)
def test_a_batch_of_packed_events_encodes_to_encode_batchs_bytes(batch, incarnation, part):
    batch = dataclasses.replace(batch, incarnation=incarnation, part=part)
    packed = PackedEvents(map(pack_event, batch.events))
    assert encode_packed(batch, len(packed), packed.data) == wire.encode_batch(batch)


@pytest.mark.parametrize("name", ["raw_batch", "raw_batch_part", "raw_batch_enriched"])
def test_a_golden_batch_packed_is_its_golden_bytes(name):
    golden = (GOLDEN / f"v{wire.SCHEMA_VERSION}" / f"{name}.msgpack").read_bytes()
    batch = wire.decode_batch(golden)
    packed = PackedEvents(map(pack_event, batch.events))
    assert encode_packed(batch, len(packed), packed.data) == golden


def test_packed_events_split_take_and_truncate_at_event_boundaries():
    events = [pack_event([1, i, "x" * i]) for i in range(7)]
    held = PackedEvents(events)
    assert len(held) == 7 and list(held) == events and held[3] == events[3] and held[-1] == events[6]
    assert list(held[2:5]) == events[2:5] and list(held[5:99]) == events[5:]
    first, rest = held.split(3)
    assert (list(first), list(rest), list(held)) == (events[:3], events[3:], events)
    taken = held.take(2)
    assert (list(taken), list(held)) == (events[:2], events[2:])
    held.truncate(3)
    assert list(held) == events[2:5] and bytes(held.data) == b"".join(events[2:5])
    everything = held.take(10)
    assert list(everything) == events[2:5] and len(held) == 0 and not held.data
    with pytest.raises(IndexError):
        held[0]


def test_the_compiled_packer_leaves_its_buffers_as_they_were_when_it_fails():
    if file_created._native is None:
        pytest.skip("ktel.probes._file_created_pack is not built: pip install -e . (or make) builds it")
    rec = file_created.LAYOUT.pack(5, 1, 1, 0, -100, 0o100, 0, 0, 0, b"sh", b"/abs", b"")
    data = frame(rec)[1] * 3
    out = bytearray(b"held")
    with pytest.raises(AttributeError):  # sizes that cannot take the sizes
        file_created._native.pack(data, file_created.LAYOUT.size, 0, 0, 1, out, [])
    assert out == b"held"


def test_a_path_resolved_from_proc_in_a_directory_not_named_in_utf8_packs(tmp_path):
    """A relative path resolved from /proc (no dir in the record) takes the directory's
    name as the kernel's bytes give it, escaped as every path of a record is
    (backslashreplace): undecodable bytes read as surrogates cannot be packed, and the
    event was lost as a decode error."""
    where = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    os.mkdir(where)
    fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY)
    try:
        rec = file_created.LAYOUT.pack(5, os.getpid(), 1, 0, fd, 0o100, 0, 0, 0, b"sh", b"new", b"")
        size = file_created.ABS_SIZE
        data = frame(rec[:size])[1]
        [event] = file_created.decode_run(size, data, 0)
        packed = packed_run(size, data, 0)
    finally:
        os.close(fd)
    assert event[6] == f"{tmp_path}/caf\\xe9/new"
    assert packed == [pack_event(event)]
