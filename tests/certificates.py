"""Throwaway TLS material for tests, made with the openssl command line: a CA, and
server certificates it signs for the names a test chooses."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

# A day is plenty for one test session; nothing here is meant to outlive it.
DAYS = "2"
CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


@dataclass(frozen=True)
class Authority:
    """A CA: its certificate (what clients trust) and key (what signs)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerCertificate:
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_authority(directory: Path, name: str) -> Authority:
    """A self-signed CA named ``name`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl("req", "-x509", "-new", *CURVE, "-keyout", str(key), "-out", str(cert),
             "-days", DAYS, "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return Authority(cert, key)


def make_server_certificate(authority: Authority, directory: Path, name: str,
                            dns_names: tuple[str, ...]) -> ServerCertificate:
    """A server certificate for ``dns_names`` (its subject alternative names) that
    ``authority`` signs."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key, request = (directory / f"{name}.crt", directory / f"{name}.key",
                          directory / f"{name}.csr")
    names = ",".join(f"DNS:{n}" for n in dns_names)
    _openssl("req", "-new", *CURVE, "-keyout", str(key), "-out", str(request),
             "-subj", f"/CN={dns_names[0]}", "-addext", f"subjectAltName={names}",
             "-addext", "basicConstraints=critical,CA:FALSE",
             "-addext", "extendedKeyUsage=serverAuth")
    _openssl("x509", "-req", "-in", str(request), "-CA", str(authority.cert),
             "-CAkey", str(authority.key), "-CAcreateserial", "-out", str(cert),
             "-days", DAYS, "-copy_extensions", "copy")
    return ServerCertificate(cert, key)
