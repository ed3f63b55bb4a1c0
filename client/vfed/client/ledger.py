"""The researcher's verified views of collaborations' ledgers (`vfed.common.ledger`), one per collaboration,
kept for the life of the client so each read verifies only what is new.

Organizations are anchored at the first keys of their chains as the client's trust store verifies them
(`ClientTrust`): the own organization from the researcher's identity (its keyring, or the chain its
certificate verified under), the others as pinned, or in `tofu` mode at first sight. An organization the
trust store refuses (not pinned in `pinned` mode, another first key than the pinned one) is left unanchored:
its entries count for nothing here (`LedgerState.problems`) and the rest still verifies. A server that
rewrites what was verified here raises `LedgerForked` / `LedgerTampered` naming the entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vfed.client import catalog
from vfed.client.catalog import DatasetInfo, LeaseInfo, LeaseStatus, ReceiptInfo, Researcher
from vfed.client.errors import ApiError, KeyMissing, LedgerUnavailable, NotCertified, TrustRefused
from vfed.client.http import ApiSession
from vfed.client.identity import whoami
from vfed.common.crypto import CryptoError, PublicKey, SenderLookup
from vfed.common.ledger import (
    KEY_RECORD_KINDS,
    EmbeddedLedger,
    Head,
    Ledger,
    LedgerError,
    LedgerState,
    LedgerView,
    metadata,
)
from vfed.common.ledger.fabric import FabricLedger, FabricSettings
from vfed.common.ledger.metadata import DatasetMetadata, metadata_sender

if TYPE_CHECKING:
    from vfed.client.client import AsyncClient

log = logging.getLogger("vfed.client")

HEAD_REUSE_S = 1.0
"""A descriptor may carry a head whose read began at most this long ago (s) instead of reading the ledger
first. Safe because the head is still one the researcher verified, which is all a descriptor's head claims:
a node meeting it checks it is on its own chain, and a fork past it is caught by the next task's head (the
server must keep showing the two histories, and every read re-reads the view's head); lease decisions are
the node's own, on its own verified view. A failed read forgets the head (the next task reads again and
raises), and a fork or tampering found in the background is raised by the next task before it is created."""
REFRESH_AFTER_S = HEAD_REUSE_S / 2
"""A task that used the view has it read again this long after, in the background (once per collaboration at
a time): off the path of that task's dispatch, and fresh for the next task of a researcher submitting one
after another, so they do not wait for a read of the ledger before each."""


class ApiTransport:
    """`vfed.common.ledger.Transport` over the client's authenticated API session."""

    def __init__(self, api: ApiSession) -> None:
        self.api = api

    async def get_json(self, path: str, params: dict[str, str]) -> Any:
        return await self.api.request("GET", path, params=params)

    async def post_json(self, path: str, body: Any) -> Any:
        return await self.api.request("POST", path, json=body)


FABRIC_LEDGERS_ENV = "VFED_FABRIC_LEDGERS"


