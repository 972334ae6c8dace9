"""The real agent against faults that used to wedge or silence it: lost state, a
full disk, a dead task, batches above Kafka's message limit, and its only broker
SIGKILLed under the whole pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import mmap
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from edge_agent.spool import HEADER, MAGIC
from ktel.probes.decode import stride
from ktel.wire import HEARTBEATS_TOPIC, RAW_TOPIC, WireError, decode_batch, decode_heartbeat, event_dict
from processors.dedupe_core import Dedupe
from tests.conftest import need_bpf
from tests.integration.agent_harness import AgentProcess, kill_leftovers, read_topic
from tests.integration.pipeline_harness import Pipeline, broker_crash_mid_stream
from tests.integration.test_agent_delivery import create_files, make_topics

pytestmark = [pytest.mark.kafka, pytest.mark.bpf]
ONLY_FILES = '["file_created"]'  # one ring-buffer probe: no histogram events to account for


@pytest.fixture(autouse=True)
def no_leftover_agents():
    yield
    kill_leftovers()


def deduped_paths(bootstrap: str, host: str, prefix: str) -> list[str]:
    """Paths under ``prefix`` in ``host``'s batches on ktel.raw, after the dedupe stage's core."""
    dedupe, state, paths = Dedupe(guards="counted"), {}, []
    for rec in asyncio.run(read_topic(bootstrap, RAW_TOPIC)):
        try:
            batch = decode_batch(rec.value)
        except WireError:
            continue  # another test's garbage on the shared broker
        if batch.host_id != host:
            continue
        kept = dedupe.on_batch(state, batch, 0).batch
        for ev in kept.events if kept else []:
            path = event_dict(ev).get("path", "")
            if path.startswith(prefix):
                paths.append(path)
    return sorted(paths)


def expected(directory, n) -> list[str]:
    return [str(directory / f"f{i:05d}") for i in range(n)]


def wait_for(what, condition, agent, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert agent.proc.poll() is None, f"agent exited while waiting for {what}:\n{agent.log()[-3000:]}"
        assert time.monotonic() < deadline, f"{what}:\n{agent.log()[-3000:]}"
        time.sleep(0.2)


def test_lost_state_starts_a_numbering_that_dedupe_counts(kafka, tmp_path):
    need_bpf()
    make_topics(kafka.bootstrap)
    host = f"lost-{uuid.uuid4().hex[:8]}"
    agent = AgentProcess(tmp_path, kafka.bootstrap, host_id=host, probes=ONLY_FILES).start()
    # Slowly: many batches, so the first numbering gets well past what the second uses.
    create_files(tmp_path / "before", 100, rate_per_s=40)
    agent.wait_until_spool_empty()
    shutil.rmtree(agent.state_dir)  # lost while it runs (an emptyDir, a reimage)
    assert agent.stop() == 0
    shutil.rmtree(agent.state_dir, ignore_errors=True)  # and between runs
    agent = AgentProcess(tmp_path, kafka.bootstrap, host_id=host, probes=ONLY_FILES).start()
    create_files(tmp_path / "after", 300, rate_per_s=5000)
    agent.wait_until_spool_empty()
    assert agent.stop() == 0
    assert deduped_paths(kafka.bootstrap, host, f"{tmp_path / 'before'}/") == expected(
        tmp_path / "before", 100
    )
    assert deduped_paths(kafka.bootstrap, host, f"{tmp_path / 'after'}/") == expected(tmp_path / "after", 300)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs for the agent's state, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(directory) -> None:
    # Unbuffered: a buffered file keeps what a short write left over, and its close
    # raises ENOSPC writing it again (the room left is not a multiple of the writes).
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass


BPF_MAP_TYPE_RINGBUF = 27
RINGBUF_BUSY_BIT, RINGBUF_DISCARD_BIT = 1 << 31, 1 << 30  # a record header's (include/uapi/linux/bpf.h)
SYS_PIDFD_GETFD = 438  # on x86-64 and arm64 alike (the syscall table every newer arch shares)


def ring_buffer_records(pid: int) -> int:
    """Records the kernel has written so far into process ``pid``'s one BPF ring buffer,
    read through a copy of the process's map fd: the records from its start up to its
    producer position, which must not have wrapped around yet. (file_created's records
    come in two sizes, so the position alone does not say how many.)"""
    fds = {}  # map id -> (one of the process's fds of it (BCC may hold several), its size)
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            fields = dict(line.split(":\t", 1) for line in info.read_text().splitlines() if ":\t" in line)
            if fields.get("map_type") == str(BPF_MAP_TYPE_RINGBUF):
                fds[fields["map_id"]] = (int(info.name), int(fields["max_entries"]))
    [(fd, size)] = fds.values()
    pidfd = os.pidfd_open(pid)
    try:
        mine = ctypes.CDLL(None, use_errno=True).syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        assert mine >= 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(pidfd)
    try:
        # The page after the consumer's holds producer_pos, the data follows (edge_agent/ringbuf.py).
        with mmap.mmap(mine, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ, offset=mmap.PAGESIZE) as page:
            written = int.from_bytes(page[:8], sys.byteorder)
        assert written < size, "the ring buffer wrapped around: its records before the last lap are gone"
        with mmap.mmap(mine, size, mmap.MAP_SHARED, mmap.PROT_READ, offset=2 * mmap.PAGESIZE) as data:
            n = at = 0
            while at < written:
                (length,) = struct.unpack_from("<I", data, at)
                n += not length & RINGBUF_DISCARD_BIT
                at += stride(length & ~(RINGBUF_BUSY_BIT | RINGBUF_DISCARD_BIT))
            return n
    finally:
        os.close(mine)


def spooled_events(spool_dir: Path) -> int:
    """Events in the whole records of the agent's spool segments."""
    n = 0
    for seg in spool_dir.glob("*.seg"):
        data, at = seg.read_bytes(), 0
        while at + HEADER.size <= len(data):
            magic, length, events, _crc = HEADER.unpack_from(data, at)
            if magic != MAGIC or at + HEADER.size + length > len(data):
                break  # a record being written (or cut back)
            n, at = n + events, at + HEADER.size + length
    return n


