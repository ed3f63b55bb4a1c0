"""`vserver tls init`: a private CA and a server certificate it signs, for a quick start without a public CA.

The CA's certificate is what nodes and researchers are handed (`server_ca_file`, `vfed login --ca-file`);
its key stays with the operator and signs the next server certificate, so a renewal (`--force`) keeps the
CA and needs nothing new at the nodes. Keys are ECDSA P-256, written 0600; certificates carry what strict
verifiers ask for (subject and authority key identifiers, key usages, serverAuth).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.crt", "server.key"
CA_DAYS = 3650
SERVER_DAYS = 397  # what browsers accept for a server certificate; renew with `vserver tls init --force`


class TlsInitError(Exception):
    """The files cannot be written (or read back); the message says which and why."""


@dataclass(frozen=True)
class Written:
    """What `init` wrote: the folder, the names in the server certificate, whether the CA is new."""

    folder: Path
    names: list[str]
    ca_created: bool
    ca_fingerprint: str
    not_after: dt.datetime

    @property
    def ca_cert(self) -> Path:
        return self.folder / CA_CERT

    @property
    def server_cert(self) -> Path:
        return self.folder / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.folder / SERVER_KEY


def default_names() -> list[str]:
    """This machine's name, then loopback: what a quick start is reached by."""
    names = [socket.getfqdn(), "localhost", "127.0.0.1"]
    return list(dict.fromkeys(n for n in names if n))


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), mode)
        fh.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, as `openssl x509 -fingerprint -sha256` prints it."""
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _new_ca(folder: Path, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"vfed private CA {socket.gethostname()}")])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(folder / CA_KEY, _key_pem(key), 0o600)
    _write(folder / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def _load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((folder / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((folder / CA_KEY).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise TlsInitError(
            f"the CA in {folder} cannot be used ({exc}); move it away to make a new one"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TlsInitError(f"{folder / CA_KEY} is not the ECDSA key `vserver tls init` writes")
    return cert, key


def _server_cert(
    names: list[str], ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, now: dt.datetime, days: int
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def init(folder: Path, names: list[str], *, days: int = SERVER_DAYS, force: bool = False) -> Written:
    """Write (or reuse) the CA in `folder` and a new server certificate for `names` signed by it."""
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not names:
        raise TlsInitError("name at least one host name or address the server is reached by (--hostname)")
    if (folder / SERVER_CERT).exists() and not force:
        raise TlsInitError(
            f"{folder / SERVER_CERT} exists; add --force to replace it (the CA is kept: nodes need nothing)"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        now = dt.datetime.now(dt.UTC)
        have_ca = (folder / CA_CERT).exists() and (folder / CA_KEY).exists()
        ca, ca_key = _load_ca(folder) if have_ca else _new_ca(folder, now)
        cert, key = _server_cert(names, ca, ca_key, now, days)
        _write(folder / SERVER_KEY, _key_pem(key), 0o600)
        _write(folder / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as exc:
        raise TlsInitError(f"cannot write in {folder}: {exc.strerror or exc}") from None
    return Written(folder, names, not have_ca, fingerprint(ca), cert.not_valid_after_utc)
