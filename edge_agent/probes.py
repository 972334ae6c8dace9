"""Loading the BPF probes, draining their ring buffers, reading their histograms.

One probe = one set of files found by name: ``bpf/<probe>.bpf.c`` (compiled
after ``bpf/ktel_common.bpf.h``), its event or key header ``bpf/<probe>.h`` and
its decoder ``edge_agent/<probe>.py``. A probe whose attach points (tracepoints,
tracepoint fields, uprobe targets) this kernel or host lacks is skipped with the
reason, not fatal.

Two kinds of probes (docs/design.md, principle 6):

- event probes send discrete events through their ring buffer; a thread reads
  it in bulk (edge_agent/ringbuf.py) into runs of records, and ``take()`` and
  ``decode()`` turn those into wire events;
- histogram probes keep log2 histograms (``struct ktel_hist``, bpf/ktel_hist.h)
  in per-CPU BPF maps; ``snapshot()`` reads them and returns one
  ``HISTOGRAM_DELTA`` wire event per key that changed since the previous read.
  The kernel's counts only grow, so a delta is exact; the agent's collect loop
  calls ``maybe_snapshot()`` on every pass and gets events every
  ``SNAPSHOT_SECONDS``. A probe may be both (dns_latency: histogram + slow
  lookups as events).
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_agent import (
    block_latency,
    dns_latency,
    file_created,
    ktel_api,
    oom_kill,
    process,
    runq_latency,
    skb_drop,
    syscall_latency,
    tcp_retransmit,
)
from edge_agent import ringbuf as rb
from ktel.wire import HIST_SLOTS, HISTOGRAM_DELTA

log = logging.getLogger(__name__)

BPF_DIR = Path(os.environ.get("KTEL_BPF_DIR", Path(__file__).resolve().parent.parent / "bpf"))
TRACEFS = Path("/sys/kernel/tracing")

# Mirrors enum ktel_counter / enum ktel_knob in bpf/ktel_common.h.
COUNTER_RINGBUF_DROPS = 0
COUNTER_SAMPLED_OUT = 1
KNOB_SAMPLE_EVERY = 0

# struct ktel_hist (bpf/ktel_hist.h): HIST_SLOTS u64 bucket counts then a u64 sum.
HIST_WORDS = HIST_SLOTS + 1
# How often the agent reads the histogram maps (maybe_snapshot's default).
SNAPSHOT_SECONDS = 10.0
# A histogram key unchanged for this many reads is deleted from the kernel's map
# (and from the agent's memory), so keys of gone cgroups or processes do not fill
# it. An increment landing between the last read and the delete is lost: the key
# was idle for EVICT_IDLE_SNAPSHOTS * SNAPSHOT_SECONDS before, so it rarely is.
EVICT_IDLE_SNAPSHOTS = 30
# The shared libraries of BCC's in-process compiler: resident after the probes
# are compiled, not needed afterwards (ktel.runtime.release_memory).
COMPILER_LIBRARIES = ("libLLVM", "libclang")
# After a drain pass that took less than this share of the ring buffer, the drain
# thread lets records gather for DRAIN_PAUSE_S before the next pass: a pass costs a
# few µs whatever it takes, and the kernel wakes the reader on the first record
# after each pass. A fuller ring buffer is drained again at once.
DRAIN_PAUSE_S = 0.002
DRAIN_PAUSE_BELOW = 0.25
# At most this many bytes of records wait in a probe's queue for the agent to take
# them. When the agent falls behind, records stay in the ring buffer instead (and
# what does not fit there is dropped and counted by the kernel), so the agent's
# memory stays bounded under any load.
QUEUE_MAX_BYTES = 8 << 20


def no_events(raw: bytes, wall_offset_ns: int) -> list:
    raise ValueError(f"this probe sends no ring-buffer events (got a record of {len(raw)} bytes)")


@dataclasses.dataclass(frozen=True)
class Uprobe:
    """A uprobe (and its uretprobe) on a library function."""

    library: str  # as BCC's attach_uprobe(name=...) resolves it: "c" is libc (ld.so.cache)
    symbol: str
    entry_fn: str  # BPF function run at entry
    return_fn: str  # BPF function run at return


@dataclasses.dataclass(frozen=True)
class Histogram:
    """A BPF map of struct ktel_hist values, published as HISTOGRAM_DELTA events."""

    map: str  # the map's name in the probe's source
    metric: str  # the wire metric name
    labels: Callable[[bytes], dict[str, Any]]  # the map key's bytes -> labels
    unit: str = "ns"
    evict: bool = True  # a hash map whose idle keys are deleted (arrays cannot be)


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
    name: str
    decode: Callable[[bytes, int], list]
    required_tracepoints: tuple[str, ...]
    # Tracepoint -> -D flag for attach points that exist on some kernels only.
    optional_tracepoints: dict[str, str] = dataclasses.field(default_factory=dict)
    # "system/event:field" that the probe cannot do without (skipped otherwise, with the reason).
    required_fields: tuple[str, ...] = ()
    # "system/event:field" -> -D flag, for tracepoint fields some kernels lack.
    optional_fields: dict[str, str] = dataclasses.field(default_factory=dict)
    uprobes: tuple[Uprobe, ...] = ()
    histograms: tuple[Histogram, ...] = ()
    # False: the probe sends no events; its ring buffer is one page and not drained.
    ringbuf: bool = True
    # Run once when the probe loads (e.g. reading enum names from a format file).
    prepare: Callable[[], Any] | None = None
    # Tracepoint -> BPF function for programs that take a context declared in
    # bpf/ktel_tracepoints.bpf.h instead of BCC's TRACEPOINT_PROBE (which BCC
    # attaches by itself). Each is attached where its tracepoint exists.
    programs: dict[str, str] = dataclasses.field(default_factory=dict)
    # Optional bulk form of ``decode``: (record size, run of framed records, wall
    # offset) -> events, the same events ``decode`` gives record by record
    # (edge_agent/ringbuf.py). For high-rate probes: per-record work is then the
    # decoder's loop body only.
    decode_run: Callable[[int, bytes, int], list] | None = None


SPECS: dict[str, ProbeSpec] = {
    "file_created": ProbeSpec(
        name="file_created",
        decode=file_created.decode,
        decode_run=file_created.decode_run,
        required_tracepoints=(
            "syscalls/sys_enter_openat",
            "syscalls/sys_exit_openat",
            "syscalls/sys_enter_openat2",
            "syscalls/sys_exit_openat2",
            "syscalls/sys_enter_creat",
            "syscalls/sys_exit_creat",
        ),
        # With the filewatcher module loaded, its tracepoint (which sees the create
        # itself) replaces the syscall tracepoints, which the source then leaves out.
        optional_tracepoints={
            "syscalls/sys_enter_open": "KTEL_HAVE_SYS_OPEN",
            "filewatcher/file_created": "KTEL_HAVE_FILEWATCHER",
        },
        programs={"filewatcher/file_created": "file_created_filewatcher"},
    ),
    "ktel_api": ProbeSpec(
        name="ktel_api",
        decode=ktel_api.decode,
        required_tracepoints=tuple(ktel_api.PROGRAMS),
        programs=ktel_api.PROGRAMS,
    ),
    "tcp_retransmit": ProbeSpec(
        name="tcp_retransmit",
        decode=tcp_retransmit.decode,
        required_tracepoints=("tcp/tcp_retransmit_skb",),
        required_fields=("tcp/tcp_retransmit_skb:state", "tcp/tcp_retransmit_skb:family"),
        optional_fields={"tcp/tcp_retransmit_skb:err": "KTEL_TCP_RETRANSMIT_ERR"},
    ),
    "oom_kill": ProbeSpec(
        name="oom_kill",
        decode=oom_kill.decode,
        required_tracepoints=("oom/mark_victim",),
        optional_fields={"oom/mark_victim:comm": "KTEL_OOM_DETAIL"},
    ),
    "process": ProbeSpec(
        name="process",
        decode=process.decode,
        required_tracepoints=(
            "sched/sched_process_exec",
            "sched/sched_process_exit",
            "sched/sched_process_fork",
        ),
        optional_tracepoints={
            "syscalls/sys_enter_exit_group": "KTEL_HAVE_SYS_EXIT_GROUP",
            "syscalls/sys_enter_exit": "KTEL_HAVE_SYS_EXIT",
            "signal/signal_generate": "KTEL_HAVE_SIGNAL_GENERATE",
        },
        optional_fields={"sched/sched_process_exit:group_dead": "KTEL_HAVE_GROUP_DEAD"},
    ),
    "skb_drop": ProbeSpec(
        name="skb_drop",
        decode=skb_drop.decode,
        required_tracepoints=("skb/kfree_skb",),
        required_fields=("skb/kfree_skb:reason",),
        prepare=lambda: skb_drop.load_reasons(TRACEFS / "events/skb/kfree_skb/format"),
    ),
    "syscall_latency": ProbeSpec(
        name="syscall_latency",
        decode=no_events,
        required_tracepoints=("raw_syscalls/sys_enter", "raw_syscalls/sys_exit", "sched/sched_process_exit"),
        histograms=(Histogram("hist", syscall_latency.METRIC, syscall_latency.labels),),
        ringbuf=False,
    ),
    "runq_latency": ProbeSpec(
        name="runq_latency",
        decode=no_events,
        required_tracepoints=("sched/sched_wakeup", "sched/sched_wakeup_new", "sched/sched_switch"),
        required_fields=("sched/sched_switch:prev_state",),
        histograms=(Histogram("hist", runq_latency.METRIC, runq_latency.labels, evict=False),),
        ringbuf=False,
    ),
    "block_latency": ProbeSpec(
        name="block_latency",
        decode=no_events,
        required_tracepoints=("block/block_rq_issue", "block/block_rq_complete"),
        histograms=(Histogram("hist", block_latency.METRIC, block_latency.labels),),
        ringbuf=False,
    ),
    "dns_latency": ProbeSpec(
        name="dns_latency",
        decode=dns_latency.decode,
        required_tracepoints=(),
        uprobes=(Uprobe("c", "getaddrinfo", "getaddrinfo_entry", "getaddrinfo_return"),),
        histograms=(Histogram("hist", dns_latency.METRIC, dns_latency.labels),),
    ),
}


class ProbeUnavailable(Exception):
    pass


def _has_tracepoint(tp: str) -> bool:
    return (TRACEFS / "events" / tp / "format").exists()


_FIELD = re.compile(r"^\s*field:.*?([A-Za-z_][A-Za-z0-9_]*)(\[[^\]]*\])?;", re.MULTILINE)


def tracepoint_fields(tp: str) -> set[str]:
    """Field names of a tracepoint, from the running kernel's format file."""
    try:
        text = (TRACEFS / "events" / tp / "format").read_text()
    except OSError:
        return set()
    return {m.group(1) for m in _FIELD.finditer(text)}


