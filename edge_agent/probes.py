"""Loading the BPF probes, draining their ring buffers, reading their histograms.

What each probe is (its BPF source, tracepoints, maps, kinds and decoder) is
declared in the probe registry (ktel/probes/); this module puts a probe into
the kernel. A probe whose attach points (tracepoints, tracepoint fields, uprobe
targets) this kernel or host lacks is skipped with the reason, not fatal.

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
import contextlib
import ctypes
import logging
import math
import mmap
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from edge_agent import node_stats
from edge_agent import ringbuf as rb
from edge_agent.ticks import until_tick
from ktel.config import AgentConfig
from ktel.paths import DATA_DIR, TRACEFS
from ktel.probes import HIST_SLOTS, HISTOGRAM_DELTA, PROBES, Histogram, Probe
from ktel.probes.decode import PackedEvents, Run, frame, pack_event, records

log = logging.getLogger(__name__)

BPF_DIR = Path(os.environ.get("KTEL_BPF_DIR", DATA_DIR / "bpf"))

# Mirrors enum ktel_counter / enum ktel_knob in bpf/ktel_common.h.
COUNTER_RINGBUF_DROPS = 0
COUNTER_SAMPLED_OUT = 1
COUNTER_INFLIGHT_LOST = 2
COUNTER_NEGATIVE_LATENCY = 3
COUNTER_PATH_TRUNCATED = 4
COUNTER_PATH_UNRESOLVED = 5
# Probe.kernel_counters' names -> their indices.
KERNEL_COUNTERS = {"truncated_paths": COUNTER_PATH_TRUNCATED, "unresolved_paths": COUNTER_PATH_UNRESOLVED}
KNOB_SAMPLE_EVERY = 0

# struct ktel_hist (bpf/ktel_hist.h): HIST_SLOTS u64 bucket counts then a u64 sum.
HIST_WORDS = HIST_SLOTS + 1
# A histogram key's values as read_histograms gives them: the buckets, then the sum.
Values = tuple[int, ...]
# How often the agent reads the histogram maps (maybe_snapshot's default).
SNAPSHOT_SECONDS = 10.0
# A histogram key unchanged for this many reads is deleted from the kernel's map
# (and from the agent's memory), so keys of gone cgroups or processes do not fill
# it. It is read and deleted in one step (BPF_MAP_LOOKUP_AND_DELETE_ELEM, kernels
# 5.14 and later), so what was counted between the read that found it idle and the
# delete is sent too. Still lost: an increment by a program that found the key
# before the delete and adds after it (nanoseconds, on a key idle for
# EVICT_IDLE_SNAPSHOTS * SNAPSHOT_SECONDS), and on older kernels, where a plain
# delete is all there is, what came between the read and the delete.
EVICT_IDLE_SNAPSHOTS = 30
# The shared libraries of BCC's in-process compiler: resident after the probes
# are compiled, not needed afterwards (ktel.runtime.release_memory).
COMPILER_LIBRARIES = ("libLLVM", "libclang")
# The drain thread reads each ring buffer on the ticks of the read interval
# (agent.read_interval_ms, its default when not given; edge_agent/ticks.py), and at
# once when the kernel wakes it: the probes ask for a wake-up only once their buffer
# holds WAKEUP_SHARE of its size (KTEL_WAKEUP_BYTES, bpf/ktel_common.bpf.h), so a
# pass takes many records and a burst is still read long before the buffer is full.
READ_INTERVAL_S = AgentConfig.model_fields["read_interval_ms"].default / 1000
WAKEUP_SHARE = 0.25
# While the agent has not taken its queue (QUEUE_MAX_BYTES), the drain thread looks
# again this much later.
BEHIND_PAUSE_S = 0.002
# At most this many bytes of records wait in a probe's queue for the agent to take
# them. When the agent falls behind, records stay in the ring buffer instead (and
# what does not fit there is dropped and counted by the kernel), so the agent's
# memory stays bounded under any load.
QUEUE_MAX_BYTES = 8 << 20


# What container runtimes leave in each container: Docker's /.dockerenv, Podman's
# /run/.containerenv; Kubernetes sets KUBERNETES_SERVICE_HOST in every container.
CONTAINER_MARKERS = (Path("/.dockerenv"), Path("/run/.containerenv"))
# The uprobes' library that agent.libc_path names (ktel.probes.Uprobe.library).
LIBC = "c"


class ProbeUnavailable(Exception):
    pass


def in_container() -> bool:
    """Whether this process runs in a container, as far as its runtime says so (one that
    leaves none of these marks is not seen)."""
    return "KUBERNETES_SERVICE_HOST" in os.environ or any(p.exists() for p in CONTAINER_MARKERS)


def uprobe_library(library: str, libc_path: Path | None, find: Callable[[bytes], bytes | None]) -> bytes:
    """The file a uprobe on ``library`` attaches to: agent.libc_path for libc where given,
    else what ``find`` (BCC's find_library: ldconfig's cache) names. A uprobe is on the
    file itself (its inode): only processes mapping that file are seen."""
    if library == LIBC and libc_path is not None:
        if not libc_path.is_file():
            raise ProbeUnavailable(
                f"agent.libc_path = '{libc_path}' is not a file here: give the host's libc as this "
                "agent sees it (in a container, where the host's is mounted)"
            )
        return os.fsencode(libc_path)
    path = find(library.encode())
    if path is None:
        raise ProbeUnavailable(f"library {library!r} not found (ldconfig -p)")
    return path


def own_libc_warning(names: Sequence[str], libc_path: Path | None) -> str | None:
    """What to warn of when probes on libc attach to the agent's own in a container: the
    image's libc, which the host's processes and other containers' do not map, so the
    probes see only the processes of the agent's own container."""
    if libc_path is not None or not in_container():
        return None
    on_libc = [n for n in names if any(u.library == LIBC for u in PROBES[n].uprobes)]
    if not on_libc:
        return None
    return (
        f"{', '.join(on_libc)}: the agent runs in a container and agent.libc_path is unset, so "
        "its uprobe is on this container's own libc, which none of the host's processes and no "
        "other container maps: it sees only this container's processes. Set agent.libc_path to "
        "the host's libc as mounted in the container (the Helm chart: agent.libcHostPath)"
    )


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


