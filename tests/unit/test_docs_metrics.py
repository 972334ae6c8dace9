"""The docs name what ktel exports, and only that: every self-metric a ktel process
serves is described in docs/operating.md ("Every self-metric"), so that an operator
finds each series a scrape shows, and every ktel metric the docs, the alert rules and
the dashboards name is one a process serves."""

from __future__ import annotations

import importlib
import pkgutil
import re
import types
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

from edge_agent.agent import AgentCollector
from processors import fleet_metrics

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ktel", "edge_agent", "processors", "exporters")
REFERENCE = ROOT / "docs/operating.md"
# Where users read metric names: the docs, the alert and recording rules, the dashboards.
NAMING = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "deploy/prometheus").glob("*.yml")),
    *sorted((ROOT / "deploy/grafana/dashboards").glob("*.json")),
]
# Names the docs give as replaced, for users upgrading from them (docs/guarantees.md).
RETIRED = {"ktel_processor_process_evictions_total"}
NAME = re.compile(r"\bktel_(?:agent|processor|exporter|consumer|node)_[a-z0-9_]*[a-z0-9]")
HISTOGRAM_SERIES = ("_bucket", "_count", "_sum")


def _exposed(name: str, kind: str) -> str:
    """A family's name as a scrape shows it (prometheus_client adds a counter's _total)."""
    return f"{name}_total" if kind == "counter" else name


def module_metrics() -> list[MetricWrapperBase]:
    """The metrics ktel's modules define (as module globals: every module is imported,
    so that a new one counts too)."""
    out = []
    for package in PACKAGES:
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, f"{package}."):
            module = importlib.import_module(info.name)
            out += [value for value in vars(module).values() if isinstance(value, MetricWrapperBase)]
    return out


def served() -> dict[str, str]:
    """Every ktel self-metric, as a scrape names it, and its type."""
    families: list[Metric] = [f for metric in module_metrics() for f in metric.describe()]
    # The agent's families made at scrape time, from an agent with no probe loaded.
    spool = types.SimpleNamespace(
        dropped_events=0, corrupt_bytes=0, unreadable_bytes=0, depth_bytes=lambda: 0
    )
    families += AgentCollector(types.SimpleNamespace(loaded={}, spool=spool)).collect()  # type: ignore[arg-type]
    names = {_exposed(f.name, f.type): f.type for f in families if f.name.startswith("ktel_")}
    # The worker's per-host series, written as text (processors/fleet_metrics.py).
    names |= {name: kind for name, kind, _ in fleet_metrics.FAMILIES.values()}
    return names


def test_the_self_metrics_are_found():
    names = served()
    # (one of each source: a module's Counter, the agent's collector, the fleet's series)
    assert {"ktel_processor_batches_total", "ktel_agent_spool_bytes", "ktel_agent_up"} <= names.keys()


def test_every_self_metric_is_described_in_the_operators_reference():
    missing = served().keys() - set(NAME.findall(REFERENCE.read_text()))
    assert not missing, f"self-metrics docs/operating.md does not describe: {sorted(missing)}"


def test_every_metric_the_docs_rules_and_dashboards_name_is_served():
    names = served()
    known = names.keys() | RETIRED
    known |= {n + suffix for n, kind in names.items() if kind == "histogram" for suffix in HISTOGRAM_SERIES}
    unknown = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in NAMING
        for name in NAME.findall(path.read_text())
        if name not in known
    }
    assert not unknown, f"metrics no ktel process serves: {sorted(unknown)}"


SELF_METRICS = re.compile(r"^### Every self-metric$(.*?)^## ", re.S | re.M)
LABELLED = re.compile(r"`(ktel_\w+)(?:\{([^}]*)\})?`")


def test_each_self_metric_is_described_with_its_labels():
    """Each metric of "Every self-metric" is given the labels a scrape shows it with, but
    the processing worker's `stage`, which its heading gives once for all the series
    but those it names (and the per-host ones, and the agent's made at scrape time,
    whose labels come from data, not from a module's metric)."""
    labels = {
        _exposed(m._name, m._type): set(m._labelnames)  # type: ignore[attr-defined]
        for m in module_metrics()
        if m._name.startswith("ktel_")  # type: ignore[attr-defined]
    }
    section = SELF_METRICS.search(REFERENCE.read_text())
    assert section
    checked = set()
    for block in section.group(1).split("\n**")[1:]:
        heading, _, table = block.partition("\n\n")
        worker = heading.startswith("Processing worker")
        unstaged = set(NAME.findall(heading))
        for row in table.splitlines():
            cell = row.split(" | ")[0]
            for name, given in LABELLED.findall(cell):
                if name not in labels:
                    continue
                documented = {label.strip() for label in given.split(",") if label.strip()}
                if worker and name not in unstaged:
                    documented.add("stage")
                assert documented == labels[name], f"{heading.split('**')[0]}: {name}"
                checked.add(name)
    assert checked == labels.keys()
