"""The agent seals batches small enough for Kafka's default 1 MiB record limit, and
its heartbeats report its counters."""

import contextlib
import errno
import logging
import os
import socket
import uuid

import msgpack
import pytest
from prometheus_client import REGISTRY

from edge_agent import agent as agent_mod
from edge_agent import containers as containers_mod
from edge_agent import control as control_mod
from edge_agent import probes as probes_mod
from ktel import cli, config
from ktel.config import AgentConfig, Config, ConfigError, RedactRule
from ktel.probes import file_created, ktel_api
from ktel.probes.decode import PackedEvents, pack_event
from ktel.wire import ControlCommand, decode_batch, encode_batch, encode_heartbeat
from ktel.wire.codec import SEND_MAX_BYTES, ZSTD_MAGIC
from tests.unit.test_ringbuf import fc_record, run_of


def make_agent(tmp_path, **settings) -> agent_mod.Agent:
    acfg = AgentConfig(host_id="h", state_dir=tmp_path, cgroup_root=tmp_path, **settings)
    return agent_mod.Agent(Config(agent=acfg))


@pytest.fixture
def agent(tmp_path):
    a = make_agent(tmp_path)
    yield a
    a.spool.close()


def file_events(n: int) -> list[list]:
    return [[1, 10**18 + i, 100, 100, 0, "touch", f"/tmp/d/f{i:06d}", 0o101, True] for i in range(n)]


def packed(events: list[list]) -> PackedEvents:
    return PackedEvents(map(pack_event, events))  # as the agent holds its events


def test_a_full_batch_of_ordinary_events_is_one_batch(agent):
    # A full batch of file creations (5,000) encodes to about 300 KB: one batch, however
    # large their records (4 MB).
    n = agent.cfg.agent.batch_max_events
    [(batch, payload)] = agent.encoded(packed(file_events(n)), [1.0] * n)
    assert len(payload) < agent.cfg.agent.batch_max_bytes
    assert decode_batch(payload).events == file_events(n) and batch.weights is None


def test_a_batch_encoding_past_the_limit_is_sealed_as_consecutive_batches_that_fit(tmp_path):
    agent = make_agent(tmp_path, batch_max_bytes=64 << 10)
    full = ktel_api.LAYOUT.pack(
        1, 0, 7, 0, 0, 0, 1, 1, ktel_api.LOG, 13, 4, bytes(range(1, 17)), b"n" * 64, b"k" * 512, b"m" * 256
    )
    event = ktel_api.decode(full, 0)  # the largest kernel log
    n = 2000
    weights = [1.5] * n
    with contextlib.closing(agent.spool):
        parts = agent.encoded(packed([event] * n), weights)
        [(after, _)] = agent.encoded(packed(file_events(1)), [1.0])
    assert len(parts) > 8
    assert all(len(payload) <= 64 << 10 for _, payload in parts)
    decoded = [decode_batch(payload) for _, payload in parts]
    # Every event once, in order, each part numbered after the one before it.
    assert sum(len(b.events) for b in decoded) == n
    assert all(b.events == [event] * len(b.events) and b.weights == [1.5] * len(b.events) for b in decoded)
    seqs = [b.seq for b in decoded]
    assert seqs == list(range(seqs[0], seqs[0] + len(parts)))
    assert [b.seq for b, _ in parts] == seqs
    # The next batch is numbered after them.
    assert after.seq == seqs[-1] + 1


def test_one_event_larger_than_the_limit_stays_one_batch(tmp_path):
    a = make_agent(tmp_path, batch_max_bytes=4096)
    with contextlib.closing(a.spool):
        big = [1, 1, 100, 100, 0, "touch", "/" + "p" * 5000, 0o101, True]
        [(batch, payload)] = a.encoded(packed([big]), [1.0])
        # Its encoding is past the limit, and it is not split further.
        assert len(encode_batch(decode_batch(payload))) > 4096 and decode_batch(payload).events == [big]


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
async def test_batches_are_spooled_compressed_by_the_agent_only_with_zstd(tmp_path, codec):
    a = make_agent(tmp_path, compression=codec)
    with contextlib.closing(a.spool):
        [(batch, payload)] = a.encoded(packed(file_events(2000)), [1.0] * 2000)
    plain = encode_batch(decode_batch(payload))
    producer = a._new_producer()
    await producer.stop()  # (never started: stopped so that nothing of it is left open)
    if codec == "zstd":
        # One zstd frame, a small part of the batch's bytes; Kafka is asked for no codec.
        assert payload[:4] == ZSTD_MAGIC and len(payload) < len(plain) / 4
        assert producer._compression_type is None
    else:
        # Kafka's codec compresses them (lz4), or nothing does.
        assert payload == plain
        assert producer._compression_type == (None if codec == "none" else codec)


