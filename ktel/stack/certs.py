"""Throwaway certificates for the local secured Kafka, made with openssl: a CA, the
brokers' certificate for 127.0.0.1, and client certificates whose CN is the principal.
Unencrypted keys, valid for a day: for tests and trying ktel out, never for production."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def _openssl(*args: str | Path) -> None:
    if shutil.which("openssl") is None:
        raise RuntimeError("cannot make certificates: `openssl` is not on PATH (run deploy/setup.sh)")
    res = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {res.stderr.strip()}")


def make_ca(d: Path) -> Path:
    """A CA in ``d`` (ca.pem, ca.key); the CA certificate's path."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=ktel test CA",
             "-keyout", d / "ca.key", "-out", d / "ca.pem")  # fmt: skip
    return d / "ca.pem"


def issue(ca: Path, name: str, server: bool = False) -> tuple[Path, Path]:
    """(certificate, key) for CN=``name``, signed by ``ca`` and written next to it; a
    ``server`` certificate also names 127.0.0.1 and localhost, which clients check."""
    d = ca.parent
    key, cert, csr = d / f"{name}.key", d / f"{name}.crt", d / f"{name}.csr"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", key, "-out", csr)
    ext = d / f"{name}.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n" if server else "extendedKeyUsage=clientAuth\n"
    )
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca.with_suffix(".key"), "-CAcreateserial",
             "-days", "1", "-extfile", ext, "-out", cert)  # fmt: skip
    return cert, key


def keystore(cert: Path, key: Path) -> Path:
    """Key and certificate in one PEM file, as Kafka's PEM key store wants them."""
    path = cert.with_suffix(".pem")
    path.write_text(key.read_text() + cert.read_text())
    return path


def broker_keystore(ca: Path) -> Path:
    """The brokers' key store: one certificate for 127.0.0.1 serves every local node."""
    return keystore(*issue(ca, "127.0.0.1", server=True))
