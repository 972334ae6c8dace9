"""Benchmark: the fused worker's own work per raw batch, without Faust or Kafka.

bench/stream_floor.py prices what a worker pays per Kafka record around ktel's code;
this prices ktel's code itself: the chain of `ktel process all` (processors/chain.py,
ktel's default config) over bench/fleet.py's traffic, in this process, per batch and
per window:

  decode      each record decoded (ktel/wire), nothing else: the baseline
  chain       decode, then every stage's on_batch and the host's table value
              serialized as its changelog record would be (JSON); every --window-every
              batches, each timed stage's window over every host
  idle window a window over every host with nothing counted since the last: what a
              window costs a worker whose hosts are quiet

Each host sends --rounds batches of --events events, one round after another; the
first round warms the chain (every host known) and is left out. CPU is the process's
(time.process_time). Each checkout given with --tree (this one by default) is measured
in a child process of its own, in turn, --repeat times: before and after, in one run.

Run: PYTHONPATH=. .venv/bin/python bench/chain_cost.py [--hosts 10000] [--events 10]
     [--tree /path/to/checkout ...] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def measure(args: argparse.Namespace) -> dict[str, float]:
    # (the checkout measured: its chain and wire, and its bench's traffic)
    sys.path[:0] = [args.child, str(Path(args.child) / "bench")]
    from fleet import Traffic, make_batch

    from ktel.config import load
    from ktel.wire import decode_batch, encode_batch
    from processors.chain import build

    chain = build("all", load(None))
    rng = random.Random(2)
    hosts = Traffic(args.hosts, 1.0, 1.0).hosts
    records = [encode_batch(make_batch(h, args.events, rng)[0]) for _ in range(args.rounds) for h in hosts]
    warm, measured = records[: args.hosts], records[args.hosts :]
    table: dict[str, dict[str, Any]] = {}
    timed = chain.timed()

    def windows() -> None:
        for stage in timed:
            chain.on_window(stage, table, time.time_ns() // 1_000_000, 1.0)

    def run(recs: list[bytes]) -> None:
        for i, rec in enumerate(recs, 1):
            batch = decode_batch(rec)
            value = table.setdefault(batch.host_id, {})
            chain.on_batch(value, batch, time.time_ns() // 1_000_000)
            json.dumps(value)
            if i % args.window_every == 0:
                windows()

    t = time.process_time()
    for rec in measured:
        decode_batch(rec)
    decode = time.process_time() - t
    run(warm)
    windows()
    t = time.process_time()
    run(measured)
    chain_s = time.process_time() - t
    t = time.process_time()
    for _ in range(5):
        windows()
    idle = (time.process_time() - t) / 5
    n = len(measured)
    return {"decode_us": decode / n * 1e6, "chain_us": chain_s / n * 1e6, "idle_window_ms": idle * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=10000)
    ap.add_argument("--events", type=int, default=10, help="events a batch")
    ap.add_argument("--rounds", type=int, default=4, help="batches per host (the first warms)")
    ap.add_argument("--window-every", type=int, default=5000, help="batches between windows")
    ap.add_argument("--tree", action="append", help="a checkout to measure (default: this one)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    print(
        f"{args.hosts:,} hosts, {args.events} events a batch, a window every {args.window_every:,} "
        f"batches, load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| checkout | decode µs/batch | chain µs/batch (windows included) | idle window over every host ms |"
    )
    print("| --- | ---: | ---: | ---: |")
    trees = args.tree or [str(ROOT)]
    for _ in range(args.repeat):
        for tree in trees:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    *("--child", tree),
                    *("--hosts", str(args.hosts), "--events", str(args.events)),
                    *("--rounds", str(args.rounds), "--window-every", str(args.window_every)),
                ],
                capture_output=True,
                text=True,
                check=True,
                env=dict(os.environ, PYTHONPATH=tree),  # (its ktel, not the one installed)
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            commit = subprocess.run(
                ["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
            cells = f"{r['decode_us']:.1f} | {r['chain_us']:.1f} | {r['idle_window_ms']:.1f}"
            print(f"| {commit or tree} | {cells} |")


if __name__ == "__main__":
    main()
