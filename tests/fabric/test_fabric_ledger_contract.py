"""The ledger contract (tests/ledger_contract.py) on the Fabric backend: three organizations with a peer each
on a real Fabric 2.5 network, majority endorsement, the project's chaincode; each organization appends its own
key records and certificates through its own Fabric identity."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.fabric.network import FabricNetwork
from tests.ledger_contract import CASES, Harness
from vfed.common.ledger import Ledger, LedgerEntryInvalid
from vfed.common.ledger.fabric import FabricLedger, FabricSettings
from vfed.common.trust import SignedEntry

pytestmark = pytest.mark.fabric

CHAINCODE = Path(__file__).resolve().parents[2] / "chaincode"
COLLAB = 11


class Fabric:
    """A `Harness` over a fresh deployment of the ledger chaincode (a ledger of its own) on the network."""

    refusals: tuple[type[BaseException], ...] = (LedgerEntryInvalid,)
    collaboration = COLLAB
    orgs = (1, 2, 3)
    admin_user = 10

    def __init__(self, net: FabricNetwork, chaincode: str) -> None:
        self.ledgers: dict[int, FabricLedger] = {}
        for org in net.orgs:
            ident = org.identity("User1")
            settings = FabricSettings(
                connection_profile=net.profile_path(org.name),
                channel=net.channel,
                chaincode=chaincode,
                msp_id=ident.msp_id,
                certificate=ident.cert,
                private_key=ident.key,
            )
            self.ledgers[org.index] = FabricLedger(settings, COLLAB)

    def writer(self, org: int) -> Ledger:
        return self.ledgers[org]

    async def publish_key(self, org: int, record: SignedEntry) -> None:
        await self.ledgers[org].append(record)

    async def publish_certificate(self, org: int, certificate: SignedEntry) -> None:
        await self.ledgers[org].append(certificate)


@pytest_asyncio.fixture
async def fabric(fabric_network: FabricNetwork) -> AsyncIterator[Harness]:
    name = f"contract-{len(fabric_network.deployments)}"
    msp = json.dumps({org.msp_id: org.index for org in fabric_network.orgs})
    fabric_network.deploy_chaincode(
        name,
        "1.0",
        1,
        {o.name: CHAINCODE for o in fabric_network.orgs},
        init_args=["InitLedger", str(COLLAB), msp],
    )
    harness = Fabric(fabric_network, name)
    try:
        yield harness
    finally:
        for ledger in harness.ledgers.values():
            await ledger.close()


@pytest.mark.parametrize("case", list(CASES))
async def test_the_ledger_contract(fabric: Harness, case: str) -> None:
    await CASES[case](fabric)
