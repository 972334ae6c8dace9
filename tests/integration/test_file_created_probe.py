"""The file_created probe against the real kernel: a known workload of 23 files."""

import contextlib
import os
import subprocess
import time

import pytest

from edge_agent import agent as agent_mod
from edge_agent import probes, ringbuf
from ktel.config import AgentConfig, Config
from ktel.probes import file_created
from ktel.wire import event_dict
from tests.conftest import need_bpf
from tests.integration.probe_harness import threads_in_open

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
    # A relative path, made absolute from the cwd the kernel side read.
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
    assert probe.counters() == {
        "ringbuf_drops": 0,
        "sampled_out": 0,
        "inflight_lost": 0,
        "recursion_misses": 0,
        "truncated_paths": 0,
        "unresolved_paths": 0,
    }


def test_absolute_paths_travel_without_dir_and_relative_ones_with_it(probe, tmp_path):
    """bpf/file_created.h: a record for an absolute path ends where dir begins."""
    if probes._has_tracepoint("filewatcher/file_created"):
        # The module reports every path absolute (d_path), so both records are short.
        pytest.skip("the filewatcher module is loaded: this is the syscall fallback's test")
    code = f"open({str(tmp_path / 'absolute')!r}, 'w').close(); open('relative', 'w').close()"
    subprocess.run(["python3", "-c", code], cwd=tmp_path, check=True)
    want = {str(tmp_path / "absolute"), str(tmp_path / "relative")}
    sizes: dict[str, int] = {}
    deadline = time.monotonic() + 10
    while not want <= sizes.keys() and time.monotonic() < deadline:
        for size, data in probe.take():
            sizes.update((ev[6], size) for ev in file_created.decode_run(size, data, 0))
        time.sleep(0.05)
    assert {p: sizes.get(p) for p in want} == {
        str(tmp_path / "absolute"): file_created.ABS_SIZE,
        str(tmp_path / "relative"): file_created.LAYOUT.size,
    }


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


def test_relative_and_dirfd_paths_are_absolute_after_the_process_has_exited(probe, tmp_path, monkeypatch):
    """The kernel side reads the directory a relative path is relative to (the
    cwd, or openat's dirfd) when the open returns, so the path is made absolute
    though the process is gone before the agent reads the event and /proc has
    nothing left to resolve it from."""
    # Resolving from /proc would hide a kernel side that did not: the test makes it fail.
    monkeypatch.setattr(file_created, "_resolve", lambda path, pid, dirfd: f"UNRESOLVED:{path}")
    cwd = tmp_path / "a dir" / "deep"
    other = tmp_path / "other"
    cwd.mkdir(parents=True)
    other.mkdir()
    # /dev/shm: a directory on another mount, so the walk crosses a mount point.
    shm = (
        "/dev/shm"
        if os.path.isdir("/dev/shm") and os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev
        else None
    )
    code = (
        "import os\n"
        "open('by-cwd', 'w').close()\n"
        "open('../by-dotdot', 'w').close()\n"
        f"d = os.open({str(other)!r}, os.O_RDONLY | os.O_DIRECTORY)\n"
        "os.close(os.open('by-dirfd', os.O_CREAT | os.O_WRONLY, dir_fd=d))\n"
        "os.close(os.open('by-dirfd-excl', os.O_CREAT | os.O_EXCL | os.O_WRONLY, dir_fd=d))\n"
        "os.close(d)\n"
    )
    if shm:
        code += f"os.chdir({shm!r}); open('ktel-test-{os.getpid()}', 'w').close()\n"
    proc = subprocess.run(["python3", "-c", code], cwd=cwd, check=True)
    assert proc.returncode == 0  # exited and reaped: /proc/<pid> is gone
    want = {
        str(cwd / "by-cwd"),
        str(tmp_path / "a dir" / "by-dotdot"),
        str(other / "by-dirfd"),
        str(other / "by-dirfd-excl"),
    }
    if shm:
        want.add(f"{shm}/ktel-test-{os.getpid()}")
    try:
        events = drain_until(probe, lambda evs: want <= {e["path"] for e in evs})
    finally:
        if shm:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{shm}/ktel-test-{os.getpid()}")
    mine = {e["path"] for e in events if "by-" in e["path"] or "ktel-test-" in e["path"]}
    assert mine == want


