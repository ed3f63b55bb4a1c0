"""The node's client of the server API: the shared REST client plus node login, claims and run updates."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import aiohttp
from pydantic import BaseModel, ConfigDict

from vfed.proxy.rest import ApiError, Organization, RestClient, Run, Task


class NodeIdentity(BaseModel):
    """Who the server says we are, from `POST /token/node`."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    node_id: int
    organization_id: int
    collaboration_id: int


class RunToken(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    token: str


class Claim(Run):
    """A claimed run, with the task, the run's proxy token and a small input the server sends along (None
    from an older server, or for a large input: the node then asks for them)."""

    task: Task | None = None
    run_token: RunToken | None = None
    input: str | None = None  # base64 of a small input blob; None: download it

    def input_bytes(self) -> bytes | None:
        return base64.b64decode(self.input, validate=True) if self.input is not None else None


class AlreadyClaimed(Exception):
    """Another node won the claim (409); not an error for this node."""


class NodeClient(RestClient):
    """Node-token calls; a 401 logs in again with the API key, once, and retries."""

    def __init__(self, session: aiohttp.ClientSession, server_url: str, api_key: str) -> None:
        super().__init__(session, server_url)
        self._api_key = api_key
        self._refresh_token: str | None = None
        self._login_lock = asyncio.Lock()
        self.identity: NodeIdentity | None = None

    async def login(self) -> NodeIdentity:
        """Exchange the API key for a token; raises ApiError 401 when the key is wrong."""
        self.token = None
        answer = await self.request("POST", "/token/node", json={"api_key": self._api_key})
        self.token = answer["access_token"]
        self._refresh_token = answer.get("refresh_token")
        self.identity = NodeIdentity.model_validate(answer)
        return self.identity

    async def _on_unauthorized(self) -> bool:
        if self.token is None:
            return False
        async with self._login_lock:
            await self.login()
        return True

    async def claim(self, run_id: int) -> Claim:
        """Claim a pending run for this node; AlreadyClaimed when another node was first."""
        try:
            return Claim.model_validate(await self.request("POST", f"/runs/{run_id}/claim"))
        except ApiError as exc:
            if exc.status == 409:
                raise AlreadyClaimed(f"run {run_id}: {exc.detail or exc.error}") from None
            raise

    async def patch_run(self, run_id: int, **fields: Any) -> Run:
        """Update status, exit code, reason, log, digest or result blob of a run we claimed."""
        body = {k: v for k, v in fields.items() if v is not None}
        return Run.model_validate(await self.request("PATCH", f"/runs/{run_id}", json=body))

    async def run_token(self, run_id: int) -> str:
        """A token scoped to one claimed run, for that run's proxy."""
        answer = await self.request("POST", f"/runs/{run_id}/token")
        return str(answer["token"])

    async def put_public_key(self, organization_id: int, public_key_text: str) -> Organization:
        answer = await self.request(
            "PUT", f"/organizations/{organization_id}/public_key", json={"public_key": public_key_text}
        )
        return Organization.model_validate(answer)

    async def heartbeat(self) -> None:
        await self.request("POST", "/nodes/heartbeat")
