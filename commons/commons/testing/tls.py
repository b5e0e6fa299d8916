"""A throw-away certificate authority and a server certificate for TLS tests (``openssl``)."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from commons.testing.redis_server import RedisServer

__all__ = ["CertificateFiles", "TlsRedisServer", "make_certificates"]


@dataclass(frozen=True)
class CertificateFiles:
    """PEM files: the CA, and a certificate it signed for ``localhost`` / ``127.0.0.1``."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def _openssl(*args: str) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise RuntimeError("openssl is needed to make test certificates")
    subprocess.run(  # noqa: S603 - openssl with our own arguments
        [binary, *args], check=True, capture_output=True
    )


def make_certificates(
    directory: Path, host_names: tuple[str, ...] = ("localhost",)
) -> CertificateFiles:
    """Creates a self-signed CA and a server certificate for ``host_names`` and 127.0.0.1."""
    ca_key, ca_cert = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    extensions = directory / "server.ext"
    names = ",".join([*(f"DNS:{name}" for name in host_names), "IP:127.0.0.1"])
    # The extensions X.509 strict verification asks for (Python 3.13's default context): a CA
    # with critical basic constraints and key usage, a leaf naming its issuer's key.
    extensions.write_text(
        f"subjectAltName={names}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n",
        encoding="utf-8",
    )
    _openssl("genrsa", "-out", str(ca_key), "2048")
    _openssl(
        "req", "-x509", "-new", "-key", str(ca_key), "-sha256", "-days", "2",
        "-subj", "/CN=commons test CA", "-out", str(ca_cert),
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    _openssl("genrsa", "-out", str(key), "2048")
    _openssl("req", "-new", "-key", str(key), "-subj", "/CN=localhost", "-out", str(csr))
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(extensions),
        "-out", str(cert),
    )  # fmt: skip
    return CertificateFiles(ca_file=ca_cert, cert_file=cert, key_file=key)


@dataclass
class TlsRedisServer(RedisServer):
    """A redis-server that listens with TLS only (``--port 0``), on :attr:`port`."""

    certificates: CertificateFiles | None = None

    @property
    def url(self) -> str:
        return f"rediss://localhost:{self.port}/0"

    def _listen_args(self) -> list[str]:
        assert self.certificates is not None
        return [
            "--port", "0",
            "--tls-port", str(self.port),
            "--tls-cert-file", str(self.certificates.cert_file),
            "--tls-key-file", str(self.certificates.key_file),
            "--tls-ca-cert-file", str(self.certificates.ca_file),
            "--tls-auth-clients", "no",
        ]  # fmt: skip

    def answers_ping(self, timeout: float = 0.2) -> bool:
        assert self.certificates is not None
        context = ssl.create_default_context(cafile=str(self.certificates.ca_file))
        context.check_hostname = False  # a readiness probe; the tests check names themselves
        try:
            with (
                socket.create_connection((self.host, self.port), timeout=timeout) as raw,
                context.wrap_socket(raw, server_hostname="localhost") as conn,
            ):
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False
