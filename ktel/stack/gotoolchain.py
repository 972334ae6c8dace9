"""A Go toolchain for what ktel builds from Go modules (the local OpenTelemetry Collector;
helm for the tests), on a host without Go.

The Go module proxy serves every Go release as the module
``golang.org/toolchain@v0.0.1-go<version>.<os>-<arch>`` (what the go command itself
downloads when a module asks for a newer Go). Its zip is fetched once, checked
against the SHA-256 pinned below, and unpacked into ``<cache>/go-<version>/``. Module
zips keep no file modes, so the executables are marked as the go command marks them:
everything under ``bin/`` and ``pkg/tool/``.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import platform
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import IO

import httpx

from ktel.paths import cache_dir
from ktel.retry import Permanent, retry
from ktel.stack import proc

# The Collector's modules (v0.161.0) require Go 1.26.
GO_VERSION = "1.26.8"
MODULE = f"golang.org/toolchain@v0.0.1-go{GO_VERSION}.linux-amd64"
# sha256 of the proxy's zip of MODULE, taken when the version was chosen; a zip that
# differs is refused.
ZIP_SHA256 = "30c2b1bf7dcc88d3eb0a1364e47ddd9128edb3110a30e8a0ef61cd5856b31de7"
DEFAULT_PROXY = "https://proxy.golang.org"
FETCH_DEADLINE_S = 600  # 70 MB; transient network failures are retried until then
_MARKER = ".complete"
# Where Go's own installer puts it (off PATH for many users).
HOST_GO = ["/usr/local/go/bin/go"]


def proxy_url() -> str:
    """The first HTTP(S) proxy of ``$GOPROXY`` (as the go command reads it), else the public one."""
    for entry in os.environ.get("GOPROXY", "").replace("|", ",").split(","):
        if entry.startswith(("https://", "http://")):
            return entry.rstrip("/")
    return DEFAULT_PROXY


def find_go(root: Path | None = None) -> str:
    """A Go new enough for the Collector's modules: the host's (on PATH, or Go's own
    /usr/local/go), else the toolchain fetched once into the cache (``root``)."""
    for go in (shutil.which("go"), *HOST_GO):
        if go and Path(go).is_file() and _new_enough(go):
            return go
    return str(ensure_go(root or cache_dir()))


def _new_enough(go: str) -> bool:
    # Debian 12's golang is 1.19; with GOTOOLCHAIN=local it cannot build modules that need 1.26.
    out = proc.run([go, "env", "GOVERSION"]).stdout.strip()
    found = re.fullmatch(r"go(\d+)\.(\d+)(?:\.\d+)?", out)
    need = tuple(int(x) for x in GO_VERSION.split(".")[:2])
    return found is not None and (int(found.group(1)), int(found.group(2))) >= need


def ensure_go(root: Path) -> Path:
    """Return the path of a ``go`` binary of GO_VERSION under the cache ``root``, fetching it once."""
    if platform.machine() != "x86_64":  # the one toolchain pinned (Debian 12 on amd64)
        raise RuntimeError(
            f"no Go toolchain is pinned for {platform.machine()}: install Go {GO_VERSION} or later "
            "(on PATH or in /usr/local/go), or set stack.collector_binary to a prebuilt Collector"
        )
    home = root / f"go-{GO_VERSION}"
    go = home / "bin" / "go"
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if go.is_file() and (home / _MARKER).is_file():
            return go
        (home / _MARKER).unlink(missing_ok=True)
        for old in ("bin", "pkg", "src", "lib", "misc"):
            shutil.rmtree(home / old, ignore_errors=True)
        path, version = MODULE.split("@")
        url = f"{proxy_url()}/{path}/@v/{version}.zip"
        with tempfile.TemporaryFile(dir=home) as zf:
            fetch = retry(lambda: _download(url, zf), what=f"fetching Go {GO_VERSION} from {url}")
            try:
                asyncio.run(asyncio.wait_for(fetch, FETCH_DEADLINE_S))
            except TimeoutError:
                raise RuntimeError(
                    f"could not fetch Go {GO_VERSION} from {url} within {FETCH_DEADLINE_S}s"
                ) from None
            _unpack(zf, home, f"{MODULE}/")
        if not go.is_file():
            raise RuntimeError(f"the Go toolchain zip from {url} holds no bin/go")
        (home / _MARKER).write_text(ZIP_SHA256 + "\n")  # last: its presence means the unpack is whole
        return go


async def _download(url: str, out: IO[bytes]) -> None:
    out.seek(0)
    out.truncate()
    digest = hashlib.sha256()
    async with (
        httpx.AsyncClient(follow_redirects=True, timeout=60) as client,
        client.stream("GET", url) as resp,
    ):
        if resp.status_code in (403, 404, 410):  # the proxy's "no such module"
            raise Permanent(f"{url}: HTTP {resp.status_code} {(await resp.aread())[:200]!r}")
        resp.raise_for_status()
        async for chunk in resp.aiter_bytes(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != ZIP_SHA256:
        raise Permanent(
            f"{url} has sha256 {digest.hexdigest()}, not the pinned {ZIP_SHA256}; refusing it "
            "(a proxy that serves other bytes for a published module is broken or hostile)"
        )


def _unpack(zf: IO[bytes], home: Path, prefix: str) -> None:
    zf.seek(0)
    with zipfile.ZipFile(zf) as z:
        for info in z.infolist():
            name = info.filename
            if not name.startswith(prefix) or info.is_dir():
                continue
            rel = Path(name[len(prefix) :])
            if rel.is_absolute() or ".." in rel.parts:
                raise ValueError(f"unsafe path in the Go toolchain zip: {name}")
            dest = home / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
            if rel.parts[0] == "bin" or rel.parts[:2] == ("pkg", "tool"):
                dest.chmod(dest.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
