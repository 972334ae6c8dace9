"""Benchmark: a snapshot Prometheus holds newer samples of, sent again series by series.

After a SIGKILL the remote-write exporter reads again what it had sent but not
committed (up to one fetch, 500 records); Prometheus refuses each such snapshot whole
("out of order sample") and does not say which series, so exporters/remote_write.py
sends it again one series a request (``_resend_by_series``). This measures that
against a real Prometheus started for it, each round on a new host: its
``--series`` gauges stored at t1 in one request (the baseline: what the same series
cost sent together), then a snapshot of them at t0 < t1 (every series refused, the
case after a restart) and one at t2 > t1 (every series taken) each sent again series
by series. Reported: the median round's wall time and the exporter's CPU for each,
and the CPU per request.

Run: PYTHONPATH=. .venv/bin/python bench/resend_by_series.py [--series 2000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporters import remote_write  # noqa: E402
from exporters.consume import Record  # noqa: E402
from exporters.remote_write_client import Receiver  # noqa: E402
from ktel.config import RemoteWriteConfig  # noqa: E402
from ktel.stack.proc import free_port  # noqa: E402
from ktel.stack.prometheus import LocalPrometheus  # noqa: E402
from ktel.wire import MetricSnapshot, decode_snapshot, encode_snapshot  # noqa: E402


class Producer:
    """ktel.dlq, which nothing here should reach."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send_and_wait(self, topic, value, key=None):
        self.sent.append(value)


def record(snap: MetricSnapshot, offset: int) -> Record:
    value = encode_snapshot(snap)
    return Record(decode_snapshot(value), "ktel.metrics", 0, offset, b"bench", value, "ktel.dlq")


async def resend(receiver: Receiver, snap: MetricSnapshot, offset: int) -> tuple[float, float, bool]:
    rec = record(snap, offset)
    every = set(remote_write.series_keys(rec.item))
    producer = Producer()
    wall, cpu = time.perf_counter(), time.process_time()
    taken = await remote_write._resend_by_series(receiver, rec, every, producer, "native", "bench")  # noqa: SLF001
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if producer.sent:
        raise SystemExit(f"{len(producer.sent)} dead letters: the bench's snapshots are not what it assumes")
    return wall, cpu, taken


async def main(args: argparse.Namespace) -> None:
    rows: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        prom = LocalPrometheus(Path(tmp), free_port())
        prom.start()
        try:
            async with Receiver(RemoteWriteConfig(url=prom.remote_write_url)) as receiver:
                now = time.time_ns() // 1_000_000
                for r in range(args.repeat):
                    run = uuid.uuid4().hex[:12]
                    labels = {"host.id": f"host-{run}", "ktel.run": run}

                    def snapshot(ts: int, v: float, labels: dict[str, str] = labels) -> MetricSnapshot:
                        return MetricSnapshot(
                            ts, [[f"g{i}", "gauge", labels, v + i] for i in range(args.series)]
                        )

                    t1 = now - 60_000 + 3_000 * r
                    [(body, _, _)] = remote_write.encode([snapshot(t1, 1.0)])
                    wall, cpu = time.perf_counter(), time.process_time()
                    await remote_write.post(receiver, body)
                    rows.setdefault("one request of every series (stored)", []).append(
                        (time.perf_counter() - wall, time.process_time() - cpu)
                    )
                    wall, cpu, taken = await resend(receiver, snapshot(t1 - 1_000, 0.0), 0)
                    assert not taken
                    rows.setdefault("series by series, all held (refused)", []).append((wall, cpu))
                    wall, cpu, taken = await resend(receiver, snapshot(t1 + 1_000, 2.0), 1)
                    assert taken
                    rows.setdefault("series by series, none held (stored)", []).append((wall, cpu))
        finally:
            prom.stop()
    print(f"{args.series} series a snapshot, {args.repeat} rounds, the median round")
    print("| sent | wall s | exporter CPU s | CPU ms a request |")
    print("| --- | ---: | ---: | ---: |")
    for what, got in rows.items():
        wall = sorted(w for w, _ in got)[len(got) // 2]
        cpu = sorted(c for _, c in got)[len(got) // 2]
        requests = 1 if what.startswith("one") else args.series
        print(f"| {what} | {wall:.3f} | {cpu:.3f} | {1000 * cpu / requests:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--series", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
