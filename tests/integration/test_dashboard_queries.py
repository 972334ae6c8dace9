"""The dashboards' queries, as Grafana sends them (tests/system/test_dashboards_e2e.py
puts the variables' values in): promtool accepts each, and on-call's panel of agents
down, evaluated by promtool over a fleet made up for it, shows only hosts down, the
silent longest first, at most `$topk` of them, and none stopped on purpose; it and fleet
overview's count read the hosts KtelAgentDown pages for, and fleet overview's time since
the last heartbeat reads them as it does, all from the heartbeats' recording rules, which
lose no heartbeat time between two of their 5-minute records. Each top-N panel of what a
host may have none of (OOM kills, drops, steal, queued I/O) shows only those with some,
and on-call's burn rate is over each burn alert's threshold while that alert's condition
holds."""

from __future__ import annotations

import yaml

from tests.integration.test_alert_rules import RULES, run
from tests.system.test_dashboards_e2e import VARIABLES, panel_queries
from tests.unit.test_dashboards import AGES, metrics, promql


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
    promtool_holds(
        tmp_path,
        series,
        [{"expr": expr, "eval_time": f"{at}s", "exp_samples": shown}],
        rules=str(RULES),  # (the panel reads the heartbeats' recording rules)
    )


def promtool_holds(
    tmp_path,
    series: list[dict],
    cases: list[dict],
    rules: str | None = None,
    every: str = "1m",
    order: list[str] | None = None,
) -> None:
    """promtool evaluates each of ``cases`` (expression, time, expected samples) over
    ``series``, one sample a minute, with ``rules`` loaded (none: the panels alone),
    every rule group evaluated ``every`` (promtool ignores a group's own interval), in
    ``order`` (by name; by default in no order of its own)."""
    if rules is None:
        (tmp_path / "none.yml").write_text("groups: []\n")
    tests = {
        "rule_files": [rules or "none.yml"],
        "evaluation_interval": every,
        **({"group_eval_order": order} if order else {}),
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": cases}],
    }
    path = tmp_path / "test.yml"
    path.write_text(yaml.safe_dump(tests))
    assert "SUCCESS" in run("test", "rules", str(path))


def minutes(values: dict[int, float], until: int) -> str:
    """A promtool series of one sample a minute up to minute ``until``: ``values`` by
    minute, none (``_``) at the minutes it does not name."""
    return " ".join(str(values[m]) if m in values else "_" for m in range(until + 1))


def test_agents_down_shows_the_hosts_ktel_agent_down_pages_for(tmp_path):
    """Both Agents down panels read the hosts KtelAgentDown pages for, with its value
    (seconds since the last heartbeat): a host the workers have forgotten
    (aggregate.host_ttl_seconds) until a day after its last heartbeat, as the alert, a
    host whose agent was stopped on purpose, then started again under another worker and
    died, as the alert, not spared for the old worker's record of the stop, and a host
    whose heartbeats' times went back (rebooted with its clock behind), timed from the
    highest of them, as the alert. Fleet overview's time since the last heartbeat shows the same
    hosts and times, and those up: a forgotten host too, not one stopped on purpose."""
    at = 50  # minutes: the evaluation's time
    up, last, stopped = (
        "ktel_agent_up",
        "ktel_agent_last_heartbeat_timestamp_seconds",
        "ktel_agent_stopped_timestamp_seconds",
    )
    every = range(at + 1)
    fleet = {
        # Silent since 0; its worker forgot it at 20m: no series of it since.
        f'{up}{{host_id="forgotten", instance="w1"}}': {m: 0 for m in range(21)},
        f'{last}{{host_id="forgotten", instance="w1"}}': {m: 0 for m in range(21)},
        # Stopped on purpose at 1m under w1, which keeps its record of the stop; started
        # again at 5m under w2, SIGKILLed at 25m.
        f'{up}{{host_id="restarted", instance="w1"}}': {m: 0 for m in every},
        f'{last}{{host_id="restarted", instance="w1"}}': {m: 60 for m in every},
        f'{stopped}{{host_id="restarted", instance="w1"}}': {m: 60 for m in every},
        f'{up}{{host_id="restarted", instance="w2"}}': {m: int(m < 28) for m in range(5, at + 1)},
        f'{last}{{host_id="restarted", instance="w2"}}': {m: 60 * min(m, 25) for m in range(5, at + 1)},
        # Stopped on purpose at 2m (a node drained): no page.
        f'{up}{{host_id="drained", instance="w1"}}': {m: 0 for m in every},
        f'{last}{{host_id="drained", instance="w1"}}': {m: 120 for m in every},
        f'{stopped}{{host_id="drained", instance="w1"}}': {m: 120 for m in every},
        # Down since 40m.
        f'{up}{{host_id="down", instance="w2"}}': {m: int(m < 43) for m in every},
        f'{last}{{host_id="down", instance="w2"}}': {m: 60 * min(m, 40) for m in every},
        # Rebooted at 31m with its clock 10 minutes behind, dead at 35m.
        f'{up}{{host_id="rebooted", instance="w2"}}': {m: int(m < 38) for m in every},
        f'{last}{{host_id="rebooted", instance="w2"}}': {
            m: 60 * (m if m <= 30 else min(m, 35) - 10) for m in every
        },
        # Up, under w2 since a rebalance; w1 still says down.
        f'{up}{{host_id="up", instance="w1"}}': {m: 0 for m in every},
        f'{last}{{host_id="up", instance="w1"}}': {m: 0 for m in every},
        f'{up}{{host_id="up", instance="w2"}}': {m: 1 for m in every},
        f'{last}{{host_id="up", instance="w2"}}': {m: 60 * m for m in every},
    }
    paged = {
        "forgotten": 60 * at,
        "restarted": 60 * (at - 25),
        "down": 60 * (at - 40),
        "rebooted": 60 * (at - 30),
    }
    promtool_holds(
        tmp_path,
        [{"series": s, "values": minutes(v, at)} for s, v in fleet.items()],
        agents_down_cases(f"{at}m", paged, up=["up"]),
        rules=str(RULES),  # (the alert reads ktel:agent_up:max and the heartbeats' records)
    )


