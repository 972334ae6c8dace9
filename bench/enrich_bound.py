"""Benchmark: what keeping the enrich stage's tables within their bytes costs the fused
chain on hosts that exec a lot.

The chain of ``ktel process all`` (processors/chain.py, default config), in this
process, without Kafka: batches of 1500 events of which ``--execs`` are new processes
(the rest files created by recent ones), one host, after a warm-up that fills its
process table. Each batch's table value is also JSON-encoded, as the runner does for
its changelog record. Measured in CPU seconds, the chain with the bytes bound
(``enrich.max_processes`` and 3/8 of ``process.max_state_bytes``) against the same
chain with the bytes bound lifted (``max_processes`` alone), in turn, ``--rounds`` times.

Run: PYTHONPATH=. .venv/bin/python bench/enrich_bound.py [--execs 75] [--path-len 16] [--rounds 5]
(with ``--path-len 200`` the bytes bound is what binds: about 1300 processes fit).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ktel import config  # noqa: E402
from ktel.wire import FILE_CREATED, PROCESS_EXEC, RawBatch  # noqa: E402
from processors.chain import Chain, build  # noqa: E402
from processors.stage import State  # noqa: E402

EVENTS = 1500


def chain(bytes_bound: bool) -> Chain:
    c = build("all", config.Config(agent=config.AgentConfig(host_id="bench")))
    if not bytes_bound:
        for stage in c.stages:
            if stage.name == "enrich":
                stage.opts = dataclasses.replace(stage.opts, max_table_bytes=1 << 40)  # type: ignore[attr-defined]
    return c


def batches(n: int, execs: int, path_len: int, first: int = 0) -> list[RawBatch]:
    out = []
    for seq in range(first, first + n):
        pids = range(seq * execs, (seq + 1) * execs)
        events = [
            [PROCESS_EXEC.id, 1, p, p, 1, 0, 0, "worker", f"/usr/lib/{'a' * path_len}/{p}"] for p in pids
        ]
        events += [
            [FILE_CREATED.id, 1, p, p, 0, "worker", f"/var/tmp/{p % 50}/f", 0o101, False]
            for p in range((seq + 1) * execs - (EVENTS - execs), (seq + 1) * execs)
        ]
        out.append(RawBatch("h", "b", seq, 1 + seq, events))
    return out


def events_per_cpu_second(
    bytes_bound: bool, execs: int, warmup: list[RawBatch], work: list[RawBatch]
) -> float:
    c, value = chain(bytes_bound), State()
    for b in warmup:
        c.on_batch(value, b, 0)
    start, counted = time.process_time(), 0.0
    for b in work:
        counted += c.on_batch(value, b, 0).counts["events"]
        json.dumps(value, separators=(",", ":"))  # the changelog record
    return counted / (time.process_time() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--execs", type=int, default=75, help="new processes per 1500-event batch")
    ap.add_argument("--path-len", type=int, default=16, help="length of each program's directory name")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    warmup = batches(4096 // args.execs + 1, args.execs, args.path_len)
    work = batches(300, args.execs, args.path_len, first=len(warmup))
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for bound in (True, False):
            rates[bound].append(events_per_cpu_second(bound, args.execs, warmup, work))
    print(
        f"{args.execs} new processes a {EVENTS}-event batch (directory names of {args.path_len}), "
        f"{len(work)} batches, {args.rounds} rounds"
    )
    print("| chain | events per CPU-second, median | range |\n| --- | ---: | --- |")
    for bound, label in ((False, "max_processes alone"), (True, "with the bytes bound")):
        r = rates[bound]
        print(f"| {label} | {statistics.median(r):,.0f} | {min(r):,.0f}-{max(r):,.0f} |")
    ratio = statistics.median(rates[True]) / statistics.median(rates[False])
    print(f"with / without: {ratio:.2f}")


if __name__ == "__main__":
    main()
