"""The probe registry: every probe ktel can load, each declared in one module.

A probe is ``bpf/<name>.bpf.c`` (the BPF program), ``bpf/<name>.h`` (the layout
of what it sends, shared by C and the test that checks the Python side against
it) and ``ktel/probes/<name>.py``, whose ``PROBE`` declares everything else:
the tracepoints, tracepoint fields and uprobes it needs or can use, its maps,
the event kinds it sends (each field with its type, range and size bound, see
ktel/schema.py), its decoder, the counters the aggregate stage keeps of its
events and whether the sampler always keeps them. Everything else derives from
here: the config's probe names, the wire's kinds and their validation, the
sampler's keep list and the probe a kind belongs to, the aggregate's counters,
the C-layout tests and ``ktel probes``. Adding a probe is adding those three
files (docs/design.md, principle 9).

Modules of this package without a ``PROBE`` (``decode``) hold what probes share.
Importing the registry never imports BCC: the agent's loader
(edge_agent/probes.py) does, when it loads a probe.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ktel.schema import TS_NS, U64, EventKind, Field, Int, IntList, Map, Str

if TYPE_CHECKING:
    from ktel.probes.decode import PackedEvents

# Buckets of a log2 histogram: KTEL_HIST_SLOTS in bpf/ktel_hist.h (checked by
# tests/unit/test_probe_layout.py). The agent's histogram deltas and the aggregate
# stage's histograms of kernel code's observations have these, so they merge.
HIST_SLOTS = 40

# The one kind every histogram probe sends: what its in-kernel histograms counted
# since the agent's previous read of the map.
HISTOGRAM_DELTA = EventKind(
    8,
    "histogram_delta",
    (
        Field("ts_ns", TS_NS, "end of the interval: when the agent read the BPF map"),
        Field("start_ns", TS_NS, "start of the interval: the previous read (or the probe's load)"),
        Field("metric", Str(64), 'e.g. "syscall_latency"'),
        Field("unit", Str(16), 'unit of the values counted, e.g. "ns"'),
        Field("labels", Map(16, 256, ints=True), '{label: str | int}, e.g. {"syscall.id": 110}'),
        Field("count", Int(0, U64), "values counted in the interval (== sum(buckets))"),
        Field("sum", Int(0, U64), "their sum, in unit"),
        Field(
            "buckets",
            IntList(HIST_SLOTS, 0, U64),
            "log2 bucket counts for the interval (a delta): buckets[i] counts values v with "
            "2**i <= v < 2**(i+1), except that buckets[0] counts 0 <= v < 2 and the last "
            "counts every v >= 2**(HIST_SLOTS-1)",
        ),
        Field(
            "sample_every",
            Int(1, (1 << 32) - 1),
            "the probe's in-kernel sampling (1 in N) when read; counts are of sampled values",
        ),
    ),
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A C struct of ``bpf/<header>`` and the struct format the Python side reads it
    with: ``fields`` names the C member of each item of the format, in order
    (``x`` padding excluded). A test compiles the header and compares sizes and
    offsets."""

    header: str
    c_struct: str
    struct: struct.Struct
    fields: tuple[str, ...]
    event: bool = True  # a ring-buffer record (else a map key)

    def offsets(self) -> dict[str, int]:
        """Each field's offset as the struct format implies it."""
        out: dict[str, int] = {}
        fmt, pos, names = self.struct.format.lstrip("<=!@>"), 0, iter(self.fields)
        count = ""
        for ch in fmt:
            if ch.isdigit():
                count += ch
                continue
            n = int(count or 1)
            count = ""
            if ch == "x":
                pos += n
            elif ch == "s":
                out[next(names)] = pos
                pos += n
            else:
                for _ in range(n):
                    out[next(names)] = pos
                    pos += struct.calcsize("<" + ch)
        return out


@dataclasses.dataclass(frozen=True)
class Uprobe:
    """A uprobe (and its uretprobe) on a library function."""

    library: str  # as BCC's attach_uprobe(name=...) resolves it: "c" is libc (ld.so.cache)
    symbol: str
    entry_fn: str  # BPF function run at entry
    return_fn: str  # BPF function run at return