def agents_down_cases(at: str, paged: dict[str, float], up: list[str]) -> list[dict]:
    """promtool's cases at ``at`` of KtelAgentDown and both Agents down panels: the hosts
    ``paged``, each with its seconds since its last heartbeat; of fleet overview's time
    since the last heartbeat: those and the hosts ``up``, at 0."""
    [alert] = [
        r["expr"]
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if r.get("alert") == "KtelAgentDown"
    ]
    queries = panel_queries()
    [panel] = [e for name, e in queries.items() if name.startswith("on-call / Agents down")]
    [count] = [e for name, e in queries.items() if name.startswith("fleet-overview / Agents down")]
    [ages] = [
        e for name, e in queries.items() if name.startswith("fleet-overview / Top $topk hosts by time since")
    ]
    shown = [{"labels": f'{{host_id="{h}"}}', "value": v} for h, v in paged.items()]
    aged = [*shown, *({"labels": f'{{host_id="{h}"}}', "value": 0} for h in up)]
    return [{"expr": expr, "eval_time": at, "exp_samples": shown} for expr in (alert, panel)] + [
        {"expr": count, "eval_time": at, "exp_samples": [{"labels": "{}", "value": len(paged)}]},
        {"expr": ages, "eval_time": at, "exp_samples": aged},
    ]


def test_a_heartbeat_time_seen_between_two_of_the_5_minute_records_is_kept(tmp_path):
    """KtelAgentDown and the panels that read hosts as it does take the day of heartbeat
    times from records made every 5 minutes (ktel-heartbeats-5m), and only the last 10
    minutes from the workers' series. Each record holds the highest of the 5 minutes
    before it, so a time the workers exported only between two of them is not lost: here
    a host's heartbeat times peak at 32m, then go back (rebooted with its clock 10 minutes
    behind) until it dies at 35m, and its worker forgets it at 45m. At 60m, with every
    rule evaluated every 5 minutes (at 30m the host's latest time was 1800, at 35m 1500),
    it is timed from 32m's, as from the workers' own series. The records are made after
    the rules that read them, so that what those read of them is 5 minutes old, as it
    may be in Prometheus: a host up is timed from its latest heartbeat all the same, also
    when its series has no label the records lack."""
    at = 60
    up, last = "ktel_agent_up", "ktel_agent_last_heartbeat_timestamp_seconds"
    held = range(46)  # minutes its worker exports it
    fleet = {
        f'{up}{{host_id="rebooted", instance="w1"}}': {m: int(m < 38) for m in held},
        f'{last}{{host_id="rebooted", instance="w1"}}': {
            m: 60 * (m if m <= 32 else min(m, 35) - 10) for m in held
        },
        # (with host_id alone, as the records have: relabelled so, or federated)
        f'{up}{{host_id="up"}}': {m: 1 for m in range(at + 1)},
        f'{last}{{host_id="up"}}': {m: 60 * m for m in range(at + 1)},
    }
    promtool_holds(
        tmp_path,
        [{"series": s, "values": minutes(v, at)} for s, v in fleet.items()],
        agents_down_cases(f"{at}m", {"rebooted": 60 * (at - 32)}, up=["up"]),
        rules=str(RULES),
        every="5m",
        order=sorted(
            (g["name"] for g in yaml.safe_load(RULES.read_text())["groups"]),
            key=lambda name: name == "ktel-heartbeats-5m",
        ),
    )


