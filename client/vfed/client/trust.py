"""Organizations' key chains as the researcher's client verifies them: pinned by the fingerprint of each
organization's first key in a trust store (like SSH's known_hosts), fetched from the server, cached.

The server is trusted for availability only: the keys inputs are sealed to and results are checked against
come from chains that verify under these pins, never from the server's `public_key` field. The client's
default mode is `tofu` (a researcher confirms at first sight, as with ssh; `vfed organizations list` shows
what was pinned); `pinned` refuses every organization not pinned with `vfed trust` beforehand.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from vfed.client.errors import ApiError, ClientError, TrustRefused
from vfed.client.http import ApiSession
from vfed.common.api.resources import Organization, Resource
from vfed.common.crypto import CryptoError, PublicKey
from vfed.common.trust import (
    KIND_GENESIS,
    ChainResolver,
    KeyChain,
    Pin,
    SignedEntry,
    TrustError,
    TrustMode,
    TrustStore,
    TrustStoreError,
    fingerprint,
    parse_records,
    show_fingerprint,
    verify_chain,
)
from vfed.common.trust.truststore import (
    FederationFileError,
    NamedPin,
    pin_named,
    read_federation_file,
)

DEFAULT_MODE = TrustMode.TOFU


def trust_mode(value: str | None = None) -> TrustMode:
    """The mode given, else VFED_TRUST, else `tofu`."""
    raw = value or os.environ.get("VFED_TRUST") or DEFAULT_MODE.value
    try:
        return TrustMode(raw.strip().lower())
    except ValueError:
        raise ClientError(f"trust mode {raw!r} is not one of: pinned, tofu (VFED_TRUST or trust=)") from None


def open_store(path: Path, mode: TrustMode) -> ClientStore:
    try:
        return ClientStore(path, mode)
    except TrustStoreError as exc:
        raise ClientError(str(exc)) from None


class ClientStore(TrustStore):
    """The trust file's pins, plus the client's own organization when its key file is the organization's
    keyring: pinned by the keyring's first key, in memory (whatever the file says about it)."""

    own: Pin | None = None

    def get(self, organization_id: int) -> Pin | None:
        if self.own is not None and organization_id == self.own.organization_id:
            return self.own
        return super().get(organization_id)

    def pins(self) -> list[Pin]:
        listed = [
            p for p in super().pins() if self.own is None or p.organization_id != self.own.organization_id
        ]
        return sorted([*listed, *([self.own] if self.own else [])], key=lambda p: p.organization_id)


def refused(exc: TrustError, organization_id: int | None = None) -> TrustRefused:
    return TrustRefused(exc.message, exc.reason, organization_id)


class OrganizationTrust(Resource):
    """An organization as your pins see it: the fingerprint of the first key it published, and whether it is
    pinned (`yes`, `no`, or `MISMATCH`: the pin names another first key) with the pinned fingerprint."""

    id: int
    name: str
    fingerprint: str | None
    pinned: Literal["yes", "no", "MISMATCH"]
    pinned_fingerprint: str | None
    problem: str | None
    """What stands in the way of trusting it (no key published, a chain that does not verify), else None."""


