"""Build ktel's kernel modules and run them in Debian's kernel under qemu.

The host kernel cannot load modules, so tests/vm boots the Debian kernel that
matches the newest installed headers (/boot/vmlinuz-<ver>, package
linux-image-<ver>) in qemu-system-x86_64 without KVM, with a busybox initramfs
that holds the .ko files, a test script and static helpers (tests/vm/guest_open.c,
and the libbpf loader of tests/vm/bpf/ with its BPF object), and reads the
serial console. The host's root is shared read-only over virtio-9p, so the guest
can also run the real agent (BCC and Python from the host, chrooted).

The initramfs is written here in the kernel's "newc" cpio format
(Documentation/driver-api/early-userspace/buffer-format.rst), so building it
needs neither root (for /dev/console) nor the cpio tool.
"""

from __future__ import annotations

import gzip
import re
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KMOD = REPO / "kmod"
HERE = Path(__file__).resolve().parent

BEGIN = re.compile(r"=====KTEL BEGIN (.+)=====$")
ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")  # SeaBIOS clears the screen before the kernel starts
END = "=====KTEL END {}====="
DONE = "=====KTEL GUEST DONE====="

MODULES = ("ktel", "ktel_sample", "filewatcher")


@dataclass(frozen=True)
class Kernel:
    version: str  # e.g. "6.1.0-56-amd64"
    headers: Path  # /usr/src/linux-headers-<version>
    image: Path  # /boot/vmlinuz-<version>


