"""Benchmark: what the aggregate stage emits per window, and what that costs downstream,
for a fleet where most series are quiet most of the time.

The aggregate's pure core (processors/aggregate_core.py) is driven window by window
with a synthetic fleet: every host has ``--dirs`` file_created_total series and
``--keys`` syscall latency histograms (the kernel's 40 log2 slots); each window a share
``--active`` of the hosts sends a batch touching a few of its series. Counted per window,
averaged over ``--windows`` windows after the first (when everything is new):

- rows in the snapshots (series emitted) and bytes on ktel.metrics (encoded snapshots);
- remote-write samples, with native histograms and with classic ones (exporters/remote_write.py);
- the CPU time of the window's work (on_window) and of the remote-write encoding.

``every window`` is the aggregate before it emitted only what changed: refresh_seconds
below the window emits every series every window, which is what it did.

Run: PYTHONPATH=. .venv/bin/python bench/emission.py [--hosts 500] [--windows 30]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporters import remote_write  # noqa: E402
from ktel.wire import FILE_CREATED, HIST_SLOTS, HISTOGRAM_DELTA, RawBatch, encode_snapshot  # noqa: E402
from processors import aggregate_core  # noqa: E402
from processors.chain import Chain  # noqa: E402

WINDOW_S = 10.0
T0_MS = 1_800_000_000_000


def file_event(d: int) -> list:
    return [FILE_CREATED.id, 1, 2, 2, 0, "touch", f"/srv/d{d}/f", 0o101, False]


def hist_event(key: int, rng: random.Random) -> list:
    buckets = [0] * HIST_SLOTS
    for _ in range(20):
        buckets[rng.randrange(8, 24)] += 1
    return [
        HISTOGRAM_DELTA.id,
        1,
        0,
        "syscall_latency",
        "ns",
        {"syscall.id": key},
        20,
        20 * 50_000,
        buckets,
        1,
    ]


def run(args: argparse.Namespace, refresh_s: float) -> dict[str, float]:
    rng = random.Random(7)
    opts = aggregate_core.Options(window_seconds=WINDOW_S, refresh_seconds=refresh_s, directory_depth=2)
    chain = Chain([aggregate_core.Aggregate(opts)])
    [stage] = chain.timed()
    table: dict[str, dict] = {}
    seq: dict[str, int] = {}
    totals = dict.fromkeys(("rows", "bytes", "native", "classic", "window_cpu_s", "encode_cpu_s"), 0.0)

    def send(host: str, events: list, now_ms: int) -> None:
        seq[host] = seq.get(host, -1) + 1
        chain.on_batch(table.setdefault(host, {}), RawBatch(host, "b", seq[host], 0, events), now_ms)

    for w in range(args.windows + 1):
        now = T0_MS + int(w * WINDOW_S * 1000)
        if w == 0:  # every host's every series
            for h in range(args.hosts):
                events = [file_event(d) for d in range(args.dirs)] + [
                    hist_event(k, rng) for k in range(args.keys)
                ]
                send(f"host-{h}", events, now - 1)
        else:
            for h in rng.sample(range(args.hosts), int(args.hosts * args.active)):
                events = [file_event(rng.randrange(args.dirs)) for _ in range(3)]
                events += [hist_event(rng.randrange(args.keys), rng) for _ in range(2)]
                send(f"host-{h}", events, now - 1)
        cpu = time.process_time()
        snaps = [snap for _, snap in chain.on_window(stage, table, now, 1.0).snapshots]
        window_cpu = time.process_time() - cpu
        cpu = time.process_time()
        native = sum(n for _, n, _ in remote_write.encode(snaps, histograms="native"))
        encode_cpu = time.process_time() - cpu
        if w == 0:
            continue
        totals["rows"] += sum(len(s.series) for s in snaps)
        totals["bytes"] += sum(len(encode_snapshot(s)) for s in snaps)
        totals["native"] += native
        totals["classic"] += sum(n for _, n, _ in remote_write.encode(snaps, histograms="classic"))
        totals["window_cpu_s"] += window_cpu
        totals["encode_cpu_s"] += encode_cpu
    return {k: v / args.windows for k, v in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=500)
    ap.add_argument("--dirs", type=int, default=40, help="file_created_total series per host")
    ap.add_argument("--keys", type=int, default=10, help="latency histograms per host")
    ap.add_argument("--active", type=float, default=0.1, help="share of hosts sending a batch each window")
    ap.add_argument("--windows", type=int, default=30)
    args = ap.parse_args()
    series = args.hosts * (args.dirs + args.keys)
    print(
        f"{args.hosts} hosts x ({args.dirs} counters + {args.keys} histograms) = {series:,} series; "
        f"{args.active:.0%} of hosts send a batch each {WINDOW_S:g} s window (3 counters, 2 histograms); "
        f"means over {args.windows} windows after the first\n"
    )
    print("| aggregate | series emitted | ktel.metrics bytes | remote-write samples (native) | (classic) "
          "| on_window CPU ms | encode CPU ms |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, refresh in (("every window", WINDOW_S / 2), ("changed + refresh 120 s", 120.0)):
        r = run(args, refresh)
        print(
            f"| {label} | {r['rows']:,.0f} | {r['bytes']:,.0f} | {r['native']:,.0f} | {r['classic']:,.0f} "
            f"| {r['window_cpu_s'] * 1000:,.1f} | {r['encode_cpu_s'] * 1000:,.1f} |"
        )


if __name__ == "__main__":
    main()
