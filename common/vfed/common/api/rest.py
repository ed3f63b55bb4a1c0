"""The one async client of the server's REST API (docs/api.md): the node and the proxy (`vfed.proxy.rest`)
and the researcher's client (`vfed.client.http`) are subclasses of `RestClient`.

What it does for all of them: the API root of a server URL, the bearer token (a subclass's
`_on_unauthorized` gets a new one on a 401, then the call is made once more), error answers as `ApiError`
with the server's code and detail (`vfed.common.api.errors`), paged lists, blob uploads in 1 MiB chunks with
the Content-Length said up front (`vfed.common.chunks`), downloads that resume with `Range` where a broken
transfer stopped, and retries where they are safe: a connection that could not be opened (nothing was sent),
and a 502/503/504 answer to an idempotent request, a few times with a short jittered backoff. A request the
server may have acted on (a POST that met a 503, a connection that broke after it was sent) is not repeated:
the caller decides. Connection failures and 502/503/504 end as `ServerUnavailable`, unless a subclass
`_unavailable` says otherwise.
"""

from __future__ import annotations

import contextlib
import json as _json
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import aiohttp
from pydantic import BaseModel
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from vfed.common import tls
from vfed.common.api.errors import ApiError, read_error
from vfed.common.api.resources import Blob
from vfed.common.chunks import CHUNK_BYTES, body_and_length

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
DOWNLOAD_ATTEMPTS = 5  # transfers of one blob, each resuming where the last broke
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
RETRY_STATUSES = frozenset({502, 503, 504})
PAGE_SIZE = 500


class ServerUnavailable(Exception):
    """The server did not answer (connection refused, timeout, 502/503/504); try again later."""


