"""Who this node is: the identity stamped on every batch and heartbeat."""

from __future__ import annotations

import platform
from pathlib import Path

from opentelemetry.semconv._incubating.attributes.host_attributes import HostArchValues

# `uname -m` -> the semantic conventions' host.arch; a machine not listed keeps its own name.
_ARCH = {
    "x86_64": HostArchValues.AMD64,
    "aarch64": HostArchValues.ARM64,
    "arm64": HostArchValues.ARM64,
    "armv7l": HostArchValues.ARM32,
    "armv6l": HostArchValues.ARM32,
    "i386": HostArchValues.X86,
    "i686": HostArchValues.X86,
    "ppc64": HostArchValues.PPC64,
    "ppc64le": HostArchValues.PPC64,
    "ppc": HostArchValues.PPC32,
    "s390x": HostArchValues.S390X,
    "ia64": HostArchValues.IA64,
}


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")


def host_arch(machine: str | None = None) -> str:
    """host.arch of ``machine`` (default this one's, ``uname -m``): amd64 for x86_64, arm64 for aarch64."""
    machine = platform.machine() if machine is None else machine
    arch = _ARCH.get(machine)
    return arch.value if arch is not None else machine
