"""Benchmark: what the agent costs a node at ordinary rates: its share of one core and
its RSS at 1 k, 10 k and 100 k file creations a second, against the bare BCC loop
(BCC's ring_buffer_poll with a Python callback copying each record, the probe
submitting with the kernel's wake-ups, flags 0) on the same probe and the same paced
load, measured in the same run.

The load is bench/create_loop.c paced to the rate (pinned to CPU 1); the consumer is
pinned to CPU 0 (bench/agent_throughput.py runs both, and says how). The agent
publishes to a local Kafka, with its default settings (heartbeats every 10 s), and
the load starts once its start-up is over (agent_throughput.SETTLE_S). Share of a
core: the consumer's CPU seconds (user + system) while the load ran, over the load's
wall seconds. The agent's includes what it does at any rate (heartbeats, histogram
reads, the spool). Aim: at most 1 % of a core at 10 k events/s.

--idle SECONDS measures instead what the agent costs a node with nothing to report:
``ktel agent`` with its default settings (10 s heartbeats), no load but the host's own
file creations, its CPU over SECONDS from SETTLE_S after its metrics endpoint opened
(start-up left out), --repeat times, each on a fresh Kafka.

Run as root: PYTHONPATH=. .venv/bin/python bench/agent_cost.py [--seconds 20] [--rates 1000,10000,100000]
             PYTHONPATH=. .venv/bin/python bench/agent_cost.py --idle 60 [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from agent_throughput import (  # noqa: E402
    SETTLE_S,
    agent,
    bare_in_child,
    build_load,
    make_topics,
    proc_cpu,
    rss_mib,
)

from ktel.stack.kafka import LocalKafka, ensure_kafka  # noqa: E402
from ktel.stack.proc import free_port  # noqa: E402
from tests.integration.agent_harness import AgentProcess  # noqa: E402

AIM = (10_000, 0.01)  # at most 1 % of a core at 10 k events/s


def idle(seconds: float, tmp: Path) -> tuple[float, float]:
    """The idle agent's share of a core over ``seconds``, and its RSS (MiB) at the end."""
    ensure_kafka()
    with LocalKafka(tmp / "kafka", free_port(), free_port()) as kafka:
        make_topics(kafka.bootstrap)
        a = AgentProcess(tmp, kafka.bootstrap)
        a.env.pop("KTEL_AGENT__HEARTBEAT_SECONDS")  # (the harness's 1 s: the default here)
        a.start()
        assert a.proc is not None
        try:
            time.sleep(SETTLE_S)
            cpu0, t0 = proc_cpu(a.proc.pid), time.monotonic()
            time.sleep(seconds)
            share = (proc_cpu(a.proc.pid) - cpu0) / (time.monotonic() - t0)
            return share, rss_mib(Path(f"/proc/{a.proc.pid}/status"))
        finally:
            a.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20, help="load per measurement")
    ap.add_argument("--rates", default="1000,10000,100000", help="file creations a second")
    ap.add_argument("--idle", type=float, metavar="SECONDS", help="measure the idle agent instead")
    ap.add_argument("--repeat", type=int, default=3, help="idle measurements")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    if args.idle:
        with tempfile.TemporaryDirectory(prefix="ktel-bench-idle-") as d:
            runs = [idle(args.idle, Path(d) / str(i)) for i in range(args.repeat)]
        print(
            f"\n{time.strftime('%Y-%m-%d')}, kernel {platform.release()}, load average at the start "
            f"{load:.1f}; the idle agent (default settings) over {args.idle:g} s, {args.repeat} runs:\n"
        )
        print("| run | % of a core | RSS MiB |\n| ---: | ---: | ---: |")
        for i, (share, rss) in enumerate(runs, 1):
            print(f"| {i} | {100 * share:.2f} | {rss:.0f} |")
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="ktel-bench-cost-") as d:
        tmp = Path(d)
        exe = build_load(tmp)
        target = tmp / "target"
        target.touch()
        for rate in (float(r) for r in args.rates.split(",")):
            b = bare_in_child(exe, target, args.seconds, "bcc", rate)
            a = agent(exe, target, args.seconds, tmp / f"agent-{rate:.0f}", rate, deployed=True)
            row = {
                "rate": rate,
                "achieved": a["generated"] / a["wall_s"],
                "bare_share": b["cpu_s"] / b["wall_s"],
                "agent_share": a["cpu_s"] / a["wall_s"],
                "bare_rss": b["rss_mib"],
                "agent_rss": a["rss_under_load_max_mib"],
                "delivered": f"{a['delivered']:,.0f} of {a['generated']:,} (drops {a['drops']:,.0f})",
            }
            print(row, flush=True)
            rows.append(row)
    model = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in ln
        ),
        "?",
    )
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores ({model}), kernel {platform.release()}, "
        f"load average at the start {load:.1f}; {args.seconds:g} s per measurement.\n"
    )
    print("| events/s asked | achieved | bare BCC loop, % of a core | agent, % of a core | agent / bare "
          "| bare RSS MiB | agent RSS MiB (max under load) | agent published |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(
            f"| {r['rate']:,.0f} | {r['achieved']:,.0f} | {100 * r['bare_share']:.2f} "
            f"| {100 * r['agent_share']:.2f} | {r['agent_share'] / r['bare_share']:.1f} "
            f"| {r['bare_rss']:.0f} | {r['agent_rss']:.0f} "
            f"| {r['delivered']} |"
        )
    at = [r for r in rows if r["rate"] == AIM[0]]
    if at:
        verdict = "met" if at[0]["agent_share"] <= AIM[1] else "missed"
        print(f"\nAim: at most {100 * AIM[1]:g} % of a core at {AIM[0]:,} events/s: {verdict}.")


if __name__ == "__main__":
    main()
