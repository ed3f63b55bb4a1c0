"""The ledger contract (tests/ledger_contract.py) on the embedded backend: a real server (SQLite) reached over
HTTP by each organization's node client, as nodes append; the server carries key records and certificates onto
the ledger itself."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from tests.ledger_contract import CASES, Harness
from tests.node.node_harness import PASSWORD, Server

from vfed.client.client import AsyncClient
from vfed.common.ledger import EmbeddedLedger, Ledger
from vfed.common.trust import SignedEntry
from vfed.node.server_api import ApiError, NodeClient

ORGS = ("alpha", "beta", "gamma")


class Embedded:
    """A `Harness` over a fresh server."""

    refusals: tuple[type[BaseException], ...] = (ApiError,)

    def __init__(self, clients: dict[int, NodeClient], collaboration: int, admin_user: int) -> None:
        self.clients = clients
        self.collaboration = collaboration
        self.admin_user = admin_user
        first, second, third = sorted(clients)
        self.orgs = (first, second, third)

    def writer(self, org: int) -> Ledger:
        return EmbeddedLedger(self.clients[org], self.collaboration)

    async def publish_key(self, org: int, record: SignedEntry) -> None:
        await self.clients[org].post_key_records(org, [record])

    async def publish_certificate(self, org: int, certificate: SignedEntry) -> None:
        body = {"certificate": certificate.model_dump(mode="json")}
        await self.clients[org].request("POST", f"/organizations/{org}/certificates", json=body)


@pytest_asyncio.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[Harness]:
    server = Server(tmp_path / "server", mqtt_url=None)
    keys = await server.seed(list(ORGS))
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            clients: dict[int, NodeClient] = {}
            collaboration = 0
            for name in ORGS:
                client = NodeClient(session, server.url, keys[name])
                identity = await client.login()
                clients[identity.organization_id] = client
                collaboration = identity.collaboration_id
            async with AsyncClient(server.url) as researcher:
                await researcher.login(f"res-{ORGS[0]}", PASSWORD)
                assert researcher.user_id is not None
                admin_user = researcher.user_id
            yield Embedded(clients, collaboration, admin_user)
    finally:
        await server.stop()


@pytest.mark.parametrize("case", list(CASES))
async def test_the_ledger_contract(embedded: Harness, case: str) -> None:
    await CASES[case](embedded)
