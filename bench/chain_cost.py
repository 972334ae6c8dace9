"""Benchmark: the fused worker's own work per raw batch, without Faust or Kafka.

bench/stream_floor.py prices what a worker pays per Kafka record around ktel's code;
this prices ktel's code itself: the chain of `ktel process all` (processors/chain.py,
ktel's default config) over bench/fleet.py's traffic, in this process, per batch and
per window:

  decode      each record decoded (ktel/wire), nothing else: the baseline
  chain       decode, then every stage's on_batch and the host's table value
              serialized as its changelog record would be (JSON); every --window-every
              batches, each timed stage's window over every host
  of which GC  the part of the chain's time the cyclic garbage collector took
              (timed by gc.callbacks), at the interpreter's thresholds as the
              checkout's worker sets them (processors/stages.py GC_THRESHOLD)
  idle window a window over every host with nothing counted since the last: what a
              window costs a worker whose hosts are quiet (after a full collection, so
              that one falling inside these few windows does not decide the figure)

Each host sends --rounds batches of --events events, one round after another; the
first round warms the chain (every host known) and is left out. CPU is the process's
(time.process_time). Each checkout given with --tree (this one by default) is measured
in a child process of its own, in turn, --repeat times: before and after, in one run.

Run: PYTHONPATH=. .venv/bin/python bench/chain_cost.py [--hosts 10000] [--events 10]
     [--tree /path/to/checkout ...] [--repeat 2]
"""

from __future__ import annotations

import argparse
import gc
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
    try:
        from processors.stages import GC_THRESHOLD

        gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
    except ImportError:  # (a checkout from before the worker set it)
        pass
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
    collecting = [0.0, 0.0]  # (time spent, when the collection under way began)

    def timed_gc(phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            collecting[1] = time.perf_counter()
        else:
            collecting[0] += time.perf_counter() - collecting[1]

    gc.callbacks.append(timed_gc)
    t = time.process_time()
    run(measured)
    chain_s = time.process_time() - t
    gc.callbacks.remove(timed_gc)
    gc.collect()
    t = time.process_time()
    for _ in range(5):
        windows()
    idle = (time.process_time() - t) / 5
    n = len(measured)
    return {
        "decode_us": decode / n * 1e6,
        "chain_us": chain_s / n * 1e6,
        "gc_us": collecting[0] / n * 1e6,
        "idle_window_ms": idle * 1e3,
    }


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
        "| checkout | decode µs/batch | chain µs/batch (windows included) | of which GC µs/batch "
        "| idle window over every host ms |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
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
            cells = (
                f"{r['decode_us']:.1f} | {r['chain_us']:.1f} | {r['gc_us']:.1f} | {r['idle_window_ms']:.1f}"
            )
            print(f"| {commit or tree} | {cells} |")


if __name__ == "__main__":
    main()