def test_a_full_disk_drops_and_counts_then_the_backlog_drains(private_kafka, small_disk, tmp_path):
    need_bpf()
    host = f"full-{uuid.uuid4().hex[:8]}"
    private_kafka.stop()  # Kafka away: everything must be kept on the small disk
    agent = AgentProcess(
        tmp_path,
        private_kafka.bootstrap,
        host_id=host,
        probes=ONLY_FILES,
        state_dir=str(small_disk / "state"),
        # Uncompressed: the 200 files' events zstd-compressed take a few KB, which the
        # last page of the segment being written (tmpfs gives whole pages) could hold
        # whole on the full disk, the disk then never refusing a write.
        compression="none",
    ).start()
    fill(small_disk)
    create_files(tmp_path / "full", 200, rate_per_s=2000)
    # The test's events must meet the full disk, not wait in the ring buffer until space
    # returns. The agent reads its ring buffer and seals batches in order, so once it has
    # sealed (spooled or dropped) as many events as the kernel had written by now, the
    # test's are among them. (Each of the buffer's records is one file_created event:
    # the only probe loaded.)
    written = ring_buffer_records(agent.proc.pid)

    def sealed() -> float:
        dropped = agent.metric("ktel_agent_disk_dropped_events_total")
        return spooled_events(small_disk / "state" / "spool") + dropped

    wait_for("every event written before the 'full' files ended sealed", lambda: sealed() >= written, agent)
    assert "refuses writes" in agent.log()
    (small_disk / "filler").unlink()  # space returns; Kafka is still away
    create_files(tmp_path / "kept", 300, rate_per_s=2000)
    wait_for("backlog spooled", lambda: agent.metric("ktel_agent_spool_bytes") > 0, agent)
    assert "takes writes again" in agent.log()
    private_kafka.start()
    agent.wait_until_spool_empty()

    def balanced() -> bool:
        read = agent.metric("ktel_agent_events_read_total", probe="file_created")
        published = agent.metric("ktel_agent_events_published_total")
        dropped = agent.metric("ktel_agent_disk_dropped_events_total")
        return read == published + dropped and agent.metric("ktel_agent_spool_bytes") == 0

    # Every event the agent read is published or counted as dropped (other processes
    # create files too, so the totals are the host's, not only the test's).
    wait_for("read == published + dropped", balanced, agent)
    assert agent.metric("ktel_agent_spool_dropped_events_total") == 0
    time.sleep(1.5)  # one more heartbeat, sent now that Kafka is back
    dropped = agent.metric("ktel_agent_disk_dropped_events_total")
    assert agent.stop() == 0
    assert deduped_paths(private_kafka.bootstrap, host, f"{tmp_path / 'kept'}/") == expected(
        tmp_path / "kept", 300
    )
    # tmpfs gives a file whole pages, so the last page of the segment being written can
    # still take a small batch while the disk is full: a few of the 'full' files may be
    # kept. Every one that is not was dropped, and counted.
    kept_while_full = deduped_paths(private_kafka.bootstrap, host, f"{tmp_path / 'full'}/")
    assert set(kept_while_full) <= set(expected(tmp_path / "full", 200))
    lost = 200 - len(kept_while_full)
    assert lost >= 100, f"only {lost} of 200 events met the full disk"
    assert dropped >= lost
    beats = [
        decode_heartbeat(r.value) for r in asyncio.run(read_topic(private_kafka.bootstrap, HEARTBEATS_TOPIC))
    ]
    assert max(b["counters"]["disk_dropped_events"] for b in beats if b["host"]["host.id"] == host) >= lost