def fabric_ledgers_from_env() -> dict[int, FabricSettings]:
    """Collaboration id -> Fabric ledger settings, from the YAML (or JSON) file VFED_FABRIC_LEDGERS names;
    none when it is unset. LedgerUnavailable (one line) when the file is unreadable or malformed."""
    path = os.environ.get(FABRIC_LEDGERS_ENV)
    if not path:
        return {}
    import yaml
    from pydantic import ValidationError

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("it holds no mapping of collaboration ids to Fabric settings")
        return {int(k): FabricSettings.model_validate(v) for k, v in raw.items()}
    except yaml.MarkedYAMLError as exc:
        where = f" at line {exc.problem_mark.line + 1}" if exc.problem_mark is not None else ""
        raise LedgerUnavailable(f"{FABRIC_LEDGERS_ENV}={path}: not YAML ({exc.problem}{where})") from None
    except (OSError, ValueError, yaml.YAMLError, ValidationError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LedgerUnavailable(f"{FABRIC_LEDGERS_ENV}={path}: {first}") from None


class LedgerViews:
    """One `LedgerView` per collaboration, made on first use and kept (in memory) by the client."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.transport = ApiTransport(client.api)
        self._views: dict[int, LedgerView] = {}
        self._roots: dict[int, str] = {}
        """Organization -> the first key of its chain as verified under the trust store (the anchors)."""
        self._tried: set[int] = set()
        self._own_pinned = False
        self._read_at: dict[int, float] = {}
        """Collaboration -> when the last read that verified began (monotonic s); gone after a failed read."""
        self._found: dict[int, LedgerError] = {}
        """A fork or tampering a background read found, for the next task to raise."""
        self._refresh: dict[int, asyncio.TimerHandle | asyncio.Task[None]] = {}
        self._fabric: dict[int, FabricLedger] = {}
        """Collaboration -> its Fabric ledger's client (kept: it holds gRPC channels and a block stream)."""

    async def view(self, collaboration_id: int) -> LedgerView:
        """The collaboration's view, synced now: LedgerUnavailable when the server keeps no ledger there,
        a LedgerError when what it serves does not verify."""
        began = time.monotonic()
        self._read_at.pop(collaboration_id, None)
        try:
            view = self._views.get(collaboration_id)
            if view is None:
                await self._pin_own()
                await self._anchor(await self.client.members.of(collaboration_id))
                view = self._views[collaboration_id] = self._new_view(collaboration_id)
            await view.sync()
            if await self._anchor(self._unanchored(view)):
                view = self._views[collaboration_id] = await self._rebuilt(view)
        except ApiError as exc:
            if exc.status == 404:
                raise LedgerUnavailable(
                    f"collaboration {collaboration_id}: the server shows no ledger "
                    f"({exc.detail or exc.error}; an unknown collaboration, or a server without ledgers)"
                ) from None
            raise
        self._read_at[collaboration_id] = began
        return view

    async def head_for_task(self, collaboration_id: int) -> Head | None:
        """The head to put in a descriptor: the view as read at most HEAD_REUSE_S ago, else synced now; None
        when the server keeps no ledger. A fork or tampering found since raises here."""
        found = self._found.pop(collaboration_id, None)
        if found is not None:
            raise found
        read_at = self._read_at.get(collaboration_id)
        if read_at is not None and time.monotonic() - read_at <= HEAD_REUSE_S:
            head = self._views[collaboration_id].head
        else:
            try:
                head = (await self.view(collaboration_id)).head
            except LedgerUnavailable as exc:
                log.info("task without a ledger head: %s", exc)
                return None
        if collaboration_id not in self._refresh:
            loop = asyncio.get_running_loop()
            self._refresh[collaboration_id] = loop.call_later(
                REFRESH_AFTER_S, self._start_refresh, collaboration_id
            )
        return head

    async def close(self) -> None:
        """Stop the background reads (the client is closing)."""
        pending = list(self._refresh.values())
        self._refresh.clear()
        for item in pending:
            item.cancel()
        tasks = [t for t in pending if isinstance(t, asyncio.Task)]
        await asyncio.gather(*tasks, return_exceptions=True)
        fabric, self._fabric = list(self._fabric.values()), {}
        for backend in fabric:
            await backend.close()

    def _start_refresh(self, collaboration_id: int) -> None:
        if self.client.api._session is None:  # the client was closed (or never opened): nothing to keep fresh
            self._refresh.pop(collaboration_id, None)
            return
        self._refresh[collaboration_id] = asyncio.ensure_future(self._refreshed(collaboration_id))

    async def _refreshed(self, collaboration_id: int) -> None:
        """Read the view in the background; what it finds wrong is for the next task (never raised here)."""
        try:
            await self.view(collaboration_id)
        except LedgerError as exc:
            self._found[collaboration_id] = exc
        except Exception as exc:  # the server away, a closed session: the next task reads the ledger itself
            log.debug("ledger: background read of collaboration %s failed: %s", collaboration_id, exc)
        finally:
            self._refresh.pop(collaboration_id, None)

    def _new_view(self, collaboration_id: int) -> LedgerView:
        backend: Ledger
        fabric = self.client.fabric_ledgers.get(collaboration_id)
        if fabric is not None:
            backend = self._fabric.get(collaboration_id) or FabricLedger(fabric, collaboration_id)
            self._fabric[collaboration_id] = backend
        else:
            backend = EmbeddedLedger(self.transport, collaboration_id)
        return LedgerView(backend, lambda: LedgerState(collaboration_id, anchors=self._roots.get))

    async def _rebuilt(self, old: LedgerView) -> LedgerView:
        """Verify afresh with organizations anchored since (a member that joined): the new view must hold the
        old one's head, or history was rewritten between the two reads."""
        view = self._new_view(old.collaboration_id)
        await view.sync()
        if not view.state.check_head(old.head, "this client's earlier read"):
            await view.ensure_head(old.head, "this client's earlier read")
        return view

    def _unanchored(self, view: LedgerView) -> list[int]:
        """Organizations whose key records the view could not anchor and that were not looked up yet."""
        problems = [p.seq for p in view.state.problems if p.kind in KEY_RECORD_KINDS]
        if not problems:
            return []
        records = view.copy.load()
        found = {records[seq - 1].entry.body.get("org") for seq in problems if seq <= len(records)}
        return sorted(o for o in found if isinstance(o, int) and o not in self._tried)

    async def _anchor(self, organization_ids: list[int]) -> bool:
        """Verify these organizations' chains under the trust store (tofu: pinned at first sight); those it
        refuses (not pinned in `pinned` mode, a first key other than the pinned one) stay unanchored: their
        entries count for nothing here, the rest of the ledger still verifies. True if any was anchored."""
        wanted = [o for o in organization_ids if o not in self._tried]
        self._tried.update(wanted)
        added = False
        for org_id in wanted:
            try:
                chain = await self.client.chains.chain(org_id)
            except TrustRefused as exc:
                log.warning("ledger: entries of organization %s are not counted: %s", org_id, exc)
                continue
            self._roots[org_id] = chain.root.key_id
            added = True
        return added

    async def _pin_own(self) -> None:
        """Anchor the researcher's own organization first: by its keyring when the key file is the
        organization's, else by the chain the trust store verifies (the one the researcher's certificate is
        checked against)."""
        if self._own_pinned:
            return
        org_id, _user = await whoami(self.client)
        # Reading the ledger needs no key of one's own; without one, the chain below still anchors it.
        with contextlib.suppress(KeyMissing, NotCertified, OSError):
            await self.client.identity()
        self._roots[org_id] = (await self.client.chains.chain(org_id)).root.key_id
        self._tried.add(org_id)
        self._own_pinned = True


async def researcher(client: AsyncClient) -> Researcher:
    org_id, user_id = await whoami(client)
    return Researcher(org_id, user_id)


async def states(client: AsyncClient, collaboration: int | None) -> list[LedgerState]:
    """The verified state of one collaboration's ledger, or of every collaboration the researcher sees that
    has one (collaborations without a ledger are left out)."""
    if collaboration is not None:
        return [(await client.ledgers.view(collaboration)).state]
    found = []
    for item in await client.collaborations():
        try:
            found.append((await client.ledgers.view(item.id)).state)
        except LedgerUnavailable:
            continue
    return found


async def datasets(client: AsyncClient, collaboration: int | None) -> list[DatasetInfo]:
    who = await researcher(client)
    out: list[DatasetInfo] = []
    for state in await states(client, collaboration):
        opened = open_metadata(client, state, catalog.leases(state, who))
        out.extend(catalog.datasets(state, who, opened))
    return out


async def leases(
    client: AsyncClient, collaboration: int | None, expiring_within_s: float | None
) -> list[LeaseInfo]:
    who = await researcher(client)
    now = time.time()
    out = [x for state in await states(client, collaboration) for x in catalog.leases(state, who, now)]
    if expiring_within_s is not None:
        out = [x for x in out if x.status is LeaseStatus.ACTIVE and x.expires_in_s(now) <= expiring_within_s]
    return out


async def receipts(client: AsyncClient, collaboration: int | None, task: int | None) -> list[ReceiptInfo]:
    return [r for state in await states(client, collaboration) for r in catalog.receipts(state, task)]


def open_metadata(
    client: AsyncClient, state: LedgerState, held: list[LeaseInfo]
) -> dict[str, DatasetMetadata]:
    """Lease id -> its sealed metadata, opened with the client's key (leases it does not open are left out:
    sealed to other keys only, such as the organization's, or no key file here)."""
    try:
        keyring = client.keyring
    except (KeyMissing, OSError, CryptoError):
        return {}
    out: dict[str, DatasetMetadata] = {}
    for info in held:
        lease = state.leases.get(info.id)
        if lease is None or not lease.body.metadata:
            continue
        sender = metadata_sender(state, lease)
        if sender is None:
            continue
        try:
            found = metadata.open_metadata(lease, keyring, _only(sender))
        except metadata.MetadataError as exc:
            if exc.reason != "not-a-recipient":
                log.warning("lease %s: %s", lease.id[:12], exc.message)
            continue
        if found is not None:
            out[lease.id] = found
    return out


def _only(key: PublicKey) -> SenderLookup:
    return lambda key_id: key if key_id == key.key_id else None
