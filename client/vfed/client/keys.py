"""Public keys of organizations as the server publishes them, including rotated (historical) ones."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from vfed.client.http import ApiSession
from vfed.common.crypto import PublicKey


class KeyDirectory:
    """Caches each organization's current and past public keys, fetched on first use."""

    def __init__(self, api: ApiSession) -> None:
        self.api = api
        self._by_org: dict[int, dict[str, PublicKey]] = {}
        self._members: dict[int, dict[int, PublicKey | None]] = {}

    async def keys_of(self, org_id: int, refresh: bool = False) -> dict[str, PublicKey]:
        if refresh or org_id not in self._by_org:
            org, history = await asyncio.gather(  # two independent reads: one round trip's wait, not two
                self.api.request("GET", f"/organizations/{org_id}"),
                self.api.request("GET", f"/organizations/{org_id}/keys"),
            )
            keys: dict[str, PublicKey] = {}
            for entry in _entries(history):
                text = entry.get("public_key")
                if text:
                    key = PublicKey.from_text(text)
                    keys[key.key_id] = key
            if org.get("public_key"):
                key = PublicKey.from_text(org["public_key"])
                keys[key.key_id] = key
            self._by_org[org_id] = keys
        return self._by_org[org_id]

    async def current(self, org_id: int) -> PublicKey | None:
        """The key new inputs for this organization are sealed to."""
        org = await self.api.request("GET", f"/organizations/{org_id}")
        text = org.get("public_key")
        return PublicKey.from_text(text) if text else None

    async def current_in(self, collaboration_id: int, refresh: bool = False) -> dict[int, PublicKey | None]:
        """The current key of every member of a collaboration the caller can see, in one request, then kept.

        A kept key may have rotated since: inputs name the key they are sealed to, and the server refuses a
        stale one (409 stale-key) before storing anything; the caller then asks again with refresh=True. A
        member without a key yet is asked about again each time.
        """
        kept = self._members.get(collaboration_id)
        if not kept or refresh or any(key is None for key in kept.values()):
            orgs = await self.api.get_all("/organizations", {"collaboration_id": collaboration_id})
            kept = {int(o["id"]): _key(o.get("public_key")) for o in orgs}
            self._members[collaboration_id] = kept
        return dict(kept)

    async def lookup_for(self, org_id: int) -> Callable[[str], PublicKey | None]:
        """A sender lookup that accepts only keys of this one organization."""
        keys = await self.keys_of(org_id)
        return keys.get


def _key(text: str | None) -> PublicKey | None:
    return PublicKey.from_text(text) if text else None


def _entries(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, dict):
        data = body.get("data", [])
        return list(data) if isinstance(data, list) else []
    return list(body) if isinstance(body, list) else []