def test_a_dead_task_ends_the_agent_with_one_line(kafka, tmp_path):
    need_bpf()
    make_topics(kafka.bootstrap)
    agent = AgentProcess(tmp_path, kafka.bootstrap, module="tests.integration.agent_with_fault")
    agent.start()
    try:
        status = agent.proc.wait(120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the agent runs on without its publish task:\n{agent.log()[-3000:]}")
    assert status == 1
    [line] = [ln for ln in agent.log().splitlines() if "exiting with status 1" in ln]
    assert "agent task publish failed: OSError" in line and "Input/output error" in line
    assert "Traceback" not in agent.log()


def test_a_batch_above_the_topics_message_limit_is_split_and_counted_once(private_kafka, tmp_path):
    need_bpf()
    host = f"split-{uuid.uuid4().hex[:8]}"

    async def limit_topic():
        admin = AIOKafkaAdminClient(bootstrap_servers=private_kafka.bootstrap)
        await admin.start()
        try:
            cfg = {"max.message.bytes": "1500"}
            await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, RAW_TOPIC, cfg)])
        finally:
            await admin.close()

    asyncio.run(limit_topic())
    agent = AgentProcess(tmp_path, private_kafka.bootstrap, host_id=host, probes=ONLY_FILES).start()
    n = 4000
    worker = threading.Thread(target=create_files, args=(tmp_path / "big", n, 20000))
    worker.start()
    worker.join()
    agent.wait_until_spool_empty(published=n)
    split = agent.metric("ktel_agent_batches_split_total")
    dropped = agent.metric("ktel_agent_too_large_dropped_events_total")
    assert agent.stop() == 0
    assert split > 0 and dropped == 0
    assert deduped_paths(private_kafka.bootstrap, host, f"{tmp_path / 'big'}/") == expected(
        tmp_path / "big", n
    )


def test_sigkill_of_the_only_broker_under_the_whole_pipeline_loses_and_doubles_nothing(
    private_kafka, prometheus, tmp_path
):
    """test_agent_delivery stops the broker cleanly under the agent alone; here it
    crashes under the agent, the worker and both exporters."""
    need_bpf()
    host = f"crash-{uuid.uuid4().hex[:8]}"
    pipeline = Pipeline(
        tmp_path, prometheus, lambda _role: {"KTEL_KAFKA__BOOTSTRAP": private_kafka.bootstrap}, host
    )
    try:
        pipeline.start()
        broker_crash_mid_stream(pipeline, lambda: private_kafka)
    finally:
        pipeline.stop()
