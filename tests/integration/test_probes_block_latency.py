"""The block_latency probe against the real kernel: 23 direct 4 KiB writes to a
loop device the test attaches are exactly 23 in that device's write histogram,
and a write + fsync to a file on this machine's disk is counted on its disk."""

import contextlib
import mmap
import os
import shutil
import subprocess
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
