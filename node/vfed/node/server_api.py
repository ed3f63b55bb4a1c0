"""The node's client of the server API: the shared REST client plus node login, claims and run updates."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from vfed.common import multipart
from vfed.common.api.errors import ApiError
from vfed.common.api.resources import Organization, Run, RunToken, Task
from vfed.common.trust import SignedEntry
from vfed.proxy.rest import RestClient

CLAIM_ACCEPT = "multipart/mixed"  # the claim answer may carry a small input as a binary part


class NodeIdentity(BaseModel):
    """Who the server says we are, from `POST /token/node`."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    node_id: int
    organization_id: int
    collaboration_id: int
    broker_username: str | None = None
    """The node's own doorbell broker account (servers that manage the broker's accounts)."""
    broker_password: str | None = Field(None, repr=False)


class Claim(Run):
    """A claimed run (`vfed.common.api.resources.Claim`, read leniently): the task, the run's proxy token and
    a small input the server sends along as a binary part (None from an older server, or for a large input:
    the node then asks for them)."""

    task: Task | None = None
    run_token: RunToken | None = None
    _input: bytes | None = PrivateAttr(default=None)

    def input_bytes(self) -> bytes | None:
        return self._input


def parse_claim(content_type: str, body: bytes) -> Claim:
    """The claim answer: JSON alone, or multipart/mixed with the JSON and then the sealed input."""
    try:
        if not content_type.lower().startswith(CLAIM_ACCEPT):
            return Claim.model_validate_json(body)
        parts = multipart.split(content_type, body, "mixed")
        if len(parts) != 2:
            raise multipart.MultipartError(f"{len(parts)} parts, expected the claim and its input")
        claim, sent = Claim.model_validate_json(parts[0].data), parts[1]
        if sent.name != "input" or sent.content_type != "application/octet-stream":
            raise multipart.MultipartError(
                "the second part is not the run's input (application/octet-stream)"
            )
        claim._input = sent.data
    except (multipart.MultipartError, ValidationError) as exc:
        raise ApiError(502, "bad-claim-answer", f"the server's claim answer is malformed: {exc}") from None
    return claim


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
            accept = {"Accept": f"{CLAIM_ACCEPT}, application/json"}
            content_type, body = await self.fetch("POST", f"/runs/{run_id}/claim", headers=accept)
        except ApiError as exc:
            if exc.status == 409:
                raise AlreadyClaimed(f"run {run_id}: {exc.detail or exc.error}") from None
            raise
        return parse_claim(content_type, body)

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

    async def key_records(self, organization_id: int) -> list[Any]:
        """The organization's signed key records as the server holds them (unverified: see ChainResolver)."""
        return await self._entries(f"/organizations/{organization_id}/key-records")

    async def post_key_records(self, organization_id: int, records: list[SignedEntry]) -> None:
        body = {"records": [r.model_dump(mode="json") for r in records]}
        await self.request("POST", f"/organizations/{organization_id}/key-records", json=body)

    async def revocations(self, organization_id: int) -> list[Any]:
        """The organization's certificate revocations (unverified); none from a server that keeps none."""
        try:
            return await self._entries(f"/organizations/{organization_id}/revocations")
        except ApiError as exc:
            if exc.status == 404:
                return []
            raise

    async def _entries(self, path: str) -> list[Any]:
        answer = await self.request("GET", path)
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            raise ApiError(502, "bad-answer", f"GET {path}: expected {{'data': [...]}}")
        return data

    async def heartbeat(self) -> None:
        await self.request("POST", "/nodes/heartbeat")

    # The ledger (`vfed.common.ledger.Transport`: EmbeddedLedger builds the paths; the answers are verified
    # by the caller, never trusted).
    async def get_json(self, path: str, params: dict[str, str]) -> Any:
        return await self.request("GET", path, params=params)

    async def post_json(self, path: str, body: Any) -> Any:
        return await self.request("POST", path, json=body)

    async def ledger_entries(self, collaboration_id: int, after: int, limit: int) -> Any:
        """`GET /collaborations/{id}/ledger?after=N&limit=M` as the server answers it (unverified)."""
        params = {"after": str(after), "limit": str(limit)}
        return await self.get_json(f"/collaborations/{collaboration_id}/ledger", params)

    async def append_ledger(self, collaboration_id: int, entry: SignedEntry) -> Any:
        """`POST /collaborations/{id}/ledger`: `{"seq", "hash"}` (ApiError 409 when it is there already)."""
        body = {"entry": entry.model_dump(mode="json")}
        return await self.post_json(f"/collaborations/{collaboration_id}/ledger", body)
