"""Benchmark: what KtelAgentDown's look-back over a day of heartbeats costs Prometheus,
for a fleet of --hosts (10 000) against --baseline (100) in the same run.

KtelAgentDown (deploy/prometheus/ktel-rules.yml) remembers a host's last heartbeat for a
day after its worker forgets it, so what it reads holds a day of each host's heartbeat
times, read at every rule evaluation; the dashboards' panels of agents down (fleet
overview, on-call) read it at every step of their range. The alert, the recording rules
it and the panels read, and the panels are taken from the repository's files as they
are, not copied here.

The fleet, as the workers that read heartbeats export it (processors/fleet_metrics.py)
and a Prometheus scrapes it every --scrape-seconds (15: deploy/prometheus/prometheus.yml;
the Helm chart's ServiceMonitor says 30 s): each host sends a heartbeat every 10 s (the
agent's default, each host at a phase of its own, its times by the agent's clock, to the
microsecond), read by one of --workers workers, which exports its
``ktel_agent_up``, ``ktel_agent_last_heartbeat_timestamp_seconds`` and, once the last
heartbeat said the agent stopped on purpose, ``ktel_agent_stopped_timestamp_seconds``
(labels host_id, instance, job). --down of the hosts die and --stopped are stopped on
purpose, each at a time of its own in the day; their worker reports them down, then
forgets them an hour (aggregate.host_ttl_seconds) after their last heartbeat. Half-way
through the day a rebalance moves a worker's hosts to another: the old one holds them,
down, for that hour too. A day and 10 minutes of samples end at the time the bench
starts, for --hosts; for --baseline, the same ending three days earlier, in the same
Prometheus (queried at its own end, so it reads none of the larger fleet's blocks).

How they get there: each 2-hour block's samples written as OpenMetrics text, one file a
block, made into TSDB blocks by `promtool tsdb create-blocks-from openmetrics` while the
next file is written (the other core), into the data directory before Prometheus starts.
That route takes a day of 10 000 hosts in a few minutes on 2 cores: the samples go
straight into blocks (remote-write would pass each through Prometheus' WAL and head, and
build protobuf in Python first), and one file per block is parsed once (promtool parses
its whole input again for every 2-hour block it writes). The recording rules the
expressions read (ktel:agent_up:max, ...), and those these read, are then backfilled
over the day with `promtool tsdb create-blocks-from rules`, at their group's interval or
else --eval-seconds (15: deploy/prometheus/prometheus.yml), as Prometheus would have
recorded them: from the workers' series first, then those that read records from
those, Prometheus restarted on each's blocks. Each group at the times Prometheus
evaluates it (a phase in its interval, from its name and its file's), the same in every
run, and a record that reads another of its group reads it as Prometheus does, as made
at the same evaluation: where the other has no series of a host then (Prometheus marks it
stale), it has none either, though promtool (2.42) writes no staleness marker. It is
measured once it has compacted the blocks and is idle. (The queries measured read the
records as they are: a series that ends is read for 5 minutes more, the workers' too,
by every version of the rules alike.)

Measured, for each fleet, at the end of its day (query time fixed there), through the
HTTP API with stats=all:

  alert    KtelAgentDown's expression as an instant query (/api/v1/query), --runs times
           (the first right after Prometheus started): wall time at the client,
           Prometheus' CPU time over the query (user + system, /proc),
           totalQueryableSamples (the samples read, summed over the steps) and
           peakSamples (the most held at once, which Prometheus' --query.max-samples
           bounds: 50 000 000 by default, which this Prometheus keeps), and whether it
           fails (too many samples, or the 2 minute --query.timeout)
  records  the same of each recording rule's expression above, as Prometheus evaluates
           it at its group's interval (shown)
  panels   each dashboard panel that reads the heartbeats' look-back, as Grafana sends it
           for the dashboards' default range (1 hour) and all hosts: a range query
           (/api/v1/query_range) at a 15 s step (Grafana's step for a 1-hour range,
           raised to the data source's scrape interval, 15 s by default), --panel-runs
           times

The figures to compare are each fleet's against the baseline's, and the CPU time
against the rules' evaluation interval (15 s in deploy/prometheus/prometheus.yml, 30 s
by the Prometheus Operator's default) and the dashboards' refresh (30 s).

Run: PYTHONPATH=. .venv/bin/python bench/heartbeat_lookback.py [--hosts 10000]
     [--baseline 100] [--runs 5] [--panel-runs 2] [--keep DIR] [--results FILE]
     [--compare FILE]
--keep DIR keeps the raw series' blocks in DIR and reuses them on a later run with the
same fleet settings (the recording rules are backfilled afresh on every run, from the
rules file as it then is); --results FILE writes each query's first result, and
--compare FILE checks this run's against those an earlier run wrote, query by query
(same name, same fleet): at how many of its times (an instant query's one, a panel's
steps) each returns other series or other values, and the first such time; so that two
versions of the rules and dashboards, run on the same blocks, can be checked to page and
show the same hosts with the same values. Results go to bench/RESULTS.md by hand, with
the date and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import httpx  # noqa: E402
import yaml  # noqa: E402

from ktel.stack.proc import free_port  # noqa: E402
from ktel.stack.prometheus import RULES, LocalPrometheus  # noqa: E402
from tests.system.test_dashboards_e2e import panel_queries  # noqa: E402

PROMTOOL = "/usr/bin/promtool"  # Debian's, with /usr/bin/prometheus
HEARTBEAT_US = 10_000_000  # agent.heartbeat_seconds' default
MISSED_HEARTBEATS = 3  # processors/fleet_metrics.py: heartbeats missed before a host is down
HOST_TTL_MS = 3_600_000  # aggregate.host_ttl_seconds' default: a silent host is forgotten
BLOCK_MS = 7_200_000  # Prometheus' (and promtool's) 2-hour blocks
DAY_MS = 86_400_000
LEAD_MS = 600_000  # samples before the day the queries read, so that it is full
BASELINE_EARLIER_MS = 3 * DAY_MS
DASHBOARD_RANGE_S = 3600  # the dashboards' default time range (now-1h)
GRAFANA_STEP_S = 15  # Grafana's step for it: the data source's scrape interval (15 s by default)
JOB = "ktel-process"
LAST, UP, STOPPED = (
    "ktel_agent_last_heartbeat_timestamp_seconds",
    "ktel_agent_up",
    "ktel_agent_stopped_timestamp_seconds",
)


@dataclass
class Host:
    label: str  # host_id="…"
    phase_us: int  # its first heartbeat's offset in the day
    worker: int  # the worker that reads its heartbeats
    moved_to: int | None  # the worker that reads them after the rebalance
    end_ms: int | None  # when its agent died or stopped (its last heartbeat before)
    stopped: bool  # stopped on purpose: the last heartbeat says so


@dataclass
class Fleet:
    hosts: list[Host]
    start_ms: int
    end_ms: int  # the queries' time
    rebalance_ms: int
    workers: int
    scrape_ms: int


def make_fleet(n: int, end_ms: int, args: argparse.Namespace) -> Fleet:
    rng = random.Random(n)  # the same fleet for the same size, so --keep's blocks match
    start_ms = end_ms - DAY_MS - LEAD_MS
    # At least one of each, so that the baseline has them too.
    down, stopped = (max(1, round(n * share)) if share else 0 for share in (args.down, args.stopped))
    fates = ["stopped"] * stopped + ["down"] * down + [""] * (n - down - stopped)
    rng.shuffle(fates)
    hosts = []
    for i, fate in enumerate(fates):
        worker = i % args.workers
        hosts.append(
            Host(
                label=f'host_id="{n:08x}{i:024x}"',
                phase_us=rng.randrange(HEARTBEAT_US),
                worker=worker,
                moved_to=(worker + 1) % args.workers if worker == 0 and args.workers > 1 else None,
                end_ms=rng.randrange(start_ms, end_ms) if fate else None,
                stopped=fate == "stopped",
            )
        )
    return Fleet(
        hosts, start_ms, end_ms, start_ms + (end_ms - start_ms) // 2, args.workers, args.scrape_seconds * 1000
    )


def host_series(f: Fleet, h: Host, lo_ms: int, hi_ms: int, out: list[str]) -> None:
    """The samples in [lo_ms, hi_ms) of the series ``h``'s workers export, as OpenMetrics
    lines, each series' in time order."""
    first_us = f.start_ms * 1000 + h.phase_us
    # The last heartbeat's index: the one before the agent died or stopped, else none.
    k_end = None if h.end_ms is None else (h.end_ms * 1000 - first_us) // HEARTBEAT_US
    # (worker, from, to, the last heartbeat it can have read): who exports the host when
    spans = []
    if h.moved_to is None:
        spans.append((h.worker, f.start_ms, None, k_end))
    else:
        k_moved = (f.rebalance_ms * 1000 - first_us) // HEARTBEAT_US
        before = k_moved if k_end is None else min(k_moved, k_end)
        spans.append((h.worker, f.start_ms, None, before))
        if k_end is None or k_end > k_moved:
            spans.append((h.moved_to, f.rebalance_ms, None, k_end))
    for worker, span_lo, _, k_last in spans:
        if k_last is not None and k_last < 0:
            continue
        # Forgotten an hour after the last heartbeat it read.
        span_hi = f.end_ms + 1 if k_last is None else (first_us + k_last * HEARTBEAT_US) // 1000 + HOST_TTL_MS
        lo, hi = max(lo_ms, span_lo), min(hi_ms, span_hi)
        offset = worker * f.scrape_ms // f.workers  # each worker scraped at its own phase
        labels = f'{{{h.label},instance="worker-{worker}:9466",job="{JOB}"}} '
        last, up, stopped = LAST + labels, UP + labels, STOPPED + labels
        for t in range(lo + (offset - lo) % f.scrape_ms, hi, f.scrape_ms):
            k = (t * 1000 - first_us) // HEARTBEAT_US
            if k < 0:
                continue  # no heartbeat read yet
            if k_last is not None and k > k_last:
                k = k_last
            # The agent's clock: its heartbeat's time to the microsecond, a little late.
            beat_us = first_us + k * HEARTBEAT_US + (k * 7919 + h.phase_us) % 4000
            ts = f"{t // 1000}.{t % 1000:03d}"
            value = f"{beat_us // 1_000_000}.{beat_us % 1_000_000:06d}"
            alive = t * 1000 - beat_us <= MISSED_HEARTBEATS * HEARTBEAT_US
            out.append(f"{last}{value} {ts}\n{up}{1 if alive else 0} {ts}\n")
            if h.stopped and k == k_last and k_last == k_end:
                out.append(f"{stopped}{value} {ts}\n")


