"""Self-metrics: every ktel process serves its own counters at /metrics.

`ktel up` reads these endpoints for its live view; users scrape them to
reconcile what the kernel emitted with what reached the backends.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, start_http_server


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Serve the default registry on host:port; port 0 turns it off."""
    if port:
        start_http_server(port, addr=host, registry=REGISTRY)
