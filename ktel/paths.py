"""Where ktel finds files: the kernel's tracefs, the non-Python files that ship with ktel,
and the cache of what the local stack fetches or builds.

Those files (the BPF programs, the kernel modules' sources, the manifests the local
stack builds Kafka and the Collector from) stay in the repository's top-level bpf/,
kmod/ and deploy/. ``ktel/_data/`` holds a relative symlink to each, and the wheel
carries the files under ``ktel/_data/`` (setuptools copies package data through the
links: pyproject.toml lists them). So they are found the same way, next to the ktel
package that was imported, from a checkout, an editable install or an installed
wheel, and a worktree run with ``PYTHONPATH`` finds its own. (A setuptools
``package-dir`` mapping, such as ``ktel._data.bpf`` -> ``bpf/``, would be found through
the editable install's import hook instead: that hook does not find a package nested
under ``ktel`` without a directory of its own, and it points at the checkout that was
installed, not at the one imported.)
"""

from __future__ import annotations

import os
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
DATA_DIR = Path(__file__).resolve().parent / "_data"


def cache_dir() -> Path:
    """Where the local stack caches Kafka's jars, the Collector and Go: $KTEL_CACHE_DIR,
    else ~/.cache/ktel (kept across runs: only the first needs the network)."""
    return Path(os.environ.get("KTEL_CACHE_DIR") or Path.home() / ".cache" / "ktel")
