"""The operator commands' way to the ledger: the node's verified view (`vfed.node.ledger.NodeLedger`, its
copy in the node's data folder) with the node's login, synced, plus what they ask of it beyond `LedgerState`.

Every failure is an OperatorError (one line): the server not answering or refusing, a ledger that does not
verify (naming the entry).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import aiohttp

from vfed.common import tls
from vfed.common.api.errors import ApiError
from vfed.common.crypto import Keyring
from vfed.common.ledger import LedgerError
from vfed.common.trust import KIND_REVOCATION, Certificate, TrustError, revoked_digests, verify_certificate
from vfed.node.config import NodeSettings
from vfed.node.ledger import NodeLedger
from vfed.node.operator.common import OperatorError
from vfed.node.server_api import NodeClient
from vfed.node.trust import NodeTrustStore
from vfed.proxy.rest import ServerUnavailable

T = TypeVar("T")
TIMEOUT_S = 60.0


@contextlib.asynccontextmanager
async def open_ledger(
    settings: NodeSettings, keyring: Keyring, *, sync: bool = True
) -> AsyncIterator[NodeLedger]:
    """The node's ledger view, logged in with its API key, anchored at its key file's first key and the trust
    store, its local copy loaded and (with `sync`) what is new on the server read and verified."""
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    to_server = tls.connector(settings.server_ca_file)
    async with aiohttp.ClientSession(connector=to_server, timeout=timeout) as http:
        client = NodeClient(http, settings.server_url, settings.api_key.get_secret_value())
        identity = await client.login()
        store = NodeTrustStore(settings, identity.organization_id, keyring.keys[0].public)
        ledger = NodeLedger(
            settings,
            client,
            organization_id=identity.organization_id,
            collaboration_id=identity.collaboration_id,
            store=store,
        )
        try:
            await ledger.open()
            if sync:
                await ledger.sync()
            yield ledger
        finally:
            ledger.close()


def run(settings: NodeSettings, work: Callable[[], Awaitable[T]]) -> T:
    """Run the command's async part; server and ledger failures become one clear line."""

    async def guarded() -> T:
        return await work()

    try:
        return asyncio.run(guarded())
    except tls.CaFileError as exc:
        raise OperatorError(f"server_ca_file: {exc}") from None
    except ServerUnavailable as exc:
        raise OperatorError(f"server not reachable at {settings.server_url}: {exc}") from None
    except ApiError as exc:
        if exc.status == 404 and "ledger" in str(exc.detail).lower():
            raise OperatorError(f"the server keeps no ledger here ({exc.detail})") from None
        raise OperatorError(f"server answered {exc.status}: {exc.error}: {exc.detail}") from None
    except LedgerError as exc:
        raise OperatorError(f"the ledger does not verify: {exc.message}") from None


def revoked(ledger: NodeLedger, organization_id: int) -> set[str]:
    """Digests of the certificates `organization_id` revoked on the verified ledger."""
    chain = ledger.state.chain(organization_id)
    if chain is None:
        return set()
    entries = [r.entry for r in ledger.copy.load() if r.entry.kind == KIND_REVOCATION]
    return revoked_digests(entries, chain)


def certified(ledger: NodeLedger, organization_id: int, now: float | None = None) -> list[Certificate]:
    """The organization's certificates on the verified ledger that hold now (not expired, not revoked)."""
    chain = ledger.state.chain(organization_id)
    if chain is None:
        return []
    gone = revoked(ledger, organization_id)
    moment = time.time() if now is None else now
    out = []
    for entry in ledger.state.certificates(organization_id):
        with contextlib.suppress(TrustError):
            out.append(verify_certificate(entry, chain, gone, now=moment, skew_s=0))
    return out


def require_own_chain(ledger: NodeLedger) -> None:
    """Entries the organization signs verify only once its key records are on the ledger."""
    if ledger.state.chain(ledger.organization_id) is None:
        raise OperatorError(
            f"organization {ledger.organization_id}'s key records are not on the ledger of collaboration "
            f"{ledger.collaboration_id}: publish them with `vnode keys upload`"
        )
