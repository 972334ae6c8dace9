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
    ``__name__`` is the metric's name) or ``le`` on a histogram (its buckets' bounds,
    which would also be on its ``_sum`` and ``_count``). prometheus_client's OpenMetrics
    parser refuses a whole scrape for one (``__x``, ``le`` on a histogram), and two
    series differing only in ``__name__``, which the exporters replace with the
    series' name, would be one."""
    name = label_name(label)
    return name.startswith("__") or (name == "le" and typ == "histogram")


def unnamed(snap_series: Iterable[Sequence[Any]]) -> str | None:
    """Why Prometheus cannot take one of these wire series (None: it can): an empty
    metric name or an empty label name. Neither is a name once sanitised, and
    Prometheus' remote-write receiver leaves such a series out and still answers 2xx,
    so the exporter would count it delivered."""
    for name, _typ, labels, _value in snap_series:
        if not name:
            return "series '': no Prometheus name (an empty name)"
        if "" in labels:
            return f"series {name!r:.100}: a label with an empty name"
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
