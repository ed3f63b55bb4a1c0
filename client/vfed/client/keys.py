"""Public keys of organizations as the server publishes them, including rotated (historical) ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vfed.client.http import ApiSession
from vfed.common.crypto import PublicKey


class KeyDirectory:
    """Caches each organization's current and past public keys, fetched on first use."""

    def __init__(self, api: ApiSession) -> None:
        self.api = api
        self._by_org: dict[int, dict[str, PublicKey]] = {}

    async def keys_of(self, org_id: int, refresh: bool = False) -> dict[str, PublicKey]:
        if refresh or org_id not in self._by_org:
            org = await self.api.request("GET", f"/organizations/{org_id}")
            keys: dict[str, PublicKey] = {}
            history = await self.api.request("GET", f"/organizations/{org_id}/keys")
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

    async def lookup_for(self, org_id: int) -> Callable[[str], PublicKey | None]:
        """A sender lookup that accepts only keys of this one organization."""
        keys = await self.keys_of(org_id)
        return keys.get


def _entries(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, dict):
        data = body.get("data", [])
        return list(data) if isinstance(data, list) else []
    return list(body) if isinstance(body, list) else []
