"""OpenTelemetry names -> Prometheus names (one place for both exporters).

Per the OpenTelemetry-to-Prometheus compatibility spec: characters outside
``[a-zA-Z0-9_]`` become ``_`` (so ``host.id`` becomes ``host_id``), and a name
starting with a digit gets a leading ``_``; a counter's samples end in ``_total``
(``metric_name``).

Prometheus names the series of a classic histogram ``h`` ``h_bucket``, ``h_sum`` and
``h_count``, and a counter ``c``'s samples ``c_total``: a gauge named ``h_count`` or
``c_total`` would write into another metric's series. ``clash`` refuses such names by
the name alone (``promtool check metrics`` flags the same), not by which other series
were seen first: the aggregate, every exporter and every one of their instances (each
seeing its own partitions) refuse the same series.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any

from opentelemetry.semconv._incubating.attributes.host_attributes import HOST_ID

_INVALID = re.compile(r"[^a-zA-Z0-9_]")


# Names repeat in every snapshot; the regex per label was most of the exporters' label cost.
@functools.lru_cache(maxsize=4096)
def label_name(name: str) -> str:
    out = _INVALID.sub("_", name)
    return "_" + out if out[:1].isdigit() else out


COUNTER_SUFFIX = "_total"
# What Prometheus appends to a classic histogram's name for its series.
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@functools.lru_cache(maxsize=4096)
def metric_name(name: str, typ: str) -> str:
    """The Prometheus name of a series' samples (a histogram's: the name its ``_bucket``,
    ``_sum`` and ``_count`` series or its native series are made of): sanitised, and a
    counter's ending in ``_total``, as OpenMetrics has it and as Prometheus names an
    OTLP counter, so a counter ``x`` is ``x_total`` whichever way it reaches Prometheus
    (and the text exposition's ``# TYPE x_total counter`` names its samples)."""
    pname = label_name(name)
    return pname.removesuffix(COUNTER_SUFFIX) + COUNTER_SUFFIX if typ == "counter" else pname


@functools.lru_cache(maxsize=4096)
def clash(name: str, typ: str) -> str | None:
    """Why a series of this name and type would write a Prometheus series that another
    type's series write (None: it would not), by its name alone (see the module doc): a
    gauge named as a classic histogram's series are (``_bucket``, ``_sum``, ``_count``)
    or as a counter's samples (``_total``); a histogram named as a counter's samples
    (its native series has its name). A counter's samples end in ``_total``, which only
    a counter's may: its name is free."""
    pname = label_name(name)
    if typ != "counter" and pname.endswith(COUNTER_SUFFIX):
        return f"a {typ} ending in {COUNTER_SUFFIX}, as Prometheus names a counter's samples"
    if typ == "gauge" and pname.endswith(HISTOGRAM_SUFFIXES):
        suffix = pname[pname.rindex("_") :]
        return f"a gauge ending in {suffix}, as Prometheus names a histogram's series"
    return None


HOST_LABEL = label_name(HOST_ID)  # host_id, as Prometheus has it
BUCKET_LABEL = "le"  # a classic histogram's bucket's upper bound, as Prometheus names it


def bucket_label(label: str, typ: str) -> bool:
    """Whether a label of this name (sanitised) on a series of type ``typ`` is the one
    Prometheus gives a histogram's buckets, their bounds: ``le`` on a histogram. Its
    buckets' own would replace it, and its ``_sum`` and ``_count`` keep it: two
    histograms differing only in it are one in their buckets, one of them the same
    histogram without it."""
    return typ == "histogram" and label_name(label) == BUCKET_LABEL


def reserved(label: str, typ: str) -> bool:
    """Whether Prometheus keeps a label of this name (sanitised) for itself on a series
    of type ``typ``: a name starting with ``__`` (reserved for Prometheus' internal use;
    ``__name__`` is the metric's name) or ``le`` on a histogram (``bucket_label``).
    prometheus_client's OpenMetrics parser refuses a whole scrape for one (``__x``,
    ``le`` on a histogram), and two series differing only in ``__name__``, which the
    exporters replace with the series' name, would be one."""
    return label_name(label).startswith("__") or bucket_label(label, typ)


def unnamed(snap_series: Iterable[Sequence[Any]]) -> str | None:
    """Why Prometheus cannot take one of these wire series (None: it can): an empty
    metric name or an empty label name. Neither is a name once sanitised, and
    Prometheus' remote-write receiver leaves such a series out and still answers 2xx,
    so the exporter would count it delivered. Nor a label other than ``host.id`` that
    is ``host_id`` once sanitised (``host-id``, ``host_id``): it would name the series'
    host as ``host.id`` does, unchecked against the record's key (ktel/wire/signals.py
    ``check_keyed``), making the series another host's, or ending it with a stale
    snapshot. The aggregate writes none (processors/aggregate_core.py ``_kept``)."""
    for name, _typ, labels, _value in snap_series:
        if not name:
            return "series '': no Prometheus name (an empty name)"
        if "" in labels:
            return f"series {name!r:.100}: a label with an empty name"
        for label in labels:
            # (only a name as long as host_id can be it once sanitised: most are not looked up)
            if len(label) == len(HOST_LABEL) and label != HOST_ID and label_name(label) == HOST_LABEL:
                return f"series {name!r:.100}: a label {label!r} that names its host as {HOST_ID} does"
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
