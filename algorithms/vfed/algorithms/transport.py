"""HTTP to the node's proxy from inside an algorithm container, with the standard library only.

A Docker run has no network: the proxy is a Unix socket (`PROXY_SOCKET`). A run in a cluster reaches it over
the network (`PROXY_URL`) with its own token, a file its pod alone mounts (`PROXY_TOKEN_FILE`; read at each
request, never copied into the environment). One connection per request keeps it simple and robust; a
Unix-socket connect costs microseconds.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse


class ProxyError(Exception):
    """The proxy answered with an error status; `error`/`detail` come from its JSON body."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"proxy answered {status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


class ProxyUnavailable(Exception):
    """The proxy could not be reached (connection refused or reset): worth retrying later."""


class ProxyConfigError(Exception):
    """Neither PROXY_SOCKET nor PROXY_URL is set, or the URL is unusable."""


@dataclass(frozen=True)
class Response:
    """A proxy answer, body fully read."""

    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


class _UnixConnection(http.client.HTTPConnection):
    """http.client over a Unix socket: the host name only fills the Host header."""

    def __init__(self, path: str, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self._socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Transport:
    """Sends requests to one proxy endpoint, over a Unix socket or TCP with a bearer token."""

    def __init__(
        self,
        *,
        socket_path: str | None = None,
        url: str | None = None,
        token: str | None = None,
        token_file: str | None = None,
    ) -> None:
        if not socket_path and not url:
            raise ProxyConfigError(
                "no proxy configured: set PROXY_SOCKET (or PROXY_URL and PROXY_TOKEN_FILE)"
            )
        self._socket_path = socket_path
        self._token = token
        self._token_file = token_file
        self._base_path = ""
        self._host = ""
        self._port: int | None = None
        if not socket_path and url:
            parsed = urlparse(url)
            if parsed.scheme != "http" or not parsed.hostname:
                raise ProxyConfigError(f"PROXY_URL must be an http:// URL, got {url!r}")
            self._host, self._port = parsed.hostname, parsed.port
            self._base_path = parsed.path.rstrip("/")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Transport:
        """The proxy the node gave this run."""
        env = os.environ if environ is None else environ
        return cls(
            socket_path=env.get("PROXY_SOCKET") or None,
            url=env.get("PROXY_URL") or None,
            token=env.get("PROXY_TOKEN") or None,
            token_file=env.get("PROXY_TOKEN_FILE") or None,
        )

    def _bearer(self) -> str | None:
        """The run's token: the token file's content (as the pod sees it now), else the one given."""
        if self._token_file:
            try:
                with open(self._token_file, encoding="utf-8") as handle:
                    return handle.read().strip() or None
            except OSError as exc:
                raise ProxyConfigError(
                    f"PROXY_TOKEN_FILE {self._token_file}: {exc.strerror or exc}"
                ) from None
        return self._token

    def _connection(self, timeout_s: float) -> http.client.HTTPConnection:
        if self._socket_path:
            return _UnixConnection(self._socket_path, timeout_s)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout_s)

    def request(self, method: str, path: str, body: Any = None, timeout_s: float = 60.0) -> Response:
        """One request; JSON body in, full response out. Connection failures raise ProxyUnavailable."""
        headers = {"Accept": "application/json, application/vnd.apache.parquet"}
        data: bytes | None = None
        if body is not None:
            data = json.dumps(body, allow_nan=False).encode()
            headers["Content-Type"] = "application/json"
        token = None if self._socket_path else self._bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        connection = self._connection(timeout_s)
        try:
            connection.request(method, self._base_path + path, body=data, headers=headers)
            answer = connection.getresponse()
            return Response(answer.status, answer.getheader("Content-Type", ""), answer.read())
        except (ConnectionError, FileNotFoundError, http.client.RemoteDisconnected, TimeoutError) as exc:
            raise ProxyUnavailable(f"proxy unreachable: {exc}") from exc
        finally:
            connection.close()

    def call(self, method: str, path: str, body: Any = None, timeout_s: float = 60.0) -> Response:
        """Like request, but a non-2xx answer raises ProxyError with the proxy's reason."""
        response = self.request(method, path, body, timeout_s)
        if response.status >= 300:
            raise _error_of(response)
        return response


def _error_of(response: Response) -> ProxyError:
    try:
        document = response.json()
    except ValueError:
        document = None
    if isinstance(document, dict):
        return ProxyError(response.status, str(document.get("error", "")), str(document.get("detail", "")))
    text = response.body[:200].decode(errors="replace")
    return ProxyError(response.status, "http-error", text)
