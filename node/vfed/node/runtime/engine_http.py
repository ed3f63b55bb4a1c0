"""The job volume's create as a request on the event loop (aiohttp over the engine's Unix socket).

Why: on a run's start the job volume is the longest branch. Through the SDK, in a thread, its answer waited
for the GIL while the loop decrypted the input and started the run's proxy (bench/node.py: ready ~7 ms after
the claim answer, the engine's own work ~2.7 ms). As a request on the loop the engine works while the loop
does.
Only for `unix://` endpoints; any other keeps the SDK's thread path.
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp

from vfed.node.runtime.base import PermanentStartError, RuntimeUnavailable

DEFAULT_SOCKET = "unix:///var/run/docker.sock"


def unix_socket(base_url: str | None) -> str | None:
    """The engine socket path when reached over a Unix socket (config, else DOCKER_HOST); else None."""
    url = base_url or os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET
    return url.removeprefix("unix://") if url.startswith("unix:///") else None


class EngineHttp:
    """An aiohttp session on the engine's socket; no I/O until the first request."""

    def __init__(self, socket_path: str, api_version: str) -> None:
        self._socket_path = socket_path
        self._prefix = f"http://docker/v{api_version}"
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def create_volume(
        self, name: str, driver_opts: dict[str, str], labels: dict[str, str]
    ) -> dict[str, Any]:
        """`POST /volumes/create` with the local driver; the engine's answer (an existing volume of that name
        comes back as it is, whatever its options: the caller checks them)."""
        body = {"Name": name, "Driver": "local", "DriverOpts": driver_opts, "Labels": labels}
        if self._session is None:
            connector = aiohttp.UnixConnector(path=self._socket_path)
            timeout = aiohttp.ClientTimeout(total=60)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        try:
            async with self._session.post(f"{self._prefix}/volumes/create", json=body) as response:
                answer = await response.json(content_type=None)
                status = response.status
        except (aiohttp.ClientError, ValueError) as exc:
            raise RuntimeUnavailable(f"volume {name}: docker engine unreachable: {exc}") from exc
        message = answer.get("message") if isinstance(answer, dict) else None
        if status >= 500:
            raise RuntimeUnavailable(f"volume {name}: docker engine error {status}: {message}")
        if status >= 400 or not isinstance(answer, dict):
            raise PermanentStartError(f"volume {name}: {message or status}")
        return answer