# openat2(2) with RESOLVE_IN_ROOT (include/uapi/linux/openat2.h), from a process that
# then exits: argv[1] the directory that is the root, the rest paths to create in it.
OPENAT2_IN_ROOT = """
import ctypes, errno, os, struct, sys
syscall = ctypes.CDLL(None, use_errno=True).syscall
syscall.restype = ctypes.c_long
syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
root = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
how = struct.pack("QQQ", os.O_CREAT | os.O_WRONLY, 0o644, 0x10)
for path in sys.argv[2:]:
    for _try in range(100):  # EAGAIN: a ".." crossed while something was renamed or mounted
        fd = syscall(437, root, path.encode(), how, len(how))  # SYS_openat2, x86-64 and arm64 alike
        if fd >= 0 or ctypes.get_errno() != errno.EAGAIN:
            break
    if fd < 0:
        err = ctypes.get_errno()
        sys.exit(3 if err in (errno.ENOSYS, errno.EPERM) else f"openat2 {path}: {os.strerror(err)}")
    os.close(fd)
"""


def test_files_opened_in_a_root_are_named_inside_it(probe, tmp_path, monkeypatch):
    """openat2's RESOLVE_IN_ROOT (how container runtimes open files in a container's
    root) resolves the path inside dirfd's directory, ".." and absolute symlinks
    included: the event names the file the kernel created, not the host's path of
    the same name, even after the process has exited."""
    if probes._has_tracepoint("filewatcher/file_created"):
        pytest.skip("the filewatcher module is loaded: this is the syscall fallback's test")
    monkeypatch.setattr(file_created, "_resolve", lambda path, pid, dirfd: f"UNRESOLVED:{path}")
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "var").mkdir()
    (root / "etc" / "link").symlink_to("/var")  # inside the root: <root>/var
    paths = ["/etc/in-root", "/../../escaped", "etc/../../../rel-escaped", "/etc/link/via-link"]
    made = subprocess.run(["python3", "-c", OPENAT2_IN_ROOT, str(root), *paths], cwd=tmp_path)
    if made.returncode == 3:
        pytest.skip("openat2 is not available to this process (kernel before 5.6, or seccomp)")
    assert made.returncode == 0
    want = {
        str(root / "etc" / "in-root"),
        str(root / "escaped"),
        str(root / "rel-escaped"),
        str(root / "var" / "via-link"),
    }
    assert all(os.path.exists(p) for p in want)  # where the kernel made them
    events = drain_until(probe, lambda evs: want <= {e["path"] for e in evs})
    names = ("in-root", "escaped", "via-link")
    assert {e["path"] for e in events if any(n in e["path"] for n in names)} == want


