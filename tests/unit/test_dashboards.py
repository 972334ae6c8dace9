"""The Grafana dashboards (deploy/grafana/dashboards/) are valid JSON, and every panel
queries something: a panel without a query would show nothing, silently. That each
query returns data is checked against a real pipeline (tests/system/test_dashboards_e2e.py)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from processors import fleet_metrics

GRAFANA = Path(__file__).resolve().parents[2] / "deploy/grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCE_UID = "ktel-prometheus"  # deploy/grafana/provisioning/datasources/ktel.yml
# Every query names its datasource by the dashboard's `datasource` variable, not by a uid:
# in a Grafana other than the local stack's (a cluster's, kube-prometheus-stack's) the
# Prometheus has a uid of its own (kube-prometheus-stack's: `prometheus`).
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# The variable: Grafana's default Prometheus datasource ("default", as the Kubernetes
# mixins' dashboards have it) until another is chosen.
DATASOURCE_VARIABLE = {
    "name": "datasource",
    "type": "datasource",
    "query": "prometheus",
    "current": {"selected": True, "text": "default", "value": "default"},
}


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
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["expr"].strip(), f"panel {p['title']!r}: empty query {t['refId']}"
            assert t.get("datasource", DATASOURCE) == DATASOURCE, p["title"]
    # Every template variable a query uses is defined.
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    used = {m for p in panels(dashboard) for t in p["targets"] for m in re.findall(r"\$(\w+)", t["expr"])}
    assert used - {"__rate_interval"} <= defined


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_queries_the_prometheus_its_grafana_has(path):
    """The datasource is the dashboard's first variable, and everything that queries
    (panels, their queries, the `host` variable) goes through it: loaded into any Grafana,
    the dashboard reads that Grafana's Prometheus, whatever its uid; locally, the
    provisioned one, which is the default."""
    dashboard = json.loads(path.read_text())
    variables = dashboard["templating"]["list"]
    assert DATASOURCE_VARIABLE.items() <= variables[0].items()
    for v in variables[1:]:
        assert v.get("datasource", DATASOURCE) == DATASOURCE, v["name"]
    assert DATASOURCE_UID not in path.read_text()  # no query pinned to the local stack's uid


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


def test_both_agents_down_panels_read_the_same_hosts():
    """Fleet overview counts the hosts on-call ranks: one set of hosts down, the record
    of them, which leaves out an agent stopped by a signal (a node drained or retired)
    while that stop is its last heartbeat, as the alert on silent hosts spares it (below;
    that both show the alert's hosts is checked by promtool:
    tests/integration/test_dashboard_queries.py)."""
    downs = {
        path.stem: t["expr"]
        for path in DASHBOARDS
        for p in panels(json.loads(path.read_text()))
        if p["title"].startswith("Agents down")
        for t in p["targets"]
    }
    assert set(downs) == {"fleet-overview", "on-call"}
    hosts = downs["on-call"].removeprefix("time() - bottomk($topk, ").removesuffix(")")
    assert hosts == f'{DOWN}{{host_id=~"$host"}}'
    assert downs["fleet-overview"] == f"count({hosts}) or vector(0)"


def test_the_heartbeat_panels_read_hosts_as_ktel_agent_down_does():
    """On-call's Agents down shows KtelAgentDown's hosts, those chosen (`$host`), as
    fleet overview's count of them does (above), with its value, and fleet overview's
    time since the last heartbeat reads each host's as the alert does, sparing those it
    spares for a stop: a day of heartbeat times, so a host the workers have forgotten
    (aggregate.host_ttl_seconds) stays there while it pages, and the same function of
    them, so the same time and the same hosts. Each shows the $topk with the oldest
    heartbeat (`bottomk` of the times, the same as `topk` of the ages, which would take
    the age of every host at every step). Matchers (`$host`) are left out of the
    comparison, ranges and functions not; a recording rule is read as its query, in the
    alert and in the panels."""
    groups = yaml.safe_load((GRAFANA.parent / "prometheus/ktel-rules.yml").read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    [alert] = [r["expr"] for r in rules if r.get("alert") == "KtelAgentDown"]
    records = {r["record"]: r["expr"] for r in rules if "record" in r}

    def expanded(query: str) -> str:
        # A rule reads other rules: until none is left. (A record's matchers go with it.)
        while found := re.search(
            rf"(?<![\w:])(?:{'|'.join(map(re.escape, records))})(?![\w:])(\{{[^}}]*\}})?", query
        ):
            name = found.group().split("{")[0]
            query = f"{query[: found.start()]}({records[name]}){query[found.end() :]}"
        return query

    pages = promql(expanded(alert))
    queries = {
        p["title"]: expanded(t["expr"])
        for path in DASHBOARDS
        for p in panels(json.loads(path.read_text()))
        for t in p["targets"]
    }
    # time() - ((heard from, unless stopped) unless up, and some host exported)
    now, hosts = pages.args
    heard = hosts.args[0].args[0]
    assert "ktel_agent_stopped_timestamp_seconds" in metrics(heard), alert
    # The panels: time() - the $topk whose last heartbeat is oldest, of the same hosts.
    for title, shown in [
        ("Agents down, the $topk silent longest", hosts),
        ("Top $topk hosts by time since last heartbeat", heard),
    ]:
        panel = promql(queries[title])
        [oldest] = bounds(panel)
        assert (oldest.name, oldest.args[-1]) == ("bottomk", shown), title
        assert panel == Expr("binary", "-", (now, oldest)), title


NATIVE_LATENCY = re.compile(r"histogram_quantile\(([\d.]+), sum by \(host_id\) \(rate\((\w+)_nanoseconds\{")


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_each_latency_panel_also_reads_classic_histograms(path):
    """A native histogram (`*_nanoseconds`) is there only with Prometheus' native
    histograms; with remote_write.histograms = "classic", or from the pull endpoint, the
    same latency is the `*_seconds_bucket` series by `le`: each query reads both, the
    native one first (`or`: a host shows once), and ranks the hosts over both."""
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
                # (then, in a top-N panel, the filter of hosts with any over both, and the `topk`)
                ends = re.escape(f") / 1e9 or {classic}") + r"(\) > 0\))?$"
                assert re.search(ends, t["expr"]), f"panel {p['title']!r}: no classic query"
    assert latency == (3 if path.stem == "kernel-debug" else latency)


def test_provisioning_points_at_the_dashboards_and_makes_its_datasource_the_default():
    [datasource] = yaml.safe_load((GRAFANA / "provisioning/datasources/ktel.yml").read_text())["datasources"]
    # The default, so the dashboards' `datasource` variable ("default") is this one.
    assert (datasource["uid"], datasource["type"], datasource["isDefault"]) == (
        DATASOURCE_UID,
        "prometheus",
        True,
    )
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


# A fleet is meant to be 10,000 hosts: a panel drawing a series per host with `$host` at
# All asks Prometheus for 10,000 series at every refresh and the browser to draw them,
# and nobody reads them. So a panel's query returns a bounded number of series: the
# fleet's aggregates (`sum`, `count`, by labels that are not a host's), or the `$topk`
# hosts at the top (`topk`/`bottomk`), or what those filter. The rule is on the query's
# shape, parsed below (the part of PromQL the dashboards use; anything else is refused,
# so the rule cannot be passed by an unparsed construct).

AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "quantile"}
BOUNDING = {"topk", "bottomk", "limitk"}  # at most k series, whatever the input
# Binary operators by precedence, lowest first (`^` is right-associative).
PRECEDENCE = {
    "or": 1,
    **dict.fromkeys(("and", "unless"), 2),
    **dict.fromkeys(("==", "!=", "<", "<=", ">", ">="), 3),
    **dict.fromkeys(("+", "-"), 4),
    **dict.fromkeys(("*", "/", "%", "atan2"), 5),
    "^": 6,
}
TOKEN = re.compile(
    r"""\s*(?:
      (?P<matchers>\{(?:[^}"']|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')*\})
    | (?P<range>\[[^\]]*\])
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<variable>\$\w+)
    | (?P<name>[A-Za-z_:][\w:]*)
    | (?P<op>==|!=|<=|>=|[-+*/%^<>(),])
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class Expr:
    """A PromQL expression, as much of it as its shape needs: ``kind`` is ``scalar``
    (a number, a dashboard variable, time()), ``string``, ``selector`` (``name`` its
    metric, empty when it selects by ``__name__``; ``window`` its range, ``[1d]``, if it
    has one; its matchers are left out), ``call``, ``aggregation`` (``by``:
    the labels it keeps, or with ``without`` those it drops; None without either) or
    ``binary`` (``name`` the operator)."""

    kind: str
    name: str = ""
    args: tuple[Expr, ...] = ()
    by: frozenset[str] | None = None
    without: bool = False
    on: frozenset[str] | None = None  # a binary operator's `on (...)` labels
    ignoring: frozenset[str] = frozenset()
    group: str = ""  # group_left or group_right
    window: str = ""  # a range selector's range


class Parser:
    def __init__(self, text: str):
        self.tokens: list[tuple[str, str]] = []
        pos, text = 0, text.rstrip()
        while pos < len(text):
            m = TOKEN.match(text, pos)
            assert m, f"cannot read {text[pos:]!r}"
            kind = m.lastgroup
            assert kind
            self.tokens.append((kind, m.group(kind)))
            pos = m.end()
        self.at = 0

    def peek(self) -> str:
        return self.tokens[self.at][1] if self.at < len(self.tokens) else ""

    def take(self, expected: str | None = None) -> tuple[str, str]:
        assert self.at < len(self.tokens), "unexpected end"
        token = self.tokens[self.at]
        assert expected is None or token[1] == expected, f"{expected!r} expected, not {token[1]!r}"
        self.at += 1
        return token

    def parse(self) -> Expr:
        e = self.expr(1)
        assert self.at == len(self.tokens), f"not understood from {self.tokens[self.at][1]!r}"
        return e

    def labels(self) -> frozenset[str]:
        self.take("(")
        out = set()
        while self.peek() != ")":
            kind, label = self.take()
            assert kind == "name", label
            out.add(label)
            if self.peek() == ",":
                self.take()
        self.take(")")
        return frozenset(out)

    def expr(self, lowest: int) -> Expr:
        lhs = self.unary()
        while (op := self.peek()) in PRECEDENCE and PRECEDENCE[op] >= lowest:
            self.take()
            on, ignoring, group = None, frozenset[str](), ""
            if self.peek() == "bool":
                self.take()
            if self.peek() in ("on", "ignoring"):
                if self.take()[1] == "on":
                    on = self.labels()
                else:
                    ignoring = self.labels()
            if self.peek() in ("group_left", "group_right"):
                group = self.take()[1]
                if self.peek() == "(":
                    self.labels()
            rhs = self.expr(PRECEDENCE[op] + (op != "^"))
            lhs = Expr("binary", op, (lhs, rhs), on=on, ignoring=ignoring, group=group)
        return lhs

    def unary(self) -> Expr:
        if self.peek() in ("-", "+"):
            self.take()
            return self.expr(PRECEDENCE["^"])
        e = self.primary()
        if self.peek().startswith("["):  # a subquery
            self.take()
        return e

    def args(self) -> tuple[Expr, ...]:
        self.take("(")
        out = []
        while self.peek() != ")":
            out.append(self.expr(1))
            if self.peek() == ",":
                self.take()
        self.take(")")
        return tuple(out)

    def primary(self) -> Expr:
        kind, text = self.take()
        if kind in ("number", "variable"):
            return Expr("scalar", text)
        if kind == "string":
            return Expr("string", text)
        if text == "(":
            e = self.expr(1)
            self.take(")")
            return e
        if kind == "matchers":
            return Expr("selector", "", window=self.window())
        assert kind == "name", f"not understood: {text!r}"
        if text in AGGREGATIONS | BOUNDING:
            by, without = None, False
            if self.peek() in ("by", "without"):
                without = self.take()[1] == "without"
                by = self.labels()
            args = self.args()
            if self.peek() in ("by", "without"):
                without = self.take()[1] == "without"
                by = self.labels()
            return Expr("aggregation", text, args, by=by, without=without)
        if self.peek() == "(":
            args = self.args()
            return Expr("scalar" if text in ("time", "scalar", "pi") else "call", text, args)
        if self.peek().startswith("{"):
            self.take()
        return Expr("selector", text, window=self.window())

    def window(self) -> str:
        return self.take()[1] if self.peek().startswith("[") else ""


def promql(text: str) -> Expr:
    return Parser(text).parse()


def metrics(e: Expr) -> set[str]:
    return {e.name} if e.kind == "selector" else set().union(*map(metrics, e.args))


def host_labels(e: Expr) -> set[str]:
    """The labels that tell hosts apart in ``e``'s series: ``host_id``, and ``instance``
    on the self-metrics an agent serves (``ktel_agent_*``; scraped on every node), not
    on those of the few workers and exporters, nor the per-host series the workers
    export from heartbeats (processors/fleet_metrics.py)."""
    per_host = {name for name, _, _ in fleet_metrics.FAMILIES.values()}
    agents = {m for m in metrics(e) if m.startswith("ktel_agent_") and m not in per_host}
    return {"host_id", "instance"} if agents else {"host_id"}


def scalar(e: Expr) -> bool:
    return e.kind == "scalar" or (e.kind == "binary" and all(map(scalar, e.args)))


def one_per_host(e: Expr) -> bool:
    """Whether ``e`` may return a series per host, as many as the fleet has."""
    if e.kind in ("scalar", "string"):
        return False
    if e.kind == "selector":  # every label kept, the host's too
        return True
    if e.kind == "call":  # rate(), histogram_quantile(), ...: their vector argument's
        return any(map(one_per_host, e.args))
    if e.kind == "aggregation":
        if e.name in BOUNDING:
            return False
        if e.without:
            return one_per_host(e.args[-1]) and not host_labels(e) <= (e.by or set())
        return bool((e.by or set()) & host_labels(e))
    lhs, rhs = e.args
    if scalar(lhs) or scalar(rhs):
        return one_per_host(rhs if scalar(lhs) else lhs)
    if e.name == "or":
        return one_per_host(lhs) or one_per_host(rhs)
    if e.name == "unless" or e.group == "group_left":
        return one_per_host(lhs)
    if e.group == "group_right":
        return one_per_host(rhs)
    if e.name == "and":  # lhs's series whose hosts rhs has: bounded by rhs if matched by host
        by_host = host_labels(e) & (e.on if e.on is not None else host_labels(e) - e.ignoring)
        return one_per_host(lhs) and (one_per_host(rhs) or not by_host)
    # One-to-one (arithmetic, comparison): no more series than the smaller side. A
    # comparison keeping only hosts in trouble is no bound: in an outage that is all.
    return one_per_host(lhs) and one_per_host(rhs)


def bounds(e: Expr) -> list[Expr]:
    return [e] * (e.kind == "aggregation" and e.name in BOUNDING) + [b for a in e.args for b in bounds(a)]


@pytest.mark.parametrize(
    ("expr", "per_host"),
    [
        ('max by (host_id) (ktel_agent_up{host_id=~"$host"})', True),
        ("time() - max by (host_id) (ktel_agent_last_heartbeat_timestamp_seconds)", True),
        ("max by (host_id, device) (ktel_node_disk_io_in_progress) > 2", True),
        ("sum by (host_id) (rate(file_created_total[$__rate_interval]))", True),
        ("sum by (instance, probe) (rate(ktel_agent_ringbuf_drops_total[5m]))", True),
        ("sum without (probe) (rate(ktel_agent_ringbuf_drops_total[5m]))", True),
        ("max by (host_id) (x) == 0 unless on (host_id) ktel_agent_stopped_timestamp_seconds", True),
        ("max by (host_id) (x) and on () (count(ktel_agent_up) > 0)", True),
        ("max by (host_id) (a) / max by (host_id) (b)", True),
        ("topk($topk, max by (host_id) (a) / max by (host_id) (b))", False),
        ("-topk($topk, max by (host_id) (a)) * 100", False),
        ("max by (host_id) (a) and on (host_id) topk($topk, max by (host_id) (b))", False),
        ("max by (host_id) (a) / on (host_id) group_left bottomk(3, max by (host_id) (b))", True),
        ("sum(max by (host_id) (ktel_agent_up))", False),
        ("count(max by (host_id) (ktel_agent_up) == 0) or vector(0)", False),
        ("max by (instance, stage) (ktel_processor_hosts)", False),
        ("max by (instance) (ktel_agent_up)", False),
        ('histogram_quantile(0.99, sum by (exporter, le) (rate(x_bucket{le!="+Inf"}[5m])))', False),
        ('sum by (job) (increase({__name__=~"ktel_(processor|exporter)_x"}[15m]))', False),
    ],
)
def test_a_query_is_judged_one_series_per_host_or_bounded(expr, per_host):
    assert one_per_host(promql(expr)) is per_host


@pytest.mark.parametrize("expr", ["max by (host_id) (a) offset 5m", "sum(a) (", "max by host_id (a)"])
def test_a_query_the_rule_does_not_read_is_refused_not_passed(expr):
    with pytest.raises(AssertionError):
        promql(expr)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_no_panel_draws_a_series_per_host_of_the_whole_fleet(path):
    """Each panel shows the fleet's aggregates, or the `$topk` hosts (or disks, maps, ...)
    at the top, and says so in its title. One knob, the dashboard's `$topk` (10 by
    default, as docs/operating.md says), sets them all: a small fleet, or `$host`
    narrowed to that many hosts, still shows every host."""
    dashboard = json.loads(path.read_text())
    for p in panels(dashboard):
        for t in p["targets"]:
            e = promql(t["expr"])
            assert not one_per_host(e), f"panel {p['title']!r} draws a series per host: {t['expr']}"
            for b in bounds(e):
                assert b.args[0] == Expr("scalar", "$topk"), f"panel {p['title']!r}: {b.name} of a fixed k"
                assert "$topk" in p["title"], f"panel {p['title']!r} does not say it shows the top $topk"
    topk = [v for v in dashboard["templating"]["list"] if v["name"] == "topk"]
    if topk:
        [v] = topk
        assert v["current"]["value"] == "10" and "10" in v["query"].split(",")


# A heartbeat's age: every host heard from has one, and the top N are those silent longest.
# The panels read it, as KtelAgentDown does, from the rules that keep it a day: of every
# host heard from but those stopped on purpose, and of the hosts down.
HEARD = "ktel:agent_last_heartbeat_timestamp_seconds:max1d_unless_stopped"
DOWN = "ktel:agent_last_heartbeat_timestamp_seconds:max1d_down"
AGES = {HEARD, DOWN}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_a_top_n_panel_shows_only_what_has_any_and_says_when_none_has(path):
    """`topk` keeps N series whatever their values: of a rate, an increase or a gauge that
    is 0 on most of a quiet fleet, N hosts at 0, which on-call reads as N hosts at the
    top of OOM kills or drops that have none. So each top-N panel ranks only what is
    above zero (`topk($topk, X > 0)`: NaN, a latency of no events, is not above it
    either) and says so when nothing is; a panel of heartbeat ages ranks hosts that
    each have one."""
    for p in panels(json.loads(path.read_text())):
        for t in p["targets"]:
            e = promql(t["expr"])
            for b in bounds(e):
                if AGES & metrics(b):
                    continue
                ranked = b.args[-1]
                assert (ranked.kind, ranked.name, ranked.args[-1]) == ("binary", ">", Expr("scalar", "0")), (
                    f"panel {p['title']!r} ranks what is at zero too: {t['expr']}"
                )
                assert p["fieldConfig"]["defaults"].get("noValue"), (
                    f"panel {p['title']!r} says nothing when empty"
                )
