"""One agent to a state directory: an exclusive ``flock`` on ``<agent.state_dir>/agent.lock``,
taken before anything in the directory is read and held for the agent's life.

Two agents on one state directory (a second ``ktel agent`` started by hand, a
DaemonSet rollout that starts the new pod before the old one ends) would each
reserve sequence numbers from ``batch-seq`` as they last read it: blocks that
overlap, under the same host, boot and incarnation, so the processors would drop
one agent's batches as duplicates of the other's, losing their events with
nothing counted as lost. Both would also append to the spool, rewrite its ``ack``
file and delete segments the other still sends from, and write ``control.json``
over each other. So the second refuses to start, naming the directory and what
holds it.

The kernel releases a ``flock`` when the last descriptor of its open file goes,
also when the holder is SIGKILLed: no lock outlives its agent, and a stale file
means nothing. The holder writes its pid and host name into the file, for the
message; a reader may find it empty (a holder between its lock and its write, or
one whose disk had no space for it). A disk with no space to make the file (a
first start on a full disk, which the agent survives: docs/guarantees.md) leaves
the agent unguarded, with a warning, rather than stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from pathlib import Path

from edge_agent.seqstore import no_space, private_dir

log = logging.getLogger("ktel.agent")

LOCK_FILE = "agent.lock"
# What of the file the message shows: a pid and a host name, or what someone wrote there.
HOLDER_MAX_BYTES = 256


class Held(Exception):
    """Another process holds the state directory's lock."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is locked by {holder}")
        self.path = path
        self.holder = holder


def acquire(state_dir: Path) -> int | None:
    """Lock ``state_dir`` for this process: the descriptor holding the lock (``release``
    it, or let the process end), or None when the disk has no space for the lock file.
    Raises Held when another process holds it, OSError when the directory cannot be
    used (read-only, not a directory)."""
    path = state_dir / LOCK_FILE
    try:
        private_dir(state_dir)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as err:
        if not no_space(err):
            raise
        log.warning(
            "%s: cannot be made (%s): nothing keeps a second agent off %s while this one runs",
            path, err.strerror or err, state_dir,
        )  # fmt: skip
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise Held(path, holder) from None
    except BaseException:
        os.close(fd)
        raise
    # For the message of an agent refused: best effort, the lock is what counts.
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o600)  # a leftover from before may be looser
        mine = f"{os.getpid()} {socket.gethostname()}\n".encode()
        os.pwrite(fd, mine, 0)
        os.ftruncate(fd, len(mine))
    return fd


def release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says."""
    try:
        text = os.pread(fd, HOLDER_MAX_BYTES, 0).decode("utf-8", "replace")
    except OSError:
        text = ""
    fields = text.split()
    if len(fields) == 2 and fields[0].isdigit():
        return f"pid {fields[0]} on {fields[1]!r}"
    if not fields:
        return "a process whose pid the file does not name"
    return f"a process (the lock file holds {text[:80]!r})"
