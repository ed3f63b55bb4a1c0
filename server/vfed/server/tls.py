"""HTTPS for `vserver start`: the listening TLS context (its certificate reloaded on SIGHUP, so a renewed
certificate needs no restart), the rule against plain HTTP where other machines can reach it, and, when a
reverse proxy terminates TLS, a middleware that takes requests only from that proxy.

A reload builds a complete new context from the files and only then puts it in service: a renewed
certificate whose key does not match, or a half-written file, is refused (logged) and the previous
certificate keeps being served. New handshakes pick the current context in the SNI callback (OpenSSL calls
it for every ClientHello, with or without a server name), so connections already open are not touched.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Middleware

from vfed.common.api.errors import error_response
from vfed.common.netaddr import is_loopback_host
from vfed.server.config import Settings, TlsSettings

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TlsError(Exception):
    """A certificate or key that cannot be served; the message names the file and the problem."""


def _no_passphrase() -> str:
    raise TlsError("the key file is encrypted: give vserver an unencrypted key (mode 0600)")


def load_server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server context (TLS 1.2 or newer) serving this certificate chain and key; TlsError otherwise."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except TlsError as exc:
        raise TlsError(f"tls.key_file {key_file}: {exc}") from None
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            raise TlsError(
                f"tls.cert_file {cert_file} and tls.key_file {key_file} are not a PEM certificate and its "
                f"private key ({exc.reason or exc})"
            ) from None
        raise TlsError(f"tls: cannot read {exc.filename or cert_file}: {exc.strerror or exc}") from None
    return ctx


def describe_certificate(cert_file: Path) -> str:
    """`for NAMES, valid until DATE` of the first certificate in the file (for the log)."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return "(unreadable)"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    until = cert.not_valid_after_utc
    expired = " (EXPIRED)" if until < datetime.now(UTC) else ""
    shown = ", ".join(str(n) for n in names) or "(no names)"
    return f"for {shown}, valid until {until:%Y-%m-%d %H:%M} UTC{expired}"


class ServerTls:
    """The listening context and the one new handshakes get; `reload()` (SIGHUP) swaps the latter."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.listening = load_server_context(cert_file, key_file)
        self._current = self.listening
        self.listening.sni_callback = self._choose
        self.reloads = 0

    @classmethod
    def from_settings(cls, tls: TlsSettings) -> ServerTls | None:
        """None when the server does not terminate TLS itself."""
        if tls.cert_file is None or tls.key_file is None:
            return None
        return cls(tls.cert_file, tls.key_file)

    def _choose(
        self, connection: ssl.SSLObject | ssl.SSLSocket, name: str | None, ctx: ssl.SSLContext
    ) -> None:
        del name, ctx
        current = self._current
        if current is not self.listening:
            connection.context = current

    def reload(self) -> bool:
        """Read the files again; serve them to new connections, or keep the previous ones (logged)."""
        try:
            fresh = load_server_context(self.cert_file, self.key_file)
        except TlsError as exc:
            log.error("TLS reload refused, still serving the previous certificate: %s", exc)
            return False
        self._current = fresh
        self.reloads += 1
        log.info("TLS certificate reloaded from %s: %s", self.cert_file, describe_certificate(self.cert_file))
        return True


def plain_http_refusal(settings: Settings, insecure_http: bool) -> str | None:
    """Why `vserver start` must not serve plain HTTP on its address, or None when it may."""
    if settings.tls.cert_file is not None or settings.tls.terminated_by == "proxy" or insecure_http:
        return None
    if is_loopback_host(settings.host):
        return None
    return (
        f"refusing to serve plain HTTP on {settings.host}:{settings.port}, which other machines can reach "
        "(passwords and tokens would cross the network in clear): set tls.cert_file and tls.key_file "
        "(`vserver tls init` writes a quick-start pair), or tls.terminated_by: proxy with the proxy in "
        "trusted_proxies when a reverse proxy terminates TLS, or pass --insecure-http"
    )


def _peer_in(request: web.Request, networks: Sequence[IPNetwork]) -> bool:
    try:
        peer = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    return any(peer.version == net.version and peer in net for net in networks)


def proxy_only_middleware(trusted_proxies: Sequence[IPNetwork]) -> Middleware:
    """With `tls.terminated_by: proxy`: a request straight from anyone but a trusted proxy came in plain
    HTTP around the proxy's TLS, so it is refused (403 with the reason) instead of served."""

    @web.middleware
    async def proxy_only(request: web.Request, handler: Handler) -> web.StreamResponse:
        if _peer_in(request, trusted_proxies):
            return await handler(request)
        return error_response(
            403,
            "tls-proxy-only",
            "this server takes requests only through its TLS-terminating proxy (tls.terminated_by: proxy); "
            "use the proxy's https:// address",
        )

    return proxy_only
