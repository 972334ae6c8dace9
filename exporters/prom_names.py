"""OpenTelemetry names -> Prometheus names (one place for both exporters).

Per the OpenTelemetry-to-Prometheus compatibility spec: characters outside
``[a-zA-Z0-9_]`` become ``_`` (so ``host.id`` becomes ``host_id``), and a name
starting with a digit gets a leading ``_``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any

_INVALID = re.compile(r"[^a-zA-Z0-9_]")


# Names repeat in every snapshot; the regex per label was most of the exporters' label cost.
@functools.lru_cache(maxsize=4096)
def label_name(name: str) -> str:
    out = _INVALID.sub("_", name)
    return "_" + out if out[:1].isdigit() else out


def reserved(label: str, typ: str) -> bool:
    """Whether Prometheus keeps a label of this name (sanitised) for itself on a series
    of type ``typ``: a name starting with ``__`` (reserved for Prometheus' internal use;
    ``__name__`` is the metric's name) or ``le`` on a histogram (its buckets' bounds).
    ``__name__`` and ``le`` are replaced by what the exporters put there, so two series
    differing only in one would be one series given two values at one instant:
    Prometheus (2.42) keeps one of them and answers 204 to remote-write, so the other
    would be lost and counted delivered."""
    name = label_name(label)
    return name.startswith("__") or (name == "le" and typ == "histogram")


def unfit(snap_series: Iterable[Sequence[Any]]) -> str | None:
    """Why Prometheus cannot take one of these wire series (None: it can): an empty
    metric name or an empty label name, neither a name once sanitised (Prometheus'
    remote-write receiver leaves such a series out and still answers 2xx, so the
    exporter would count it delivered), or a label Prometheus keeps for itself
    (``reserved``). The aggregate writes none of these (processors/aggregate_core.py)."""
    for name, typ, labels, _value in snap_series:
        if not name:
            return "series '': no Prometheus name (an empty name)"
        if "" in labels:
            return f"series {name!r:.100}: a label with an empty name"
        for label in labels:
            if reserved(label, typ):
                return f"series {name!r:.100}: a label Prometheus reserves ({label!r:.100})"
    return None


def prom_labels(name: str, labels: dict[str, str]) -> list[tuple[str, str]]:
    """Sorted, de-duplicated, non-empty labels including __name__ (remote-write 1.0 rules)."""
    merged: dict[str, str] = {}
    for k, v in labels.items():
        if v == "" or v is None:
            continue
        merged[label_name(k)] = str(v)  # a later duplicate after sanitising wins
    merged["__name__"] = label_name(name)
    return sorted(merged.items())
