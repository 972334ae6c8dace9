"""Hostile input on every topic ktel reads, against the real pipeline.

A real broker; the agent (whose control follower reads ``ktel.control``), the fused
processing worker ``ktel process all`` (``ktel.raw`` and ``ktel.heartbeats``), the
remote-write exporter into a real Prometheus, the pull endpoint (``ktel.metrics``)
and the OTLP exporter into a real Collector (``ktel.metrics``, ``ktel.spans``,
``ktel.logs``), each its own process. Good records, published as an agent and a
processing stage publish them, are mixed with bad ones, made from valid records of
every kind by breaking one field at a time (type, range, size, nesting, encoding)
and by keying them as another host. Every process must stay up; ``ktel.dlq`` must
hold exactly the bad records, per consumer and source topic, with their reasons;
the agent, which may not write ``ktel.dlq``, must count exactly the bad commands it
refused; the good workload must be counted exactly at the pull endpoint and in
Prometheus, which must still take a sample afterwards.
"""

from __future__ import annotations

import asyncio
import copy
import math
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families

from ktel.stack.otelcol import LocalCollector
from ktel.stack.proc import free_port
from ktel.wire import (
    CONTROL_TOPIC,
    DLQ_TOPIC,
    FILE_CREATED,
    HEARTBEATS_TOPIC,
    LOGS_TOPIC,
    METRICS_TOPIC,
    RAW_TOPIC,
    SPANS_TOPIC,
    ControlCommand,
    LogBatch,
    MetricSnapshot,
    RawBatch,
    SpanBatch,
    WireError,
    decode_batch,
    decode_command,
    decode_dead_letter,
    decode_heartbeat,
    decode_logs,
    decode_snapshot,
    decode_spans,
    encode_batch,
    encode_command,
    encode_heartbeat,
    encode_logs,
    encode_snapshot,
    encode_spans,
)
from tests.conftest import need_bpf
from tests.integration.agent_harness import AgentProcess, read_topic
from tests.unit.test_wire_golden import EVENTS, HEARTBEAT

pytestmark = [pytest.mark.system, pytest.mark.kafka]

BAD_PER_TOPIC = 1000  # on each of the six input topics: 6000 bad records in all
# What a field must refuse, whatever it is: other types, out of range, too long, nested.
WRONG: list[Any] = [
    None,
    True,
    -1,
    -(2**63),
    2**64 - 1,
    1.5,
    math.nan,
    math.inf,
    "x" * 5000,
    b"\x00" * 20,
    [],
    [[["deep"]]],
    {},
    {"k": [1]},
]


def paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every position in a decoded record (map keys and array indexes), outermost first."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, (*prefix, i))
    return out


def replaced(obj: Any, path: tuple, value: Any) -> Any:
    """``obj`` with the value at ``path`` replaced (``...``: that map key removed)."""
    obj = copy.deepcopy(obj)
    parent = obj
    for step in path[:-1]:
        parent = parent[step]
    if value is ...:
        if not isinstance(parent, dict):
            return None
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


def refused(decode, data: bytes) -> bool:
    try:
        decode(data)
    except WireError:
        return True
    return False


