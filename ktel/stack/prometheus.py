"""A throwaway local Prometheus (Debian's /usr/bin/prometheus) that accepts remote write,
in the clear or, with ``Web``, over TLS with basic auth and client certificates; and,
given them, scrapes ktel's self-metrics and evaluates ktel's rules."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ktel.paths import DATA_DIR
from ktel.stack import proc
from ktel.stack.certs import Pair

PROMETHEUS_BIN = "/usr/bin/prometheus"
# ktel's recording and alerting rules (deploy/prometheus/ktel-rules.yml).
RULES = DATA_DIR / "deploy/prometheus/ktel-rules.yml"
# Local: scrape often, so that rates over ktel's self-metrics show within seconds.
SELF_METRICS_SCRAPE_S = 5

_CONFIG = """\
global:
  scrape_interval: 15s
  evaluation_interval: 15s
"""


# The server is local: an HTTP(S)_PROXY in the environment must not be used to reach it.
_HTTP: dict[str, Any] = {"timeout": 30, "trust_env": False}


@dataclass(frozen=True)
class Web:
    """What Prometheus asks of every client (its ``--web.config.file``): TLS with
    ``cert``, basic auth as one of ``users`` (user -> password; Prometheus keeps only
    their bcrypt hashes), and with ``client_ca`` a client certificate it signed."""

    cert: Pair
    ca: Path  # what signed ``cert``: how clients, LocalPrometheus' own included, trust it
    users: dict[str, str] = field(default_factory=dict)
    client_ca: Path | None = None
    client: Pair | None = None  # LocalPrometheus' own client certificate, with client_ca

    def config(self) -> dict[str, Any]:
        import bcrypt  # a test dependency: only a test's Prometheus asks for passwords

        tls: dict[str, Any] = {"cert_file": str(self.cert.cert), "key_file": str(self.cert.key)}
        if self.client_ca is not None:
            tls |= {"client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": str(self.client_ca)}
        hashed = {
            # Cost 4, bcrypt's least: Prometheus checks the hash on every request.
            user: bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
            for user, password in self.users.items()
        }
        return {"tls_server_config": tls, "basic_auth_users": hashed}

    def client_kwargs(self) -> dict[str, Any]:
        """httpx settings for a client that passes: the CA, the first user, the certificate."""
        ctx = ssl.create_default_context(cafile=self.ca)
        if self.client is not None:
            ctx.load_cert_chain(self.client.cert, self.client.key)
        auth = next(iter(self.users.items()), None)
        return {"verify": ctx, "auth": auth}


class LocalPrometheus(proc.Server):
    """Samples arrive by remote write from the exporters. ``web``: what Prometheus asks
    of its clients (TLS, basic auth, client certificates). ``native_histograms``: accept
    native histograms (Prometheus 2.40 to 2.x keep them behind a feature flag), which
    ktel's remote-write sends by default. ``scrape`` (host:port of ktel's self-metrics
    endpoints) adds a ``ktel`` scrape job and ktel's rules. ``out_of_order_window`` (a
    Prometheus duration, "3h"): how much older than a series' newest sample a sample it
    stores may be (its ``storage.tsdb.out_of_order_time_window``; none by default, as in
    Prometheus: a sample older than its head block takes is refused "out of bounds")."""

    def __init__(
        self,
        data_dir: Path,
        port: int = 9090,
        web: Web | None = None,
        native_histograms: bool = True,
        scrape: Sequence[str] = (),
        out_of_order_window: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.web = web
        self.native_histograms = native_histograms
        self.scrape = list(scrape)
        self.out_of_order_window = out_of_order_window
        self.log_path = self.data_dir / "prometheus.log"
        self._http = _HTTP | (web.client_kwargs() if web else {})

    def config(self) -> str:
        config = _CONFIG
        if self.out_of_order_window is not None:
            window = {"tsdb": {"out_of_order_time_window": self.out_of_order_window}}
            config += f"storage: {json.dumps(window)}\n"  # (JSON is YAML)
        if not self.scrape:
            return config
        # JSON is YAML: the paths and targets need no quoting rules of their own.
        job = {"job_name": "ktel", "scrape_interval": f"{SELF_METRICS_SCRAPE_S}s"}
        return (
            config
            + f"rule_files: [{json.dumps(str(RULES))}]\n"
            + f"scrape_configs: [{json.dumps({**job, 'static_configs': [{'targets': self.scrape}]})}]\n"
        )

    @property
    def url(self) -> str:
        return f"{'https' if self.web else 'http'}://127.0.0.1:{self.port}"

    @property
    def remote_write_url(self) -> str:
        return f"{self.url}/api/v1/write"

    def start(self, timeout: float = 60) -> None:
        if self.running:
            return
        if proc.port_in_use(self.port):
            # Otherwise /-/ready could be answered by some other Prometheus.
            raise RuntimeError(f"cannot start Prometheus: 127.0.0.1:{self.port} is in use")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "prometheus.yml"
        config.write_text(self.config())
        argv = [
            PROMETHEUS_BIN,
            f"--config.file={config}",
            f"--storage.tsdb.path={self.data_dir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-remote-write-receiver",
        ]
        if self.web is not None:
            web_config = self.data_dir / "web.yml"  # JSON is YAML
            web_config.write_text(json.dumps(self.web.config(), indent=2))
            argv.append(f"--web.config.file={web_config}")
        if self.native_histograms:
            argv.append("--enable-feature=native-histograms")
        with proc.stop_signals_held():
            self._proc = proc.spawn(argv, self.log_path, self.data_dir)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop(timeout=5)
            raise

    def query(self, expr: str, at_s: float | None = None) -> list[dict[str, Any]]:
        """Instant query (at ``at_s``, seconds since the epoch; default now); returns
        ``data.result`` (a list for vector results)."""
        params: dict[str, Any] = {"query": expr} if at_s is None else {"query": expr, "time": at_s}
        resp = httpx.get(f"{self.url}/api/v1/query", params=params, **self._http)
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if resp.status_code != 200 or body.get("status") != "success":
            raise RuntimeError(
                f"Prometheus query {expr!r} failed (HTTP {resp.status_code}): "
                f"{body.get('errorType', '')} {body.get('error', resp.text[:500])}"
            )
        return body["data"]["result"]

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_started("Prometheus")
            try:
                resp = httpx.get(f"{self.url}/-/ready", **(self._http | {"timeout": 2}))
                if resp.status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Prometheus not ready after {timeout}s; tail of {self.log_path}:\n"
                    + proc.tail(self.log_path)
                )
            time.sleep(0.2)
