"""OpenTelemetry names -> Prometheus names (one place for both exporters).

Per the OpenTelemetry-to-Prometheus compatibility spec: characters outside
``[a-zA-Z0-9_]`` become ``_`` (so ``host.id`` becomes ``host_id``), and a name
starting with a digit gets a leading ``_``.
"""

from __future__ import annotations

import functools
import re

_INVALID = re.compile(r"[^a-zA-Z0-9_]")


# Names repeat in every snapshot; the regex per label was most of the exporters' label cost.
@functools.lru_cache(maxsize=4096)
def label_name(name: str) -> str:
    out = _INVALID.sub("_", name)
    return "_" + out if out[:1].isdigit() else out


def prom_labels(name: str, labels: dict[str, str]) -> list[tuple[str, str]]:
    """Sorted, de-duplicated, non-empty labels including __name__ (remote-write 1.0 rules)."""
    merged: dict[str, str] = {}
    for k, v in labels.items():
        if v == "" or v is None:
            continue
        merged[label_name(k)] = str(v)  # a later duplicate after sanitising wins
    merged["__name__"] = label_name(name)
    return sorted(merged.items())