def test_top_n_panels_show_only_what_has_some(tmp_path):
    """Every top-N panel but those of heartbeat ages (each host has one) is empty over a
    fleet where nothing happens, not `$topk` hosts at zero, and once two hosts have OOM
    kills and a probe of an agent drops events, shows those and nothing else."""
    top = int(VARIABLES["$topk"])
    hosts = [f"h{i:02}" for i in range(top + 2)]
    # Minutes 0 to 60: nothing until 30, then "killed" has two OOM kills, "oom" one more,
    # and h00's runq_latency probe drops 60 events a minute.
    quiet = "0x60"
    per_host = [
        ("oom_kills_total", "", "3x60"),
        ("ktel_node_cpu_steal_seconds_total", "", "7x60"),
        ("ktel_node_cpus", "", "4x60"),
        ("ktel_node_context_switches_total", "", "9x60"),
        ("ktel_node_disk_io_in_progress", ', device="sda"', quiet),
        ("file_created_total", ', directory="/var/lib"', "2x60"),
        ("ktel_agent_bpf_map_entries", ', probe="runq_latency", map="starts"', quiet),
        ("ktel_agent_bpf_map_max_entries", ', probe="runq_latency", map="starts"', "1024x60"),
        *(
            (f"{probe}_seconds_bucket", f', le="{le}"', "6x60")
            for probe in ("syscall_latency", "runq_latency", "block_latency")
            for le in ("0.001", "+Inf")
        ),
    ]
    series = [
        *(
            {"series": f'{name}{{host_id="{h}"{labels}}}', "values": values}
            for name, labels, values in per_host
            for h in hosts
        ),
        *({"series": f'ktel_agent_spool_bytes{{instance="{h}"}}', "values": quiet} for h in hosts),
        *(
            {"series": f'ktel_agent_ringbuf_drops_total{{instance="{h}", probe="runq_latency"}}', "values": v}
            for h, v in zip(hosts, ["0x29 0+60x30"] + ["5x60"] * len(hosts), strict=False)
        ),
        {"series": 'oom_kills_total{host_id="killed"}', "values": "1x29 3x30"},
        {"series": 'oom_kills_total{host_id="oom"}', "values": "4x44 5x15"},
    ]
    ranked = {
        name: expr
        for name, expr in panel_queries().items()
        if expr.startswith("topk(") and not AGES & metrics(promql(expr))
    }
    assert len(ranked) == 14, sorted(ranked)
    oom_kills = [{"labels": '{host_id="killed"}', "value": 2}, {"labels": '{host_id="oom"}', "value": 1}]
    drops = [{"labels": '{instance="h00", probe="runq_latency"}', "value": 1}]
    after = {
        name: oom_kills if "oom_kills_total" in e else drops if "ringbuf_drops" in e else []
        for name, e in ranked.items()
    }
    assert sum(map(bool, after.values())) == 3  # two panels of OOM kills, one of drops
    promtool_holds(
        tmp_path,
        series,
        [{"expr": e, "eval_time": "20m", "exp_samples": []} for e in ranked.values()]
        + [{"expr": e, "eval_time": "60m", "exp_samples": after[name]} for name, e in ranked.items()],
    )


def test_burn_rate_panel_is_over_each_threshold_while_its_alert_condition_holds(tmp_path):
    """On-call's burn rate panel draws, per exporter, what each burn alert compares with
    its threshold. Records all on time for five hours, then all late for 30 minutes, then
    on time again: 5 minutes in, the 5 m window burns far past 14.4 and the hour not
    (no page, none drawn); 20 minutes in, both do (a page), and the 6 h and 30 m windows
    are past 6 (a ticket); 15 minutes after, the 5 m window is at 0 (no page) while the
    ticket's windows still hold it open, and so does its line."""
    late = range(300, 330)  # minutes
    at = 345
    count = {m: 60 * m for m in range(at + 1)}
    on_time = {m: 60 * (m - sum(1 for t in late if t < m)) for m in range(at + 1)}
    alerts = {
        r["alert"]: r["expr"]
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if r.get("alert", "").startswith("KtelIngestionLatencyBudgetBurn")
    }
    lines = {
        name: e for name, e in panel_queries().items() if name.startswith("on-call / Error budget burn rate")
    }
    assert len(lines) == 2, sorted(lines)
    [fast, slow] = (lines[name] for name in sorted(lines))  # [A], [B]
    holds = {  # minute: (fast, slow)
        305: (0, 0),
        320: (1, 1),
        345: (0, 1),
    }
    cases = []
    for minute, expected in holds.items():
        for (alert, threshold, line), held in zip(
            [
                ("KtelIngestionLatencyBudgetBurnFast", 14.4, fast),
                ("KtelIngestionLatencyBudgetBurnSlow", 6, slow),
            ],
            expected,
            strict=True,
        ):
            cases += [
                {
                    "expr": f"count({alerts[alert]}) or vector(0)",
                    "eval_time": f"{minute}m",
                    "exp_samples": [{"labels": "{}", "value": held}],
                },
                {
                    "expr": f"({line}) > bool {threshold}",
                    "eval_time": f"{minute}m",
                    "exp_samples": [{"labels": '{exporter="remote-write"}', "value": held}],
                },
            ]
    series = [
        {"series": f"ktel_exporter_ingestion_latency_seconds_{name}", "values": minutes(values, at)}
        for name, values in (
            ('bucket{exporter="remote-write", le="10.0", instance="rw"}', on_time),
            ('count{exporter="remote-write", instance="rw"}', count),
        )
    ]
    promtool_holds(tmp_path, series, cases, rules=str(RULES))  # (the alerts read the recording rules)