def present_tracepoints(spec: Probe) -> frozenset[str]:
    """The probe's optional and by-name tracepoints this kernel has, looked at once per
    load: the source compiled for them and the programs attached must agree, though a
    module may be loaded or unloaded during BCC's compile."""
    return frozenset(tp for tp in (*spec.optional_tracepoints, *spec.programs) if _has_tracepoint(tp))


def cflags_for(
    spec: Probe,
    ringbuf_pages: int,
    defines: Mapping[str, int] | None = None,
    present: frozenset[str] | None = None,
) -> list[str]:
    """The compiler flags the loader gives a probe on this kernel (``present``: see
    present_tracepoints, which it defaults to)."""
    present = present_tracepoints(spec) if present is None else present
    pages = ringbuf_pages if spec.ringbuf else 1
    cflags = [f"-I{BPF_DIR}", f"-DKTEL_RINGBUF_PAGES={pages}", f"-DKTEL_WAKEUP_BYTES={wakeup_bytes(pages)}"]
    cflags += [f"-D{d}" for tp, d in spec.optional_tracepoints.items() if tp in present]
    cflags += [f"-D{d}" for f, d in spec.optional_fields.items() if _has_field(f)]
    if spec.kernel_defines is not None:
        cflags += [f"-D{k}={v}" for k, v in spec.kernel_defines().items()]
    cflags += [f"-D{k}={v}" for k, v in (defines or {}).items()]
    return cflags


def wakeup_bytes(ringbuf_pages: int) -> int:
    """Bytes of records in a ring buffer at which its probe wakes the reader."""
    return max(int(ringbuf_pages * mmap.PAGESIZE * WAKEUP_SHARE), 1)


