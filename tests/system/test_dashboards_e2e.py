"""ktel's dashboards and rules against a real run: `ktel up` with the kernel probes the
dashboards chart, some kernel activity (files created, block I/O, an OOM kill), and then
every panel's query, as Grafana would send it, and every recording rule returns data
from the local Prometheus (which scrapes ktel's self-metrics and evaluates its rules).
A panel whose metric was renamed, mislabelled or never exported fails here instead of
showing nothing."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.probe_harness import python_workload
from tests.integration.test_probes_oom_kill import HOG, memory_cgroup
from tests.integration.up_harness import ktel_up

pytestmark = pytest.mark.system

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROBES = ["file_created", "oom_kill", "syscall_latency", "runq_latency", "block_latency"]
# What Grafana puts in place of the dashboards' variables: every host, its rate window
# for a 15 s scrape interval (the local Prometheus scrapes every 5 s), and the default
# number of hosts a per-host panel shows.
VARIABLES = {"$__rate_interval": "1m", "$host": ".*", "$topk": "10"}
# A rule over the time an agent stopped on purpose has data only once one has, and the
# record of the hosts down only once one is: none is in this run (the alert's promtool
# tests, deploy/prometheus/ktel-rules.test.yml, cover them, on the names
# processors/fleet_metrics.py exports).
STOPPED_ONLY = {
    "rule ktel:agent_stopped_timestamp_seconds:max5m",
    "rule ktel:agent_stopped_timestamp_seconds:max1d",
}
DOWN_ONLY = {"rule ktel:agent_last_heartbeat_timestamp_seconds:max1d_down"}
# A panel that shows only hosts in trouble is empty on a healthy run: here it reads the
# record the hosts down are taken from, every host heard from (none is left out as up),
# so that the rest of its query is checked all the same.
WIDENED = {
    "on-call / Agents down, the $topk silent longest [A]": (
        "ktel:agent_last_heartbeat_timestamp_seconds:max1d_down{",
        "ktel:agent_last_heartbeat_timestamp_seconds:max1d_unless_stopped{",
    )
}
# So is a top-N panel of what a host may have none of (drops, queued I/O, OOM kills):
# here its `> 0` is `>= 0`, which lets the hosts at zero in.
ANY = (" > 0)", " >= 0)")


def panel_queries() -> dict[str, str]:
    """``dashboard / panel [refId]`` -> its query, with the variables substituted."""
    out = {}
    for path in sorted((DEPLOY / "grafana/dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                for var, value in VARIABLES.items():
                    expr = expr.replace(var, value)
                out[f"{path.stem} / {panel['title']} [{target['refId']}]"] = expr
    return out


def recording_rules() -> dict[str, str]:
    groups = yaml.safe_load((DEPLOY / "prometheus/ktel-rules.yml").read_text())["groups"]
    return {f"rule {r['record']}": r["record"] for g in groups for r in g["rules"] if "record" in r}


def query(port: int, expr: str) -> list:
    resp = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}, trust_env=False)
    body = resp.json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def kernel_activity(where: Path) -> None:
    """Files created, written and synced (block I/O), and a process the OOM killer kills."""
    for i in range(20):
        with open(where / f"f{i}", "wb") as f:
            f.write(os.urandom(1 << 16))
            f.flush()
            os.fsync(f.fileno())
    with memory_cgroup() as (cgroup, procs):
        hog = python_workload(HOG)
        try:
            (cgroup / procs).write_text(str(hog.pid))
            hog.send()
            assert hog.proc.wait(timeout=120) == -signal.SIGKILL
        finally:
            hog.kill()


def without_data(port: int, queries: dict[str, str], proc: subprocess.Popen) -> dict[str, str]:
    """The queries that still return nothing after a wait: a guard against waiting
    forever, not a timing assertion (rules are evaluated every 15 s, ktel-heartbeats-5m's
    every 5 minutes, rates need two scrapes, and a processing worker fresh from its first
    start may take minutes to process every batch on a loaded machine)."""
    missing = dict(queries)
    deadline = time.monotonic() + 600
    while missing and time.monotonic() < deadline and proc.poll() is None:
        missing = {name: expr for name, expr in missing.items() if not query(port, expr)}
        time.sleep(2)
    return missing


def test_every_dashboard_panel_and_recording_rule_returns_data_after_a_run(tmp_path):
    wanted = panel_queries() | recording_rules()
    assert wanted.keys() >= STOPPED_ONLY | DOWN_ONLY
    for name in STOPPED_ONLY | DOWN_ONLY:
        del wanted[name]
    some = {name: ANY for name, expr in wanted.items() if expr.startswith("topk(") and expr.endswith(ANY[0])}
    assert some
    for name, (only, every) in (WIDENED | some).items():
        assert only in wanted[name], name
        wanted[name] = wanted[name].replace(only, every)
    with ktel_up(tmp_path, KTEL_AGENT__PROBES=json.dumps(PROBES)) as (proc, ports, lines, _env):
        where = Path(tempfile.mkdtemp(prefix="ktel-dash-", dir="/var/tmp"))  # on a block device
        try:
            # The kernel's own histograms come every few seconds: once they are all in,
            # the pipeline delivers, and what happens once (an OOM kill) is made.
            steady = {n: e for n, e in wanted.items() if "latency_nanoseconds" in e and "ktel_" not in e}
            assert len(steady) == 3 and not without_data(ports["prom"], steady, proc), "".join(lines[-30:])
            kernel_activity(where)
            missing = without_data(ports["prom"], wanted, proc)
            assert not missing, "no data for:\n" + "\n".join(f"{n}: {e}" for n, e in missing.items())

            # Every process's own counters are scraped, the pull endpoint's too.
            assert query(ports["prom"], "ktel_exporter_pull_expired_series_total")

            # The ingestion latency SLI: observations from both exporters, positive and finite.
            for exporter in ("remote-write", "otlp"):
                labels = f'{{exporter="{exporter}"}}'
                [count] = query(ports["prom"], f"ktel_exporter_ingestion_latency_seconds_count{labels}")
                [total] = query(ports["prom"], f"ktel_exporter_ingestion_latency_seconds_sum{labels}")
                n, s = float(count["value"][1]), float(total["value"][1])
                assert n > 0 and 0 < s < math.inf, (exporter, n, s)
        finally:
            subprocess.run(["rm", "-rf", str(where)], check=True)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=180) == 0, "".join(lines[-30:])
