"""The pull endpoint: ``ktel export pull`` serves the current aggregates at
``/metrics`` in the Prometheus text format, as the Riptides demo does.

Each instance reads every partition of ``ktel.metrics`` from the beginning (no
consumer group: every instance needs the whole picture) and keeps the latest
value of each series.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from exporters import consume
from exporters.prom_names import label_name, prom_labels
from ktel.config import Config
from ktel.wire import MetricSnapshot

log = logging.getLogger("ktel.export.pull")


class LatestValues(Collector):
    def __init__(self) -> None:
        # (name, type) -> sorted label items -> (ts_ms, value)
        self.series: dict[tuple[str, str], dict[tuple[tuple[str, str], ...], tuple[int, float]]] = {}

    def update(self, snapshots: list[MetricSnapshot]) -> None:
        for snap in snapshots:
            for name, typ, labels, value in snap.series:
                by_labels = self.series.setdefault((name, typ), {})
                key = tuple(kv for kv in prom_labels(name, labels) if kv[0] != "__name__")
                old = by_labels.get(key)
                if old is None or old[0] <= snap.ts_ms:
                    by_labels[key] = (snap.ts_ms, value)

    def collect(self):
        for (name, typ), by_labels in list(self.series.items()):
            pname = label_name(name)
            if typ == "counter":
                fam: CounterMetricFamily | GaugeMetricFamily = CounterMetricFamily(
                    pname.removesuffix("_total"), f"ktel aggregate {name}"
                )
            else:
                fam = GaugeMetricFamily(pname, f"ktel aggregate {name}")
            for key, (_ts, value) in by_labels.items():
                fam.add_sample(pname, dict(key), value)
            yield fam


async def run(cfg: Config, stop: asyncio.Event) -> None:
    latest = LatestValues()
    registry = CollectorRegistry()
    registry.register(latest)
    start_http_server(cfg.pull.port, addr=cfg.pull.host, registry=registry)
    log.info("pull endpoint on http://%s:%d/metrics", cfg.pull.host, cfg.pull.port)

    async def deliver(snaps: list[MetricSnapshot], _producer: AIOKafkaProducer) -> None:
        latest.update(snaps)

    await consume.run(bootstrap=cfg.kafka.bootstrap, group_id=None, stage="pull", deliver=deliver, stop=stop)
