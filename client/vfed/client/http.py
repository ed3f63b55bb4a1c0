"""The researcher's HTTP session with the server: tokens, JSON errors, pagination, streamed blobs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from vfed.client.errors import ApiError, NotLoggedIn
from vfed.common.api.errors import read_error
from vfed.common.api.rest import RestClient
from vfed.common.chunks import CHUNK_BYTES

RESUME_ATTEMPTS = 5  # attempts in a row that bring no new byte before a download to a file gives up
BLOB_READ_TIMEOUT_S = 60.0  # a transfer silent this long is broken: resume it


class ApiSession(RestClient):
    """The researcher's session against `<url>/api/v1` (the shared REST client, on a session of its own):
    refreshes the access token once on a 401, raises the client's ApiError for an error answer and lets a
    connection failure through as aiohttp raised it (the CLI names what to fix). An https:// server's
    certificate is verified against `ca_file` (None: the system's CAs) and the URL's host name."""

    api_error = ApiError

    def __init__(
        self,
        url: str,
        token: str | None = None,
        refresh_token: str | None = None,
        ca_file: str | Path | None = None,
    ) -> None:
        super().__init__(None, url, token, ca_file=ca_file)
        self.refresh_token = refresh_token
        # the server rotates refresh tokens and treats a second use of one as theft (revoking every token),
        # so concurrent requests that all met a 401 must refresh once, not once each
        self._refresh_lock = asyncio.Lock()

    async def __aenter__(self) -> ApiSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _unavailable(self, method: str, path: str, exc: BaseException) -> BaseException:
        return exc

    async def _error(self, response: aiohttp.ClientResponse) -> BaseException:
        return self.api_error(response.status, *await read_error(response))

    async def _on_unauthorized(self) -> bool:
        return await self._refresh()

    def _auth_headers(self) -> dict[str, str]:
        if not self.token:
            raise NotLoggedIn("not logged in: call login() or set VFED_TOKEN")
        return self._headers()

    async def request(self, method: str, path: str, *, auth: bool = True, **kwargs: Any) -> Any:
        """A JSON request; an error answer raises ApiError with the server's code and detail, and a
        request that needs a login without one NotLoggedIn."""
        if auth:
            self._auth_headers()
        return await super().request(method, path, auth=auth, **kwargs)

    async def login(self, username: str, password: str) -> dict[str, Any]:
        body = await self.request(
            "POST", "/token/user", json={"username": username, "password": password}, auth=False
        )
        self.token, self.refresh_token = body["access_token"], body["refresh_token"]
        return dict(body)

    async def logout(self) -> None:
        """Revoke the refresh token's login at the server (POST /token/revoke) and forget both tokens; the
        access token, short-lived, is not usable for a refresh and expires on its own. ApiError/aiohttp
        errors when the server could not be told (the tokens are forgotten here all the same)."""
        refresh, self.token, self.refresh_token = self.refresh_token, None, None
        if refresh:
            await self.request("POST", "/token/revoke", json={"refresh_token": refresh}, auth=False)

    async def _refresh(self) -> bool:
        seen = self.refresh_token
        if not seen:
            return False
        async with self._refresh_lock:
            if self.refresh_token != seen:
                return True  # another request refreshed while this one waited
            return await self._refresh_now()

    async def _refresh_now(self) -> bool:
        try:
            body = await self.request(
                "POST", "/token/refresh", json={"refresh_token": self.refresh_token}, auth=False
            )
        except ApiError:
            return False
        self.token = body["access_token"]
        self.refresh_token = body.get("refresh_token", self.refresh_token)
        return True

    async def post_with_input(self, path: str, fields: dict[str, Any], data: bytes) -> Any:
        """One multipart POST: `fields` as the JSON `task` part, `data` as the octet-stream `input` part
        (the server streams it into blob storage; no base64, no second request). A form is sent once: on
        a 401 it is built again after the refresh."""
        for again in (True, False):
            form = aiohttp.FormData()
            form.add_field("task", json.dumps(fields), content_type="application/json")
            form.add_field("input", data, content_type="application/octet-stream", filename="input")
            try:
                return await self.request("POST", path, data=form)
            except ApiError as exc:
                if exc.status == 401 and again and await self._refresh():
                    continue
                raise
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def download_blob_to(self, blob_id: str, path: Path) -> int:
        """The blob into `path`, continuing from the bytes the file already holds (`Range: bytes=N-`), so a
        transfer broken here or in an earlier call resumes; returns the blob's size. Chunks go straight to
        the file, so memory stays at one chunk whatever the size. The bytes kept are not checked here: the
        caller's decryption verifies them all. Gives up (ApiError download-failed) after RESUME_ATTEMPTS
        attempts in a row that brought no new byte."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=BLOB_READ_TIMEOUT_S)
        self._auth_headers()
        idle, why = 0, ""
        while idle < RESUME_ATTEMPTS:
            have = await asyncio.to_thread(file_size, path)
            headers = {"Range": f"bytes={have}-"} if have else None
            try:
                async with self.open(
                    "GET", f"/blobs/{blob_id}", headers=headers, client_timeout=timeout, passing={416}
                ) as resp:
                    if resp.status == 416:
                        if _range_size(resp.headers.get("Content-Range")) == have:
                            return have  # an earlier transfer got every byte
                        # longer than the blob, or an unreadable answer: start over
                        await asyncio.to_thread(path.unlink, True)
                        idle, why = idle + 1, "the server refused the range"
                        continue
                    if resp.status == 206 and _range_start(resp.headers.get("Content-Range")) != have:
                        # a part of another place than asked: start over
                        await asyncio.to_thread(path.unlink, True)
                        idle, why = idle + 1, "the server answered another range"
                        continue
                    return await _write_body(resp, path, resp.status == 206)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
                why = f"{exc.__class__.__name__}: {exc}"
            grew = await asyncio.to_thread(file_size, path) > have
            idle = 0 if grew else idle + 1
            if not grew:
                await asyncio.sleep(0.2 * idle)
        raise ApiError(
            0,
            "download-failed",
            f"blob {blob_id}: {RESUME_ATTEMPTS} attempts in a row brought nothing ({why})",
        )


async def _write_body(resp: aiohttp.ClientResponse, path: Path, appending: bool) -> int:
    """Append a 206 answer (it starts where the file ends), or replace the file with a 200 answer (the
    server sent the whole blob). Returns the file's size. A transfer cut short raises with what arrived
    kept in the file, for the next attempt to continue."""
    with path.open("ab" if appending else "wb") as out:
        async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
            await asyncio.to_thread(out.write, chunk)
        return out.tell()


def file_size(path: Path) -> int:
    """The size of the file, 0 when there is none."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _range_start(header: str | None) -> int | None:
    """The first byte of `Content-Range: bytes START-END/SIZE`; None when it is not of that form."""
    try:
        unit, rest = (header or "").split(" ", 1)
        return int(rest.split("-", 1)[0]) if unit == "bytes" else None
    except ValueError:
        return None


def _range_size(header: str | None) -> int | None:
    """The SIZE of `Content-Range: bytes */SIZE` (a 416's); None when it is not of that form."""
    try:
        unit, rest = (header or "").split(" ", 1)
        return int(rest.rsplit("/", 1)[1]) if unit == "bytes" else None
    except (ValueError, IndexError):
        return None
