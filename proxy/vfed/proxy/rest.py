"""The REST client of the proxy (run token) and the node agent: the shared one (`vfed.common.api.rest`: bearer
token, errors, retries, chunked uploads, resumed downloads) with the calls they make, answers read as the
shared resource models (`vfed.common.api.resources`). The node's subclass adds login and refresh.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp

from vfed.common.api import rest
from vfed.common.api.resources import Blob, Organization, Run, Task
from vfed.common.api.rest import ServerUnavailable
from vfed.common.resumable_upload import ResumableUploader, Source, UploadBroken

__all__ = ["RestClient", "ServerUnavailable"]


class RestClient(rest.RestClient):
    """Bearer-token calls to one server, on the caller's session (it outlives this client)."""

    def __init__(self, session: aiohttp.ClientSession, server_url: str, token: str | None = None) -> None:
        super().__init__(session, server_url, token)

    async def health(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "/health")
        return result

    async def get_organization(self, organization_id: int) -> Organization:
        return Organization.model_validate(await self.request("GET", f"/organizations/{organization_id}"))

    async def list_organizations(self) -> list[Organization]:
        return await self.get_models("/organizations", Organization)

    async def get_task(self, task_id: int) -> Task:
        return Task.model_validate(await self.request("GET", f"/tasks/{task_id}"))

    async def create_task(self, body: Mapping[str, Any]) -> Task:
        return Task.model_validate(await self.request("POST", "/tasks", json=dict(body)))

    async def get_run(self, run_id: int) -> Run:
        return Run.model_validate(await self.request("GET", f"/runs/{run_id}"))

    async def list_runs(self, **filters: Any) -> list[Run]:
        return await self.get_models("/runs", Run, filters)

    async def upload_source(self, source: Source, size: int | None = None, **session: Any) -> Blob:
        """Store a file's bytes on the server, resuming after a broken connection (and with `resume`, a
        session of an earlier attempt: vfed.common.resumable_upload); ServerUnavailable when it stayed
        unreachable."""
        uploader = ResumableUploader(self.session, self.base, self._headers, self._on_unauthorized)
        try:
            done = await uploader.upload(source, size=size, **session)
        except UploadBroken as exc:
            raise ServerUnavailable(str(exc)) from exc
        self.bytes_up += done.size
        return Blob(id=done.id, size=done.size, sha256=done.sha256)

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


def _create_private(path: Path) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb")
