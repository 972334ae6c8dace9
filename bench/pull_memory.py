"""Benchmark: the pull endpoint's peak memory, its series held and one scrape, at its bound.

For each shape, in a process of its own: a pull endpoint (exporters/pull.py LatestValues)
of ``--bound`` bytes (pull.max_series_bytes, its default unless given) takes snapshots of
series of that shape, 1,000 a snapshot, through the wire (encoded and decoded as
ktel.metrics gives them), until it refuses one; then it is scraped once as Prometheus
scrapes it (OpenMetrics, gzip) through the endpoint's WSGI app. Reported: the series held,
what the endpoint counts them at (ktel_exporter_pull_series_bytes), the process' peak RSS
above its RSS before the first snapshot (held and scrape), that peak over the bound, and
the scrape's CPU seconds. ``--tracemalloc`` reports Python's peak allocations instead of
RSS, what the endpoint's counts are measured against (slower, and its traces take memory).

Shapes: the documented case (100 characters of labels), gauges of one short label, one
gauge family a series, histograms of 40 buckets, histograms of 5 buckets and 63 labels
of one character (the largest one snapshot may be), series of 1,000 characters of labels
with one character outside the BMP in the first (which widens the whole scrape's text),
and gauges of 400 random characters of labels (text gzip cannot shrink).

Run: PYTHONPATH=. .venv/bin/python bench/pull_memory.py [--bound BYTES] [--shapes doc,gauge]
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import resource
import string
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry  # noqa: E402
from prometheus_client.exposition import make_wsgi_app  # noqa: E402

from exporters.pull import LatestValues  # noqa: E402
from ktel.config import PullConfig  # noqa: E402
from ktel.wire import MetricSnapshot, decode_snapshot, encode_snapshot  # noqa: E402

# What Prometheus 2.x sends (scrape_protocols' default without native histograms).
ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
ROWS = 1000


def histogram(buckets: int) -> dict[str, Any]:
    bounds = [2.0 ** (i + 1) * 1e-9 for i in range(buckets - 1)]
    return {"count": buckets, "sum": 1.5, "bounds": bounds, "counts": [1] * buckets}


def shapes() -> dict[str, Callable[[int], list]]:
    h40, h5 = histogram(40), histogram(5)
    short = dict.fromkeys([c for c in string.ascii_letters + string.digits + "_" if c != "a"], '"')
    rng = random.Random(1)
    noise = [base64.b64encode(rng.randbytes(300)).decode() for _ in range(1009)]
    return {
        "doc": lambda i: ["g", "gauge", {"a": f"{i:099d}"}, 1.0],
        "gauge": lambda i: ["g", "gauge", {"a": str(i)}, 1.0],
        "family": lambda i: [f"g{i}", "gauge", {}, 1.0],
        "histogram": lambda i: ["h", "histogram", {"a": str(i)}, h40],
        "labels": lambda i: ["h", "histogram", {**short, "a": f"{i}\U0001d11e"}, h5],
        "wide": lambda i: ["g", "gauge", {"a": f"{i:01000d}" + ("\U0001d11e" if i == 0 else "")}, 1.0],
        "random": lambda i: ["g", "gauge", {"a": noise[i % len(noise)] + str(i)}, 1.0],
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def one(shape: str, bound: int, traced: bool) -> dict[str, Any]:
    make = shapes()[shape]
    latest = LatestValues(max_bytes=bound)
    registry = CollectorRegistry()
    registry.register(latest)
    app = make_wsgi_app(registry)
    if traced:
        tracemalloc.start()
    before = rss_bytes()
    offset, full = 0, False
    while not full:
        rows = [make(i) for i in range(offset * ROWS, (offset + 1) * ROWS)]
        snap = decode_snapshot(encode_snapshot(MetricSnapshot(1, rows)))
        # (what was refused let go at once, as once dead-lettered)
        full = bool(latest.update(snap, 0, offset))
        del rows, snap
        offset += 1
    held = sum(len(f.series) for f in latest.families.values())
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/metrics",
        "QUERY_STRING": "",
        "HTTP_ACCEPT": ACCEPT,
        "HTTP_ACCEPT_ENCODING": "gzip",
    }
    if traced:
        tracemalloc.reset_peak()
    cpu = time.process_time()
    body = app(environ, lambda *_: None)
    cpu = time.process_time() - cpu
    peak = (
        tracemalloc.get_traced_memory()[1]
        if traced
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    )
    return {
        "shape": shape,
        "series": held,
        "counted": latest.held_bytes,
        "peak": peak,
        "scrape_cpu_s": cpu,
        "body": sum(map(len, body)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bound", type=int, default=PullConfig().max_series_bytes, help="pull.max_series_bytes")
    ap.add_argument(
        "--shapes", default=",".join(shapes()), help="comma-separated, of: " + ", ".join(shapes())
    )
    ap.add_argument("--tracemalloc", action="store_true", help="Python's peak allocations, not RSS")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.bound, args.tracemalloc)))
        return
    what = "Python's peak allocations" if args.tracemalloc else "peak RSS above the start"
    print(f"bound {args.bound:,} bytes ({args.bound / 2**20:.0f} MiB); peak: {what}")
    head = ("shape", "series", "counted MiB", "peak MiB", "peak/bound", "scrape CPU s")
    print(f"{head[0]:10} {head[1]:>10} {head[2]:>12} {head[3]:>9} {head[4]:>10} {head[5]:>12}")
    for shape in args.shapes.split(","):
        cmd = [sys.executable, __file__, "--one", shape, "--bound", str(args.bound)]
        cmd += ["--tracemalloc"] if args.tracemalloc else []
        r = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout)
        print(
            f"{shape:10} {r['series']:>10,} {r['counted'] / 2**20:>12.0f} {r['peak'] / 2**20:>9.0f}"
            f" {r['peak'] / args.bound:>10.2f} {r['scrape_cpu_s']:>12.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