def broken(valid: bytes, decode, rng: random.Random, n: int) -> list[bytes]:
    """``n`` records the decoder refuses, each ``valid`` with one thing broken: a field
    given a wrong value or removed, the encoding, or the nesting."""
    obj = msgpack.unpackb(valid, raw=False)
    candidates = set()
    for path in paths(obj):
        for value in [*WRONG, ...]:
            changed = replaced(obj, path, value)
            if changed is not None:
                candidates.add(msgpack.packb(changed, use_bin_type=True))
    marker = msgpack.packb(replaced(obj, paths(obj)[-1], "@@@@"))
    candidates |= {
        marker.replace(b"\xa4@@@@", b"\xa4\xff\xfe\xfd\xfc"),  # not UTF-8
        marker.replace(b"\xa4@@@@", b"\x91" * 5000 + b"\xa1x"),  # nested 5000 deep
        valid[: len(valid) // 2],  # cut short
        b"\xc1" + valid,  # not msgpack
    }
    bad = sorted(c for c in candidates if refused(decode, c))
    assert len(bad) >= 100, f"only {len(bad)} ways to break the record"
    picked = rng.sample(bad, min(n, len(bad)))
    while len(picked) < n:  # the rest: each way again, or garbage
        picked.append(rng.choice(bad) if len(picked) % 2 else rng.randbytes(rng.randint(1, 300)))
    assert all(refused(decode, p) for p in picked)
    return picked


class Proc:
    """One ktel command, its own process."""

    def __init__(self, tmp_path: Path, name: str, args: list[str], env: dict[str, str], port: int, own: str):
        """``own``: a metric only this process serves on ``port`` (the port is this one's)."""
        self.name, self.port, self.own = name, port, own
        self.log = tmp_path / f"{name}.log"
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ktel.cli", *args], env=env, stdout=f, stderr=f
            )
        self.pid = self.proc.pid

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"{self.name} exited:\n{self.log.read_text()[-3000:]}"
        try:
            text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", trust_env=False, timeout=2).text
        except httpx.TransportError:
            return False
        assert self.own in text, f"port {self.port} is not {self.name}'s"
        return True

    def metric(self, name: str, **labels: str) -> float:
        assert self.proc.poll() is None, f"{self.name} exited:\n{self.log.read_text()[-3000:]}"
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", trust_env=False, timeout=5).text
        return sum(
            s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for(what: str, fn, timeout: float = 120):
    """Poll ``fn`` until it returns a truthy value (a guard against hanging, not a timed assertion)."""
    deadline = time.monotonic() + timeout
    while not (value := fn()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(1)
    return value


async def produce(bootstrap: str, records: list[tuple[str, bytes, bytes | None]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=1 << 20)
    await producer.start()
    try:
        for topic, key, value in records:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


async def committed_topics(bootstrap: str, group: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {tp.topic for tp in await admin.list_consumer_group_offsets(group)}
    finally:
        await admin.close()


@pytest.fixture
def collector(tmp_path):
    with LocalCollector(tmp_path / "otelcol", free_port(), free_port()) as col:
        yield col


@pytest.fixture
def bpf():
    need_bpf()  # the agent; checked before the servers start


def test_bad_records_on_every_topic_are_dead_lettered_and_the_good_ones_counted_exactly(
    bpf, private_kafka, prometheus, collector, tmp_path
):
    run = uuid.uuid4().hex[:8]
    rng = random.Random(run)
    hosts = [f"hx-{run}-{i}" for i in range(3)]
    agent_host, snap_host = f"hx-{run}-agent", f"hx-{run}-m"
    ports = {k: free_port() for k in ("process", "rw", "pull", "pull-metrics", "otlp")}
    env = dict(
        os.environ,
        KTEL_KAFKA__BOOTSTRAP=private_kafka.bootstrap,
        KTEL_AGENT__HOST_ID=agent_host,
        KTEL_AGGREGATE__WINDOW_SECONDS="1",
        KTEL_PROCESS__METRICS_PORT=str(ports["process"]),
        KTEL_PROCESS__DATA_DIR=str(tmp_path / "process"),
        KTEL_REMOTE_WRITE__URL=prometheus.remote_write_url,
        KTEL_REMOTE_WRITE__METRICS_PORT=str(ports["rw"]),
        KTEL_PULL__PORT=str(ports["pull"]),
        KTEL_PULL__METRICS_PORT=str(ports["pull-metrics"]),
        KTEL_OTLP__PROTOCOL="grpc",
        KTEL_OTLP__ENDPOINT=collector.grpc_endpoint,
        KTEL_OTLP__METRICS_PORT=str(ports["otlp"]),
    )
    procs = [
        Proc(tmp_path, "process", ["process", "all"], env, ports["process"], "ktel_processor_heartbeats"),
        Proc(tmp_path, "remote-write", ["export", "remote-write"], env, ports["rw"], "ktel_exporter_samples"),
        Proc(tmp_path, "pull", ["export", "pull"], env, ports["pull-metrics"], "ktel_exporter_pull_expired"),
        Proc(tmp_path, "otlp", ["export", "otlp"], env, ports["otlp"], "ktel_exporter_otlp_items"),
    ]
    # oom_kill: a probe that sends next to nothing, so the agent's own batches stay few.
    agent = AgentProcess(tmp_path, private_kafka.bootstrap, host_id=agent_host, probes='["oom_kill"]')
    try:
        agent.start()
        for p in procs:
            wait_for(f"{p.name} up", p.ready)
        pids = {p.name: p.pid for p in procs} | {"agent": agent.proc.pid}
        now_ns = time.time_ns()
        now_ms = now_ns // 1_000_000

        # --- the good workload, as agents and a processing stage write it
        good: list[tuple[str, bytes, bytes]] = []
        expected_files: dict[tuple[str, str], float] = {}
        for seq in range(10):
            for h in hosts:
                directory = f"/hx/{run}/d{seq % 2}"
                ev = [FILE_CREATED.id, now_ns, 2, 2, 0, "w", f"{directory}/f", 0o101, False]
                good.append((RAW_TOPIC, h.encode(), encode_batch(RawBatch(h, "boot", seq, now_ns, [ev] * 5))))
                expected_files[h, directory] = expected_files.get((h, directory), 0) + 5
        heartbeats = []
        for h in hosts:
            hb = {**copy.deepcopy(HEARTBEAT), "ts": now_ms, "containers": []}
            hb["host"] = {**hb["host"], "host.id": h, "boot.id": "boot"}
            heartbeats.append((HEARTBEATS_TOPIC, h.encode(), encode_heartbeat(hb)))
        good += heartbeats
        snap_key = snap_host.encode()
        for i in range(1, 6):
            series = [["hx_value", "gauge", {"host.id": snap_host, "run": run}, float(i)]]
            good.append((METRICS_TOPIC, snap_key, encode_snapshot(MetricSnapshot(now_ms + i, series))))
        resource = {"host.id": snap_host, "ktel.run": run}
        span_row = [
            b"\x01" * 16,
            b"\x02" * 8,
            b"",
            "good-span",
            now_ns,
            now_ns + 1000,
            0,
            "",
            {"ktel.run": run},
        ]
        log_row = [now_ns, 9, "INFO", f"good log {run}", {}, b"", b""]
        good_spans = [
            (SPANS_TOPIC, snap_key, encode_spans(SpanBatch(resource, [span_row]))) for _ in range(3)
        ]
        good_logs = [(LOGS_TOPIC, snap_key, encode_logs(LogBatch(resource, [log_row]))) for _ in range(3)]
        good += good_spans + good_logs
        commands = [
            ControlCommand(f"hx-{run}-{i}", agent_host, "oom_kill", 2, now_ms + 60_000, 60_000)
            for i in range(3)
        ]
        good += [(CONTROL_TOPIC, c.key, encode_command(c)) for c in commands]

        # --- the bad ones: each valid record above with one thing broken
        valid_batch = encode_batch(RawBatch(hosts[0], "boot", 99, now_ns, [list(e) for e in EVENTS]))
        bad: dict[str, list[tuple[bytes, bytes | None]]] = {}
        bad[RAW_TOPIC] = [
            (hosts[0].encode(), b) for b in broken(valid_batch, decode_batch, rng, BAD_PER_TOPIC - 10)
        ]
        # Valid, but keyed as another host: its key decides the worker and the state it writes.
        bad[RAW_TOPIC] += [(hosts[1].encode(), valid_batch)] * 10
        # Keyed as its host, but that host is "*", ktel.control's every host: a spike of it
        # would have the sample stage command the whole fleet.
        bad[RAW_TOPIC] += [(b"*", encode_batch(RawBatch("*", "boot", 0, now_ns, [list(e) for e in EVENTS])))]
        valid_hb = heartbeats[0][2]
        bad[HEARTBEATS_TOPIC] = [
            (hosts[0].encode(), b) for b in broken(valid_hb, decode_heartbeat, rng, BAD_PER_TOPIC - 10)
        ]
        bad[HEARTBEATS_TOPIC] += [(hosts[1].encode(), valid_hb)] * 10
        hist = {"count": 3, "sum": 1.0, "bounds": [1.0], "counts": [1, 2]}
        valid_snap = encode_snapshot(
            MetricSnapshot(
                now_ms,
                [
                    ["hx_h", "histogram", {"host.id": snap_host}, hist],
                    ["hx_c_total", "counter", {"host.id": snap_host}, 1],
                ],
            )
        )
        bad[METRICS_TOPIC] = [
            (snap_key, b) for b in broken(valid_snap, decode_snapshot, rng, BAD_PER_TOPIC - 10)
        ]
        # Valid, but two hours ahead of every exporter's clock.
        ahead = [["hx_value", "gauge", {"host.id": snap_host, "run": run}, -1.0]]
        bad[METRICS_TOPIC] += [
            (snap_key, encode_snapshot(MetricSnapshot(now_ms + 7_200_000 + i, ahead))) for i in range(10)
        ]
        bad[SPANS_TOPIC] = [(snap_key, b) for b in broken(good_spans[0][2], decode_spans, rng, BAD_PER_TOPIC)]
        bad[LOGS_TOPIC] = [(snap_key, b) for b in broken(good_logs[0][2], decode_logs, rng, BAD_PER_TOPIC)]
        valid_cmd = encode_command(commands[0])
        bad[CONTROL_TOPIC] = [
            (agent_host.encode(), b) for b in broken(valid_cmd, decode_command, rng, BAD_PER_TOPIC - 30)
        ]
        # Decodable, but out of the agent's bounds: an unknown probe, 1 in 10^7, a week.
        for i in range(10):
            for probe, every, ttl in (
                ("nope", 2, 60_000),
                ("oom_kill", 10**7, 60_000),
                ("oom_kill", 2, 7 * 86_400_000),
            ):
                c = ControlCommand(
                    f"hx-{run}-bad-{probe}-{every}-{ttl}-{i}", agent_host, probe, every, now_ms + ttl, ttl
                )
                bad[CONTROL_TOPIC].append((c.key, encode_command(c)))
        # And on every topic a record with no value (a tombstone), which any client allowed
        # to write the topic can send.
        for recs in bad.values():
            recs.append((recs[0][0], None))
        # And one as large as Kafka takes by default (1 MiB, key and value), whose dead
        # letter must still fit ktel.dlq.
        huge = rng.randbytes(1_040_000)
        for recs in bad.values():
            recs.append((b"k" * 2000, huge))
        assert all(len(recs) >= 1000 for recs in bad.values()) and len(bad) == 6

        mixed = [(t, k, v) for t, recs in bad.items() for k, v in recs]
        rng.shuffle(mixed)
        # Each topic's good records keep their order (a host's batches and snapshots are in sequence).
        records = sorted(good + mixed, key=lambda r: rng.random())
        order = {id(r): i for i, r in enumerate(good)}
        slots = sorted(i for i, r in enumerate(records) if id(r) in order)
        for slot, r in zip(slots, good, strict=True):
            records[slot] = r
        asyncio.run(produce(private_kafka.bootstrap, records))

        # --- the DLQ: exactly the bad records, per consumer and source topic
        expected_letters = Counter()
        for topic, recs in bad.items():
            stages = {
                RAW_TOPIC: ["all"],
                HEARTBEATS_TOPIC: ["all"],
                METRICS_TOPIC: ["remote-write", "pull", "otlp"],
                SPANS_TOPIC: ["otlp"],
                LOGS_TOPIC: ["otlp"],
                CONTROL_TOPIC: [],  # the agent counts them: it may not write ktel.dlq
            }[topic]
            for stage in stages:
                expected_letters[stage, topic] += len(recs)

        def letters():
            got = [
                decode_dead_letter(r.value)
                for r in asyncio.run(read_topic(private_kafka.bootstrap, DLQ_TOPIC, idle_s=2))
            ]
            return got if len(got) >= sum(expected_letters.values()) else None

        dead = wait_for("the dead letters", letters, timeout=240)
        assert Counter((d.stage, d.topic) for d in dead) == expected_letters
        assert all(d.reason for d in dead)

        def whole(d) -> bytes:
            """The payload of the record dead-lettered (that of the one near Kafka's limit
            is cut to fit, which its reason says)."""
            if "payload cut to fit ktel.dlq" not in d.reason:
                return d.payload
            assert huge.startswith(d.payload) and len(d.payload) > 900_000
            return huge

        assert sum("payload cut to fit ktel.dlq" in d.reason for d in dead) == 7  # (the records' consumers)
        for topic, recs in bad.items():
            for stage in {d.stage for d in dead if d.topic == topic}:
                assert Counter(whole(d) for d in dead if (d.stage, d.topic) == (stage, topic)) == Counter(
                    b"" if v is None else v for _k, v in recs
                ), (stage, topic)
        assert sum("is not its host" in d.reason for d in dead) == 20  # the mis-keyed batches and heartbeats
        assert sum("ahead of the exporter's clock" in d.reason for d in dead) == 30

        # --- the agent counted every bad command and applied the good ones
        def refusals() -> dict[str, float]:
            return {
                dict(labels)["reason"]: v
                for (name, labels), v in agent.metrics().items()
                if name == "ktel_agent_commands_refused_total"
            }

        def agent_counted() -> bool:
            applied = agent.metric("ktel_agent_commands_applied_total")
            return sum(refusals().values()) >= len(bad[CONTROL_TOPIC]) and applied >= len(commands)

        wait_for("the agent's command counts", agent_counted)
        refused = refusals()
        assert sum(refused.values()) == len(bad[CONTROL_TOPIC])
        assert refused["undecodable"] == BAD_PER_TOPIC - 30 + 2  # (and the tombstone, and the 1 MiB one)
        assert agent.metric("ktel_agent_commands_applied_total") == len(commands)

        # --- the good workload, exactly: at the pull endpoint and in Prometheus
        def pulled() -> dict:
            # Alive, so the port answering is its own (a process that lost a race for its
            # port to another exits).
            assert procs[2].proc.poll() is None, procs[2].log.read_text()[-3000:]
            resp = httpx.get(f"http://127.0.0.1:{ports['pull']}/metrics", trust_env=False, timeout=5)
            if resp.status_code == 503:
                return {}  # (reading its lookback of ktel.metrics: nothing served yet)
            text = resp.text
            out = {}
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    if s.labels.get("host_id", "").startswith(f"hx-{run}-"):
                        out[s.name, s.labels["host_id"], s.labels.get("directory", "")] = s.value
            return out

        want_pull = {("file_created_total", h, d): n for (h, d), n in expected_files.items()}
        want_pull[("hx_value", snap_host, "")] = 5.0
        wait_for("the good counts at the pull endpoint", lambda: pulled() == want_pull)

        def in_prometheus() -> dict:
            # Every series of this run's hosts in the last hour, each its last sample: an
            # instant query would miss the snapshots sent once, at the start, on a machine
            # slow enough to reach this check 5 minutes later (Prometheus' look-back).
            rows = prometheus.query(f'{{host_id=~"hx-{run}-.*"}}[1h]')
            return {
                (r["metric"]["__name__"], r["metric"]["host_id"], r["metric"].get("directory", "")): float(
                    r["values"][-1][1]
                )
                for r in rows
            }

        assert wait_for("the good counts in Prometheus", lambda: in_prometheus() == want_pull) is True
        # Prometheus still takes samples: nothing bad stopped it (e.g. a sample from the future).
        later = MetricSnapshot(
            time.time_ns() // 1_000_000, [["hx_value", "gauge", {"host.id": snap_host, "run": run}, 6.0]]
        )
        asyncio.run(produce(private_kafka.bootstrap, [(METRICS_TOPIC, snap_key, encode_snapshot(later))]))
        wait_for(
            "a later sample in Prometheus", lambda: in_prometheus().get(("hx_value", snap_host, "")) == 6.0
        )
        # The Collector got the good spans and logs, each once.
        mine = lambda items: [i for i in items if i["resource"].get("ktel.run") == run]  # noqa: E731
        wait_for(
            "the good spans and logs at the Collector",
            lambda: len(mine(collector.spans())) >= 3 and len(mine(collector.logs())) >= 3,
        )
        assert len(mine(collector.spans())) == 3 and len(mine(collector.logs())) == 3

        # --- who reads what, and everyone still up, never restarted
        # (Faust commits every few seconds, so a group's first commit may come after the
        # counts it made reached the backends.)
        readers = {
            "ktel-all": {RAW_TOPIC, HEARTBEATS_TOPIC},
            "ktel-export-remote-write": {METRICS_TOPIC},
            "ktel-export-otlp": {METRICS_TOPIC, SPANS_TOPIC, LOGS_TOPIC},
        }
        committed = lambda g: asyncio.run(committed_topics(private_kafka.bootstrap, g))  # noqa: E731
        wait_for("each group's commits", lambda: all(want <= committed(g) for g, want in readers.items()))
        assert {g: committed(g) for g in readers} == readers
        # (the pull endpoint and the agent's control follower read without a group)
        assert {p.name: p.proc.poll() for p in procs} | {"agent": agent.proc.poll()} == dict.fromkeys(pids)
        assert {p.name: p.pid for p in procs} | {"agent": agent.proc.pid} == pids
        # Each counted what it dead-lettered, and the worker took the good heartbeats (and
        # the agent's own).
        process, remote_write, pull, otlp = procs
        assert process.metric("ktel_processor_dead_letters_total") == len(bad[RAW_TOPIC]) + len(
            bad[HEARTBEATS_TOPIC]
        )
        assert process.metric("ktel_processor_heartbeats_total") >= len(hosts)
        assert remote_write.metric("ktel_exporter_dead_letters_total") == len(bad[METRICS_TOPIC])
        assert pull.metric("ktel_exporter_dead_letters_total") == len(bad[METRICS_TOPIC])
        assert otlp.metric("ktel_exporter_dead_letters_total") == sum(
            len(bad[t]) for t in (METRICS_TOPIC, SPANS_TOPIC, LOGS_TOPIC)
        )
    finally:
        for p in procs:
            p.stop()
        agent.stop()
