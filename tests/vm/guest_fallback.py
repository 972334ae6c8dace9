"""Run in the agent VM (chrooted in the host's root, Debian's kernel, before the
filewatcher module loads): the file_created probe's syscall fallback, with its
in-kernel directory walk, loads on that kernel and resolves relative creates of
processes that have exited before the probe is read. Prints each event of
``DIR`` as a JSON line, for tests/vm/test_kmod_vm.py to judge.

Usage: python -m tests.vm.guest_fallback DIR
"""

from __future__ import annotations

import json
import subprocess
import sys

from edge_agent import probes
from ktel.probes import PROBES
from ktel.wire import event_dict


def main(directory: str) -> None:
    probe = probes.LoadedProbe(PROBES["file_created"], 64, drain=False)
    try:
        # Relative to the cwd and to a directory fd; both processes gone before the read.
        script = "cd {d} && touch rel-a && mkdir -p sub && cd sub && touch ../rel-b"
        subprocess.run(["sh", "-c", script.format(d=directory)], check=True)
        subprocess.run(
            [sys.executable, "-c", f"import os; d = os.open({directory!r}, os.O_RDONLY); "
             "os.close(os.open('rel-c', os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=d))"],
            check=True,
        )  # fmt: skip
        probe.consume()
        for ev in probe.decode(probe.take()):
            row = event_dict(ev)
            if "rel-" in row["path"]:
                print(json.dumps(row))
    finally:
        probe.close()


if __name__ == "__main__":
    main(sys.argv[1])
