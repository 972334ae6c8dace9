"""End-to-end ingestion latency of a running pipeline: `ktel up` (real kernel, Kafka,
Prometheus, Collector), files created at a steady rate for a while, then the p50 and
p99 of each exporter's ``ktel_exporter_ingestion_latency_seconds`` over the run, read
from the local Prometheus (which scrapes the exporters' self-metrics).

The objective it checks: p99 within the aggregate window + 1 s. For metric snapshots
the histogram starts at the window's close, so an event's own latency is at most the
window more than what it shows; spans and logs start at the kernel's timestamp.

    .venv/bin/python bench/latency.py --seconds 120 --window 2

As root (BPF). Record the printed table in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.up_harness import KtelUp, free_ports  # noqa: E402


def query(port: int, expr: str) -> list:
    body = httpx.get(
        f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}, trust_env=False, timeout=30
    ).json()
    if body["status"] != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=120, help="how long files are created")
    ap.add_argument("--window", type=float, default=2.0, help="aggregate.window_seconds")
    ap.add_argument("--rate", type=float, default=20.0, help="files created per second")
    args = ap.parse_args()

    data = Path(tempfile.mkdtemp(prefix="ktel-bench-latency-"))
    ports, env = free_ports()
    env |= {
        "KTEL_STACK__DATA_DIR": str(data / "stack"),
        "KTEL_AGENT__STATE_DIR": str(data / "agent-state"),
        "KTEL_AGGREGATE__WINDOW_SECONDS": str(args.window),
    }
    prom = ports["prom"]
    up = KtelUp([sys.executable, "-m", "ktel.cli", "up"], {**os.environ, **env})
    try:
        if not up.wait_up(600):
            raise SystemExit("ktel up did not come up:\n" + up.output(last=40))
        where = data / "files"
        where.mkdir()
        start = time.time()
        n = 0
        while time.time() - start < args.seconds:
            (where / f"f{n}").touch()
            n += 1
            time.sleep(1 / args.rate)
        time.sleep(3 * args.window + 10)  # the last windows delivered and scraped
        span = int(time.time() - start)
        rows = []
        for exporter in ("remote-write", "otlp"):
            sel = f'exporter="{exporter}"'
            inc = f"sum by (le) (increase(ktel_exporter_ingestion_latency_seconds_bucket{{{sel}}}[{span}s]))"
            p50, p99 = (
                float(query(prom, f"histogram_quantile({q}, {inc})")[0]["value"][1]) for q in (0.5, 0.99)
            )
            count = float(
                query(
                    prom, f"sum(increase(ktel_exporter_ingestion_latency_seconds_count{{{sel}}}[{span}s]))"
                )[0]["value"][1]
            )
            rows.append((exporter, count, p50, p99))
    finally:
        up.proc.send_signal(signal.SIGINT)
        up.proc.wait(timeout=180)
    bound = args.window + 1
    print(f"{n} files over {args.seconds} s, aggregate window {args.window} s; objective p99 <= {bound} s")
    print("| exporter | observations | p50 (s) | p99 (s) | p99 <= window + 1 s |")
    print("| --- | ---: | ---: | ---: | --- |")
    for exporter, count, p50, p99 in rows:
        print(f"| {exporter} | {count:.0f} | {p50:.3f} | {p99:.3f} | {'yes' if p99 <= bound else 'no'} |")
    print(json.dumps({"files": n, "window_s": args.window, "rows": rows}))


if __name__ == "__main__":
    main()