def test_a_path_longer_than_the_record_is_sent_as_its_start_marked_and_counted(probe, tmp_path):
    """bpf/file_created.h, KTEL_PATH_TRUNCATED: a path the record's 255 bytes cannot hold
    (an absolute one, a relative one) keeps its start, its record says it was cut, and
    the kernel's count of them reaches the agent's scrape and heartbeat; one of exactly
    255 bytes fits whole, unmarked."""
    # Two trees, so that neither's start is a start of the other's path.
    deep = [tmp_path.joinpath(top, *(c * 60 for c in "abcde")) for top in ("abs", "rel")]
    for d in deep:
        d.mkdir(parents=True)
    fits = tmp_path / "f"
    fits = tmp_path / ("f" * (255 - len(str(fits)) + 1))  # 255 bytes, its NUL the record's last
    long_abs = deep[0] / "long-absolute"
    rel = os.path.relpath(deep[1] / "long-relative", tmp_path)  # relative, and past 255 bytes too
    assert len(str(fits)) == 255 and len(str(long_abs)) > 255 and len(rel) > 255
    code = "".join(f"open({p!r}, 'w').close()\n" for p in (str(fits), str(long_abs), rel))
    subprocess.run(["python3", "-c", code], cwd=tmp_path, check=True)
    whole = {str(fits), str(long_abs), str(tmp_path / rel)}

    seen: list[tuple[str, int]] = []  # every record drained: (its event's path, dir_state)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for size, data in probe.take():
            states = [rec[7] for rec in file_created._framed(size).iter_unpack(data)]
            events = file_created.decode_run(size, data, 0)
            seen += [(ev[6], state) for ev, state in zip(events, states, strict=True)]
        trees = (f"{tmp_path}/abs/", f"{tmp_path}/rel/")
        if sum(p == str(fits) or p.startswith(trees) for p, _ in seen) >= 3:
            break
        time.sleep(0.05)
    ours = {p: state for p, state in seen if str(tmp_path) in p}
    # Each event names a file by its start: a prefix of its whole path, and no more.
    starts = {p: next(w for w in whole if w.startswith(p)) for p in ours}
    assert sorted(starts.values()) == sorted(whole), ours
    cut = {w for p, w in starts.items() if p != w}
    assert cut == {str(long_abs), str(tmp_path / rel)}
    assert {starts[p]: bool(s & file_created.PATH_TRUNCATED) for p, s in ours.items()} == {
        str(fits): False,
        str(long_abs): True,
        str(tmp_path / rel): True,
    }
    # Counted once each; every record marked is counted (none other than these here).
    marked = sum(bool(s & file_created.PATH_TRUNCATED) for _, s in seen)
    assert probe.counters()["truncated_paths"] == marked == 2

    # The agent exports the kernel's count on its scrape and in its heartbeat.
    acfg = AgentConfig(host_id="h", state_dir=tmp_path / "state", cgroup_root=tmp_path)
    agent = agent_mod.Agent(Config(agent=acfg))
    try:
        agent.loaded = {"file_created": probe}
        families = {f.name: f for f in agent_mod.AgentCollector(agent).collect()}
        [sample] = [s for s in families["ktel_agent_truncated_paths"].samples if s.name.endswith("_total")]
        assert (sample.labels, sample.value) == ({"probe": "file_created"}, 2)
        beat, _ = agent.heartbeat(1.0, {}, [], {})
        assert beat["counters"]["truncated_paths.file_created"] == 2
    finally:
        agent.spool.close()


M = 41  # opens in flight at once: a prime, against a map of KTEL_PENDING_MAX = 8


def test_creates_evicted_from_a_full_map_of_opens_in_flight_are_counted(tmp_path):
    """More O_CREAT opens in flight than the pending map holds: each one is either an
    event or counted in inflight_lost, none lost uncounted."""
    need_bpf()
    loaded, skipped = probes.load(
        ["file_created"], ringbuf_pages=64, defines={"file_created": {"KTEL_PENDING_MAX": 8}}
    )
    assert not skipped, skipped
    probe = loaded["file_created"]
    fifos = [tmp_path / f"fifo{i:02d}" for i in range(M)]
    for f in fifos:
        os.mkfifo(f)
    # Opening a FIFO for writing sleeps until a reader opens it; O_CREAT on it (it exists)
    # succeeds without creating: an event of the fallback (certain false), held in flight.
    code = (
        "import os, sys, threading\n"
        "def w(p):\n"
        "    os.close(os.open(p, os.O_CREAT | os.O_WRONLY))\n"
        "ts = [threading.Thread(target=w, args=(p,)) for p in sys.argv[1:]]\n"
        "[t.start() for t in ts]\n"
        "[t.join() for t in ts]\n"
    )
    writer = subprocess.Popen(["python3", "-c", code, *map(str, fifos)])
    readers: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while threads_in_open(writer.pid) < M and time.monotonic() < deadline:
            time.sleep(0.02)
        assert threads_in_open(writer.pid) == M, "the writer's threads did not all block in open"
        readers = [os.open(f, os.O_RDONLY | os.O_NONBLOCK) for f in fifos]
        assert writer.wait() == 0
        prefix = f"{tmp_path}/fifo"

        def settled(evs):
            return sum(e["path"].startswith(prefix) for e in evs) + probe.counters()["inflight_lost"] >= M

        events = drain_until(probe, settled)
        delivered = sorted(e["path"] for e in events if e["path"].startswith(prefix))
        lost = probe.counters()["inflight_lost"]
    finally:
        for fd in readers:
            os.close(fd)
        writer.kill()
        probe.close()
    assert len(set(delivered)) == len(delivered)  # each at most once
    assert len(delivered) < M  # the map of 8 could not hold them all...
    # ...and each one it did not hold is counted (other processes' creates may add to it).
    assert lost >= M - len(delivered)