def _has_field(spec: str) -> bool:
    tp, field = spec.split(":")
    return field in tracepoint_fields(tp)


def _has_uprobes() -> bool:
    return Path("/sys/bus/event_source/devices/uprobe").exists() or (TRACEFS / "uprobe_events").exists()


def bpf_source(name: str) -> str:
    common = (BPF_DIR / "ktel_common.bpf.h").read_text()
    return common + "\n" + (BPF_DIR / f"{name}.bpf.c").read_text()


def present_tracepoints(spec: ProbeSpec) -> frozenset[str]:
    """The probe's optional and by-name tracepoints this kernel has, looked at once per
    load: the source compiled for them and the programs attached must agree, though a
    module may be loaded or unloaded during BCC's compile."""
    return frozenset(tp for tp in (*spec.optional_tracepoints, *spec.programs) if _has_tracepoint(tp))


def cflags_for(
    spec: ProbeSpec,
    ringbuf_pages: int,
    defines: Mapping[str, int] | None = None,
    present: frozenset[str] | None = None,
) -> list[str]:
    """The compiler flags the loader gives a probe on this kernel (``present``: see
    present_tracepoints, which it defaults to)."""
    present = present_tracepoints(spec) if present is None else present
    pages = ringbuf_pages if spec.ringbuf else 1
    cflags = [f"-I{BPF_DIR}", f"-DKTEL_RINGBUF_PAGES={pages}"]
    cflags += [f"-D{d}" for tp, d in spec.optional_tracepoints.items() if tp in present]
    cflags += [f"-D{d}" for f, d in spec.optional_fields.items() if _has_field(f)]
    cflags += [f"-D{k}={v}" for k, v in (defines or {}).items()]
    return cflags


