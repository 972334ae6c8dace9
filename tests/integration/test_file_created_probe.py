"""The file_created probe against the real kernel: a known workload of 23 files."""

import os
import subprocess
import time

import pytest

from edge_agent import probes, ringbuf
from ktel.wire import event_dict
from tests.conftest import need_bpf

pytestmark = pytest.mark.bpf

N = 23  # a prime, so a doubled or halved count cannot pass by accident


@pytest.fixture
def probe():
    need_bpf()
    loaded, skipped = probes.load(["file_created"], ringbuf_pages=64)
    assert not skipped, skipped
    p = loaded["file_created"]
    yield p
    p.close()


def drain_until(probe, want, timeout=10.0):
    events = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events.extend(event_dict(e) for e in probe.decode(probe.take()))
        if want(events):
            break
        time.sleep(0.05)
    return events


def test_23_files_give_exactly_23_events_with_paths_and_pids(probe, tmp_path):
    target = tmp_path / "created"
    other = tmp_path / "created-other"  # same prefix: must not count as ours
    target.mkdir()
    other.mkdir()
    names = [f"f{i:02d}" for i in range(N)]
    noise = subprocess.Popen(["touch", *(str(other / n) for n in names[:7])])
    touch = subprocess.Popen(["touch", *(str(target / n) for n in names)])
    assert touch.wait() == 0
    noise.wait()
    # A relative path, resolved by the agent from the creating process's cwd
    # (while it lives: a process already gone leaves the path relative).
    rel = subprocess.Popen(
        ["python3", "-c", "import time; open('relative-one', 'w').close(); time.sleep(3)"],
        cwd=other,
    )
    # Opening existing files without O_CREAT must not count.
    for n in names:
        (target / n).read_bytes()

    prefix = f"{target}/"
    events = drain_until(
        probe,
        lambda evs: (
            sum(e["path"].startswith(prefix) for e in evs) >= N
            and any(e["path"].endswith("relative-one") for e in evs)
        ),
    )
    ours = [e for e in events if e["path"].startswith(prefix)]
    assert sorted(e["path"] for e in ours) == [str(target / n) for n in names]
    assert {(e["pid"], e["tid"], e["comm"]) for e in ours} == {(touch.pid, touch.pid, "touch")}
    assert all(e["ts_ns"] > time.time_ns() - 60 * 10**9 for e in ours)  # wall clock, not boot time
    assert all(e["flags"] & os.O_CREAT and not e["certain"] for e in ours)  # touch: O_CREAT without O_EXCL

    noise_paths = sorted(e["path"] for e in events if e["path"].startswith(f"{other}/"))
    assert noise_paths == sorted([str(other / n) for n in names[:7]] + [str(other / "relative-one")])
    [relative] = [e for e in events if e["path"].endswith("relative-one")]
    assert relative["pid"] == rel.pid
    rel.kill()
    assert probe.counters() == {"ringbuf_drops": 0, "sampled_out": 0}


def test_o_excl_creations_are_certain_and_failed_opens_are_not_events(probe, tmp_path):
    path = tmp_path / "excl"
    code = (
        "import os,sys\n"
        f"fd = os.open({str(path)!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY); os.close(fd)\n"
        "try:\n"
        f"    os.open({str(path)!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY)\n"
        "except FileExistsError:\n"
        "    pass\n"
        "try:\n"
        f"    os.open({str(tmp_path / 'missing-dir' / 'x')!r}, os.O_CREAT | os.O_WRONLY)\n"
        "except FileNotFoundError:\n"
        "    pass\n"
        f"os.close(os.open({str(tmp_path / 'last')!r}, os.O_CREAT | os.O_WRONLY))\n"
    )
    subprocess.run(["python3", "-c", code], check=True)
    # 'last' is created after the failing opens, so once it is seen they were too.
    events = drain_until(probe, lambda evs: any(e["path"] == str(tmp_path / "last") for e in evs))
    mine = [e for e in events if e["path"].startswith(f"{tmp_path}/")]
    assert [(e["path"], e["certain"]) for e in mine] == [
        (str(path), True),
        (str(tmp_path / "last"), False),
    ]


def test_bccs_callback_reader_gives_the_same_events_within_the_queue_bound(monkeypatch, tmp_path):
    """Off x86-64 the agent reads the ring buffer through BCC's callback (see
    edge_agent/ringbuf.py); forced here, where the bulk reader would be used."""
    need_bpf()
    monkeypatch.setattr(ringbuf, "BULK_READ", False)
    loaded, skipped = probes.load(["file_created"], ringbuf_pages=64)
    assert not skipped, skipped
    p = loaded["file_created"]
    try:
        assert p._reader is None
        target = tmp_path / "callback"
        target.mkdir()
        names = [str(target / f"f{i:02d}") for i in range(N)]
        subprocess.run(["touch", *names], check=True)
        prefix = f"{target}/"
        events = drain_until(p, lambda evs: sum(e["path"].startswith(prefix) for e in evs) >= N)
        assert sorted(e["path"] for e in events if e["path"].startswith(prefix)) == names
        # What this reader queued counts against the drain queue's bound too.
        assert p._queued >= p._taken > 0
    finally:
        p.close()
