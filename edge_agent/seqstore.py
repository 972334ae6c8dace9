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
before incarnations (a number alone) gets one and keeps its numbering. A file that
does not hold what this store writes (damaged by a disk, or edited by hand) is
lost state too: it is logged and numbering starts again under a new incarnation.
Refusing it would stop the agent at every start until someone removed the file,
with the node's events lost meanwhile.

The file and its directory are private (0600 in 0700): what the state
directory holds names the host's paths and processes.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
from pathlib import Path

log = logging.getLogger("ktel.agent")

BLOCK = 4096
# What a batch's numbers may be on the wire (ktel/wire/raw.py: "seq" is a U63, "inc"
# a string); past these every batch would be refused downstream.
_SEQ_MAX = 2**63 - 1
_INCARNATION = re.compile(r"[0-9a-f]{32}")


def private_dir(path: Path) -> None:
    """Make ``path`` (and missing parents) a directory only its owner can read,
    tightening one that already exists."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def no_space(err: OSError) -> bool:
    """Whether ``err`` is a disk out of space (or out of its owner's quota): a state
    that passes, so the agent runs on and counts what it cannot keep, unlike a state
    directory it cannot write at all (read-only, not a directory), which stops it at
    start with one line naming the setting."""
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


def _parse(text: str, block: int) -> tuple[str | None, int] | None:
    """(incarnation, next number) as the store writes them, None for the incarnation
    of a file from before incarnations; None when ``text`` is neither."""
    fields = text.split()
    if (
        len(fields) not in (1, 2)
        or not fields[-1].isdigit()
        # (checked before int(): past 4300 digits it raises, and the agent failed at every start)
        or len(fields[-1]) > len(str(_SEQ_MAX))
        or int(fields[-1]) > _SEQ_MAX - block
    ):
        return None
    if len(fields) == 1:
        return None, int(fields[0])
    return (fields[0], int(fields[1])) if _INCARNATION.fullmatch(fields[0]) else None


class SeqStore:
    def __init__(self, state_dir: Path, block: int = BLOCK):
        self._dir = state_dir
        try:
            private_dir(state_dir)
        except OSError as err:
            if not no_space(err):
                raise
            # A first start on a full disk: nothing to read; the first reservation makes it.
        self._path = state_dir / "batch-seq"
        self._block = block
        self._next, self.incarnation = 0, secrets.token_hex(16)
        try:
            text = self._path.read_bytes().decode("ascii", "replace")
        except FileNotFoundError:
            text = None
        if text is not None:
            os.chmod(self._path, 0o600)
            found = _parse(text, block)
            if found is None:
                log.error(
                    "%s does not hold an incarnation and a batch number (%r): numbering starts "
                    "again at 0 under a new incarnation, %s",
                    self._path, text[:80], self.incarnation,
                )  # fmt: skip
            else:
                incarnation, self._next = found
                self.incarnation = incarnation or self.incarnation
        self._limit = self._next

    def _reserve(self) -> None:
        """Persist the next block. The limit moves only once it is on disk: a write
        that fails (a full disk) issues no number, and the next call tries again."""
        limit = self._next + self._block
        # The directory may have been removed under a running agent: numbering goes on.
        private_dir(self._dir)
        tmp = self._path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        # Owned by the file object at once: a step that fails closes it, and the next
        # batch tries again (a descriptor left at each try would run the agent out of them).
        with open(fd, "w") as f:
            os.fchmod(fd, 0o600)  # a leftover from before may be looser
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
