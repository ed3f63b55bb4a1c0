"""A small client of the server's REST API (docs/api.md), shared by the proxy (run token) and the node agent.

It holds a bearer token and turns answers into the shared resource models (`vfed.common.api.resources`);
error answers become `ApiError` with the server's `error` code, connection failures `ServerUnavailable`. The
node's subclass adds login and refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import json as _json
import logging
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp

from vfed.common import tls
from vfed.common.api.errors import ApiError, read_error
from vfed.common.api.resources import Blob, Organization, Run, Task
from vfed.common.chunks import body_and_length

log = logging.getLogger(__name__)
DOWNLOAD_ATTEMPTS = 5  # transfers of one blob, each resuming where the last broke


class ServerUnavailable(Exception):
    """The server did not answer (connection refused, timeout, 502/503/504); try again later."""


def api_base(server_url: str) -> str:
    """The API root for a server URL given with or without its /api/v1 suffix."""
    url = server_url.rstrip("/")
    return url if url.endswith("/api/v1") else url + "/api/v1"


class RestClient:
    """Bearer-token calls to one server. Owns no session: the caller's session outlives it."""

    def __init__(self, session: aiohttp.ClientSession, server_url: str, token: str | None = None) -> None:
        self.session = session
        self.base = api_base(server_url)
        self.token = token
        self.bytes_down = 0
        self.bytes_up = 0

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    async def _on_unauthorized(self) -> bool:
        """Called on a 401; True when the subclass obtained a new token and the call should be retried."""
        return False

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
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A successful response, still open for streaming; errors raised as ApiError/ServerUnavailable.

        A 401 is retried once after `_on_unauthorized` (a streamed request body cannot be replayed, so
        uploads of streams do not get that second chance).
        """
        for attempt in (0, 1):
            try:
                async with self.session.request(
                    method,
                    self.base + path,
                    json=json,
                    params=_clean(params),
                    data=data,
                    headers=self._headers(headers),
                ) as response:
                    replayable = data is None or isinstance(data, bytes | bytearray)
                    if (
                        response.status == 401
                        and attempt == 0
                        and replayable
                        and await self._on_unauthorized()
                    ):
                        continue
                    if response.status >= 400:
                        await _raise_for(response)
                    yield response
                    return
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                why = tls.explain(exc) or exc or type(exc).__name__  # TLS: what to fix, in one line
                raise ServerUnavailable(f"{method} {path}: {why}") from exc

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        raw: bool = False,
    ) -> Any:
        """One call; the JSON answer (or the bytes when raw)."""
        _, body = await self.fetch(method, path, json=json, params=params, data=data, headers=headers)
        if raw:
            return body
        return _json.loads(body) if body else None

    async def fetch(self, method: str, path: str, **kwargs: Any) -> tuple[str, bytes]:
        """One call; the answer's Content-Type and its whole body (counted in bytes_down)."""
        async with self.open(method, path, **kwargs) as response:
            body = await response.read()
            self.bytes_down += len(body)
            return response.headers.get("Content-Type", ""), body

    async def health(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "/health")
        return result

    async def get_organization(self, organization_id: int) -> Organization:
        return Organization.model_validate(await self.request("GET", f"/organizations/{organization_id}"))

    async def list_organizations(self) -> list[Organization]:
        return [Organization.model_validate(o) for o in await self.list_all("/organizations")]

    async def get_task(self, task_id: int) -> Task:
        return Task.model_validate(await self.request("GET", f"/tasks/{task_id}"))

    async def create_task(self, body: Mapping[str, Any]) -> Task:
        return Task.model_validate(await self.request("POST", "/tasks", json=dict(body)))

    async def get_run(self, run_id: int) -> Run:
        return Run.model_validate(await self.request("GET", f"/runs/{run_id}"))

    async def list_runs(self, **filters: Any) -> list[Run]:
        return [Run.model_validate(r) for r in await self.list_all("/runs", filters)]

    async def list_all(self, path: str, params: Mapping[str, Any] | None = None) -> list[Any]:
        """Every item of a paged list, following pages until the last."""
        items: list[Any] = []
        page = 1
        while True:
            query = {**(params or {}), "page": page, "per_page": 500}
            answer = await self.request("GET", path, params=query)
            items.extend(answer["data"])
            if not answer.get("links", {}).get("next") or not answer["data"]:
                return items
            page += 1

    async def upload_blob(self, data: bytes | AsyncIterable[bytes], size: int | None = None) -> Blob:
        """Store bytes (or a stream of chunks) on the server; the answer carries the blob id."""
        headers = {"Content-Type": "application/octet-stream"}
        body = body_and_length(data, headers) if isinstance(data, bytes | bytearray) else data
        answer = await self.request("POST", "/blobs", data=body, headers=headers)
        info = Blob.model_validate(answer)
        self.bytes_up += info.size if size is None else size
        return info

    async def download_blob(self, blob_id: str) -> bytes:
        """The whole blob in memory; a transfer broken mid-way goes on from where it stopped (Range)."""
        buf = bytearray()

        async def take(chunk: bytes) -> None:
            buf.extend(chunk)

        def restart() -> None:
            buf.clear()

        await self._download(blob_id, lambda: len(buf), take, restart, 1024 * 1024)
        return bytes(buf)

    async def download_blob_to(self, blob_id: str, target: Path, chunk_bytes: int = 1024 * 1024) -> int:
        """Stream a blob into a new file (mode 0600); returns its size. A transfer broken mid-way goes on
        from the bytes already written (Range), so a big blob is never fetched twice over a bad link."""
        handle = await asyncio.to_thread(_create_private, target)
        written = 0

        async def take(chunk: bytes) -> None:
            nonlocal written
            await asyncio.to_thread(handle.write, chunk)
            written += len(chunk)

        def restart() -> None:
            nonlocal written
            handle.seek(0)
            handle.truncate()
            written = 0

        try:
            await self._download(blob_id, lambda: written, take, restart, chunk_bytes)
        finally:
            handle.close()
        return written

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
            except (aiohttp.ClientPayloadError, ServerUnavailable) as exc:
                if have() == start or attempt == DOWNLOAD_ATTEMPTS - 1:
                    raise  # no byte came (a server that is down): the caller's retry, not ours
                log.info("blob %s: transfer broke after %d bytes (%s); resuming", blob_id, have(), exc)


async def file_chunks(path: Path, chunk_bytes: int = 1024 * 1024) -> AsyncIterable[bytes]:
    """A file as chunks for a streamed upload, read off the event loop."""
    handle = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(handle.read, chunk_bytes):
            yield chunk
    finally:
        handle.close()


def _create_private(path: Path) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb")


def _clean(params: Mapping[str, Any] | None) -> dict[str, str] | None:
    if params is None:
        return None
    return {k: str(v) for k, v in params.items() if v is not None}


async def _raise_for(response: aiohttp.ClientResponse) -> None:
    if response.status in (502, 503, 504):
        raise ServerUnavailable(f"{response.method} {response.url.path}: HTTP {response.status}")
    raise ApiError(response.status, *await read_error(response))
