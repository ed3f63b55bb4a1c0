"""TLS towards the server for every client of it (node agent, proxy, `vnode`, researcher's client):
the CA file named by the configuration, else the system's CAs, and the host name always verified.

Failures become one line that says what to fix: a certificate signed by a CA not given, a certificate for
other names than the URL's host, or an https:// URL at a server that does not speak TLS.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp

HOSTNAME_MISMATCH = 62  # X509_V_ERR_HOSTNAME_MISMATCH
IP_MISMATCH = 64  # X509_V_ERR_IP_ADDRESS_MISMATCH


class CaFileError(Exception):
    """The CA file cannot be used; the message names it and why."""


def client_context(ca_file: str | Path | None) -> ssl.SSLContext:
    """Verify the server's certificate against `ca_file` (None: the system's CAs) and its host name."""
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except ssl.SSLError as exc:
        raise CaFileError(f"CA file {ca_file}: no PEM certificate in it ({exc.reason or exc})") from None
    except OSError as exc:
        raise CaFileError(f"CA file {ca_file}: cannot read it: {exc.strerror or exc}") from None


def connector(ca_file: str | Path | None) -> aiohttp.TCPConnector:
    """An aiohttp connector whose https:// connections verify with `client_context(ca_file)` (call it in
    a running event loop, like the session it is for)."""
    return aiohttp.TCPConnector(ssl=client_context(ca_file))


def explain(exc: BaseException, ca_file: str | Path | None = None) -> str | None:
    """One line for a TLS failure of a connection to the server, or None when `exc` is not one."""
    where = f"the CA file {ca_file}" if ca_file is not None else "the system's CAs (no CA file given)"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        host = exc.host
        error = exc.certificate_error
        code = getattr(error, "verify_code", None)
        reason = getattr(error, "verify_message", None) or str(error)
        if code in (HOSTNAME_MISMATCH, IP_MISMATCH):
            return (
                f"TLS: the server's certificate is not valid for {host} ({reason}): use the name the "
                "certificate was issued for in the URL, or reissue it (`vserver tls init --hostname`)"
            )
        return (
            f"TLS: the certificate of {host}:{exc.port} does not verify with {where} ({reason}): give the CA "
            "that signed it (ca_file / server_ca_file / vfed login --ca-file / VFED_CA_FILE)"
        )
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return (
            f"TLS: no TLS handshake with {exc.host}:{exc.port} ({exc.os_error}): is it an https:// server? "
            "(a server without TLS is reached with http://)"
        )
    return None