def test_a_heartbeat_reports_the_agents_counters(agent):
    a = agent
    before, _ = a.heartbeat(1.0, {}, [], {})
    agent_mod.EVENTS_PUBLISHED.inc(7)
    agent_mod.DISK_DROPPED.inc(3)
    after, _ = a.heartbeat(1.0, before["counters"], [], {})
    assert after["counters"]["events_published"] - before["counters"]["events_published"] == 7
    assert after["counters"]["disk_dropped_events"] - before["counters"]["disk_dropped_events"] == 3
    assert after["rates"]["events_published"] == 7.0


def test_heartbeats_are_numbered_upwards_within_the_boot_across_agent_restarts(tmp_path, monkeypatch):
    """The workers order a boot's heartbeats by ``seq`` (ktel/wire/control.py): it goes
    up whatever the wall clock does, and an agent started again in the same boot goes
    on above the numbers of the one before."""
    wall = [1_700_000_000_000_000_000]
    monkeypatch.setattr(agent_mod.time, "time_ns", lambda: wall[0])
    first = make_agent(tmp_path / "a")
    one, _ = first.heartbeat(1.0, {}, [], {})
    wall[0] -= 3600 * 10**9  # the node's clock set back an hour
    two, _ = first.heartbeat(1.0, {}, [], {})
    again, _ = make_agent(tmp_path / "b").heartbeat(1.0, {}, [], {})  # (its restart)
    assert two["ts"] < one["ts"]
    assert one["seq"] < two["seq"] < again["seq"]


def test_a_heartbeat_names_the_host_as_configured_else_by_its_kernel_host_name(tmp_path):
    """In a pod the kernel's host name is the pod's (a new one at each rollout): the Helm
    chart gives the node's name as agent.host_name."""
    hb, _ = make_agent(tmp_path / "a").heartbeat(1.0, {}, [], {})
    assert hb["host"]["host.name"] == socket.gethostname()
    hb, _ = make_agent(tmp_path / "b", host_name="node-7").heartbeat(1.0, {}, [], {})
    assert hb["host"]["host.name"] == "node-7"


def test_a_flood_of_commands_leaves_heartbeats_that_kafka_takes(agent, caplog):
    """Whatever ktel.control holds, the heartbeat carrying its acknowledgements and refusals
    (with the most containers the agent lists) stays within a Kafka record: one refused as
    too large would be carried again by the next, and the host fall silent for good."""
    caplog.set_level(logging.ERROR, "ktel.control")  # (a warning for each refusal)
    ctl, t0 = agent.control, control_mod.now_ms()
    for i in range(2 * control_mod.MAX_PENDING_ACKS):
        # Ids of 512 characters as long in UTF-8 as characters can be (4 bytes each).
        long_id = f"{i:08d}" + "\U0001f600" * 503
        ctl.handle(ControlCommand(long_id, "*", "file_created", 10, t0 + 60_000, 60_000), t0, now=t0)
        ctl.handle(ControlCommand(long_id + "r", "*", "\U0001f600" * 64, 10, t0 + 60_000, 60_000), t0, now=t0)
    containers = [
        [
            i + 1,
            {
                "container.id": f"{i:064x}",
                "container.runtime.name": "containerd",
                "k8s.pod.uid": str(uuid.UUID(int=i)),
            },
        ]
        for i in range(containers_mod.MAX_CONTAINERS)
    ]
    hb, _ = agent.heartbeat(1.0, {}, containers, {})
    assert hb["acked_commands"] and hb["refused_commands"]
    assert len(encode_heartbeat(hb)) <= SEND_MAX_BYTES


class FedProbe:
    """A loaded probe whose ring buffer held ``runs`` (LoadedProbe's decoding, no BPF)."""

    spec = file_created.PROBE
    decode = probes_mod.LoadedProbe.decode
    pack = probes_mod.LoadedProbe.pack

    def __init__(self, runs):
        self.runs = runs

    def maybe_snapshot(self):
        return []

    def take(self):
        runs, self.runs = self.runs, []
        return runs


