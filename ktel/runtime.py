"""Process-wide tuning shared by ktel's long-running processes."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from pathlib import Path

log = logging.getLogger("ktel.runtime")

MADV_PAGEOUT = 21  # Linux 5.4+


def tune_gc() -> None:
    """Run Python's cyclic garbage collector far less often.

    ktel's processes handle data as acyclic lists, maps and tuples, which reference
    counting frees at once; but a batch is tens of thousands of containers, and with
    the default thresholds (700, 10, 10) the collector re-scanned the live batches
    again and again: measured at over half the remote-write exporter's CPU
    (bench/exporter_throughput.py) and about a sixth of the agent's (bench/agent_throughput.py).
    The rare cycle is still collected, later.
    """
    gc.set_threshold(50_000, 20, 100)


def release_memory(libraries: tuple[str, ...] = ()) -> int:
    """Give back memory a process needed only while starting; returns the bytes of
    library mappings it asked the kernel to page out.

    Returns freed malloc arenas to the kernel (``malloc_trim``), and pages out the
    resident pages of the named shared libraries (file names, e.g. ``libLLVM``):
    code that ran once, such as BCC's in-process compiler, which otherwise stays
    resident (about 80 MiB of LLVM and clang). A page that is needed again is read
    back in. Best effort: without glibc or MADV_PAGEOUT it does what it can.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    if not libraries:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    paged = 0
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not any(lib in Path(fields[5]).name for lib in libraries):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if libc.madvise(start, end - start, MADV_PAGEOUT) == 0:
            paged += end - start
        else:
            log.debug("madvise(MADV_PAGEOUT) of %s: errno %d", fields[5], ctypes.get_errno())
    return paged
