"""The pull endpoint: ``ktel export pull`` serves the current aggregates at
``/metrics`` in the Prometheus text format, for Prometheus (or anything) to scrape.

Each instance reads every partition of ``ktel.metrics`` (no consumer group:
every instance needs the whole picture) and keeps the latest value of each
series. It starts ``LOOKBACK_WINDOWS`` aggregation windows back in time
(``offsets_for_times``), not at the beginning of the topic: the aggregate stage
emits every series of every host once a window, so a few windows hold the whole
current picture, and a start no longer reads a day of retained snapshots.

A snapshot further ahead of the endpoint's clock than ``pull.max_future_seconds``
goes to ``ktel.dlq`` instead: kept, its values would stand for their series until
the clock caught up, since the newest value of a series is the one served. An old
snapshot needs no bound: a newer one replaces it. A snapshot marked stale (its
host went silent) removes its series.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from exporters import consume
from exporters.consume import Record
from exporters.delivery import Window
from exporters.prom_names import label_name, prom_labels
from exporters.remote_write import histogram_series
from ktel import selfmetrics
from ktel.config import Config
from ktel.wire import METRICS_TOPIC, MetricSnapshot, decode_snapshot

log = logging.getLogger("ktel.export.pull")

# More than one window, so a snapshot delayed by a slow worker or a rebalance is still read.
LOOKBACK_WINDOWS = 3


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
                if snap.stale:
                    if old is not None and old[0] <= snap.ts_ms:
                        del by_labels[key]
                elif old is None or old[0] <= snap.ts_ms:
                    by_labels[key] = (snap.ts_ms, value)

    def collect(self):
        for (name, typ), by_labels in list(self.series.items()):
            pname = label_name(name)
            fam: Metric
            if typ == "histogram":
                fam = HistogramMetricFamily(pname, f"ktel aggregate {name}")
                for key, (_ts, value) in by_labels.items():
                    for labels, v in histogram_series(name, dict(key), value):
                        sample = dict(labels)
                        fam.add_sample(sample.pop("__name__"), sample, v)
                yield fam
                continue
            if typ == "counter":
                fam = CounterMetricFamily(pname.removesuffix("_total"), f"ktel aggregate {name}")
            else:
                fam = GaugeMetricFamily(pname, f"ktel aggregate {name}")
            for key, (_ts, value) in by_labels.items():
                fam.add_sample(pname, dict(key), value)
            yield fam


async def run(cfg: Config, stop: asyncio.Event) -> None:
    latest = LatestValues()
    registry = CollectorRegistry()
    registry.register(latest)
    # With /healthz and /readyz, like every ktel process's metrics port.
    selfmetrics.serve(cfg.pull.port, cfg.pull.host, "pull.port", registry, "pull.host")

    window = Window(math.inf, cfg.pull.max_future_seconds, "pull")

    async def deliver(records: list[Record], producer: AIOKafkaProducer) -> None:
        now = time.time_ns()
        snaps = []
        for rec in records:
            problem = window.problem(rec.item.ts_ms * 1_000_000, now)
            if problem is None:
                snaps.append(rec.item)
            else:
                items = len(rec.item.series)
                await consume.refuse(producer, "pull", rec, problem, signal="series", items=items)
        latest.update(snaps)

    start_ms = time.time_ns() // 1_000_000 - int(LOOKBACK_WINDOWS * cfg.aggregate.window_seconds * 1000)
    await consume.run(
        kafka=cfg.kafka,
        group_id=None,
        stage="pull",
        topics={METRICS_TOPIC: decode_snapshot},
        deliver=deliver,
        stop=stop,
        start_ms=start_ms,
    )
