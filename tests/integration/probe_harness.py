"""What the probe tests share: a loaded probe, draining until a condition holds,
network namespaces and cgroups the test creates (and removes), a workload that
waits for a go, and small C programs built with the host's gcc."""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent import probes
from edge_agent.containers import find_cgroup2_root
from ktel.probes import PROBES
from ktel.wire import event_dict
from tests.conftest import need_bpf

_seq = itertools.count()


@contextlib.contextmanager
def loaded(name: str, ringbuf_pages: int = 64, **kwargs: Any) -> Iterator[probes.LoadedProbe]:
    """The named probe in the kernel; skipped (a failure under CI) when this
    kernel or host lacks its attach points."""
    need_bpf()
    try:
        p = probes.LoadedProbe(PROBES[name], ringbuf_pages, **kwargs)
    except probes.ProbeUnavailable as err:
        pytest.skip(f"probe {name} cannot load here: {err}")
    try:
        yield p
    finally:
        p.close()


def drain_until(
    probe: probes.LoadedProbe, want: Callable[[list[dict]], bool], timeout: float = 10.0
) -> list[dict]:
    """Named events drained until ``want(events)`` holds or the time is up."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        probe.consume()
        events.extend(event_dict(e) for e in probe.decode(probe.take()))
        if want(events) or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def histogram_total(events: list[list], metric: str, **labels: Any) -> tuple[int, list[int]]:
    """(count, buckets) summed over the HISTOGRAM_DELTA events of ``metric``
    whose labels include ``labels``."""
    count, buckets = 0, [0] * probes.HIST_SLOTS
    for e in map(event_dict, events):
        if e["metric"] == metric and all(e["labels"].get(k) == v for k, v in labels.items()):
            assert sum(e["buckets"]) == e["count"]
            count += e["count"]
            buckets = [a + b for a, b in zip(buckets, e["buckets"], strict=True)]
    return count, buckets


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


@contextlib.contextmanager
def netns() -> Iterator[str]:
    """A network namespace of this test's own, with its loopback up."""
    if not shutil.which("ip"):
        pytest.skip("iproute2 (ip) is not installed")
    name = f"ktel-t{os.getpid()}-{next(_seq)}"
    run("ip", "netns", "add", name)
    try:
        run("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        # Only this test's processes can be in its namespace: end them, then remove it.
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
        for pid in pids.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], check=False)


def cgroup2_mount() -> Path:
    root = find_cgroup2_root(Path("/proc/self/mountinfo").read_text())
    if root is None:
        pytest.skip("no cgroup2 hierarchy is mounted")
    return root


@contextlib.contextmanager
def cgroup2_child(*names: str) -> Iterator[Path]:
    """A cgroup v2 directory of this test's own (with ``names`` nested in it,
    innermost last: a container's, say); its inode number is the cgroup id
    that bpf_get_current_cgroup_id() returns for a process inside it."""
    paths = [cgroup2_mount() / f"ktel-t{os.getpid()}-{next(_seq)}"]
    paths += [paths[0].joinpath(*names[: i + 1]) for i in range(len(names))]
    try:
        for path in paths:
            path.mkdir()
        yield paths[-1]
    finally:
        for path in reversed(paths):
            # A process just reaped may still hold it for a moment.
            for _ in range(50 if path.exists() else 0):
                try:
                    path.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def build_c(tmp_path: Path, name: str, source: str) -> Path:
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed")
    src = tmp_path / f"{name}.c"
    src.write_text(source)
    exe = tmp_path / name
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, src], check=True)
    return exe


class Workload:
    """A child process that does its work each time it reads a line on stdin
    and answers with a line on stdout; it exits at EOF."""

    def __init__(self, cmd: list[str], **kwargs: Any):
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, **kwargs
        )
        self.pid = self.proc.pid
        self.hello = self.readline()  # the child is up and waiting for its go

    def readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"workload {self.proc.args!r} exited with {self.proc.wait()}")
        return line.strip()

    def send(self, line: str = "go") -> None:
        """Give the child ``line`` without waiting for its answer (one that never answers:
        killed while it works)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def go(self, line: str = "go") -> str:
        self.send(line)
        return self.readline()

    def finish(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout=30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def threads_in_open(pid: int) -> int:
    """Threads of pid sleeping inside openat(2) (/proc/<pid>/task/<tid>/syscall)."""
    nr = {"x86_64": 257, "aarch64": 56}[platform.machine()]
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                n += f.read().split()[0] == str(nr)
        except (OSError, IndexError):
            pass
    return n


def python_workload(code: str, prefix: tuple[str, ...] = (), **kwargs: Any) -> Workload:
    """``code`` runs once per go line; the child prints "ready", then "done" after
    each run. ``prefix`` (e.g. ip netns exec, taskset) must exec, not fork, so
    the workload's pid is the child's."""
    script = "import sys\nprint('ready', flush=True)\nfor _ in sys.stdin:\n"
    script += textwrap.indent(textwrap.dedent(code).strip(), "    ") + "\n    print('done', flush=True)\n"
    return Workload([*prefix, sys.executable, "-c", script], **kwargs)