def check_available(spec: Probe) -> None:
    """Raise ProbeUnavailable, naming what is missing, if the probe cannot attach here."""
    if not (TRACEFS / "events").is_dir():
        raise ProbeUnavailable(f"tracefs is not mounted at {TRACEFS} (mount -t tracefs nodev {TRACEFS})")
    missing = [tp for tp in spec.tracepoints if not _has_tracepoint(tp)]
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
    ``consume()`` (tests, benchmarks); ``read_interval_s``: how often the thread
    reads it when no wake-up came sooner; ``libc_path``: the libc its uprobes are on
    (agent.libc_path; None: the one ldconfig names).
    """

    def __init__(
        self,
        spec: Probe,
        ringbuf_pages: int,
        *,
        defines: Mapping[str, int] | None = None,
        uprobe_pid: int = -1,
        drain: bool = True,
        read_interval_s: float = READ_INTERVAL_S,
        libc_path: Path | None = None,
    ):
        from bcc import BPF  # imported here: only the agent needs BCC, not its tests of logic

        check_available(spec)
        self.spec = spec
        if spec.prepare is not None:
            spec.prepare()
        libs: dict[str, bytes] = {}
        for u in spec.uprobes:
            libs[u.library] = uprobe_library(u.library, libc_path, BPF.find_library)
        present = present_tracepoints(spec)
        cflags = cflags_for(spec, ringbuf_pages, defines, present)
        source = bpf_source(spec.name)
        self.bpf = BPF(text=source.encode(), cflags=cflags)
        self.hash_maps = node_stats.hash_maps(source)
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
        self._runs: collections.deque[Run] = collections.deque()
        # Bytes queued and taken so far: each written by one thread only.
        self._queued = self._taken = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._reader: rb.RingReader | None = None
        self._interval = read_interval_s
        # Called by the drain thread after a pass that queued records (the agent's
        # collect loop waits for it rather than polling take()).
        self.on_queued: Callable[[], object] | None = None
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
        self._closed_counters: dict[str, int] = {}  # counters() once closed (close)
        self._closed_map_usage: dict[str, int] = {}  # map_usage() once closed (close)

    def _on_record(self, _ctx, data, size) -> None:
        # BCC's callback reader (where ringbuf.BULK_READ is False): one run per record.
        run = frame(ctypes.string_at(data, size))
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
            queued = self._queued
            room = QUEUE_MAX_BYTES - (queued - self._taken)
            if room <= 0:
                self._stop.wait(BEHIND_PAUSE_S)  # the agent is behind: see QUEUE_MAX_BYTES
            elif reader is None:  # BCC's callback reader (not x86-64): it reads only when woken
                self.bpf.ring_buffer_poll(math.ceil(until_tick(self._interval, time.monotonic()) * 1000))
                self.bpf.ring_buffer_consume()
            else:
                # On the interval's ticks, as every probe and the seals (edge_agent/ticks.py).
                reader.wait(until_tick(self._interval, time.monotonic()))
                self._read(room)
            if self._queued != queued and self.on_queued is not None:
                self.on_queued()

    def consume(self) -> None:
        """Move what the ring buffer holds into take()'s queue, without waiting.

        For drain=False only; with the drain thread running it does nothing: one
        ring buffer has one consumer position, so it has one reader.
        """
        if self.spec.ringbuf and not self._closed and self._thread is None:
            self._read()

    def take(self) -> list[Run]:
        """Runs of records drained since the last call (``ringbuf.count`` counts the records)."""
        popleft = self._runs.popleft
        runs = [popleft() for _ in range(len(self._runs))]
        self._taken += sum(len(data) for _, data in runs)
        return runs

    def decode(self, runs: list[Run]) -> list[list]:
        """The wire events of ``runs``, in order (raises on a record that does not decode)."""
        offset = time.time_ns() - time.monotonic_ns()
        decode, decode_run = self.spec.decode, self.spec.decode_run
        events: list[list] = []
        for run in runs:
            if decode_run is not None:
                events += decode_run(run[0], run[1], offset)
            else:
                events += [decode(r, offset) for r in records(run)]
        return events

    def pack(self, runs: list[Run], out: PackedEvents) -> None:
        """``decode``'s events packed (pack_event), appended to ``out``: straight from
        the records where the probe packs in bulk (Probe.pack_run)."""
        pack_run = self.spec.pack_run
        if pack_run is None:
            out.extend(map(pack_event, self.decode(runs)))
            return
        offset = time.time_ns() - time.monotonic_ns()
        for size, data in runs:
            pack_run(size, data, offset, out)

    def counters(self) -> dict[str, int]:
        if self._closed:
            return dict(self._closed_counters)
        table = self.bpf[b"counters"]
        c = {
            "ringbuf_drops": sum(table[ctypes.c_int(COUNTER_RINGBUF_DROPS)]),
            "sampled_out": sum(table[ctypes.c_int(COUNTER_SAMPLED_OUT)]),
            # Events lost because a map of calls in flight (entry -> exit) had no room.
            "inflight_lost": sum(table[ctypes.c_int(COUNTER_INFLIGHT_LOST)]),
        }
        misses = self._recursion_misses()
        if misses is not None:
            c["recursion_misses"] = misses
        if self.spec.histograms:
            # Values a histogram could not count because a map was full.
            c["hist_lost"] = sum(self.bpf[b"hist_lost"][ctypes.c_int(0)])
            # Latencies skipped because their start was read after their end.
            c["negative_latency"] = sum(table[ctypes.c_int(COUNTER_NEGATIVE_LATENCY)])
        for name in self.spec.kernel_counters:
            c[name] = sum(table[ctypes.c_int(KERNEL_COUNTERS[name])])
        return c

    def _recursion_misses(self) -> int | None:
        """The runs of the probe's programs the kernel skipped for recursion, summed
        (recursion_misses), or None where the kernel does not show them."""
        total = None
        for fn in self.bpf.funcs.values():
            try:
                n = recursion_misses(Path(f"/proc/self/fdinfo/{fn.fd}").read_text())
            except OSError:  # the program is loaded while the probe is: not expected
                continue
            if n is not None:
                total = (total or 0) + n
        return total

    def map_usage(self) -> dict[str, int]:
        """Entries and capacity of the probe's hash maps (edge_agent/node_stats.py)."""
        if self._closed:
            return dict(self._closed_map_usage)
        tables = []
        for name in self.hash_maps:
            with contextlib.suppress(KeyError):  # declared under an #if this kernel's build left out
                tables.append((name, self.bpf[name.encode()]))
        return node_stats.map_usage(self.spec.name, tables)

    def set_sample_every(self, n: int) -> None:
        if not self._closed:
            # (closed, its maps are gone: a command expiring in the stopping agent's last
            # pass, after the probes closed, failed that pass and lost what it drained)
            self.bpf[b"knobs"][ctypes.c_int(KNOB_SAMPLE_EVERY)] = ctypes.c_uint32(n)
        self._sample_every = max(n, 1)

    # ------------------------------------------------------------ histograms

    def read_histograms(self, name: str) -> dict[bytes, tuple[int, ...]]:
        """A histogram map's cumulative values: key bytes -> HIST_SLOTS bucket
        counts then the sum, summed over the CPUs."""
        table = self.bpf[name.encode()]
        return {bytes(k): _summed(bytes(v)) for k, v in table.items()}

    @staticmethod
    def _take_histogram(table, key: bytes) -> Values | None:
        """Delete a histogram map's key and return its values as it was deleted
        (as read_histograms sums them), or None where the kernel cannot do both in
        one step (before 5.14): then it is deleted alone."""
        from bcc.libbcc import lib

        k, leaf = table.Key.from_buffer_copy(key), table.Leaf()
        if lib.bpf_lookup_and_delete(table.map_fd, ctypes.byref(k), ctypes.byref(leaf)) < 0:
            del table[k]
            return None
        return _summed(bytes(leaf))

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
                event = self._delta_event(h, key, cur, prev.get(key), start, now)
                prev[key] = cur
                if event is not None:
                    idle.pop(key, None)
                    events.append(event)
                elif h.evict:
                    idle[key] = idle.get(key, 0) + 1
                    if idle[key] >= EVICT_IDLE_SNAPSHOTS:
                        last = self._take_histogram(table, key)
                        del prev[key], idle[key]
                        # Counted since the read above (see EVICT_IDLE_SNAPSHOTS).
                        event = None if last is None else self._delta_event(h, key, last, cur, start, now)
                        if event is not None:
                            events.append(event)
        return events

    def _delta_event(
        self, h: Histogram, key: bytes, cur: Values, old: Values | None, start: int, now: int
    ) -> list | None:
        """The HISTOGRAM_DELTA event of a key's values ``cur`` since ``old`` (None: since
        the key was made), or None when nothing was counted in between."""
        delta = cur if old is None else tuple(c - o for c, o in zip(cur, old, strict=True))
        buckets, total = list(delta[:HIST_SLOTS]), delta[HIST_SLOTS]
        count = sum(buckets)
        if not count:
            return None
        return [
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

    def stop_draining(self) -> None:
        """Tell the drain thread to stop, waking it rather than waiting for its next
        tick (BCC's callback reader, off x86-64, cannot be woken: it stops on that
        tick, the same one for every probe, so a stop told to all probes before any
        close() waits for one tick, not one per probe)."""
        if self._closed:
            return  # the reader's fds are closed, their numbers maybe reused
        self._stop.set()
        if self._thread is not None and self._reader is not None:
            self._reader.wake()

    def close(self) -> None:
        """Stop draining (stop_draining), drain what is left, take the last histogram
        deltas, detach."""
        if self._closed:
            return
        self.stop_draining()
        if self._thread is not None:
            self._thread.join()
        if self.spec.ringbuf:
            self._read()
        if self._reader is not None:
            self._reader.close()
        final = self.snapshot() if self.spec.histograms else []
        # Read once more: the stopping agent's last heartbeat reports them, and the maps
        # are gone after cleanup.
        self._closed_counters = self.counters()
        # (read after cleanup, the maps' closed descriptors count no entry: the last
        # heartbeat said every map of a stopping agent was empty)
        self._closed_map_usage = self.map_usage()
        self.bpf.cleanup()
        self._closed = True
        self._final = final


def _summed(raw: bytes) -> Values:
    """A per-CPU struct ktel_hist value (one per possible CPU, end to end): HIST_SLOTS
    bucket counts then the sum, each summed over the CPUs."""
    ncpu = len(raw) // (8 * HIST_WORDS)
    words = struct.unpack(f"<{ncpu * HIST_WORDS}Q", raw)
    return tuple(sum(words[i::HIST_WORDS]) for i in range(HIST_WORDS))


def recursion_misses(fdinfo: str) -> int | None:
    """A BPF program's recursion_misses from the text of its fd's /proc/<pid>/fdinfo
    entry, or None where the kernel shows none (before 5.12). The kernel counts there
    each run of the program it skipped because another BPF program was running on that
    CPU (a tracepoint hit inside one): an event the probe never saw."""
    for line in fdinfo.splitlines():
        key, _, value = line.partition(":")
        if key == "recursion_misses":
            return int(value)
    return None


def load(
    names: Sequence[str],
    ringbuf_pages: int,
    defines: Mapping[str, Mapping[str, int]] | None = None,
    read_interval_s: float = READ_INTERVAL_S,
    libc_path: Path | None = None,
) -> tuple[dict[str, LoadedProbe], dict[str, str]]:
    """Load the named probes; returns (loaded, skipped name -> reason).

    ``defines`` maps a probe name to extra -D flags for it; ``libc_path``: agent.libc_path.
    """
    loaded: dict[str, LoadedProbe] = {}
    skipped: dict[str, str] = {}
    warning = own_libc_warning(names, libc_path)
    if warning is not None:
        log.warning("%s", warning)
    for name in names:
        try:
            loaded[name] = LoadedProbe(
                PROBES[name],
                ringbuf_pages,
                defines=(defines or {}).get(name),
                read_interval_s=read_interval_s,
                libc_path=libc_path,
            )
            log.info("probe %s loaded", name)
        except ProbeUnavailable as err:
            skipped[name] = str(err)
            log.warning("probe %s skipped: %s", name, err)
    return loaded, skipped
