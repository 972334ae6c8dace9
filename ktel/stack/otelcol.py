"""A local OpenTelemetry Collector (OTLP receiver -> file exporter) for tests and `ktel up`,
in the clear or over TLS, with or without client certificates, with or without a
bearer token required.

The Collector is built from the Go module proxy with the official builder (ocb)
and the manifest ``deploy/otelcol/builder-config.yaml``, once: the binary is
cached in ``<cache>/otelcol-<version>-<manifest hash>/`` (``$KTEL_CACHE_DIR`` or
``~/.cache/ktel``), so a second call is instant and a changed manifest is built anew
beside the old build (checkouts of different manifests sharing a cache do not rebuild
each other's). Go's temporary files go to ``gotmp/`` there, emptied before each build,
so that what a killed build left is removed by the next. The build needs Go; a host
without it gets a toolchain from the Go module proxy (ktel/stack/gotoolchain.py). A
prebuilt Collector (stack.collector_binary) needs neither. Its file exporter writes
every request it received as one OTLP/JSON line, which :meth:`LocalCollector.received`
reads back.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from ktel import paths
from ktel.paths import DATA_DIR
from ktel.stack import proc
from ktel.stack.certs import Pair
from ktel.stack.gotoolchain import find_go

MANIFEST = DATA_DIR / "deploy" / "otelcol" / "builder-config.yaml"
BINARY_NAME = "otelcol-ktel"  # dist.name in the manifest
_MARKER = ".complete"


def ensure_collector(cache_dir: Path | None = None) -> Path:
    """Return the path of the Collector binary, building it on first use (a few CPU minutes)."""
    root = cache_dir or paths.cache_dir()
    manifest = MANIFEST.read_bytes()
    # The manifest is the one place the version lives (dist.version, the core version).
    found = re.search(rb"^  version: (\S+)$", manifest, re.M)
    if found is None:
        raise RuntimeError(f"{MANIFEST} names no dist.version")
    version = found.group(1).decode()
    stamp = hashlib.sha256(manifest).hexdigest()
    # Absolute: Go takes GOBIN and GOTMPDIR so alone, and the builder runs in home.
    home = Path(root).absolute() / f"otelcol-{version}-{stamp[:12]}"
    binary = home / "build" / BINARY_NAME
    home.mkdir(parents=True, exist_ok=True)
    # A lock, so two test processes starting at once don't build into the same dir.
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = home / _MARKER
        if binary.is_file() and marker.is_file() and marker.read_text().strip() == stamp:
            return binary
        # Marker first: a build that dies half-way must leave the cache visibly incomplete.
        marker.unlink(missing_ok=True)
        shutil.rmtree(home / "build", ignore_errors=True)
        go = find_go(Path(root))
        env = {
            **os.environ,
            "PATH": f"{Path(go).parent}:{os.environ.get('PATH', '')}",  # the builder runs `go` itself
            "GOBIN": str(home / "bin"),
            "GOTOOLCHAIN": "local",  # never try to download another toolchain
            "GOTMPDIR": str(_go_tmp(home)),
        }
        (home / "builder-config.yaml").write_bytes(manifest)
        steps = [
            [go, "install", f"go.opentelemetry.io/collector/cmd/builder@v{version}"],
            # output_path in the manifest is relative to the working directory: home.
            [str(home / "bin" / "builder"), "--config", str(home / "builder-config.yaml")],
        ]
        for argv in steps:
            try:
                res = proc.run(argv, cwd=home, env=env, timeout=1800)
            except subprocess.TimeoutExpired as e:
                raise RuntimeError(f"building the OpenTelemetry Collector timed out: {argv[:3]}") from e
            if res.returncode != 0:
                out = "\n".join(
                    ln
                    for ln in (res.stdout + res.stderr).splitlines()
                    if not ln.startswith("go: downloading")
                )
                raise RuntimeError(
                    f"building the OpenTelemetry Collector failed (exit {res.returncode}) at {argv[:3]}:\n"
                    + out[-4000:]
                )
        if not binary.is_file():
            raise RuntimeError(f"the Collector builder succeeded but left no {binary}")
        marker.write_text(stamp + "\n")  # written last: its presence means the build is whole
        return binary


def _go_tmp(home: Path) -> Path:
    """The go command's temporary directory for a build in ``home`` (under its lock),
    emptied: Go removes its ``go-build*`` work directory only on a clean exit, so a
    build killed (`ktel down` or Ctrl-C during `ktel up`'s build) left it in $TMPDIR for
    good; in here, the next build removes it."""
    tmp = home / "gotmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(exist_ok=True)
    return tmp


class LocalCollector(proc.Server):
    """A Collector with the otlp receiver on 127.0.0.1 (gRPC and HTTP) and a file exporter."""

    def __init__(
        self,
        data_dir: Path,
        grpc_port: int = 4317,
        http_port: int = 4318,
        rotate_mb: int | None = None,
        binary: Path | None = None,
        tls: Pair | None = None,
        client_ca: Path | None = None,
        bearer_token: str | None = None,
    ) -> None:
        """``rotate_mb``: keep the file under that size (and one rotated-out file), for
        a Collector that runs for long; a test reads the whole file, so it sets none.
        ``binary``: a prebuilt Collector to run (none: the one built from the manifest).
        ``tls``: the receiver's certificate, both protocols then TLS only; ``client_ca``
        (with ``tls``): it also requires a client certificate signed by that CA.
        ``bearer_token``: both protocols answer only requests with ``Authorization:
        Bearer <bearer_token>`` (the bearertokenauth extension): 401 over HTTP,
        UNAUTHENTICATED over gRPC."""
        if client_ca is not None and tls is None:
            raise ValueError("a Collector's client_ca needs its tls certificate (mutual TLS is TLS)")
        self.binary = binary
        self.data_dir = Path(data_dir).resolve()
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.rotate_mb = rotate_mb
        self.tls = tls
        self.client_ca = client_ca
        self.bearer_token = bearer_token
        self.out_path = self.data_dir / "out.json"
        self.log_path = self.data_dir / "otelcol.log"

    @property
    def grpc_endpoint(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self.http_port}"

    @property
    def _scheme(self) -> str:
        return "https" if self.tls else "http"

    def start(self, timeout: float = 60) -> None:
        if self.running:
            return
        for p in (self.grpc_port, self.http_port):
            if proc.port_in_use(p):
                raise RuntimeError(f"cannot start the Collector: 127.0.0.1:{p} is already in use")
        binary = self.binary or ensure_collector()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "otelcol.json"  # JSON is YAML, and needs no YAML library
        config.write_text(json.dumps(self._config(), indent=2))
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with proc.stop_signals_held():
            self._proc = proc.spawn([str(binary), f"--config=file:{config}"], self.log_path, self.data_dir)
        try:
            self._wait_ready(timeout, log_start)
        except BaseException:
            self.stop(timeout=5)
            raise

    def _config(self) -> dict[str, Any]:
        pipeline = {"receivers": ["otlp"], "exporters": ["file", "debug"]}
        # Without rotation the file exporter empties the file when the Collector starts
        # and flushes it every second; with rotation it appends across restarts and
        # writes through, keeping one rotated-out file besides.
        file: dict[str, Any] = {"path": str(self.out_path)}
        if self.rotate_mb:
            file["rotation"] = {"max_megabytes": self.rotate_mb, "max_backups": 1}
        receiver: dict[str, Any] = {}  # what both protocols' servers share
        if self.tls is not None:
            receiver["tls"] = {"cert_file": str(self.tls.cert), "key_file": str(self.tls.key)}
            if self.client_ca is not None:
                receiver["tls"]["client_ca_file"] = str(self.client_ca)  # a client certificate required
        extensions: dict[str, Any] = {}
        if self.bearer_token is not None:
            extensions = {"bearertokenauth": {"token": self.bearer_token}}
            receiver["auth"] = {"authenticator": "bearertokenauth"}
        return {
            "extensions": extensions,
            "receivers": {
                "otlp": {
                    "protocols": {
                        "grpc": {"endpoint": f"127.0.0.1:{self.grpc_port}", **receiver},
                        "http": {"endpoint": f"127.0.0.1:{self.http_port}", **receiver},
                    }
                }
            },
            "exporters": {
                "file": file,
                "debug": {"verbosity": "basic"},
            },
            "service": {
                # Its own metrics would listen on :8888, which two Collectors (or a busy
                # machine) cannot share.
                "telemetry": {"metrics": {"level": "none"}},
                "extensions": list(extensions),
                "pipelines": {"traces": pipeline, "metrics": pipeline, "logs": pipeline},
            },
        }

    def _wait_ready(self, timeout: float, log_start: int) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_started("the Collector")
            with open(self.log_path, "rb") as f:
                f.seek(log_start)
                ready = b"Everything is ready" in f.read()
            if ready and proc.port_in_use(self.grpc_port) and proc.port_in_use(self.http_port):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the Collector not ready after {timeout}s; tail of {self.log_path}:\n"
                    + proc.tail(self.log_path)
                )
            time.sleep(0.1)

    # ------------------------------------------------------------- what arrived

    def received(self) -> list[dict[str, Any]]:
        """Every request the file exporter wrote so far, as parsed OTLP/JSON."""
        if not self.out_path.exists():
            return []
        lines = self.out_path.read_text().splitlines()
        # The last line may be half-written while a request is being written.
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def spans(self) -> list[dict[str, Any]]:
        """Flattened spans: each OTLP/JSON span plus ``resource`` and ``scope`` (attributes as dicts)."""
        return self._flatten("resourceSpans", "scopeSpans", "spans")

    def logs(self) -> list[dict[str, Any]]:
        return self._flatten("resourceLogs", "scopeLogs", "logRecords")

    def metrics(self) -> list[dict[str, Any]]:
        """Flattened metrics: one entry per OTLP metric (its data points inside)."""
        return self._flatten("resourceMetrics", "scopeMetrics", "metrics")

    def _flatten(self, rkey: str, skey: str, ikey: str) -> list[dict[str, Any]]:
        out = []
        for req in self.received():
            for rs in req.get(rkey, []):
                resource = attributes(rs.get("resource", {}).get("attributes", []))
                for ss in rs.get(skey, []):
                    for item in ss.get(ikey, []):
                        out.append({**item, "resource": resource, "scope": ss.get("scope", {})})
        return out


def any_value(v: dict[str, Any]) -> Any:
    """An OTLP/JSON AnyValue as a Python value (int64 arrives as a string in OTLP/JSON)."""
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        return int(v["intValue"])
    if "doubleValue" in v:
        return float(v["doubleValue"])
    if "boolValue" in v:
        return v["boolValue"]
    if "bytesValue" in v:
        return base64.b64decode(v["bytesValue"])
    if "arrayValue" in v:
        return [any_value(x) for x in v["arrayValue"].get("values", [])]
    if "kvlistValue" in v:
        return attributes(v["kvlistValue"].get("values", []))
    return None


def attributes(kvs: list[dict[str, Any]]) -> dict[str, Any]:
    return {kv["key"]: any_value(kv.get("value", {})) for kv in kvs}