class _Retry(Exception):
    """An answer worth asking again for (502/503/504 to an idempotent request)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        super().__init__(f"HTTP {response.status}")
        self.response = response


def _note_retry(state: RetryCallState) -> None:
    failed = state.outcome.exception() if state.outcome is not None else None
    log.info("server: attempt %d failed (%s); trying again", state.attempt_number, failed)


def api_base(server_url: str) -> str:
    """The API root for a server URL given with or without its /api/v1 suffix."""
    url = server_url.rstrip("/")
    return url if url.endswith("/api/v1") else url + "/api/v1"


def _not_sent(exc: BaseException) -> bool:
    """The request never left: the connection could not be opened (a TLS failure will not mend itself)."""
    return isinstance(exc, aiohttp.ClientConnectorError) and not isinstance(exc, aiohttp.ClientSSLError)


class RestClient:
    """Calls to one server. With a `session` the caller's session is used (and outlives this client);
    without one, this client opens its own on first use (verifying an https:// server against `ca_file`,
    None: the system's CAs) and `close()` closes it."""

    api_error: ClassVar[type[ApiError]] = ApiError
    """The exception an error answer becomes (the researcher's client raises its own subclass)."""
    retry_attempts: ClassVar[int] = 3
    """Attempts of one request where a retry is safe (see the module's docstring), the first included."""
    retry_wait_max_s: ClassVar[float] = 1.0

    def __init__(
        self,
        session: aiohttp.ClientSession | None,
        server_url: str,
        token: str | None = None,
        *,
        ca_file: str | Path | None = None,
    ) -> None:
        self._session = session
        self._owned = session is None
        self.base = api_base(server_url)
        self.token = token
        self.ca_file = ca_file
        self.bytes_down = 0
        self.bytes_up = 0

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=tls.connector(self.ca_file),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
            )
        return self._session

    async def close(self) -> None:
        """Close the session this client opened (a caller's session is left alone)."""
        if self._owned and self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self, extra: Mapping[str, str] | None = None, auth: bool = True) -> dict[str, str]:
        headers = dict(extra or {})
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    async def _on_unauthorized(self) -> bool:
        """Called on a 401; True when the subclass obtained a new token and the call should be retried."""
        return False

    def _unavailable(self, method: str, path: str, exc: BaseException) -> BaseException:
        """What a connection failure becomes (the node and proxy: ServerUnavailable, naming what to fix
        for a TLS failure)."""
        why = tls.explain(exc, self.ca_file) or exc or type(exc).__name__
        return ServerUnavailable(f"{method} {path}: {why}")

    async def _error(self, response: aiohttp.ClientResponse) -> BaseException:
        """What an error answer becomes: ServerUnavailable for 502/503/504 (a proxy in front of a server
        that is down), else `api_error` with the server's code and detail."""
        if response.status in RETRY_STATUSES:
            return ServerUnavailable(f"{response.method} {response.url.path}: HTTP {response.status}")
        return self.api_error(response.status, *await read_error(response))

    async def _send(
        self, method: str, path: str, replayable: bool, auth: bool, **kwargs: Any
    ) -> aiohttp.ClientResponse:
        """One request, repeated where that is safe; the response is open (the caller releases it)."""
        idempotent = method.upper() in IDEMPOTENT and replayable

        def retryable(exc: BaseException) -> bool:
            return (isinstance(exc, _Retry) and idempotent) or (replayable and _not_sent(exc))

        headers = kwargs.pop("headers", None)
        answered: aiohttp.ClientResponse | None = None
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(retryable),
                stop=stop_after_attempt(self.retry_attempts),
                wait=wait_exponential_jitter(multiplier=0.1, max=self.retry_wait_max_s, jitter=0.1),
                before_sleep=_note_retry,
                reraise=True,
            ):
                with attempt:
                    if answered is not None:
                        answered.release()  # the 502/503/504 of the attempt before
                    answered = await self.session.request(
                        method, self.base + path, headers=self._headers(headers, auth), **kwargs
                    )
                    if answered.status in RETRY_STATUSES and idempotent:
                        raise _Retry(answered)
        except _Retry as spent:
            return spent.response  # the attempts are spent: the answer goes to the caller as it is
        assert answered is not None  # the loop returns or raises; it ends only after an answer
        return answered

    @contextlib.asynccontextmanager
    async def open(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        auth: bool = True,
        client_timeout: aiohttp.ClientTimeout | None = None,
        passing: Collection[int] = (),
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A successful response, still open for streaming; an error answer raised (`_error`) unless its
        status is one of `passing` (the caller reads it), a connection failure too (`_unavailable`).

        A 401 is retried once after `_on_unauthorized` (a streamed request body cannot be replayed, so
        uploads of streams get neither that second chance nor a retry)."""
        replayable = data is None or isinstance(data, bytes | bytearray)
        extra: dict[str, Any] = {"json": json, "params": _clean(params), "data": data, "headers": headers}
        if client_timeout is not None:
            extra["timeout"] = client_timeout
        for attempt in (0, 1):
            try:
                response = await self._send(method, path, replayable, auth, **extra)
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                raise self._unavailable(method, path, exc) from exc
            async with response:
                again = response.status == 401 and attempt == 0 and auth and replayable
                if again and await self._on_unauthorized():
                    continue
                if response.status >= 400 and response.status not in passing:
                    raise await self._error(response)
                try:
                    yield response
                except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                    raise self._unavailable(method, path, exc) from exc
                return

    async def fetch(self, method: str, path: str, **kwargs: Any) -> tuple[str, bytes]:
        """One call; the answer's Content-Type and its whole body (counted in bytes_down)."""
        async with self.open(method, path, **kwargs) as response:
            body = await response.read()
            self.bytes_down += len(body)
            return response.headers.get("Content-Type", ""), body

    async def request(self, method: str, path: str, *, raw: bool = False, **kwargs: Any) -> Any:
        """One call; the JSON answer (None for an empty one, the bytes when `raw`)."""
        _, body = await self.fetch(method, path, **kwargs)
        if raw:
            return body
        return _json.loads(body) if body else None

    async def get_all(self, path: str, params: Mapping[str, Any] | None = None) -> list[Any]:
        """Every item of a paged list, following pages until the last."""
        items: list[Any] = []
        page = 1
        while True:
            query = {**(params or {}), "page": page, "per_page": PAGE_SIZE}
            answer = await self.request("GET", path, params=query)
            items.extend(answer["data"])
            if not answer.get("links", {}).get("next") or not answer["data"]:
                return items
            page += 1

    async def get_models(self, path: str, model: type[M], params: Mapping[str, Any] | None = None) -> list[M]:
        """Every item of a paged list, read as `model`; filters left None are not sent."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        return [model.model_validate(item) for item in await self.get_all(path, query)]

    async def upload_blob(self, data: bytes | AsyncIterable[bytes], size: int | None = None) -> Blob:
        """Store bytes (or a stream of chunks) on the server; the answer carries the blob id. Big bytes go
        as 1 MiB chunks with their Content-Length (`vfed.common.chunks`: one big body is slow to send)."""
        headers = {"Content-Type": "application/octet-stream"}
        body = body_and_length(data, headers) if isinstance(data, bytes | bytearray) else data
        info = Blob.model_validate(await self.request("POST", "/blobs", data=body, headers=headers))
        self.bytes_up += info.size if size is None else size
        return info

    async def download_blob(self, blob_id: str) -> bytes:
        """The whole blob in memory; a transfer broken mid-way goes on from where it stopped (Range)."""
        buf = bytearray()

        async def take(chunk: bytes) -> None:
            buf.extend(chunk)

        await self._download(blob_id, lambda: len(buf), take, buf.clear, CHUNK_BYTES)
        return bytes(buf)

    async def _download(
        self,
        blob_id: str,
        have: Callable[[], int],
        take: Callable[[bytes], Awaitable[None]],
        restart: Callable[[], None],
        chunk_bytes: int,
    ) -> None:
        """GET the blob, then `Range: bytes=<have>-` after each transfer that broke after bringing bytes,
        up to DOWNLOAD_ATTEMPTS; a server that answers 200 to a Range request sends it all again
        (`restart`). Errors the server answers (4xx, 5xx) and a server that sends nothing are raised as
        they come."""
        for attempt in range(DOWNLOAD_ATTEMPTS):
            start = have()
            headers = {"Range": f"bytes={start}-"} if start else None
            try:
                async with self.open("GET", f"/blobs/{blob_id}", headers=headers) as response:
                    if start and response.status != 206:
                        restart()
                    async for chunk in response.content.iter_chunked(chunk_bytes):
                        await take(chunk)
                        self.bytes_down += len(chunk)
                return
            except (aiohttp.ClientPayloadError, ServerUnavailable, aiohttp.ClientConnectionError) as exc:
                if have() == start or attempt == DOWNLOAD_ATTEMPTS - 1:
                    raise  # no byte came (a server that is down): the caller's retry, not ours
                log.info("blob %s: transfer broke after %d bytes (%s); resuming", blob_id, have(), exc)


def _clean(params: Mapping[str, Any] | None) -> dict[str, str] | None:
    if params is None:
        return None
    return {k: str(v) for k, v in params.items() if v is not None}
