"""Remote-write delivery rules against a scripted receiver on loopback: 5xx, 429 and
404 (no receiver at the URL yet) are retried until the receiver recovers; a 400 is
not retried, and the snapshot whose
samples it refused goes to the real ``ktel.dlq`` as it was read, with the receiver's
answer."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import snappy
from aiohttp import web
from aiokafka import AIOKafkaProducer
from opentelemetry.exporter.prometheus_remote_write.gen.remote_pb2 import WriteRequest

from exporters import remote_write
from ktel import config, topics
from ktel.topics import create_topics
from ktel.wire import METRICS_TOPIC, MetricSnapshot, encode_snapshot
from tests.integration.agent_harness import dead_letters_of, start_group_at_end

pytestmark = pytest.mark.kafka


def names_in(body: bytes, run: str) -> set[str]:
    """The metric names of this run's series in a remote-write body."""
    req = WriteRequest()
    req.ParseFromString(snappy.uncompress(body))
    out = set()
    for ts in req.timeseries:
        labels = {lb.name: lb.value for lb in ts.labels}
        if labels.get("ktel_run") == run:
            out.add(labels["__name__"])
    return out


class Receiver:
    """Answers by content: ``flaky`` gets 500, 404, 429, then 200; ``refused`` always 400."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.seen: list[tuple[str, int, bytes]] = []  # (name, status answered, body)

    async def handle(self, request: web.Request) -> web.Response:
        assert request.headers["Content-Encoding"] == "snappy"
        assert request.headers["Content-Type"] == "application/x-protobuf"
        assert request.headers["X-Prometheus-Remote-Write-Version"] == "0.1.0"
        body = await request.read()
        names = names_in(body, self.run)
        status, text = 200, ""
        if "flaky" in names:
            tries = sum(1 for n, _, _ in self.seen if n == "flaky")
            status = [500, 404, 429, 200][min(tries, 3)]
            text = "try again"
        elif "refused" in names:
            status, text = 400, f"label value too long (run {self.run})"
        for name in names:
            self.seen.append((name, status, body))
        return web.Response(status=status, text=text)

    def answers(self, name: str) -> list[int]:
        return [s for n, s, _ in self.seen if n == name]


async def wait_for(predicate, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):  # a guard against hanging, not a timing assertion
        while not predicate():
            await asyncio.sleep(0.1)


async def serve(receiver: Receiver, bootstrap: str) -> tuple[web.AppRunner, config.Config]:
    """``receiver`` on a free port, and a config whose remote_write sends to it (its
    topics created); the runner is the caller's to clean up."""
    app = web.Application()
    app.router.add_post("/api/v1/write", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    cfg = config.Config(
        kafka=config.KafkaConfig(bootstrap=bootstrap),
        remote_write=config.RemoteWriteConfig(url=f"http://127.0.0.1:{port}/api/v1/write", metrics_port=0),
    )
    await create_topics(bootstrap, topics.specs(cfg))
    return runner, cfg


async def test_retries_5xx_429_and_404_dead_letters_400(kafka):
    run = uuid.uuid4().hex[:12]
    receiver = Receiver(run)
    runner, cfg = await serve(receiver, kafka.bootstrap)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()

    sent: dict[str, tuple[bytes, int, int]] = {}  # name -> the record's bytes, partition, offset

    async def send(name: str, value: float) -> None:
        snap = MetricSnapshot(time.time_ns() // 1_000_000, [[name, "gauge", {"ktel.run": run}, value]])
        record = encode_snapshot(snap)
        meta = await producer.send_and_wait(METRICS_TOPIC, record, key=run.encode())
        sent[name] = (record, meta.partition, meta.offset)

    # Only this test's records: the session's broker holds other tests' snapshots, which
    # would share requests with these (a refused request is split, each part answered).
    group = f"test-rw-recv-{run}"
    await start_group_at_end(kafka.bootstrap, group, METRICS_TOPIC)
    stop = asyncio.Event()
    exporter = asyncio.create_task(remote_write.run(cfg, stop, group_id=group))
    try:
        await send("flaky", 1.0)
        await wait_for(lambda: 200 in receiver.answers("flaky"))
        # One at a time, so each request holds one of them.
        await send("refused", 2.0)
        await wait_for(lambda: receiver.answers("refused"))
        await send("after", 3.0)
        await wait_for(lambda: receiver.answers("after"))
    finally:
        stop.set()
        await asyncio.wait_for(exporter, 30)
        await producer.stop()
        await runner.cleanup()

    assert receiver.answers("flaky") == [500, 404, 429, 200]
    flaky_bodies = {b for n, _, b in receiver.seen if n == "flaky"}
    assert len(flaky_bodies) == 1  # the same request, re-sent
    # Not retried: the exporter went on to the next record after one 400.
    assert receiver.answers("refused") == [400]
    assert receiver.answers("after") == [200]

    [dl] = await dead_letters_of(kafka.bootstrap, run)
    assert dl.stage == "remote-write"
    assert dl.reason == f"HTTP 400: label value too long (run {run})"
    # The snapshot record the refused samples came from, as read, and where it was.
    assert (dl.topic, dl.payload, dl.partition, dl.offset) == (METRICS_TOPIC, *sent["refused"])


async def test_a_refused_request_is_sent_again_by_snapshot_and_only_the_refused_one_dead_lettered(kafka):
    """Three snapshots read together make one request; the receiver refuses any request
    holding ``refused``. The exporter sends the request's samples again in halves by
    snapshot: the other two arrive once each, and only ``refused`` goes to ktel.dlq."""
    run = uuid.uuid4().hex[:12]
    receiver = Receiver(run)
    runner, cfg = await serve(receiver, kafka.bootstrap)
    group = f"test-rw-split-{run}"
    await start_group_at_end(kafka.bootstrap, group, METRICS_TOPIC)
    now = time.time_ns() // 1_000_000
    records = {
        name: encode_snapshot(MetricSnapshot(now + i, [[name, "gauge", {"ktel.run": run}, float(i)]]))
        for i, name in enumerate(["first", "refused", "last"])
    }
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()
    try:
        for value in records.values():  # one key: one partition, read in one fetch
            await producer.send_and_wait(METRICS_TOPIC, value, key=run.encode())
    finally:
        await producer.stop()

    stop = asyncio.Event()
    exporter = asyncio.create_task(remote_write.run(cfg, stop, group_id=group))
    try:
        await wait_for(lambda: 200 in receiver.answers("last"))
    finally:
        stop.set()
        await asyncio.wait_for(exporter, 30)
        await runner.cleanup()

    # [first refused last] -> [first] [refused last] -> [refused] [last]
    assert receiver.answers("first") == [400, 200]
    assert receiver.answers("refused") == [400, 400, 400]
    assert receiver.answers("last") == [400, 400, 200]
    [dl] = await dead_letters_of(kafka.bootstrap, run)
    assert (dl.stage, dl.topic, dl.payload) == ("remote-write", METRICS_TOPIC, records["refused"])
    assert dl.reason == f"HTTP 400: label value too long (run {run})"
