"""Verified key chains for a node, a proxy or a client: fetched from the server, checked against the trust
store, cached. The fetching is the caller's (each has its own HTTP client); the checking is here, once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from vfed.common.trust.entries import SignedEntry
from vfed.common.trust.errors import TrustError, UntrustedKey
from vfed.common.trust.keychain import KeyChain, parse_records, show_fingerprint, verify_chain
from vfed.common.trust.truststore import TrustMode, TrustStore

log = logging.getLogger("vfed.trust")

Fetch = Callable[[int], Awaitable[list[Any]]]
Refused = Callable[[TrustError, int], None]


class ChainResolver:
    """`chain(org)` -> the organization's verified key chain; every refusal is logged and raised typed."""

    def __init__(
        self,
        store: TrustStore,
        fetch_records: Fetch,
        fetch_revocations: Fetch | None = None,
        on_refusal: Refused | None = None,
    ) -> None:
        self.store = store
        self._fetch_records = fetch_records
        self._fetch_revocations = fetch_revocations
        self._on_refusal = on_refusal
        self._chains: dict[int, KeyChain] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    def forget(self, organization_id: int) -> None:
        self._chains.pop(organization_id, None)

    def cached(self, organization_id: int) -> KeyChain | None:
        return self._chains.get(organization_id)

    async def chain(self, organization_id: int, *, refresh: bool = False) -> KeyChain:
        if not refresh and organization_id in self._chains:
            return self._chains[organization_id]
        lock = self._locks.setdefault(organization_id, asyncio.Lock())
        async with lock:
            if not refresh and organization_id in self._chains:
                return self._chains[organization_id]
            try:
                chain = await self._verify(organization_id)
            except TrustError as exc:
                self._chains.pop(organization_id, None)
                log.error("refused organization %s: %s", organization_id, exc.message)
                if self._on_refusal is not None:
                    self._on_refusal(exc, organization_id)
                raise
            self._chains[organization_id] = chain
            return chain

    async def key_for(self, organization_id: int, key_id: str) -> KeyChain:
        """The chain, refreshed once when it does not know `key_id` yet (the organization rotated)."""
        chain = await self.chain(organization_id)
        if chain.get(key_id) is None:
            chain = await self.chain(organization_id, refresh=True)
        return chain

    async def _verify(self, organization_id: int) -> KeyChain:
        self.store.reload_if_changed()
        records = parse_records(await self._fetch_records(organization_id))
        pin = self.store.get(organization_id)
        if pin is not None:
            return verify_chain(organization_id, records, pin.root, pin.head)
        if self.store.mode is not TrustMode.TOFU:
            # Verified without a pin only to name the fingerprint the operator should compare.
            seen = None
            with contextlib.suppress(TrustError):
                seen = verify_chain(organization_id, records, None).fingerprint
            shown = seen or "none published"
            raise UntrustedKey(
                f"organization {organization_id} is not pinned (its first key: {shown}); compare the "
                f"fingerprint with its admin, then `vnode trust {organization_id} --fingerprint F` "
                f"(or `vfed trust {organization_id} --fingerprint F`)",
                organization_id,
                None,
                seen.replace("-", "") if seen else None,
            )
        chain = verify_chain(organization_id, records, None)
        self.store.pin(organization_id, chain.root.key_id, note="pinned at first use")
        log.warning(
            "pinned organization %s at first use: %s", organization_id, show_fingerprint(chain.root.key_id)
        )
        return chain

    async def revocations(self, organization_id: int) -> list[SignedEntry]:
        if self._fetch_revocations is None:
            return []
        out = []
        for raw in await self._fetch_revocations(organization_id):
            try:
                out.append(SignedEntry.parse(raw))
            except TrustError:
                continue  # unsigned garbage cannot revoke anything; signatures are checked by the caller
        return out
