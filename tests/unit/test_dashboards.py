"""The Grafana dashboards (deploy/grafana/dashboards/) are valid JSON, and every panel
queries something: a panel without a query would show nothing, silently. That each
query returns data is checked against a real pipeline (tests/system/test_dashboards_e2e.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

GRAFANA = Path(__file__).resolve().parents[2] / "deploy/grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCE_UID = "ktel-prometheus"  # deploy/grafana/provisioning/datasources/ktel.yml


def panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out += [p, *p.get("panels", [])] if p.get("type") == "row" else [p]
    return [p for p in out if p.get("type") != "row"]


def test_the_four_dashboards_are_there():
    assert {p.stem for p in DASHBOARDS} == {"fleet-overview", "on-call", "kernel-debug", "pipeline-health"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_valid_json_and_every_panel_has_queries(path):
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"]
    assert len({p["id"] for p in panels(dashboard)}) == len(panels(dashboard)), "panel ids repeat"
    assert panels(dashboard), "no panels"
    for p in panels(dashboard):
        assert p["title"], p
        assert p["datasource"]["uid"] == DATASOURCE_UID, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["expr"].strip(), f"panel {p['title']!r}: empty query {t['refId']}"
    # Every template variable a query uses is defined.
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    used = {m for p in panels(dashboard) for t in p["targets"] for m in re.findall(r"\$(\w+)", t["expr"])}
    assert used - {"__rate_interval"} <= defined


def test_cpu_steal_is_shown_per_cpu_as_a_fraction():
    """Steal is counted over all of a node's CPUs: as a percentage it is divided by them,
    else a node of 8 CPUs each half stolen would show 400 %."""
    shown = 0
    for path in DASHBOARDS:
        for p in panels(json.loads(path.read_text())):
            for t in p["targets"]:
                if "ktel_node_cpu_steal_seconds_total" in t["expr"]:
                    assert p["fieldConfig"]["defaults"]["unit"] == "percentunit", p["title"]
                    assert re.search(r"\)\s*/\s*max by \(host_id\) \(ktel_node_cpus\b", t["expr"]), p["title"]
                    shown += 1
    assert shown


def test_agents_down_leaves_out_agents_stopped_on_purpose():
    """An agent stopped by a signal (a node drained or retired) says so in its last
    heartbeat, and its host is not counted down, as the alert on silent hosts spares it."""
    downs = [
        t["expr"]
        for path in DASHBOARDS
        for p in panels(json.loads(path.read_text()))
        if p["title"] == "Agents down"
        for t in p["targets"]
    ]
    assert downs and all("unless on (host_id) ktel_agent_stopped_timestamp_seconds" in e for e in downs)


NATIVE_LATENCY = re.compile(r"histogram_quantile\(([\d.]+), sum by \(host_id\) \(rate\((\w+)_nanoseconds\{")


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_each_latency_panel_also_reads_classic_histograms(path):
    """A native histogram (`*_nanoseconds`) is there only with Prometheus' native
    histograms; with remote_write.histograms = "classic", or from the pull endpoint, the
    same latency is the `*_seconds_bucket` series by `le`: each query reads both, the
    native one first (`or`: a host shows once)."""
    latency = 0
    for p in panels(json.loads(path.read_text())):
        for t in p["targets"]:
            if m := NATIVE_LATENCY.search(t["expr"]):
                q, base = m.groups()
                latency += 1
                classic = (
                    f"histogram_quantile({q}, sum by (host_id, le) "
                    f'(rate({base}_seconds_bucket{{host_id=~"$host"}}[$__rate_interval])))'
                )
                assert t["expr"].endswith(f") / 1e9 or {classic}"), f"panel {p['title']!r}: no classic query"
    assert latency == (3 if path.stem == "kernel-debug" else latency)


def test_provisioning_points_at_the_dashboards_and_the_datasource_uid():
    text = (GRAFANA / "provisioning/datasources/ktel.yml").read_text()
    assert f"uid: {DATASOURCE_UID}" in text
    assert (
        "path: /var/lib/grafana/dashboards/ktel" in (GRAFANA / "provisioning/dashboards/ktel.yml").read_text()
    )


def test_docker_compose_provisions_grafana_and_the_rules():
    compose = yaml.safe_load((GRAFANA.parents[1] / "docker-compose.yml").read_text())["services"]
    assert set(compose["grafana"]["volumes"]) == {
        "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro",
        "./deploy/grafana/dashboards:/var/lib/grafana/dashboards/ktel:ro",
    }
    prometheus = yaml.safe_load((GRAFANA.parent / "prometheus/prometheus.yml").read_text())
    mounted = dict(v.rsplit(":", 1)[0].split(":") for v in compose["prometheus"]["volumes"])
    for rules in prometheus["rule_files"]:
        assert mounted["./deploy/prometheus/" + Path(rules).name] == rules


def test_docker_compose_prometheus_scrapes_each_ktel_process_where_it_serves():
    """Each scrape target names a ktel service and the port its command serves its
    self-metrics on, and the image binds them on every address of its container (on
    127.0.0.1 no other container reaches them, and every panel over them stays empty)."""
    from ktel.config import Config
    from ktel.up import SELF_METRICS, setting

    compose = yaml.safe_load((GRAFANA.parents[1] / "docker-compose.yml").read_text())["services"]
    prometheus = yaml.safe_load((GRAFANA.parent / "prometheus/prometheus.yml").read_text())
    defaults = Config()
    command_port = {
        ("agent",): "agent.metrics_port",
        ("process", "all"): "process.metrics_port",
        ("export", "remote-write"): "remote_write.metrics_port",
        ("export", "otlp"): "otlp.metrics_port",
        ("export", "pull"): "pull.metrics_port",
    }
    assert set(command_port.values()) == set(SELF_METRICS)  # every process that serves them
    targets = [
        t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    scraped = set()
    for target in targets:
        service, port = target.split(":")
        name = command_port[tuple(compose[service]["command"])]
        assert int(port) == setting(defaults, name), target
        scraped.add(name)
    assert scraped == set(SELF_METRICS)
    dockerfile = (GRAFANA.parent / "Dockerfile").read_text()
    assert "ENV KTEL_SERVICE__METRICS_BIND=0.0.0.0" in dockerfile.splitlines()
