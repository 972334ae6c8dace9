"""The block_latency probe against the real kernel: 23 direct 4 KiB writes to a
loop device the test attaches are exactly 23 in that device's write histogram,
and a write + fsync to a file on this machine's disk is counted on its disk."""

import contextlib
import mmap
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ktel.probes.decode import block_device_name as device_name
from tests.integration.probe_harness import histogram_total, loaded

pytestmark = pytest.mark.bpf

N = 23
BLOCK = 4096


@contextlib.contextmanager
def loop_device(backing: Path):
    if not shutil.which("losetup"):
        pytest.skip("losetup (util-linux) is not installed")
    with backing.open("wb") as f:
        f.truncate(1 << 20)
    try:
        dev = subprocess.run(
            ["losetup", "--find", "--show", str(backing)], check=True, capture_output=True, text=True
        ).stdout.strip()
    except subprocess.CalledProcessError as err:
        pytest.skip(f"cannot attach a loop device: {err.stderr.strip()}")
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


def disk_of(path: Path) -> tuple[int, int] | None:
    """(major, minor) of the whole disk holding ``path``, or None if it is not on
    a block device whose requests the block tracepoints see."""
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    sys_dev = Path(f"/sys/dev/block/{major}:{minor}")
    if not sys_dev.exists():
        return None
    if (sys_dev / "partition").exists():  # the requests are the whole disk's
        major, minor = (int(x) for x in (sys_dev.resolve().parent / "dev").read_text().split(":"))
    if not Path(f"/sys/block/{device_name(major, minor)}").exists():
        return None
    return major, minor


def test_23_direct_writes_to_a_loop_device_are_23_in_its_histogram(tmp_path):
    with loaded("block_latency") as probe, loop_device(tmp_path / "backing") as dev:
        rdev = os.stat(dev).st_rdev
        major, minor = os.major(rdev), os.minor(rdev)
        buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT wants
        buf.write(b"k" * BLOCK)
        fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
        try:
            for i in range(N):  # synchronous: each request completes before the next
                assert os.pwritev(fd, [buf], i * BLOCK) == BLOCK
        finally:
            os.close(fd)
        snap = probe.snapshot()
    labels = {"device.major": major, "device.minor": minor}
    count, buckets = histogram_total(snap, "block_latency", op="write", **labels)
    assert count == N
    assert sum(buckets[:8]) == 0  # a block request takes more than 256 ns
    [ev] = [e for e in snap if e[5]["op"] == "write" and all(e[5][k] == v for k, v in labels.items())]
    assert ev[5]["device"] == Path(dev).name


def test_a_write_and_fsync_on_this_machines_disk_is_counted_on_its_disk(tmp_path):
    disk = disk_of(tmp_path)
    if disk is None:
        dev = os.stat(tmp_path).st_dev
        pytest.skip(
            f"no block device where requests are visible: {tmp_path} is on device "
            f"{os.major(dev)}:{os.minor(dev)}, not a disk in /sys/block"
        )
    major, minor = disk
    with loaded("block_latency") as probe:
        with (tmp_path / "data").open("wb") as f:
            f.write(os.urandom(1 << 16))
            f.flush()
            os.fsync(f.fileno())
        snap = probe.snapshot()
    count, _ = histogram_total(
        snap, "block_latency", op="write", **{"device.major": major, "device.minor": minor}
    )
    assert count >= 1


def _direct_writes(dev: str, offsets: list[int], rounds: int) -> None:
    """Each offset written ``rounds`` times with O_DIRECT, one thread per offset, all at once."""
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT wants
    buf.write(b"k" * BLOCK)
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    failed: list[BaseException] = []

    def writer(offset: int) -> None:
        try:
            for _ in range(rounds):
                assert os.pwritev(fd, [buf], offset) == BLOCK
        except BaseException as err:  # reported by the caller's thread
            failed.append(err)

    threads = [threading.Thread(target=writer, args=(off,)) for off in offsets]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.close(fd)
    assert not failed, failed


THREADS = 41  # writers at once: a prime, against a map of KTEL_BLOCK_INFLIGHT_MAX = 8
ROUNDS = 10


def test_requests_in_flight_beyond_the_map_are_counted_none_lost_uncounted(tmp_path):
    """More requests in flight than the map of issued requests holds: each one is in
    the histogram or counted in inflight_lost, none lost uncounted (an LRU evicted
    starts, unseen)."""
    with (
        loaded("block_latency", defines={"KTEL_BLOCK_INFLIGHT_MAX": 8}) as probe,
        loop_device(tmp_path / "backing") as dev,
    ):
        rdev = os.stat(dev).st_rdev
        labels = {"device.major": os.major(rdev), "device.minor": os.minor(rdev)}
        # A block apart: no write can merge with another's request.
        _direct_writes(dev, [2 * i * BLOCK for i in range(THREADS)], ROUNDS)
        snap = probe.snapshot()
        lost = probe.counters()["inflight_lost"]
    count, _ = histogram_total(snap, "block_latency", op="write", **labels)
    assert count <= THREADS * ROUNDS
    # Other disks' requests may be counted too, so at least, not exactly.
    assert count + lost >= THREADS * ROUNDS


def test_a_start_read_after_its_end_is_skipped_and_counted_not_recorded(tmp_path):
    """A start timestamp ahead of the completion's clock (KTEL_START_SKEW_NS moves every
    start 2^62 ns ahead): recorded, each would be a latency near 2^64 ns in the top bucket."""
    with (
        loaded("block_latency", defines={"KTEL_START_SKEW_NS": 1 << 62}) as probe,
        loop_device(tmp_path / "backing") as dev,
    ):
        rdev = os.stat(dev).st_rdev
        labels = {"device.major": os.major(rdev), "device.minor": os.minor(rdev)}
        _direct_writes(dev, [0], N)
        snap = probe.snapshot()
        counters = probe.counters()
    assert histogram_total(snap, "block_latency", op="write", **labels)[0] == 0
    assert counters["negative_latency"] >= N  # other disks' requests may add to it


def test_a_request_issued_again_with_its_issue_sampled_out_is_not_timed_from_its_first_issue(tmp_path):
    """A requeued request is issued again under the same key (disk, sector). Its first
    issue's start, put in the map here as if 10 s ago, stands for one kept; its second
    issue, a direct write to that sector, is sampled out: its completion must record
    nothing, not a latency timed from the first issue, and leave no start behind."""
    with (
        loaded("block_latency") as probe,
        loop_device(tmp_path / "backing") as dev,
    ):
        rdev = os.stat(dev).st_rdev
        major, minor = os.major(rdev), os.minor(rdev)
        offset = 128 * BLOCK  # mid-device: away from what a partition scan reads
        starts = probe.bpf[b"start"]
        key = starts.Key(dev=major << 20 | minor, sector=offset // 512)
        starts[key] = starts.Leaf(ts=time.monotonic_ns() - 10 * 10**9, op=ord("W"))
        probe.set_sample_every((1 << 32) - 1)  # keeps 1 in 2^32 - 1: none, in all likelihood
        buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT wants
        buf.write(b"k" * BLOCK)
        fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
        try:
            assert os.pwritev(fd, [buf], offset) == BLOCK
        finally:
            os.close(fd)
        snap = probe.snapshot()
        left = key in starts
        counters = probe.counters()
    assert counters["sampled_out"] >= 1
    count, _ = histogram_total(snap, "block_latency", **{"device.major": major, "device.minor": minor})
    assert count == 0
    assert not left
