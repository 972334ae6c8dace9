"""Batch numbering that keeps increasing across agent restarts: an incarnation
and a sequence number.

The store reserves numbers in blocks: the file holds the incarnation and the
first number not yet reserved, written (atomically, fsynced) before any number
of the block is used. A restart, even after SIGKILL, continues after the last
reserved block, so a number is never issued twice; a crash costs at most one
block of unused numbers, which is harmless (consumers need uniqueness, not
contiguity).

The incarnation is a random id made when the file is created. Lost state (an
emptyDir, a reimage, a volume removed) starts numbering at 0 again under the
same boot id; the new incarnation makes that a new numbering, which the
processors' dedupe keys apart from the old one, rather than duplicates of
batches the old numbering sent (docs/design.md, principle 12). A file from
before incarnations (a number alone) gets one and keeps its numbering.

The file and its directory are private (0600 in 0700): what the state
directory holds names the host's paths and processes.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

BLOCK = 4096


def private_dir(path: Path) -> None:
    """Make ``path`` (and missing parents) a directory only its owner can read,
    tightening one that already exists."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


class SeqStore:
    def __init__(self, state_dir: Path, block: int = BLOCK):
        self._dir = state_dir
        private_dir(state_dir)
        self._path = state_dir / "batch-seq"
        self._block = block
        try:
            fields = self._path.read_text().split()
            self._next = int(fields[-1])
            self.incarnation = fields[0] if len(fields) == 2 else secrets.token_hex(16)
        except FileNotFoundError:
            self._next = 0
            self.incarnation = secrets.token_hex(16)
        except (ValueError, IndexError) as err:
            raise RuntimeError(f"{self._path} is corrupt ({err}); remove it to restart numbering") from None
        if self._path.exists():
            os.chmod(self._path, 0o600)
        self._limit = self._next

    def _reserve(self) -> None:
        """Persist the next block. The limit moves only once it is on disk: a write
        that fails (a full disk) issues no number, and the next call tries again."""
        limit = self._next + self._block
        # The directory may have been removed under a running agent: numbering goes on.
        private_dir(self._dir)
        tmp = self._path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a leftover from before may be looser
        with open(fd, "w") as f:
            f.write(f"{self.incarnation} {limit}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)
        self._limit = limit

    def next(self) -> int:
        """The next sequence number; raises OSError if a new block cannot be persisted."""
        if self._next >= self._limit:
            self._reserve()
        n = self._next
        self._next += 1
        return n
