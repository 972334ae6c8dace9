"""The remote-write exporter's connection settings (exporters/remote_write_client.py):
the Authorization header made per request from the configured secret, and TLS."""

from __future__ import annotations

import base64
import ssl

import httpx

from exporters.remote_write_client import HEADERS, FileAuth, Receiver, tls_context
from ktel.config import RemoteWriteConfig

URL = "https://r:9090/api/v1/write"


def authorization(cfg: RemoteWriteConfig) -> str:
    request = httpx.Request("POST", URL)
    return next(FileAuth(cfg).auth_flow(request)).headers["Authorization"]


def test_basic_auth_reads_the_password_file_for_each_request(tmp_path):
    password = tmp_path / "password"
    password.write_text("first\n")
    cfg = RemoteWriteConfig(url=URL, basic_auth_username="ktel", basic_auth_password_file=password)
    assert authorization(cfg) == "Basic " + base64.b64encode(b"ktel:first").decode()
    password.write_text("second\n")
    assert authorization(cfg) == "Basic " + base64.b64encode(b"ktel:second").decode()


def test_a_bearer_token_file_is_read_for_each_request(tmp_path):
    token = tmp_path / "token"
    token.write_text("t1\n")
    cfg = RemoteWriteConfig(url=URL, bearer_token_file=token)
    assert authorization(cfg) == "Bearer t1"
    token.write_text("t2")
    assert authorization(cfg) == "Bearer t2"


def test_tls_checks_the_certificate_and_by_default_the_host_name():
    ctx = tls_context(RemoteWriteConfig(url=URL))
    assert (ctx.verify_mode, ctx.check_hostname) == (ssl.CERT_REQUIRED, True)
    ctx = tls_context(RemoteWriteConfig(url=URL, tls_check_hostname=False))
    assert (ctx.verify_mode, ctx.check_hostname) == (ssl.CERT_REQUIRED, False)


async def test_headers_come_with_the_protocol_headers_and_no_authorization_unless_configured():
    cfg = RemoteWriteConfig(url=URL, headers={"X-Scope-OrgID": "tenant-a"})
    async with Receiver(cfg) as receiver:
        assert receiver.client.headers["X-Scope-OrgID"] == "tenant-a"
        for name, value in HEADERS.items():
            assert receiver.client.headers[name] == value
        assert "Authorization" not in receiver.client.headers
        assert receiver.client.auth is None
