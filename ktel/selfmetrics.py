"""Self-metrics and health: every ktel process serves, on its metrics port,

- ``/metrics``: its own counters (Prometheus text format), which `ktel up` reads for
  its live view and users scrape to reconcile what the kernel emitted with what
  reached the backends;
- ``/healthz``: 200 while the process runs (its HTTP thread answers);
- ``/readyz``: 200 once the process does its job, else 503 with the reason in one
  line. Each process says what ready means (``ready_when``): the agent, connected to
  Kafka with its probes loaded; a processing stage, partitions assigned and tables
  recovered; an exporter, its consumer connected and assigned partitions (the pull
  endpoint: also positioned in each).

The address is ``service.metrics_bind`` (127.0.0.1 by default), the same for every
process; the port is each process's ``*.metrics_port``.
"""

from __future__ import annotations

import gzip
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, ThreadingWSGIServer

log = logging.getLogger(__name__)

# None: ready; a string: why not.
Check = Callable[[], str | None]

_check: Check = lambda: "starting"  # noqa: E731  (replaced by the process's own check)


def ready_when(check: Check) -> None:
    """Make ``check`` this process's readiness: /readyz answers 503 with the string it
    returns, 200 when it returns None. Called from the process's event loop; the
    check runs on the HTTP thread, so it only reads state."""
    global _check
    _check = check


def readiness() -> str | None:
    try:
        return _check()
    except Exception as err:  # a check that breaks says so instead of killing the request
        return f"readiness check failed: {type(err).__name__}: {err}"


def _text(start_response: Callable[..., Any], status: str, body: str) -> Iterable[bytes]:
    data = (body + "\n").encode()
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))]
    )
    return [data]


def app(
    registry: CollectorRegistry = REGISTRY,
    extra: Callable[[], bytes] | None = None,
    unserved: Callable[[], str | None] | None = None,
) -> Callable[..., Iterable[bytes]]:
    """The WSGI app: /healthz, /readyz, and ``registry`` everywhere else, followed by
    what ``extra`` returns (series already in the text format) if given; while
    ``unserved`` gives a reason, that instead, as a 503."""
    metrics = make_wsgi_app(registry) if extra is None else _with(registry, extra)
    # One scrape made at a time: each makes its whole text in memory (the pull endpoint's
    # up to pull.max_series_bytes with its series held), so two at once (two Prometheus
    # servers) took twice that. Under the GIL, two at once also took each as long as two
    # one after the other. /healthz and /readyz do not wait for it.
    scraping = threading.Lock()

    def route(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return _text(start_response, "200 OK", "ok")
        if path == "/readyz":
            why = readiness()
            if why is None:
                return _text(start_response, "200 OK", "ready")
            return _text(start_response, "503 Service Unavailable", f"not ready: {why}")
        if unserved is not None and (why := unserved()) is not None:
            return _text(start_response, "503 Service Unavailable", f"not served yet: {why}")
        with scraping:
            return metrics(environ, start_response)

    return route


def _with(registry: CollectorRegistry, extra: Callable[[], bytes]) -> Callable[..., Iterable[bytes]]:
    """/metrics as ``registry``'s series and ``extra``'s, in the text format (0.0.4, which
    Prometheus takes whatever else it asks for), gzipped for a client that takes it.
    ``extra`` writes its series itself: a process with very many of them
    (processors/fleet_metrics.py) writes them far faster than prometheus_client, which
    goes through them one sample at a time. Level 1: those series are megabytes at
    10,000 hosts, which the default level takes seconds of CPU to compress."""

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Length", "0")])
            return [b""]
        if environ.get("PATH_INFO") == "/favicon.ico":  # (as prometheus_client's app answers it)
            start_response("200 OK", [("Content-Length", "0")])
            return [b""]
        body = generate_latest(registry) + extra()
        headers = [("Content-Type", CONTENT_TYPE_PLAIN_0_0_4)]
        if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):
            body = gzip.compress(body, compresslevel=1)
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(body))))
        start_response("200 OK", headers)
        return [b""] if method == "HEAD" else [body]

    return serve


class _Quiet(WSGIRequestHandler):
    # A probe every few seconds would drown the process's own log lines.
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


def serve(
    port: int,
    host: str,
    setting: str,
    registry: CollectorRegistry = REGISTRY,
    host_setting: str = "service.metrics_bind",
    extra: Callable[[], bytes] | None = None,
    unserved: Callable[[], str | None] | None = None,
) -> None:
    """Serve /metrics (``registry``, then ``extra``'s series, unless ``unserved``: ``app``), /healthz and
    /readyz on host:port from a daemon thread; port 0 turns them off. ``setting`` and
    ``host_setting`` name the port's and the host's settings, for the message when they
    cannot be served."""
    if not port:
        return
    v6 = ":" in host and ipaddress.ip_address(host).version == 6
    try:
        server = make_server(
            host,
            port,
            app(registry, extra, unserved),
            _Server6 if v6 else ThreadingWSGIServer,
            handler_class=_Quiet,
        )
    except OSError as err:
        raise SystemExit(
            f"cannot serve self-metrics on {host}:{port} ({err.strerror or err}): "
            f"set {setting} to a free port, or {host_setting} to an address of this host"
        ) from None
    # Nothing calls shutdown(): the daemon thread ends with the process. serve_forever's
    # poll interval (0.5 s by default) only bounds how soon shutdown() is seen, so the
    # thread waits for requests alone rather than waking twice a second for nothing.
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": None}, name="selfmetrics", daemon=True
    ).start()
    log.info(
        "self-metrics and health on http://%s:%d (/metrics, /healthz, /readyz)", host, server.server_port
    )
