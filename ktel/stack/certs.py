"""Throwaway certificates for local TLS servers and their clients (the local secured
Kafka, Prometheus, the Collector), made with openssl: a CA, and certificates it signs,
for 127.0.0.1 and localhost, whose CN names a client's principal. Unencrypted keys,
valid for a day: for tests and trying ktel out, never for production. Files holding a
key or a password are written by ``write_private``, readable by their owner alone."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ktel.stack import proc


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key (both PEM; the key unencrypted)."""

    cert: Path
    key: Path

    def bundle(self, path: Path) -> Path:
        """Key and certificate in one PEM file (what Kafka's PEM key store takes)."""
        return write_private(path, self.key.read_text() + self.cert.read_text())


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` (a key, a password) to ``path``, readable and writable by its owner
    alone from the moment it exists: a file created with the umask's mode (0644) then
    chmod-ed could be opened by anyone in between, and kept open to read what follows."""
    # A new file (mkstemp: O_EXCL, mode 0600) put in the place of any there: one there
    # already (a directory used before) may be anyone's to read, or held open by someone.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with open(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def openssl(*args: str | Path) -> None:
    if shutil.which("openssl") is None:
        raise RuntimeError("cannot make certificates: `openssl` is not on PATH (run deploy/setup.sh)")
    res = proc.run(["openssl", *map(str, args)])
    if res.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args[:2]))} failed: {res.stderr.strip()[-2000:]}")


def make_ca(d: Path, name: str = "ca") -> Pair:
    """A self-signed CA, valid for a day: ``<d>/<name>.pem`` and ``<d>/<name>.key``."""
    d.mkdir(parents=True, exist_ok=True)
    ca = Pair(d / f"{name}.pem", d / f"{name}.key")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN=ktel test {name}",
            "-keyout", ca.key, "-out", ca.cert)  # fmt: skip
    return ca


def issue(ca: Pair, d: Path, name: str) -> Pair:
    """A certificate signed by ``ca`` for 127.0.0.1 and localhost, fit for a server and
    for a client (CN ``name``): ``<d>/<name>.crt`` and ``<d>/<name>.key``."""
    pair = Pair(d / f"{name}.crt", d / f"{name}.key")
    csr, ext = d / f"{name}.csr", d / f"{name}.ext"
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", pair.key, "-out", csr)
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl("x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial",
            "-days", "1", "-extfile", ext, "-out", pair.cert)  # fmt: skip
    return pair


def broker_keystore(ca: Pair) -> Path:
    """The Kafka brokers' PEM key store: one certificate for 127.0.0.1 serves every local
    node, as their server certificate and, CN ``broker``, as their client certificate
    when they talk to each other (ktel/stack/kafka.py, BROKER_PRINCIPAL)."""
    d = ca.cert.parent
    return issue(ca, d, "broker").bundle(d / "broker.pem")
