"""The remote-write exporter's connection to its receiver, as ``[remote_write]``
configures it: TLS (a CA, a client certificate for mutual TLS, the host name check),
basic auth or a bearer token, and extra headers (a tenant's ``X-Scope-OrgID``).

The password file and the token file are read for every request, as Prometheus
does with its own credentials files: a rotated secret is used from the next request
on, without a restart, and an exporter stuck on a refused password (401/403, which
exporters/delivery.py retries, keeping the data) recovers as soon as the file is fixed.
"""

from __future__ import annotations

import base64
import logging
import ssl
from collections.abc import Generator

import httpx

from exporters.delivery import Misconfigured, Unauthorized, bearer
from ktel.config import ConfigError, RemoteWriteConfig

log = logging.getLogger("ktel.export.remote_write")

HEADERS = {
    "Content-Encoding": "snappy",
    "Content-Type": "application/x-protobuf",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
    "User-Agent": "ktel-remote-write/0.1",
}


class FileAuth(httpx.Auth):
    """The Authorization header, made per request from the configured secret."""

    def __init__(self, cfg: RemoteWriteConfig) -> None:
        self.cfg = cfg

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self.header()
        yield request

    def header(self) -> str:
        c = self.cfg
        if c.bearer_token_file is not None:
            return bearer(c.bearer_token_file, "remote_write.bearer_token_file")
        try:
            password = c.password()
        except (OSError, UnicodeDecodeError) as err:
            why = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
            raise Unauthorized(
                f"cannot read remote_write.basic_auth_password_file {c.basic_auth_password_file}: {why}"
            ) from None
        user_pass = f"{c.basic_auth_username}:{password}".encode()
        return f"Basic {base64.b64encode(user_pass).decode()}"


def tls_context(cfg: RemoteWriteConfig) -> ssl.SSLContext:
    """The receiver's CA (or the system's), the client certificate, the host name check."""
    try:
        ctx = ssl.create_default_context(cafile=cfg.tls_ca_file)
        if cfg.tls_cert_file is not None:
            ctx.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
    except ssl.SSLError as err:
        raise ConfigError(
            f"remote_write.tls_ca_file, tls_cert_file or tls_key_file is not usable PEM ({err}): "
            "give a PEM CA bundle, and a PEM certificate with its unencrypted key"
        ) from None
    ctx.check_hostname = cfg.tls_check_hostname
    return ctx


class Receiver:
    """Where the samples go: one HTTP client, and the one line logged when the receiver
    refuses ktel's credentials or TLS handshake (not one per retry)."""

    def __init__(self, cfg: RemoteWriteConfig) -> None:
        self.url = cfg.url
        auth = cfg.basic_auth_username is not None or cfg.bearer_token_file is not None
        self.client = httpx.AsyncClient(
            timeout=cfg.timeout_seconds,
            verify=tls_context(cfg) if cfg.url.startswith("https://") else True,
            auth=FileAuth(cfg) if auth else None,
            headers={**cfg.headers, **HEADERS},
        )
        self.misconfigured = Misconfigured(
            log,
            f"remote-write to {cfg.url}",
            credentials="remote_write.basic_auth_username and basic_auth_password(_file), "
            "or remote_write.bearer_token_file",
            receiver="remote_write.url (Prometheus takes remote-write only with "
            "--web.enable-remote-write-receiver)",
            tls="remote_write.tls_ca_file, tls_cert_file, tls_key_file and url",
        )

    async def __aenter__(self) -> Receiver:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.client.aclose()