@pytest.mark.parametrize("masked", [False, True])
def test_drained_events_are_held_packed_and_masked_by_the_agents_rules(tmp_path, masked):
    rules = [RedactRule(kind="file_created", field="path", pattern=r"^/home/[^/]+", replacement="/home/*")]
    a = make_agent(tmp_path, redact=rules if masked else [])
    with contextlib.closing(a.spool):
        run = run_of([fc_record(0, b"/home/alice/x"), fc_record(1, b"/tmp/y")])
        a.loaded = {"file_created": FedProbe([run])}
        pending = PackedEvents()
        weights: list[float] = []
        a.drain_once(pending, weights)
    events = [msgpack.unpackb(p) for p in pending]
    assert [ev[6] for ev in events] == ["/home/*/x" if masked else "/home/alice/x", "/tmp/y"]
    assert [ev[2] for ev in events] == [40, 41] and weights == [1.0, 1.0]


def test_a_state_dir_that_cannot_be_used_names_the_setting_and_the_fix(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError) as stop:
        make_agent(tmp_path / "a-file" / "state")
    said = str(stop.value)
    assert said.startswith(
        f"agent.state_dir = '{tmp_path / 'a-file' / 'state'}': cannot be used (Not a directory"
    )
    assert "set agent.state_dir (KTEL_AGENT__STATE_DIR)" in said


def test_an_empty_default_host_id_stops_the_agent_naming_the_setting(tmp_path, monkeypatch):
    # Every process reads the default, /etc/machine-id; only the agent needs it.
    monkeypatch.setattr(config, "_read_id", lambda path: "")
    acfg = AgentConfig(state_dir=tmp_path, cgroup_root=tmp_path)
    assert acfg.host_id == ""  # what the processors and exporters load, and ignore
    with pytest.raises(ConfigError) as stop:
        agent_mod.Agent(Config(agent=acfg))
    assert "agent.host_id is empty" in str(stop.value)
    assert "set agent.host_id (KTEL_AGENT__HOST_ID)" in str(stop.value)


def disk_dropped() -> float:
    return REGISTRY.get_sample_value("ktel_agent_disk_dropped_events_total") or 0.0


@pytest.mark.parametrize("first_start", [False, True])
def test_a_full_disk_at_start_does_not_stop_the_agent_its_batches_are_counted(
    tmp_path, monkeypatch, first_start
):
    """A full disk passes, unlike a read-only state directory: the agent starts (even
    where it has no state directory yet), counts what it cannot spool as it does when
    the disk fills while it runs, and spools again once space returns."""
    state = tmp_path / "state"
    if not first_start:
        (state / "spool").mkdir(parents=True)
    real_open, real_mkdir = os.open, os.mkdir

    def no_space(path, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(
        os, "mkdir", lambda path, *a: (real_mkdir if os.path.isdir(path) else no_space)(path, *a)
    )
    monkeypatch.setattr(
        os, "open", lambda path, flags, *a: (no_space if flags & os.O_CREAT else real_open)(path, flags, *a)
    )
    a = make_agent(state)
    with contextlib.closing(a.spool):
        before = disk_dropped()
        a.spool_batch(packed(file_events(3)), [1.0] * 3)
        assert disk_dropped() - before == 3 and a.disk_failing
        monkeypatch.undo()
        a.spool_batch(packed(file_events(2)), [1.0] * 2)
        assert disk_dropped() - before == 3 and not a.disk_failing
        [rec] = a.spool.read(a.spool.ack_cursor)
        assert decode_batch(rec.payload).events == file_events(2)


@pytest.mark.parametrize("existing", [False, True])
def test_a_read_only_state_dir_stops_ktel_agent_with_one_line_not_a_traceback(
    tmp_path, monkeypatch, capsys, existing
):
    """What `ktel agent` prints and exits with, as for any setting found unusable."""
    state = tmp_path / "state"
    if existing:
        (state / "spool").mkdir(parents=True)
        (state / "batch-seq").write_text("c" * 32 + " 4096\n")

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(os, "chmod", read_only)
    monkeypatch.setattr(os, "mkdir", read_only)
    monkeypatch.setenv("KTEL_AGENT__STATE_DIR", str(state))
    monkeypatch.setenv("KTEL_AGENT__HOST_ID", "h")
    monkeypatch.setenv("KTEL_AGENT__CGROUP_ROOT", str(tmp_path))
    with pytest.raises(SystemExit) as stop:
        cli.main(["agent"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert err.startswith(f"ktel: agent.state_dir = '{state}': cannot be used (Read-only file system: ")
    assert "not read-only" in err and err.count("\n") == 1
