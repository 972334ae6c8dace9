"""The dashboards' queries, as Grafana sends them (tests/system/test_dashboards_e2e.py
puts the variables' values in): promtool accepts each, and on-call's panel of agents
down, evaluated by promtool over a fleet made up for it, shows only hosts down, the
silent longest first, at most `$topk` of them, and none stopped on purpose."""

from __future__ import annotations

import yaml

from tests.integration.test_alert_rules import run
from tests.system.test_dashboards_e2e import VARIABLES, panel_queries


def test_promtool_accepts_every_dashboard_query(tmp_path):
    queries = panel_queries()
    rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(queries.values())]
    path = tmp_path / "dashboards.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    assert f"SUCCESS: {len(queries)} rules found" in run("check", "rules", str(path))


def test_agents_down_shows_the_hosts_down_silent_longest_first(tmp_path):
    [expr] = [e for name, e in panel_queries().items() if name.startswith("on-call / Agents down")]
    top = int(VARIABLES["$topk"])
    at = 3600  # seconds: the evaluation's time()
    down = [f"h{i:02}" for i in range(top + 2)]  # each silent i + 1 minutes
    series = [
        *({"series": f'ktel_agent_up{{host_id="{h}"}}', "values": "0x60"} for h in down),
        *(
            {"series": f'ktel_agent_last_heartbeat_timestamp_seconds{{host_id="{h}"}}', "values": f"{v}x60"}
            for h, v in zip(down, range(at - 60, 0, -60), strict=False)
        ),
        # After a rebalance two workers export a host: the old one says down, the new one up.
        {"series": 'ktel_agent_up{host_id="up", instance="old"}', "values": "0x60"},
        {"series": 'ktel_agent_up{host_id="up", instance="new"}', "values": "1x60"},
        {"series": 'ktel_agent_last_heartbeat_timestamp_seconds{host_id="up"}', "values": "0x60"},
        # Stopped on purpose, silent longest of all.
        {"series": 'ktel_agent_up{host_id="drained"}', "values": "0x60"},
        {"series": 'ktel_agent_last_heartbeat_timestamp_seconds{host_id="drained"}', "values": "0x60"},
        {"series": 'ktel_agent_stopped_timestamp_seconds{host_id="drained"}', "values": "0x60"},
    ]
    shown = [{"labels": f'{{host_id="{h}"}}', "value": 60 * (i + 1)} for i, h in enumerate(down)][-top:]
    (tmp_path / "none.yml").write_text("groups: []\n")
    tests = {
        "rule_files": ["none.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [{"expr": expr, "eval_time": f"{at}s", "exp_samples": shown}],
            }
        ],
    }
    path = tmp_path / "test.yml"
    path.write_text(yaml.safe_dump(tests))
    assert "SUCCESS" in run("test", "rules", str(path))
