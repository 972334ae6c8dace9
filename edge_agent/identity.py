"""Who this node is: the identity stamped on every batch."""

from __future__ import annotations

from pathlib import Path


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
