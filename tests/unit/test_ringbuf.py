"""Runs of ring-buffer records (edge_agent/ringbuf.py) and the bulk decoder that
reads them: the same events as the per-record decoder, record for record."""

import contextlib
import mmap
import os
import struct

import pytest

from edge_agent import ringbuf
from ktel.probes import decode as framing
from ktel.probes import file_created
from ktel.wire import event_dict


def fc_record(i: int, path: bytes, comm: bytes = b"touch") -> bytes:
    # Bytes after the path's NUL are whatever the ring buffer held: not zeros.
    raw_path = (path + b"\0").ljust(256, b"\xaa")
    comm = comm.ljust(16, b"\0")
    # dir_state 0: no directory from the kernel (an absolute path needs none).
    return file_created.LAYOUT.pack(
        1000 + i, 40 + i, 41 + i, 0, -100, 0o101, i % 2, 0, 0, comm, raw_path, b""
    )


def run_of(records: list[bytes]) -> framing.Run:
    runs = [framing.frame(r) for r in records]
    assert {size for size, _ in runs} == {len(records[0])}
    return len(records[0]), b"".join(data for _, data in runs)


def test_a_run_frames_records_as_the_ring_buffer_does():
    size, data = framing.frame(b"abc")
    assert size == 3 and len(data) == framing.stride(3) == 16
    assert struct.unpack_from("<II", data) == (3, 0)
    assert framing.records((size, data)) == [b"abc"]
    run = run_of([b"x" * 13, b"y" * 13, b"z" * 13])
    assert framing.records(run) == [b"x" * 13, b"y" * 13, b"z" * 13]
    assert framing.count([run, framing.frame(b"abc")]) == 4


def test_bulk_decoder_gives_the_per_record_decoders_events():
    recs = [fc_record(i, f"/tmp/d{i}/file-é".encode()) for i in range(5)]
    recs.append(fc_record(5, b"/bad/\xff\xfe", comm=b"a-comm-of-16-byt"))
    recs.append(fc_record(6, b"/" + b"p" * 254))  # the longest path: no room for padding
    size, data = run_of(recs)
    bulk = file_created.decode_run(size, data, 7)
    assert bulk == [file_created.decode(r, 7) for r in recs]
    assert event_dict(bulk[0]) == {
        "kind": "file_created",
        "ts_ns": 1007,
        "pid": 40,
        "tid": 41,
        "uid": 0,
        "comm": "touch",
        "path": "/tmp/d0/file-é",
        "flags": 0o101,
        "certain": False,
    }
    assert bulk[5][6] == "/bad/\\xff\\xfe" and bulk[5][5] == "a-comm-of-16-byt"
    assert [(e[6], e[8]) for e in bulk[:5]] == [(f"/tmp/d{i}/file-é", i % 2 == 1) for i in range(5)]
    assert bulk[6][6] == "/" + "p" * 254


def test_bulk_decoder_joins_a_relative_path_to_its_own_records_directory():
    """The decoder skips each record's dir unless its path is relative, then slices
    it out of the run: the right record's, and no more than the field holds."""

    def relative(i: int, path: bytes, dir_: bytes, dir_len: int) -> bytes:
        raw_path = (path + b"\0").ljust(256, b"\xaa")
        # dir_state 1 (KTEL_DIR_OK): components innermost first, each NUL-terminated.
        return file_created.LAYOUT.pack(
            1000 + i, 40 + i, 41 + i, 0, -100, 0o101, 1, file_created.DIR_OK, dir_len,
            b"touch".ljust(16, b"\0"), raw_path, dir_.ljust(512, b"\xbb"),
        )  # fmt: skip

    recs = [
        relative(0, b"one", b"b\0a\0", 4),
        fc_record(1, b"/abs/two"),
        # A dir_len past the field (a kernel-side bug) reads no further than the field,
        # not into the next record.
        relative(2, b"four", b"x\0" * 256, 9999),
        relative(3, b"../three", b"srv\0home\0", 10),
    ]
    size, data = run_of(recs)
    bulk = file_created.decode_run(size, data, 0)
    assert bulk == [file_created.decode(r, 0) for r in recs]
    assert [e[6] for e in bulk] == ["/a/b/one", "/abs/two", "/x" * 256 + "/four", "/home/three"]


def test_bulk_decoder_refuses_records_of_another_size():
    with pytest.raises(ValueError):
        file_created.decode_run(8, framing.frame(b"12345678")[1], 0)


def test_common_prefix_of_header_words():
    want = struct.pack("<I", 304) * 6
    got = struct.pack("<I", 304) * 4 + struct.pack("<I", 304 | ringbuf.BUSY_BIT) + struct.pack("<I", 304)
    assert ringbuf._common_prefix(got, want) // 4 == 4
    assert ringbuf._common_prefix(want, want) == len(want)
    assert ringbuf._common_prefix(got[16:], want[:8]) // 4 == 0  # a look-ahead whose first record differs


def test_a_reader_that_cannot_map_its_buffer_leaves_no_fd_open():
    # An eventfd stands for the map: epoll takes it, mmap refuses it (ENODEV), as a
    # map the kernel would not let the agent map. The caller then reads through BCC.
    # The reader's own fds, its epoll instance and wake-up eventfd, are told apart by
    # kind: other tests' threads may open and close sockets and pipes meanwhile.
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        before = anon_fds()
        with pytest.raises(OSError):
            ringbuf.RingReader(fd, 16 * mmap.PAGESIZE)
        assert anon_fds() == before
    finally:
        os.close(fd)


def anon_fds() -> set[str]:
    """This process's epoll and eventfd fds."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # (closed since listed)
            if os.readlink(f"/proc/self/fd/{name}") in ("anon_inode:[eventpoll]", "anon_inode:[eventfd]"):
                out.add(name)
    return out