class ClientTrust:
    """The trust store and the verified chains of one client; nothing is read before first use."""

    def __init__(self, api: ApiSession, path: Path, mode: TrustMode) -> None:
        self.api = api
        self.path = path
        self.mode = mode
        self._store: ClientStore | None = None
        self._resolver: ChainResolver | None = None

    @property
    def store(self) -> ClientStore:
        if self._store is None:
            self._store = open_store(self.path, self.mode)
        return self._store

    @property
    def resolver(self) -> ChainResolver:
        if self._resolver is None:
            self._resolver = ChainResolver(self.store, self.fetch_records, self.fetch_revocations)
        return self._resolver

    async def fetch_records(self, organization_id: int) -> list[Any]:
        return _data(await self.api.request("GET", f"/organizations/{organization_id}/key-records"))

    async def fetch_revocations(self, organization_id: int) -> list[Any]:
        return _data(await self.api.request("GET", f"/organizations/{organization_id}/revocations"))

    async def chain(self, organization_id: int, *, refresh: bool = False) -> KeyChain:
        """The organization's chain, verified under its pin (tofu: pinned now if it has none)."""
        try:
            return await self.resolver.chain(organization_id, refresh=refresh)
        except TrustError as exc:
            raise refused(exc, organization_id) from None
        except TrustStoreError as exc:
            raise ClientError(str(exc)) from None

    async def chains(self, organization_ids: Sequence[int], *, refresh: bool = False) -> list[KeyChain]:
        """Several chains at once (cached ones answer without a request)."""
        return list(await asyncio.gather(*(self.chain(o, refresh=refresh) for o in organization_ids)))

    async def revocations(self, organization_id: int) -> list[SignedEntry]:
        try:
            return await self.resolver.revocations(organization_id)
        except ApiError as exc:
            if exc.status == 404:
                return []
            raise

    async def records(self, organization_id: int) -> list[SignedEntry]:
        """The organization's key records as published, parsed but not checked against a pin."""
        try:
            return parse_records(await self.fetch_records(organization_id))
        except TrustError as exc:
            raise refused(exc, organization_id) from None

    def pin(self, organization_id: int, text: str, head: str | None = None, note: str = "") -> Pin:
        try:
            pin = self.store.pin(organization_id, text, head, note)
        except ValueError as exc:
            raise ClientError(str(exc)) from None
        except TrustStoreError as exc:
            raise ClientError(str(exc)) from None
        if self._resolver is not None:
            self._resolver.forget(organization_id)
        return pin

    async def organization_id(self, name: str) -> int:
        """The id of organization `name`, as the server shows it to this client."""
        rows = await self.api.get_all("/organizations", {"name": name})
        found = [r for r in rows if r.get("name") == name and isinstance(r.get("id"), int)]
        if len(found) != 1:
            raise ClientError(
                f"unknown organization {name!r}: the server shows you no organization by that name"
            )
        return int(found[0]["id"])

    async def pin_from_file(self, path: Path) -> tuple[list[NamedPin], list[str]]:
        """Pin every organization the federation file (`vserver import`'s) names with a fingerprint: (the
        pins, the names it gives no fingerprint). That trusts whoever wrote the file. Nothing is pinned when
        a name is unknown or an organization is pinned to another first key already."""
        try:
            entries = read_federation_file(path)
        except FederationFileError as exc:
            raise ClientError(str(exc)) from None
        named = [e for e in entries if e.root is not None]
        # Asking the server which id a name has is safe: every key record carries the organization id it was
        # signed for (`org` in its body), so a server that maps a name to another organization's id cannot
        # serve a chain for that id that verifies under this fingerprint: that organization is then refused,
        # not impersonated.
        ids = await asyncio.gather(*(self.organization_id(e.name) for e in named))
        wanted = [(e.name, org, str(e.root)) for e, org in zip(named, ids, strict=True)]
        try:
            done = pin_named(self.store, wanted, f"from the federation file {path.name}")
        except (FederationFileError, TrustStoreError) as exc:
            raise ClientError(str(exc)) from None
        if self._resolver is not None:
            for item in done:
                self._resolver.forget(item.pin.organization_id)
        return done, [e.name for e in entries if e.root is None]

    def pin_own(self, organization_id: int, root: str) -> None:
        """Our own organization, pinned by the first key of its keyring (the client's key file)."""
        self.store.own = Pin(organization_id, root, None, "own organization: the first key of its keyring")
        if self._resolver is not None:
            self._resolver.forget(organization_id)

    def unpin(self, organization_id: int) -> bool:
        try:
            found = self.store.unpin(organization_id)
        except TrustStoreError as exc:
            raise ClientError(str(exc)) from None
        if self._resolver is not None:
            self._resolver.forget(organization_id)
        return found

    def pins(self) -> list[Pin]:
        return self.store.pins()

    async def status(self, organizations: Sequence[Organization]) -> list[OrganizationTrust]:
        """Each organization with the fingerprint of its published first key and whether it is pinned:
        `yes`, `no` or `MISMATCH` (the pin names another first key). Pins nothing, whatever the mode."""
        self.store.reload_if_changed()
        return list(await asyncio.gather(*(self._status(org) for org in organizations)))

    async def _status(self, org: Organization) -> OrganizationTrust:
        org_id = org.id
        problem: str | None = None
        records: list[SignedEntry] = []
        try:
            records = parse_records(await self.fetch_records(org_id))
        except TrustError as exc:
            problem = exc.message
        except ApiError as exc:
            problem = f"key records unavailable: {exc.detail or exc.error}"
        pin = self.store.get(org_id)
        first = first_key(org_id, records, pin.root if pin else None)
        if first is None and problem is None:
            problem = "has published no key record"
        pinned = "no" if pin is None else "MISMATCH" if first and first.key_id != pin.root else "yes"
        if pinned == "MISMATCH" and pin is not None:
            problem = (
                f"pinned {show_fingerprint(pin.root)}: the server shows another first key; ask its admin "
                "before anything else"
            )
        elif pin is not None and first is not None:
            try:
                verify_chain(org_id, records, pin.root, pin.head)
            except TrustError as exc:
                problem = exc.message
        return OrganizationTrust(
            id=org_id,
            name=org.name,
            fingerprint=fingerprint(first) if first is not None else None,
            pinned=pinned,
            pinned_fingerprint=show_fingerprint(pin.root) if pin is not None else None,
            problem=problem,
        )


def first_key(organization_id: int, records: Sequence[SignedEntry], prefer: str | None) -> PublicKey | None:
    """The self-signed first key the organization published (the pinned one when there are several)."""
    found: list[PublicKey] = []
    for entry in records:
        if entry.kind != KIND_GENESIS or entry.body.get("org") != organization_id:
            continue
        try:
            key = PublicKey.from_text(str(entry.body.get("key")))
        except CryptoError:
            continue
        if entry.signed_by(key):
            found.append(key)
    return next((k for k in found if k.key_id == prefer), found[0] if found else None)


def _data(body: Any) -> list[Any]:
    if isinstance(body, dict):
        data = body.get("data", [])
        return list(data) if isinstance(data, list) else []
    return list(body) if isinstance(body, list) else []