def fill_raw(fleets: list[Fleet], tsdb: Path, scratch: Path) -> None:
    """Each fleet's samples into TSDB blocks under ``tsdb``: one OpenMetrics file per
    2-hour block, each made into a block by promtool while the next one is written."""
    todo: queue.Queue[Path | None] = queue.Queue(maxsize=1)  # at most two files on disk
    failed: list[str] = []

    def convert() -> None:
        while (path := todo.get()) is not None:
            done = subprocess.run(
                [PROMTOOL, "tsdb", "create-blocks-from", "openmetrics", "-q", str(path), str(tsdb)],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                failed.append(f"{path.name}: {done.stdout}{done.stderr}")
            path.unlink()

    worker = threading.Thread(target=convert)
    worker.start()
    try:
        for f in fleets:
            for lo in range(f.start_ms // BLOCK_MS * BLOCK_MS, f.end_ms + 1, BLOCK_MS):
                if failed:
                    raise RuntimeError(failed[0])
                t0 = time.monotonic()
                path = scratch / f"{len(f.hosts)}-{lo}.om"
                with path.open("w") as out:
                    lines: list[str] = []
                    for h in f.hosts:
                        host_series(f, h, max(lo, f.start_ms), min(lo + BLOCK_MS, f.end_ms + 1), lines)
                        if len(lines) > 100_000:
                            out.write("".join(lines))
                            lines.clear()
                    out.write("".join(lines) + "# EOF\n")
                print(f"  {len(f.hosts)} hosts, block at {lo}: {path.stat().st_size >> 20} MiB written in "
                      f"{time.monotonic() - t0:.0f} s", flush=True)  # fmt: skip
                todo.put(path)
    finally:
        todo.put(None)
        worker.join()
    if failed:
        raise RuntimeError(failed[0])


def alert_expr() -> str:
    [expr] = [
        r["expr"]
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if r.get("alert") == "KtelAgentDown"
    ]
    return str(expr)


def panels() -> dict[str, str]:
    """The dashboard panels' queries that read the heartbeats' look-back (the workers'
    series or the rules' records of them)."""
    return {
        name: expr for name, expr in panel_queries().items() if "last_heartbeat_timestamp_seconds" in expr
    }


@dataclass
class Record:
    rule: dict[str, Any]  # as in ktel-rules.yml
    group: dict[str, Any]  # its group, without its rules
    level: int  # 0: reads only the workers' series; else 1 + the highest of the records it reads

    @property
    def every(self) -> str:
        return str(self.group.get("interval", ""))


def records_read(exprs: list[str]) -> dict[str, Record]:
    """The recording rules of ktel-rules.yml that ``exprs`` read, and those these read."""
    rules = {
        r["record"]: (r, {k: v for k, v in g.items() if k != "rules"})
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if "record" in r
    }

    def names(text: str) -> set[str]:
        return {n for n in rules if re.search(rf"(?<![\w:]){re.escape(n)}(?![\w:])", text)}

    out: dict[str, Record] = {}

    def level(name: str) -> int:
        if name not in out:
            rule, group = rules[name]
            out[name] = Record(rule, group, max((level(n) + 1 for n in names(rule["expr"])), default=0))
        return out[name].level

    for n in set().union(*map(names, exprs)):
        level(n)
    return out


def as_of_its_evaluation(record: Record, known: dict[str, Record]) -> dict[str, Any]:
    """``record``'s rule, each record of its group that it reads read as made at the same
    evaluation (at the same time: its sample of that time, else none), not from the last
    5 minutes, which would keep a host the other no longer has, as Prometheus' staleness
    marker would not (promtool's backfilled series have none)."""
    expr = record.rule["expr"]
    for name, other in known.items():
        if other.group["name"] == record.group["name"] and other is not record:
            reference = rf"(?<![\w:]){re.escape(name)}(?![\w:])"
            assert not re.search(reference + r"\s*[\[{]", expr), f"{name} read with a range or matchers"
            expr = re.sub(reference, f"last_over_time({name}[1s])", expr)
    return {**record.rule, "expr": expr}


def backfill(
    records: list[Record], known: dict[str, Record], fleets: list[Fleet], url: str, out: Path, eval_s: int
) -> None:
    """``records`` evaluated by promtool over each fleet's day, at their group's interval
    (else ``eval_s``), from what ``url`` holds (``known``: the records there, and those
    to come), into blocks under ``out``."""
    groups: dict[str, dict[str, Any]] = {}
    for r in records:
        groups.setdefault(r.group["name"], {**r.group, "rules": []})["rules"].append(
            as_of_its_evaluation(r, known)
        )
    # Prometheus evaluates a group at a phase of its interval from a hash of the group's
    # name and its file's path, as given, and promtool at the same: one path, in every run
    # and for every level, so that each group has the same times throughout.
    path = out / "ktel-rules.yml"
    path.write_text(yaml.safe_dump({"groups": list(groups.values())}))
    for f in fleets:
        done = subprocess.run(
            [
                PROMTOOL,
                "tsdb",
                "create-blocks-from",
                "rules",
                f"--url={url}",
                f"--start={(f.start_ms + LEAD_MS // 2) // 1000}",
                f"--end={f.end_ms // 1000}",
                f"--output-dir={out}",
                f"--eval-interval={eval_s}s",
                path.name,
            ],  # fmt: skip
            cwd=out,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"promtool create-blocks-from rules failed: {done.stdout}{done.stderr}")
    path.unlink()


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(prom: LocalPrometheus, least_s: float = 75, timeout_s: float = 900) -> None:
    """Until Prometheus has had the chance to compact the blocks (it looks every minute)
    and uses under 2 % of a core over 5 s."""
    assert prom._proc is not None
    pid = prom._proc.pid
    started = time.monotonic()
    while True:
        before = cpu_s(pid)
        time.sleep(5)
        busy = (cpu_s(pid) - before) / 5
        if time.monotonic() - started >= least_s and busy < 0.02:
            return
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"Prometheus still busy ({busy:.0%} of a core) after {timeout_s} s")


@dataclass
class Run:
    wall_s: float
    cpu_s: float
    samples: int | None  # totalQueryableSamples
    peak: int | None  # peakSamples
    series: int | None  # of the result
    error: str | None
    result: list[dict[str, Any]] | None = field(default=None, repr=False)  # Prometheus' data.result


def measure(prom: LocalPrometheus, expr: str, at_ms: int, ranged: bool) -> Run:
    assert prom._proc is not None
    params: dict[str, Any] = {"query": expr, "stats": "all"}
    if ranged:
        end = at_ms // 1000 // GRAFANA_STEP_S * GRAFANA_STEP_S  # Grafana aligns the range to its step
        params |= {"start": end - DASHBOARD_RANGE_S, "end": end, "step": GRAFANA_STEP_S}
        path = "query_range"
    else:
        params["time"] = f"{at_ms // 1000}.{at_ms % 1000:03d}"
        path = "query"
    before = cpu_s(prom._proc.pid)
    t0 = time.perf_counter()
    resp = httpx.post(f"{prom.url}/api/v1/{path}", data=params, timeout=300, trust_env=False)
    wall = time.perf_counter() - t0
    used = cpu_s(prom._proc.pid) - before
    body = resp.json()
    if body.get("status") != "success":
        return Run(wall, used, None, None, None, f"{body.get('errorType')}: {body.get('error')}")
    stats = body["data"].get("stats", {}).get("samples", {})
    result = body["data"]["result"]
    return Run(
        wall, used, stats.get("totalQueryableSamples"), stats.get("peakSamples"), len(result), None, result
    )


def start(prom: LocalPrometheus) -> None:
    prom.start(timeout=600)
    wait_idle(prom)


def summary(name: str, hosts: int, runs: list[Run]) -> str:
    ok = [r for r in runs if r.error is None]
    if not ok:
        return f"| {name} | {hosts} | failed: {runs[0].error} | | | | | |"
    warm = ok[1:] or ok
    wall, cpu = (statistics.median(getattr(r, k) for r in warm) for k in ("wall_s", "cpu_s"))
    return (
        f"| {name} | {hosts:,} | {ok[0].wall_s:.3f} | {wall:.3f} | {cpu:.2f} | {ok[0].samples:,} "
        f"| {ok[0].peak:,} | {ok[0].series} | {len(runs) - len(ok)} |"
    )


def by_time(result: list[dict[str, Any]]) -> dict[float, dict[str, str]]:
    """A query's result as time -> {its series' labels (without the metric's name, which
    a record's is not and a panel's is): value}."""
    out: dict[float, dict[str, str]] = {}
    for series in result:
        labels = json.dumps({k: v for k, v in series["metric"].items() if k != "__name__"}, sort_keys=True)
        for t, v in series.get("values", [series.get("value")]):
            out.setdefault(t, {})[labels] = v
    return out


def compare(earlier: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Each query both runs made (by its name and fleet): how many of its times differ,
    in the series returned or their values (to the last digit Prometheus gives), of how
    many, and the first that does."""
    lines = []
    for name in sorted(earlier.keys() & now.keys()):
        if earlier[name] is None or now[name] is None:
            lines.append(f"{name}: failed in {'the earlier run' if earlier[name] is None else 'this run'}")
            continue
        before, after = by_time(earlier[name]), by_time(now[name])
        times = sorted(before.keys() | after.keys())
        differ = [t for t in times if before.get(t, {}) != after.get(t, {})]
        line = f"{name}: {len(times) - len(differ)} of {len(times)} times the same"
        if differ:
            t = differ[0]
            b, a = before.get(t, {}), after.get(t, {})
            line += (
                f"; first other at {t}: earlier only {dict((k, b[k]) for k in b.keys() - a.keys())}, "
                f"now only {dict((k, a[k]) for k in a.keys() - b.keys())}, "
                f"other values {dict((k, (b[k], a[k])) for k in b.keys() & a.keys() if b[k] != a[k])}"
            )
        lines.append(line)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=10_000)
    ap.add_argument("--baseline", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--panel-runs", type=int, default=2)
    ap.add_argument("--scrape-seconds", type=int, default=15, help="deploy/prometheus/prometheus.yml")
    ap.add_argument("--eval-seconds", type=int, default=15, help="deploy/prometheus/prometheus.yml")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--down", type=float, default=0.01, help="share of the hosts whose agent dies in the day")
    ap.add_argument("--stopped", type=float, default=0.005, help="share stopped on purpose in the day")
    ap.add_argument("--keep", type=Path, help="keep (or reuse) the raw series' blocks here")
    ap.add_argument("--no-panels", action="store_true")
    ap.add_argument(
        "--results", type=Path, help="write each query's first result here (JSON), to compare runs"
    )
    ap.add_argument("--compare", type=Path, help="an earlier run's --results: say where this run's differ")
    args = ap.parse_args()

    expr = alert_expr()
    queries = {} if args.no_panels else panels()
    with tempfile.TemporaryDirectory(prefix="ktel-lookback-") as tmp:
        raw = args.keep or Path(tmp) / "raw"
        stamp = raw / "fleet.json"
        settings = {
            k: v
            for k, v in vars(args).items()
            if k not in ("runs", "panel_runs", "keep", "no_panels", "results", "compare")
        }
        kept = json.loads(stamp.read_text()) if stamp.exists() else {}
        end_ms = kept["end_ms"] if kept.get("settings") == settings else int(time.time()) * 1000
        fleets = [
            make_fleet(args.hosts, end_ms, args),
            make_fleet(args.baseline, end_ms - BASELINE_EARLIER_MS, args),
        ]
        if kept.get("settings") == settings:
            print(f"reusing the raw blocks in {raw}", flush=True)
        else:
            shutil.rmtree(raw, ignore_errors=True)
            raw.mkdir(parents=True)
            t0 = time.monotonic()
            print("writing the raw series' blocks", flush=True)
            fill_raw(fleets, raw, Path(tmp))
            stamp.write_text(json.dumps({"settings": settings, "end_ms": end_ms}))
            print(f"raw blocks in {time.monotonic() - t0:.0f} s", flush=True)
        tsdb = Path(tmp) / "prometheus" / "tsdb"
        tsdb.mkdir(parents=True)
        for block in raw.iterdir():
            if block.is_dir():  # linked: Prometheus replaces a block's files, never edits them
                shutil.copytree(block, tsdb / block.name, copy_function=os.link)

        prom = LocalPrometheus(tsdb.parent, port=free_port(), native_histograms=False)
        records = records_read([expr, *queries.values()])
        try:
            start(prom)
            # A record is made from what Prometheus holds: those that read other records
            # after these are in it (Prometheus restarted on their blocks).
            for level in range(max((r.level for r in records.values()), default=-1) + 1):
                made = Path(tmp) / f"records-{level}"
                made.mkdir()
                t0 = time.monotonic()
                todo = [r for r in records.values() if r.level == level]
                backfill(todo, records, fleets, prom.url, made, args.eval_seconds)
                print(f"recording rules {[r.rule['record'] for r in todo]} backfilled in "
                      f"{time.monotonic() - t0:.0f} s", flush=True)  # fmt: skip
                prom.stop()
                for block in made.iterdir():
                    block.rename(tsdb / block.name)
                start(prom)
            blocks = sorted(p.name for p in tsdb.iterdir() if (p / "meta.json").exists())
            size = sum(p.stat().st_size for p in tsdb.rglob("*") if p.is_file()) >> 20
            print(f"Prometheus ready: {len(blocks)} blocks, {size} MiB", flush=True)

            results: dict[tuple[str, int], list[Run]] = {}
            # The alert, then each record it or the panels read (Prometheus evaluates them
            # too, each at its group's interval), then the panels.
            cases = (
                [("KtelAgentDown", expr, False)]
                + [(f"record {n} (every {r.every or f'{args.eval_seconds}s'})", r.rule["expr"], False)
                   for n, r in sorted(records.items())]
                + [(n, e, True) for n, e in queries.items()]
            )  # fmt: skip
            for name, q, ranged in cases:
                for _ in range(args.panel_runs if ranged else args.runs):
                    for f in fleets:  # interleaved: both see the same load
                        run = measure(prom, q, f.end_ms, ranged)
                        results.setdefault((name, len(f.hosts)), []).append(run)
                        print(f"  {name} {len(f.hosts)} hosts: {run}", flush=True)
        finally:
            prom.stop()

    print()
    print(f"scrape every {args.scrape_seconds} s, rules every {args.eval_seconds} s; panels: range "
          f"{DASHBOARD_RANGE_S} s, step {GRAFANA_STEP_S} s")  # fmt: skip
    print("| query | hosts | first wall (s) | wall, median (s) | Prometheus CPU, median (s) "
          "| totalQueryableSamples | peakSamples | result series | failed |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (name, hosts), runs in results.items():
        print(summary(name, hosts, runs))
    firsts = {f"{name} / {hosts}": runs[0].result for (name, hosts), runs in results.items()}
    if args.results:
        args.results.write_text(json.dumps(firsts, indent=1, sort_keys=True))
    if args.compare:
        print()
        print(f"against {args.compare}:")
        print("\n".join(compare(json.loads(args.compare.read_text()), firsts)))


if __name__ == "__main__":
    main()
