"""Where the agent's CPU goes under load: thread CPU time spent in each of a list of
functions (its hot path and aiokafka's producer), per second of load.

Samplers distort a process this light (about 1 % of a core at 10,000 events/s): at
1 kHz py-spy inflated the agent itself to 9 %, at 200 Hz a minute gives about 130
samples. This bench wraps the functions instead, in the agent's own process (a
``sitecustomize`` module put first on its PYTHONPATH, installed a few seconds after
start), and adds up ``time.thread_time_ns()`` around each call: exact for code that
does not wait, which every function listed is (``BaseEventLoop._run_once`` is the
event loop's whole pass, its wait in epoll excluded, as the kernel does not count
a sleeping thread's time). The wrappers cost about a microsecond a call, at most a
few hundred calls a second.

The agent runs as bench/agent_throughput.py's ``measure_agent(deployed=True)`` runs
it (defaults, the load from 12 s after start, both pinned); the figures are the
difference of two snapshots inside the load (from a second after it starts to two
seconds before it ends).

Run as root: PYTHONPATH=. .venv/bin/python bench/agent_profile.py [--rate 10000] [--seconds 30]
Results go to bench/RESULTS.md by hand, with the date, the commit and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from agent_throughput import build_load, make_topics, measure_agent  # noqa: E402

from ktel.stack.kafka import LocalKafka, ensure_kafka  # noqa: E402
from ktel.stack.proc import free_port  # noqa: E402

# module, qualified name: what is timed.
FUNCTIONS = [
    ("asyncio.base_events", "BaseEventLoop._run_once"),
    ("edge_agent.agent", "Agent.drain_once"),
    ("edge_agent.probes", "LoadedProbe.take"),
    ("edge_agent.probes", "LoadedProbe.pack"),
    ("edge_agent.agent", "Agent.spool_batch"),
    ("edge_agent.agent", "Agent.encoded"),
    ("edge_agent.spool", "Spool.append"),
    ("edge_agent.spool", "Spool.read"),
    ("edge_agent.spool", "Spool.ack"),
    ("aiokafka.producer.message_accumulator", "MessageAccumulator.drain_by_nodes"),
    ("aiokafka.producer.sender", "SendProduceReqHandler.create_request"),
    ("aiokafka.producer.message_accumulator", "BatchBuilder._build"),
    ("aiokafka.conn", "AIOKafkaConnection.send"),
    ("aiokafka.producer.sender", "SendProduceReqHandler.handle_response"),
]

HOOK = """
import importlib, json, os, threading, time
OUT = os.environ.get("KTEL_BENCH_PROFILE_OUT")
FUNCTIONS = {functions!r}
if OUT:
    totals = {{}}

    def wrap(module, qual):
        owner = importlib.import_module(module)
        *path, name = qual.split(".")
        for part in path:
            owner = getattr(owner, part)
        inner = getattr(owner, name)
        cell = totals.setdefault(qual, [0, 0])
        clock = time.thread_time_ns

        def timed(*args, **kwargs):
            t0 = clock()
            try:
                return inner(*args, **kwargs)
            finally:
                cell[0] += clock() - t0
                cell[1] += 1

        setattr(owner, name, timed)

    def run():
        time.sleep(3)  # the agent's modules imported by then
        for module, qual in FUNCTIONS:
            wrap(module, qual)
        with open(OUT, "a") as out:
            while True:
                time.sleep(1)
                out.write(json.dumps({{"t": time.monotonic(), "totals": totals}}) + "\\n")
                out.flush()

    threading.Thread(target=run, daemon=True).start()
"""


def profile(rate: float, seconds: float, tmp: Path) -> tuple[dict, list[dict]]:
    hook = tmp / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK.format(functions=FUNCTIONS))
    out = tmp / "profile.jsonl"
    exe = build_load(tmp)
    target = tmp / "target"
    target.touch()  # the load opens an existing file with O_CREAT
    ensure_kafka()
    with LocalKafka(tmp / "kafka", free_port(), free_port()) as kafka:
        make_topics(kafka.bootstrap)
        env = {
            "KTEL_KAFKA__BOOTSTRAP": kafka.bootstrap,
            "PYTHONPATH": f"{hook}:{HERE.parent}",
            "KTEL_BENCH_PROFILE_OUT": str(out),
        }
        result = measure_agent(exe, target, seconds, tmp / "agent", env, rate, deployed=True)
    return result, [json.loads(line) for line in out.read_text().splitlines()]


def under_load(snaps: list[dict], seconds: float) -> tuple[dict, dict]:
    """Two snapshots inside the load: from a second after it started to two seconds
    before it ended."""

    def packing(s: dict) -> int:
        return s["totals"].get("LoadedProbe.pack", [0, 0])[0]

    # The load's first second: the packer busy (the host's own file creations, Kafka's
    # among them, make it run a little before).
    per_second = [packing(snaps[i]) - packing(snaps[i - 1]) for i in range(1, len(snaps))]
    busy = max(per_second, default=0) / 4
    start = next((i + 1 for i, ns in enumerate(per_second) if busy and ns >= busy), None)
    if start is None or start + 1 >= len(snaps):
        raise SystemExit("no load found in the agent's snapshots")
    a = snaps[start + 1]
    inside = [s for s in snaps if s["t"] <= a["t"] + seconds - 3]
    if inside[-1] is a:
        raise SystemExit(f"--seconds {seconds:g} leaves nothing to measure")
    return a, inside[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=10_000, help="file creations a second")
    ap.add_argument("--seconds", type=float, default=30)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the agent loads BPF programs")
    with tempfile.TemporaryDirectory(prefix="ktel-agent-profile-") as d:
        result, snaps = profile(args.rate, args.seconds, Path(d))
    a, b = under_load(snaps, args.seconds)
    span = b["t"] - a["t"]
    print(
        f"agent: {100 * result['cpu_s'] / result['wall_s']:.2f} % of a core at {args.rate:,.0f} events/s; "
        f"published {result['delivered']:,.0f} of {result['generated']:,} (drops {result['drops']:,.0f}); "
        f"timed over {span:.0f} s of the load"
    )
    print("| function | thread CPU ms/s | calls/s | µs/call |\n| --- | ---: | ---: | ---: |")
    for _module, qual in FUNCTIONS:
        ns = b["totals"].get(qual, [0, 0])[0] - a["totals"].get(qual, [0, 0])[0]
        calls = b["totals"].get(qual, [0, 0])[1] - a["totals"].get(qual, [0, 0])[1]
        print(f"| `{qual}` | {ns / 1e6 / span:.2f} | {calls / span:.1f} | {ns / 1e3 / max(calls, 1):.0f} |")


if __name__ == "__main__":
    main()
