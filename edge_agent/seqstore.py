"""Batch sequence numbers that keep increasing across agent restarts.

The store reserves numbers in blocks: the file holds the first number not yet
reserved, written (atomically, fsynced) before any number of the block is
used. A restart, even after SIGKILL, continues after the last reserved block,
so a number is never issued twice; a crash costs at most one block of unused
numbers, which is harmless (consumers need uniqueness, not contiguity).
"""

from __future__ import annotations

import os
from pathlib import Path

BLOCK = 4096


class SeqStore:
    def __init__(self, state_dir: Path, block: int = BLOCK):
        state_dir.mkdir(parents=True, exist_ok=True)
        self._path = state_dir / "batch-seq"
        self._block = block
        try:
            self._next = int(self._path.read_text())
        except FileNotFoundError:
            self._next = 0
        except ValueError as err:
            raise RuntimeError(f"{self._path} is corrupt ({err}); remove it to restart numbering") from None
        self._limit = self._next

    def _reserve(self) -> None:
        self._limit = self._next + self._block
        tmp = self._path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(str(self._limit))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)

    def next(self) -> int:
        if self._next >= self._limit:
            self._reserve()
        n = self._next
        self._next += 1
        return n