@dataclasses.dataclass(frozen=True)
class Histogram:
    """A BPF map of struct ktel_hist values, sent as HISTOGRAM_DELTA events."""

    map: str  # the map's name in the probe's source
    metric: str  # the wire metric name
    labels: Callable[[bytes], dict[str, Any]]  # the map key's bytes -> labels
    unit: str = "ns"
    evict: bool = True  # a hash map whose idle keys are deleted (arrays cannot be)


def no_events(raw: bytes, wall_offset_ns: int) -> list:
    raise ValueError(f"this probe sends no ring-buffer events (got a record of {len(raw)} bytes)")


@dataclasses.dataclass(frozen=True)
class Probe:
    name: str
    summary: str  # one line, for `ktel probes` and the docs
    # Tracepoints ("system/event") it cannot do without: missing, the probe is skipped with the reason.
    tracepoints: tuple[str, ...] = ()
    # The event kinds its ring buffer carries; none: it sends histograms only, and its
    # ring buffer is one page, never drained.
    kinds: tuple[EventKind, ...] = ()
    # One ring-buffer record -> one wire event (raises ValueError on a bad record).
    decode: Callable[[bytes, int], list] = no_events
    # Optional bulk form of ``decode``: (record size, run of framed records, wall
    # offset) -> the same events, for high-rate probes (ktel/probes/decode.py).
    decode_run: Callable[[int, bytes, int], list] | None = None
    # Optional: (record size, run, wall offset, out) appends decode_run's events packed
    # (decode.pack_event) to out, made without building them, for the agent at high rates.
    pack_run: Callable[[int, bytes, int, PackedEvents], None] | None = None
    histograms: tuple[Histogram, ...] = ()
    # Tracepoint -> -D flag for attach points that exist on some kernels only.
    optional_tracepoints: dict[str, str] = dataclasses.field(default_factory=dict)
    # "system/event:field" that the probe cannot do without.
    required_fields: tuple[str, ...] = ()
    # "system/event:field" -> -D flag, for tracepoint fields some kernels lack.
    optional_fields: dict[str, str] = dataclasses.field(default_factory=dict)
    uprobes: tuple[Uprobe, ...] = ()
    # Tracepoint -> BPF function for programs that take a context declared in
    # bpf/ktel_tracepoints.bpf.h instead of BCC's TRACEPOINT_PROBE (which BCC
    # attaches by itself). Each is attached where its tracepoint exists.
    programs: dict[str, str] = dataclasses.field(default_factory=dict)
    # Run once when the probe loads (e.g. reading enum names from a format file).
    prepare: Callable[[], Any] | None = None
    # -D flags that depend on the running kernel beyond its tracepoints (e.g. struct
    # offsets from its BTF, ktel/probes/btf.py), computed when the probe is compiled.
    kernel_defines: Callable[[], dict[str, int]] | None = None
    # Its C structs and the formats that read them (checked by a test).
    layouts: tuple[Layout, ...] = ()
    # The counters of enum ktel_counter (bpf/ktel_common.h) only it counts, beyond those
    # every probe has, by their names in edge_agent/probes.py's KERNEL_COUNTERS: the
    # agent reads and exports them for it alone.
    kernel_counters: tuple[str, ...] = ()

    @property
    def ringbuf(self) -> bool:
        return bool(self.kinds)


def _discover() -> dict[str, Probe]:
    found: dict[str, Probe] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        probe = getattr(importlib.import_module(f"{__name__}.{info.name}"), "PROBE", None)
        if probe is None:
            continue  # shared code, not a probe
        if probe.name != info.name:
            raise RuntimeError(f"ktel/probes/{info.name}.py declares probe {probe.name!r}: names must match")
        found[probe.name] = probe
    return found


PROBES: dict[str, Probe] = _discover()

# Every event kind on the wire, by id.
KINDS: dict[int, EventKind] = {HISTOGRAM_DELTA.id: HISTOGRAM_DELTA}
# The probe each kind comes from (fidelity commands name probes).
PROBE_OF_KIND: dict[int, str] = {}
for _probe in PROBES.values():
    for _kind in _probe.kinds:
        if _kind.id in KINDS or any(k.name == _kind.name for k in KINDS.values()):
            raise RuntimeError(f"probe {_probe.name}: event kind {_kind.id} {_kind.name!r} is taken")
        KINDS[_kind.id] = _kind
        PROBE_OF_KIND[_kind.id] = _probe.name
KIND_BY_NAME: dict[str, EventKind] = {k.name: k for k in KINDS.values()}
