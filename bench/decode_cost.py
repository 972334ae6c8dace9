"""Benchmark: what decoding a record costs a worker, checkout against checkout.

A worker decodes every record it takes (ktel/wire): a raw batch, a heartbeat. This
times ``decode_batch`` and ``decode_heartbeat`` alone over bench/fleet.py's traffic,
the records made once by this checkout and decoded by each checkout given with
--tree (this one by default), each in a child process of its own, in turn, --repeat
times: before and after, in one run. CPU is the child's (time.process_time), the best
of --rounds passes over the records.

  raw, N events   raw batches of N events (zstd, as the agent sends them), --hosts of them
  heartbeat       a heartbeat per host, shaped as the agent's

Run: PYTHONPATH=. .venv/bin/python bench/decode_cost.py [--hosts 10000] [--events 10,1000]
     [--tree /path/to/checkout ...] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def records(hosts: int, events: list[int]) -> dict[str, list[bytes]]:
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    from fleet import Traffic, heartbeat, make_batch

    from ktel.wire import encode_batch, encode_heartbeat

    rng = random.Random(2)
    fleet = Traffic(hosts, 1.0, 1.0).hosts
    out = {f"raw, {n} events": [encode_batch(make_batch(h, n, rng)[0]) for h in fleet] for n in events}
    out["heartbeat"] = [encode_heartbeat(heartbeat(h, 1000, 10.0)) for h in fleet]  # type: ignore[arg-type]
    return out


def measure(tree: str, path: str, rounds: int) -> dict[str, float]:
    sys.path.insert(0, tree)
    from ktel.wire import decode_batch, decode_heartbeat

    with open(path, "rb") as f:
        made: dict[str, list[bytes]] = pickle.load(f)
    out = {}
    for what, recs in made.items():
        decode = decode_heartbeat if what == "heartbeat" else decode_batch
        best = float("inf")
        for _ in range(rounds):
            t = time.process_time()
            for rec in recs:
                decode(rec)
            best = min(best, time.process_time() - t)
        out[what] = best / len(recs) * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=10000)
    ap.add_argument("--events", default="10,1000", help="events a raw batch, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="passes over the records, the best taken")
    ap.add_argument("--tree", action="append", help="a checkout to measure (default: this one)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.rounds)))
        return
    made = records(args.hosts, [int(n) for n in args.events.split(",")])
    sizes = {what: sum(map(len, recs)) / len(recs) for what, recs in made.items()}
    print(f"{args.hosts:,} records of each, load average {os.getloadavg()[0]:.1f}\n")
    print("| checkout | " + " | ".join(f"{w} ({sizes[w]:,.0f} B) µs" for w in made) + " |")
    print("| --- |" + " ---: |" * len(made))
    with tempfile.NamedTemporaryFile(suffix=".pickle") as f:
        pickle.dump(made, f)
        f.flush()
        for _ in range(args.repeat):
            for tree in args.tree or [str(ROOT)]:
                child = [sys.executable, __file__, "--rounds", str(args.rounds), "--child", tree, f.name]
                got = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
                label = subprocess.run(
                    ["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
                ).stdout.strip()
                print(f"| {label or tree} | " + " | ".join(f"{got[w]:.1f}" for w in made) + " |", flush=True)


if __name__ == "__main__":
    main()
