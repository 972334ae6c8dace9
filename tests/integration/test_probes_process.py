"""The process probe against the real kernel: 23 execs of a known binary, their
exits with their exit code, and a death by signal."""

import os
import secrets
import signal
import subprocess
import time

import pytest

from edge_agent.containers import Containers
from tests.integration.probe_harness import cgroup2_child, cgroup2_mount, drain_until, loaded

pytestmark = pytest.mark.bpf

N = 23  # a prime, so a doubled or halved count cannot pass by accident
SH = "/bin/sh"


def test_23_execs_and_their_exits_with_pids_filename_and_exit_code():
    with loaded("process") as probe:
        children = [subprocess.Popen([SH, "-c", "exit 7"]) for _ in range(N)]
        assert [c.wait() for c in children] == [7] * N
        # A death by SIGTERM: no exit status, the signal instead.
        sleeper = subprocess.Popen(["sleep", "30"])
        time.sleep(0.2)
        sleeper.send_signal(signal.SIGTERM)
        assert sleeper.wait() == -signal.SIGTERM

        pids = {c.pid for c in children}
        events = drain_until(
            probe,
            lambda evs: (
                sum(e["kind"] == "process_exit" and e["pid"] in pids for e in evs) >= N
                and any(e["kind"] == "process_exit" and e["pid"] == sleeper.pid for e in evs)
            ),
        )
    execs = [e for e in events if e["kind"] == "process_exec" and e["pid"] in pids]
    exits = [e for e in events if e["kind"] == "process_exit" and e["pid"] in pids]
    assert sorted(e["pid"] for e in execs) == sorted(pids)
    assert {(e["filename"], e["comm"], e["ppid"], e["tid"] == e["pid"]) for e in execs} == {
        (SH, "sh", os.getpid(), True)
    }
    assert sorted(e["pid"] for e in exits) == sorted(pids)
    assert {(e["exit_code"], e["signal"], e["comm"], e["ppid"]) for e in exits} == {(7, 0, "sh", os.getpid())}
    # Each exit after its exec, in the same cgroup.
    by_pid = {e["pid"]: e for e in execs}
    assert all(x["ts_ns"] >= by_pid[x["pid"]]["ts_ns"] for x in exits)
    assert all(x["cgroup_id"] == by_pid[x["pid"]]["cgroup_id"] > 0 for x in exits)

    [killed] = [e for e in events if e["kind"] == "process_exit" and e["pid"] == sleeper.pid]
    assert (killed["exit_code"], killed["signal"], killed["comm"]) == (None, signal.SIGTERM, "sleep")
    [sleep_exec] = [e for e in events if e["kind"] == "process_exec" and e["pid"] == sleeper.pid]
    assert sleep_exec["filename"].endswith("/sleep") or sleep_exec["filename"] == "sleep"


def test_a_threaded_process_exits_once_with_its_status():
    code = (
        "import os, threading, time\n"
        "ts = [threading.Thread(target=time.sleep, args=(0.2,)) for _ in range(3)]\n"
        "[t.start() for t in ts]\n"
        "time.sleep(0.05)\n"
        "os._exit(3)\n"  # exit_group(3) while the threads still sleep
    )
    with loaded("process") as probe:
        child = subprocess.Popen(["python3", "-c", code])
        assert child.wait() == 3
        events = drain_until(
            probe, lambda evs: any(e["kind"] == "process_exit" and e["pid"] == child.pid for e in evs)
        )
        time.sleep(0.3)  # a second exit event, if the probe sent one, would be here by now
        events += drain_until(probe, lambda evs: False, timeout=0.2)
    exits = [e for e in events if e["kind"] == "process_exit" and e["pid"] == child.pid]
    assert [(e["exit_code"], e["signal"], e["ppid"]) for e in exits] == [(3, 0, os.getpid())]


def test_a_process_in_a_container_cgroup_has_the_cgroup_id_the_agent_lists_for_it():
    cid = secrets.token_hex(32)
    with cgroup2_child("system.slice", f"docker-{cid}.scope") as cgroup, loaded("process") as probe:
        # The shell moves itself into the container's cgroup, then execs: that exec
        # and its exit happen inside it.
        child = subprocess.Popen([SH, "-c", f'echo $$ > {cgroup}/cgroup.procs && exec {SH} -c "exit 3"'])
        assert child.wait() == 3
        listed = dict(Containers(cgroup2_mount()).scan())
        cgroup_id = os.stat(cgroup).st_ino
        events = drain_until(
            probe, lambda evs: any(e["kind"] == "process_exit" and e["pid"] == child.pid for e in evs)
        )
    [_, inner] = [e for e in events if e["kind"] == "process_exec" and e["pid"] == child.pid]
    [exit_] = [e for e in events if e["kind"] == "process_exit" and e["pid"] == child.pid]
    assert inner["cgroup_id"] == exit_["cgroup_id"] == cgroup_id
    assert listed[inner["cgroup_id"]] == {"container.id": cid, "container.runtime.name": "docker"}
