"""Loading the BPF probes and draining their ring buffers.

One probe = one set of files found by name: ``bpf/<probe>.bpf.c`` (compiled
after ``bpf/ktel_common.bpf.h``), its event header ``bpf/<probe>.h`` and its
decoder ``edge_agent/<probe>.py``. A probe whose tracepoints this kernel lacks
is skipped with the reason, not fatal.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from edge_agent import file_created

log = logging.getLogger(__name__)

BPF_DIR = Path(os.environ.get("KTEL_BPF_DIR", Path(__file__).resolve().parent.parent / "bpf"))
TRACEFS = Path("/sys/kernel/tracing")

# Mirrors enum ktel_counter / enum ktel_knob in bpf/ktel_common.h.
COUNTER_RINGBUF_DROPS = 0
COUNTER_SAMPLED_OUT = 1
KNOB_SAMPLE_EVERY = 0


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
    name: str
    decode: Callable[[bytes, int], list]
    required_tracepoints: tuple[str, ...]
    # Tracepoint -> -D flag for attach points that exist on some kernels only.
    optional_tracepoints: dict[str, str] = dataclasses.field(default_factory=dict)


SPECS: dict[str, ProbeSpec] = {
    "file_created": ProbeSpec(
        name="file_created",
        decode=file_created.decode,
        required_tracepoints=(
            "syscalls/sys_enter_openat",
            "syscalls/sys_exit_openat",
            "syscalls/sys_enter_openat2",
            "syscalls/sys_exit_openat2",
            "syscalls/sys_enter_creat",
            "syscalls/sys_exit_creat",
        ),
        optional_tracepoints={"syscalls/sys_enter_open": "KTEL_HAVE_SYS_OPEN"},
    ),
}


class ProbeUnavailable(Exception):
    pass


def _has_tracepoint(tp: str) -> bool:
    return (TRACEFS / "events" / tp / "format").exists()


def bpf_source(name: str) -> str:
    common = (BPF_DIR / "ktel_common.bpf.h").read_text()
    return common + "\n" + (BPF_DIR / f"{name}.bpf.c").read_text()


class LoadedProbe:
    """A probe in the kernel and a thread draining its ring buffer into a list."""

    def __init__(self, spec: ProbeSpec, ringbuf_pages: int):
        from bcc import BPF  # imported here: only the agent needs BCC, not its tests of logic

        if not (TRACEFS / "events").is_dir():
            raise ProbeUnavailable(f"tracefs is not mounted at {TRACEFS} (mount -t tracefs nodev {TRACEFS})")
        missing = [tp for tp in spec.required_tracepoints if not _has_tracepoint(tp)]
        if missing:
            raise ProbeUnavailable(f"this kernel lacks tracepoint(s) {', '.join(missing)}")
        cflags = [f"-I{BPF_DIR}", f"-DKTEL_RINGBUF_PAGES={ringbuf_pages}"]
        cflags += [f"-D{d}" for tp, d in spec.optional_tracepoints.items() if _has_tracepoint(tp)]
        self.spec = spec
        self.bpf = BPF(text=bpf_source(spec.name).encode(), cflags=cflags)
        # deque: append (drain thread) and popleft (agent loop) are thread-safe.
        self._records: collections.deque[bytes] = collections.deque()
        self._stop = threading.Event()
        self.bpf[b"events"].open_ring_buffer(self._on_record)
        self._thread = threading.Thread(target=self._drain, name=f"drain-{spec.name}", daemon=True)
        self._thread.start()

    def _on_record(self, _ctx, data, size) -> None:
        # The only per-event Python work in the drain thread: copy the bytes out.
        self._records.append(ctypes.string_at(data, size))

    def _drain(self) -> None:
        while not self._stop.is_set():
            self.bpf.ring_buffer_poll(100)

    def take(self) -> list[bytes]:
        """Records drained since the last call."""
        popleft = self._records.popleft
        return [popleft() for _ in range(len(self._records))]

    def decode(self, records: list[bytes]) -> list[list]:
        offset = time.time_ns() - time.monotonic_ns()
        decode = self.spec.decode
        return [decode(r, offset) for r in records]

    def counters(self) -> dict[str, int]:
        table = self.bpf[b"counters"]
        return {
            "ringbuf_drops": sum(table[ctypes.c_int(COUNTER_RINGBUF_DROPS)]),
            "sampled_out": sum(table[ctypes.c_int(COUNTER_SAMPLED_OUT)]),
        }

    def set_sample_every(self, n: int) -> None:
        self.bpf[b"knobs"][ctypes.c_int(KNOB_SAMPLE_EVERY)] = ctypes.c_uint32(n)

    def close(self) -> None:
        """Stop draining, drain what is left, detach."""
        self._stop.set()
        self._thread.join()
        self.bpf.ring_buffer_consume()
        self.bpf.cleanup()


def load(names: Sequence[str], ringbuf_pages: int) -> tuple[dict[str, LoadedProbe], dict[str, str]]:
    """Load the named probes; returns (loaded, skipped name -> reason)."""
    loaded: dict[str, LoadedProbe] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            loaded[name] = LoadedProbe(SPECS[name], ringbuf_pages)
            log.info("probe %s loaded", name)
        except ProbeUnavailable as err:
            skipped[name] = str(err)
            log.warning("probe %s skipped: %s", name, err)
    return loaded, skipped
