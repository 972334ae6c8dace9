"""The pull endpoint: ``ktel export pull`` serves the current aggregates at
``/metrics`` in the Prometheus text format, for Prometheus (or anything) to scrape.

Each instance reads every partition of ``ktel.metrics`` (no consumer group:
every instance needs the whole picture) and keeps the latest value of each
series. It starts ``aggregate.refresh_seconds`` plus ``LOOKBACK_WINDOWS`` aggregation
windows back in time (``offsets_for_times``), not at the beginning of the topic: the
aggregate stage emits a series when it changes and again at least every
``refresh_seconds``, so that span holds the whole current picture, and a start no
longer reads a day of retained snapshots.

Which value of a series is the latest goes by the stream, not by clocks: a
host's snapshots are keyed by its host id, so they are all in one partition of
``ktel.metrics``, in the order they were written, and a series takes the value of
the snapshot furthest along that partition (its offset). Timestamps would let a
worker whose clock runs ahead win over every later snapshot: after a rebalance,
the new owner's values, stamped by a slower clock, would be ignored. A snapshot
marked stale (its host went silent) removes the series it names, if it comes
after their values. A series a snapshot of another partition names (a
mis-keyed writer, or ``ktel.metrics`` repartitioned) takes that snapshot's value
as it is read.

A snapshot further ahead of the endpoint's clock than ``pull.max_future_seconds``
goes to ``ktel.dlq`` instead, as the remote-write exporter sends it there: the
two outputs serve the same values.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

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
from ktel.wire import MetricSnapshot, decode_snapshot

log = logging.getLogger("ktel.export.pull")

# More than one window, so a snapshot delayed by a slow worker or a rebalance is still read.
LOOKBACK_WINDOWS = 3


class LatestValues(Collector):
    def __init__(self) -> None:
        # (name, type) -> sorted label items -> (partition, offset, value): the value and
        # the position in ktel.metrics of the snapshot it came from
        self.series: dict[tuple[str, str], dict[tuple[tuple[str, str], ...], tuple[int, int, Any]]] = {}

    def update(self, snap: MetricSnapshot, partition: int, offset: int) -> None:
        """Take a snapshot read at ``offset`` of ``partition`` (see the module doc)."""
        for name, typ, labels, value in snap.series:
            by_labels = self.series.setdefault((name, typ), {})
            key = tuple(kv for kv in prom_labels(name, labels) if kv[0] != "__name__")
            old = by_labels.get(key)
            later = old is None or old[0] != partition or old[1] < offset
            if not later:
                continue  # an earlier snapshot of the partition: its values are older
            if snap.stale:
                by_labels.pop(key, None)
            else:
                by_labels[key] = (partition, offset, value)

    def collect(self):
        # Runs on the HTTP server's thread while the event loop updates the dicts:
        # each is copied before it is walked.
        for (name, typ), by_labels in list(self.series.items()):
            pname = label_name(name)
            fam: Metric
            if typ == "histogram":
                fam = HistogramMetricFamily(pname, f"ktel aggregate {name}")
                for key, (_p, _o, value) in list(by_labels.items()):
                    for labels, v in histogram_series(name, dict(key), value):
                        sample = dict(labels)
                        fam.add_sample(sample.pop("__name__"), sample, v)
                yield fam
                continue
            if typ == "counter":
                fam = CounterMetricFamily(pname.removesuffix("_total"), f"ktel aggregate {name}")
            else:
                fam = GaugeMetricFamily(pname, f"ktel aggregate {name}")
            for key, (_p, _o, value) in list(by_labels.items()):
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
        for rec in records:
            problem = window.problem(rec.item.ts_ms * 1_000_000, now)
            if problem is None:
                latest.update(rec.item, rec.partition, rec.offset)
            else:
                items = len(rec.item.series)
                await consume.refuse(producer, "pull", rec, problem, signal="series", items=items)

    agg = cfg.aggregate
    start_ms = time.time_ns() // 1_000_000 - int(
        (agg.refresh_seconds + LOOKBACK_WINDOWS * agg.window_seconds) * 1000
    )
    await consume.run(
        kafka=cfg.kafka,
        group_id=None,
        stage="pull",
        topics={cfg.kafka.topics.metrics: decode_snapshot},
        deliver=deliver,
        stop=stop,
        start_ms=start_ms,
    )
