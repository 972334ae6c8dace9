"""The pull endpoint after a restart (exporters/pull.py): it reads a lookback of
ktel.metrics, oldest first, and serves nothing until it has read what was there when
it started. A stub consumer stands for the broker; tests/integration/test_pull_start.py
runs the endpoint against a real one."""

from __future__ import annotations

import asyncio
import time

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord, OffsetAndTimestamp
from prometheus_client.parser import text_string_to_metric_families

from exporters import consume, pull
from ktel import config, selfmetrics
from ktel.wire import MetricSnapshot, encode_snapshot

TP = TopicPartition("ktel.metrics", 0)


def record(offset: int, ts_ms: int, value: float) -> ConsumerRecord:
    data = encode_snapshot(MetricSnapshot(ts_ms, [["ops", "counter", {"host.id": "h1"}, value]]))
    return ConsumerRecord(TP.topic, TP.partition, offset, ts_ms, 0, b"h1", data, None, 2, len(data), ())


class Consumer:
    """ktel.metrics[0] holds two snapshots of one counter within the lookback, 900 two
    minutes ago and 1000 just now (what Prometheus scraped before the restart), fetched
    one at a time, as a backlog of many is; ``scrape`` is called before each fetch."""

    def __init__(self, now_ms: int, scrape, stop: asyncio.Event) -> None:
        self.fetches = [[record(0, now_ms - 120_000, 900.0)], [record(1, now_ms - 5_000, 1000.0)]]
        self.scrape, self.done, self.at = scrape, stop, 0
        self.held: set[TopicPartition] = set()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def assign(self, parts) -> None:
        self.parts = parts

    def assignment(self):
        return set(self.parts)

    async def end_offsets(self, parts):
        return dict.fromkeys(parts, 2)

    async def offsets_for_times(self, timestamps):
        return {tp: OffsetAndTimestamp(0, 0) for tp in timestamps}

    def seek(self, tp, offset) -> None:
        self.at = offset

    async def position(self, tp) -> int:
        return self.at

    def highwater(self, tp) -> int:
        return 2

    def paused(self):
        return set(self.held)

    def pause(self, *parts) -> None:
        self.held |= set(parts)

    def resume(self, *parts) -> None:
        self.held -= set(parts)

    async def getmany(self, *parts, timeout_ms=0):
        if self.held:
            await asyncio.sleep(0)
            return {}  # (the exporter polls while it delivers: its partitions paused)
        self.scrape()
        if not self.fetches:
            self.done.set()
            return {}
        fetched = self.fetches.pop(0)
        self.at = fetched[-1].offset + 1
        return {TP: fetched}


class Producer:
    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def partitions_for(self, topic):
        return {0}


async def test_nothing_is_served_until_the_lookback_is_read_so_no_counter_goes_back(monkeypatch):
    """A scrape while the lookback is read would serve 900 after the 1000 Prometheus
    scraped before the restart: a counter reset to it, which rate() and increase() count
    again. Until then a scrape is a 503 (a gap in the series)."""
    apps = {}
    scraped: list[tuple[str, str]] = []

    def serve(port, host, setting, registry=selfmetrics.REGISTRY, *args, unserved=None, **kwargs):
        apps[setting] = selfmetrics.app(registry, None, unserved)

    def scrape() -> None:
        if "pull.port" in apps:
            answer: list[str] = []
            request = {"PATH_INFO": "/metrics", "REQUEST_METHOD": "GET", "QUERY_STRING": ""}
            body = apps["pull.port"](request, lambda status, headers: answer.append(status))
            scraped.append((answer[0], b"".join(body).decode()))

    stop = asyncio.Event()
    consumer = Consumer(time.time_ns() // 1_000_000, scrape, stop)
    monkeypatch.setattr(consume, "AIOKafkaConsumer", lambda **kw: consumer)
    monkeypatch.setattr(consume, "AIOKafkaProducer", lambda **kw: Producer())
    monkeypatch.setattr(consume, "tune_gc", lambda: None)
    monkeypatch.setattr(consume.selfmetrics, "ready_when", lambda check: None)
    monkeypatch.setattr(pull.selfmetrics, "serve", serve)
    await asyncio.wait_for(pull.run(config.Config(agent=config.AgentConfig(host_id="t")), stop), 10)
    statuses = [status for status, _ in scraped]
    assert statuses == ["503 Service Unavailable"] * 2 + ["200 OK"], scraped
    assert scraped[0][1].startswith("not served yet: reading the last")
    [(_, text)] = [s for s in scraped if s[0] == "200 OK"]
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert values["ops_total"] == 1000.0
