"""Organizations' public keys as published on the server, cached per process.

The server is trusted for availability only; a key whose fingerprint does not match the `key_id` the server
lists beside it is refused. (Signed key records on the ledger come with the ledger issue.)
"""

from __future__ import annotations

from collections.abc import Callable

from vfed.common.crypto import PublicKey
from vfed.proxy.rest import RestClient


class KeyUnavailable(Exception):
    """An organization has no usable public key on the server."""


class KeyDirectory:
    """Public keys by organization id, fetched on first use and refreshed on a miss."""

    def __init__(self, rest: RestClient) -> None:
        self.rest = rest
        self._by_org: dict[int, PublicKey] = {}

    async def public_key(self, organization_id: int, *, refresh: bool = False) -> PublicKey:
        """The organization's current public key; KeyUnavailable when it has none or it is inconsistent."""
        if not refresh and organization_id in self._by_org:
            return self._by_org[organization_id]
        org = await self.rest.get_organization(organization_id)
        if not org.public_key:
            raise KeyUnavailable(f"organization {organization_id} has not published a public key")
        try:
            key = PublicKey.from_text(org.public_key)
        except Exception as exc:  # any parse failure of untrusted text is the same problem
            raise KeyUnavailable(
                f"organization {organization_id} publishes an unreadable key: {exc}"
            ) from None
        if org.key_id and key.key_id != org.key_id:
            raise KeyUnavailable(f"organization {organization_id}: key_id does not match its public key")
        self._by_org[organization_id] = key
        return key

    async def sender(self, organization_id: int) -> Callable[[str], PublicKey | None]:
        """A key_id lookup for decrypting something this organization signed (refreshed if it rotated)."""
        key = await self.public_key(organization_id)
        known = {key.key_id: key}

        def lookup(key_id: str) -> PublicKey | None:
            return known.get(key_id)

        return lookup

    def forget(self, organization_id: int) -> None:
        """Drop a cached key, e.g. after a signature check failed against it."""
        self._by_org.pop(organization_id, None)