def check_available(spec: ProbeSpec) -> None:
    """Raise ProbeUnavailable, naming what is missing, if the probe cannot attach here."""
    if not (TRACEFS / "events").is_dir():
        raise ProbeUnavailable(f"tracefs is not mounted at {TRACEFS} (mount -t tracefs nodev {TRACEFS})")
    missing = [tp for tp in spec.required_tracepoints if not _has_tracepoint(tp)]
    if missing:
        raise ProbeUnavailable(f"this kernel lacks tracepoint(s) {', '.join(missing)}")
    missing = [f for f in spec.required_fields if not _has_field(f)]
    if missing:
        raise ProbeUnavailable(f"this kernel's tracepoint(s) lack field(s) {', '.join(missing)}")
    if spec.uprobes and not _has_uprobes():
        raise ProbeUnavailable("this kernel has no uprobes (CONFIG_UPROBE_EVENTS)")


class LoadedProbe:
    """A probe in the kernel, a thread draining its ring buffer into a queue of
    runs of records (edge_agent/ringbuf.py), and the agent's side of its histograms.

    ``defines`` adds -D flags (e.g. KTEL_DNS_SLOW_NS); ``uprobe_pid`` attaches
    the probe's uprobes to one process only (-1: every process); with
    ``drain=False`` no thread drains the ring buffer and the caller calls
    ``consume()`` (tests, benchmarks).
    """

    def __init__(
        self,
        spec: ProbeSpec,
        ringbuf_pages: int,
        *,
        defines: Mapping[str, int] | None = None,
        uprobe_pid: int = -1,
        drain: bool = True,
    ):
        from bcc import BPF  # imported here: only the agent needs BCC, not its tests of logic

        check_available(spec)
        self.spec = spec
        if spec.prepare is not None:
            spec.prepare()
        libs: dict[str, bytes] = {}
        for u in spec.uprobes:
            path = BPF.find_library(u.library.encode())
            if path is None:
                raise ProbeUnavailable(f"library {u.library!r} not found (ldconfig -p)")
            libs[u.library] = path
        present = present_tracepoints(spec)
        cflags = cflags_for(spec, ringbuf_pages, defines, present)
        self.bpf = BPF(text=bpf_source(spec.name).encode(), cflags=cflags)
        try:
            for tp, fn in spec.programs.items():
                if tp in present:  # gone since: attaching fails and says so
                    self.bpf.attach_tracepoint(tp=tp.replace("/", ":").encode(), fn_name=fn.encode())
        except Exception as err:
            self.bpf.cleanup()
            raise ProbeUnavailable(f"cannot attach {fn} to tracepoint {tp}: {err}") from None
        try:
            for u in spec.uprobes:
                lib, sym = libs[u.library], u.symbol.encode()
                self.bpf.attach_uprobe(name=lib, sym=sym, fn_name=u.entry_fn.encode(), pid=uprobe_pid)
                self.bpf.attach_uretprobe(name=lib, sym=sym, fn_name=u.return_fn.encode(), pid=uprobe_pid)
        except Exception as err:
            self.bpf.cleanup()
            where = libs.get(u.library, b"?").decode()
            raise ProbeUnavailable(f"cannot attach a uprobe to {u.symbol} in {where}: {err}") from None
        # deque: append (drain thread) and popleft (agent loop) are thread-safe.
        self._runs: collections.deque[rb.Run] = collections.deque()
        # Bytes queued and taken so far: each written by one thread only.
        self._queued = self._taken = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._reader: rb.RingReader | None = None
        if spec.ringbuf:
            table = self.bpf[b"events"]
            if rb.BULK_READ:
                try:
                    self._reader = rb.RingReader(table.map_fd, table.max_entries)
                except (OSError, ValueError) as err:
                    log.warning("probe %s: ring buffer not mappable (%s), read by BCC", spec.name, err)
            if self._reader is None:
                table.open_ring_buffer(self._on_record)
            if drain:
                self._thread = threading.Thread(target=self._drain, name=f"drain-{spec.name}", daemon=True)
                self._thread.start()
        self._sample_every = 1
        self._ncpu = 0
        self._prev: dict[str, dict[bytes, tuple[int, ...]]] = {h.map: {} for h in spec.histograms}
        self._idle: dict[str, dict[bytes, int]] = {h.map: {} for h in spec.histograms}
        self._snap_wall = time.time_ns()
        self._snap_mono = time.monotonic()
        self._final: list[list] = []

    def _on_record(self, _ctx, data, size) -> None:
        # BCC's callback reader (where ringbuf.BULK_READ is False): one run per record.
        run = rb.frame(ctypes.string_at(data, size))
        self._runs.append(run)
        self._queued += len(run[1])

    def _read(self, max_bytes: int | None = None) -> int:
        """One pass over the ring buffer into take()'s queue; returns the bytes queued."""
        if self._reader is None:
            self.bpf.ring_buffer_consume()
            return 0
        runs = self._reader.read(max_bytes)
        n = sum(len(data) for _, data in runs)
        self._runs.extend(runs)
        self._queued += n
        return n

    def _drain(self) -> None:
        reader = self._reader
        while not self._stop.is_set():
            room = QUEUE_MAX_BYTES - (self._queued - self._taken)
            if room <= 0:
                self._stop.wait(DRAIN_PAUSE_S)  # the agent is behind: see QUEUE_MAX_BYTES
            elif reader is None:
                self.bpf.ring_buffer_poll(100)  # BCC's callback reader (not x86-64)
            elif reader.wait(0.1) and self._read(room) < reader.size * DRAIN_PAUSE_BELOW:
                self._stop.wait(DRAIN_PAUSE_S)

    def consume(self) -> None:
        """Move what the ring buffer holds into take()'s queue, without waiting.

        For drain=False only; with the drain thread running it does nothing: one
        ring buffer has one consumer position, so it has one reader.
        """
        if self.spec.ringbuf and not self._closed and self._thread is None:
            self._read()

    def take(self) -> list[rb.Run]:
        """Runs of records drained since the last call (``ringbuf.count`` counts the records)."""
        popleft = self._runs.popleft
        runs = [popleft() for _ in range(len(self._runs))]
        self._taken += sum(len(data) for _, data in runs)
        return runs

    def decode(self, runs: list[rb.Run]) -> list[list]:
        """The wire events of ``runs``, in order (raises on a record that does not decode)."""
        offset = time.time_ns() - time.monotonic_ns()
        decode, decode_run = self.spec.decode, self.spec.decode_run
        events: list[list] = []
        for run in runs:
            if decode_run is not None:
                events += decode_run(run[0], run[1], offset)
            else:
                events += [decode(r, offset) for r in rb.records(run)]
        return events

    def counters(self) -> dict[str, int]:
        table = self.bpf[b"counters"]
        c = {
            "ringbuf_drops": sum(table[ctypes.c_int(COUNTER_RINGBUF_DROPS)]),
            "sampled_out": sum(table[ctypes.c_int(COUNTER_SAMPLED_OUT)]),
        }
        if self.spec.histograms:
            # Values a histogram could not count because a map was full.
            c["hist_lost"] = sum(self.bpf[b"hist_lost"][ctypes.c_int(0)])
        return c

    def set_sample_every(self, n: int) -> None:
        self.bpf[b"knobs"][ctypes.c_int(KNOB_SAMPLE_EVERY)] = ctypes.c_uint32(n)
        self._sample_every = max(n, 1)

    # ------------------------------------------------------------ histograms

    def read_histograms(self, name: str) -> dict[bytes, tuple[int, ...]]:
        """A histogram map's cumulative values: key bytes -> HIST_SLOTS bucket
        counts then the sum, summed over the CPUs."""
        table = self.bpf[name.encode()]
        out: dict[bytes, tuple[int, ...]] = {}
        for k, v in table.items():
            raw = bytes(v)
            ncpu = len(raw) // (8 * HIST_WORDS)
            words = struct.unpack(f"<{ncpu * HIST_WORDS}Q", raw)
            out[bytes(k)] = tuple(sum(words[i::HIST_WORDS]) for i in range(HIST_WORDS))
        return out

    def snapshot(self) -> list[list]:
        """HISTOGRAM_DELTA events for every histogram key that counted something
        since the previous snapshot (or since the probe loaded)."""
        if self._closed:
            final, self._final = self._final, []
            return final
        now = time.time_ns()
        start, self._snap_wall, self._snap_mono = self._snap_wall, now, time.monotonic()
        events: list[list] = []
        for h in self.spec.histograms:
            prev, idle = self._prev[h.map], self._idle[h.map]
            table = self.bpf[h.map.encode()]
            for key, cur in self.read_histograms(h.map).items():
                old = prev.get(key)
                delta = cur if old is None else tuple(c - o for c, o in zip(cur, old, strict=True))
                prev[key] = cur
                buckets, total = list(delta[:HIST_SLOTS]), delta[HIST_SLOTS]
                count = sum(buckets)
                if count:
                    idle.pop(key, None)
                    events.append(
                        [
                            HISTOGRAM_DELTA.id,
                            now,
                            start,
                            h.metric,
                            h.unit,
                            h.labels(key),
                            count,
                            total,
                            buckets,
                            self._sample_every,
                        ]
                    )
                elif h.evict:
                    idle[key] = idle.get(key, 0) + 1
                    if idle[key] >= EVICT_IDLE_SNAPSHOTS:
                        del table[table.Key.from_buffer_copy(key)]
                        del prev[key], idle[key]
        return events

    def maybe_snapshot(self, interval_s: float | None = None) -> list[list]:
        """snapshot() once every interval_s (default SNAPSHOT_SECONDS; the agent
        calls this on every pass of its collect loop); after close(), the final
        snapshot, once."""
        if self._closed:
            return self.snapshot()
        interval = SNAPSHOT_SECONDS if interval_s is None else interval_s
        if not self.spec.histograms or time.monotonic() - self._snap_mono < interval:
            return []
        return self.snapshot()

    def close(self) -> None:
        """Stop draining, drain what is left, take the last histogram deltas, detach."""
        if self._closed:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.spec.ringbuf:
            self._read()
        if self._reader is not None:
            self._reader.close()
        final = self.snapshot() if self.spec.histograms else []
        self.bpf.cleanup()
        self._closed = True
        self._final = final


def load(
    names: Sequence[str],
    ringbuf_pages: int,
    defines: Mapping[str, Mapping[str, int]] | None = None,
) -> tuple[dict[str, LoadedProbe], dict[str, str]]:
    """Load the named probes; returns (loaded, skipped name -> reason).

    ``defines`` maps a probe name to extra -D flags for it.
    """
    loaded: dict[str, LoadedProbe] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            loaded[name] = LoadedProbe(SPECS[name], ringbuf_pages, defines=(defines or {}).get(name))
            log.info("probe %s loaded", name)
        except ProbeUnavailable as err:
            skipped[name] = str(err)
            log.warning("probe %s skipped: %s", name, err)
    return loaded, skipped