def _version_key(s: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def newest_headers() -> Path | None:
    """The newest Debian amd64 kernel headers, /usr/src/linux-headers-<ver>-amd64."""
    headers = sorted(Path("/usr/src").glob("linux-headers-*-amd64"), key=lambda p: _version_key(p.name))
    return headers[-1] if headers else None


def kernel_for(headers: Path) -> Kernel:
    """The kernel those headers belong to; its image may not be installed (check .image)."""
    version = headers.name.removeprefix("linux-headers-")
    return Kernel(version, headers, Path(f"/boot/vmlinuz-{version}"))


def find_qemu() -> tuple[str | None, str]:
    qemu = shutil.which("qemu-system-x86_64")
    return (qemu, "") if qemu else (None, "qemu-system-x86_64 not installed (package qemu-system-x86)")


def _is_static_elf(path: Path) -> bool:
    """True when the ELF64 file has no PT_INTERP, i.e. needs no dynamic loader."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    (e_phoff,) = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(e_phnum):
        (p_type,) = struct.unpack_from("<I", data, e_phoff + i * e_phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def find_busybox() -> tuple[Path | None, str]:
    for cand in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if cand.is_file() and _is_static_elf(cand):
            return cand, ""
    return None, "no statically linked busybox (package busybox-static)"


def _run(cmd: list[str], timeout: float, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}")
    return proc.stdout


def build_modules(kernel: Kernel, workdir: Path, timeout: float = 600) -> dict[str, Path]:
    """Copy kmod/ to workdir and build it with kbuild; returns {module name: .ko}."""
    src = workdir / "kmod"
    shutil.copytree(
        KMOD,
        src,
        ignore=shutil.ignore_patterns(
            "*.o", "*.ko", "*.mod", "*.mod.c", ".*.cmd", "Module.symvers", "modules.order"
        ),
    )
    _run(["make", "-C", str(kernel.headers), f"M={src}", "modules"], timeout)
    kos = {m: src / f"{m}.ko" for m in MODULES}
    missing = [str(p) for p in kos.values() if not p.is_file()]
    if missing:
        raise RuntimeError(f"kbuild made no {missing}")
    return kos


def build_static_helper(source: Path, out: Path, libs: tuple[str, ...] = (), timeout: float = 120) -> Path:
    """A static user-space program for the guest (needs libc6-dev, and the -dev packages of libs)."""
    cc = shutil.which("gcc-12") or shutil.which("gcc") or "cc"
    _run([cc, "-static", "-O2", "-Wall", "-Werror", "-o", str(out), str(source), *libs], timeout)
    return out


def build_bpf_object(source: Path, out: Path, timeout: float = 120) -> Path:
    """A BPF object for libbpf: clang -target bpf, with BTF (-g) for its map definitions."""
    clang = shutil.which("clang")
    if clang is None:
        raise RuntimeError("clang not installed (package clang)")
    multiarch = "/usr/include/x86_64-linux-gnu"  # asm/types.h, which -target bpf does not search
    bpf_dir = REPO / "bpf"  # the agent's headers (bpf/ktel_tracepoints.bpf.h)
    _run([clang, "-O2", "-g", "-target", "bpf", "-Wall", "-Werror", f"-I{multiarch}", f"-I{bpf_dir}",
          "-c", str(source), "-o", str(out)], timeout)  # fmt: skip
    return out


def build_bpf(workdir: Path) -> tuple[Path, Path]:
    """tests/vm/bpf: (the BPF object, its static libbpf loader)."""
    src = HERE / "bpf"
    obj = build_bpf_object(src / "ktel_events.bpf.c", workdir / "ktel_events.bpf.o")
    loader = build_static_helper(
        src / "ktel_events_loader.c", workdir / "ktel_bpf", libs=("-lbpf", "-lelf", "-lz", "-lzstd")
    )
    return obj, loader


# --- initramfs ------------------------------------------------------------


@dataclass
class _Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


@dataclass
class Initramfs:
    """Files of a newc archive, written gzip-compressed by write()."""

    entries: list[_Entry] = field(default_factory=list)

    def dir(self, name: str) -> None:
        self.entries.append(_Entry(name, 0o040755))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.entries.append(_Entry(name, 0o100000 | mode, data))

    def symlink(self, name: str, target: str) -> None:
        self.entries.append(_Entry(name, 0o120777, target.encode()))

    def chardev(self, name: str, major: int, minor: int) -> None:
        self.entries.append(_Entry(name, 0o020600, rdev=(major, minor)))

    def write(self, path: Path) -> Path:
        out = bytearray()
        for ino, e in enumerate([*self.entries, _Entry("TRAILER!!!", 0)], start=1):
            name = e.name.encode() + b"\0"
            fields = (ino, e.mode, 0, 0, 1, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1], len(name), 0)
            out += b"070701" + b"".join(b"%08X" % f for f in fields) + name
            out += b"\0" * (-len(out) % 4)
            out += e.data
            out += b"\0" * (-len(out) % 4)
        path.write_bytes(gzip.compress(bytes(out), compresslevel=6, mtime=0))
        return path


INIT = """#!/bin/busybox sh
# /init of the ktel test initramfs: mount what the test needs, run /test.sh, power off.
/bin/busybox mkdir -p /proc /sys /tmp /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t sysfs sysfs /sys
mount -t debugfs debugfs /sys/kernel/debug
mount -t tracefs tracefs /sys/kernel/tracing
mount -t tmpfs tmpfs /tmp
sh /test.sh
echo "=====KTEL GUEST DONE====="
poweroff -f
"""


def build_initramfs(
    out: Path,
    busybox: Path,
    modules: dict[str, Path],
    script: Path,
    env: dict[str, str],
    binaries: dict[str, Path] | None = None,
    data: dict[str, Path] | None = None,
) -> Path:
    """busybox, /init, /test.sh (+ /test.env), the modules and data files in /lib/ktel, /bin extras."""
    ird = Initramfs()
    for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/ktel"):
        ird.dir(d)
    ird.chardev("dev/console", 5, 1)  # the kernel opens it for /init before devtmpfs is mounted
    ird.file("bin/busybox", busybox.read_bytes(), 0o755)
    ird.symlink("bin/sh", "busybox")
    ird.file("init", INIT.encode(), 0o755)
    ird.file("test.sh", script.read_bytes(), 0o755)
    ird.file("test.env", "".join(f"{k}={v}\n" for k, v in env.items()).encode())
    for name, ko in modules.items():
        ird.file(f"lib/ktel/{name}.ko", ko.read_bytes())
    for name, path in (data or {}).items():
        ird.file(f"lib/ktel/{name}", path.read_bytes())
    for name, path in (binaries or {}).items():
        ird.file(f"bin/{name}", path.read_bytes(), 0o755)
    return ird.write(out)


# --- running ----------------------------------------------------------------


@dataclass
class VmRun:
    output: str  # the serial console, \r\n turned into \n
    returncode: int | None  # None when the timeout killed qemu
    seconds: float
    command: list[str]

    @property
    def finished(self) -> bool:
        return DONE in self.output

    def sections(self) -> dict[str, list[str]]:
        """Text between BEGIN/END markers, by section name (a later one wins)."""
        out: dict[str, list[str]] = {}
        lines = self.output.split("\n")
        i = 0
        while i < len(lines):
            m = BEGIN.search(lines[i].strip())
            if m:
                name, body = m.group(1), []
                i += 1
                while i < len(lines) and lines[i].strip() != END.format(name):
                    body.append(lines[i])
                    i += 1
                out[name] = body
            i += 1
        return out

    def tail(self, n: int = 80) -> str:
        return "\n".join(self.output.split("\n")[-n:])


# quiet: only errors on the console, so kernel lines rarely split the script's
# output (the test reads the full log with dmesg). clocksource=hpet: with the TSC
# clocksource, 2 TCG vCPUs hung twice in a row (soft lockup, a vCPU stuck in the
# int3 handler while the other waited in text_poke_bp() for it, "rcu: timer
# wakeup didn't happen"); with the HPET, 6 runs out of 6 passed. log_buf_len: Debian's
# 128 KiB log (CONFIG_LOG_BUF_SHIFT=17) wraps if every reload warns, hiding the start.
APPEND = "console=ttyS0 panic=-1 quiet clocksource=hpet log_buf_len=4M"


# The guest's virtio-9p client, in load order (modules in Debian's kernel), for the
# host's root that run_vm(share_host_root=True) exports with this tag.
NINEP_MODULES = (
    "drivers/virtio/virtio_ring", "drivers/virtio/virtio", "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev", "drivers/virtio/virtio_pci", "fs/netfs/netfs",
    "fs/fscache/fscache", "net/9p/9pnet", "net/9p/9pnet_virtio", "fs/9p/9p",
)  # fmt: skip
HOST_ROOT_TAG = "hostroot"


def ninep_modules(kernel: Kernel) -> dict[str, Path]:
    """The guest's 9p client modules: name -> .ko of the booted kernel's package."""
    base = Path("/lib/modules") / kernel.version / "kernel"
    mods = {rel.rsplit("/", 1)[1]: base / f"{rel}.ko" for rel in NINEP_MODULES}
    missing = [str(p) for p in mods.values() if not p.is_file()]
    if missing:
        raise RuntimeError(f"missing 9p modules {missing} (package linux-image-{kernel.version})")
    return mods


def run_vm(
    qemu: str,
    kernel: Kernel,
    initrd: Path,
    timeout: float,
    memory: str = "512M",
    smp: int = 1,
    append: str = APPEND,
    share_host_root: bool = False,
) -> VmRun:
    """Boot the kernel with the initramfs; returns when the guest powers off or at the timeout.

    ``share_host_root`` exports this host's / read-only over virtio-9p (tag
    HOST_ROOT_TAG), so the guest can run the host's Python, BCC and ktel.
    """
    cmd = [
        qemu, "-kernel", str(kernel.image), "-initrd", str(initrd), "-append", append,
        "-m", memory, "-smp", str(smp), "-nographic", "-no-reboot", "-nic", "none",
        # One host thread runs every vCPU in turn. With a thread per vCPU (TCG's
        # default), 2 vCPUs now and then froze for good while the module reloads
        # rewrote kernel text (text_poke_bp: int3 on one vCPU, the IPI wait on the
        # other), even with the HPET clocksource below: 1 CI run in 4.
        "-accel", "tcg,thread=single",
    ]  # fmt: skip
    if share_host_root:
        # multidevs=remap: / spans several host filesystems, whose inode numbers may collide.
        cmd += [
            "-virtfs",
            f"local,path=/,mount_tag={HOST_ROOT_TAG},security_model=none,readonly=on,multidevs=remap",
        ]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        raw, _ = proc.communicate(timeout=timeout)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        raw, _ = proc.communicate()
        rc = None
    text = ANSI.sub("", raw.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", ""))
    return VmRun(text, rc, time.monotonic() - t0, cmd)
