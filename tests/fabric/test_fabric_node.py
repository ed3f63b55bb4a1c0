"""The node enforcing leases held on a real Fabric ledger exactly as on the embedded one: a real server (for
tasks), a real agent with `ledger.backend: fabric`, real Docker, and the project's chaincode on a three-org
Fabric network. The org admin and the researcher read the same channel."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fabric.network import FabricNetwork
from tests.node.node_harness import ensure_probe_image, wait_run_status
from tests.node.test_node_leases import only_run, refusals, site
from vfed.common.ledger.fabric import FabricSettings

pytestmark = [pytest.mark.fabric, pytest.mark.docker]

CHAINCODE = Path(__file__).resolve().parents[2] / "chaincode"


@pytest.fixture(scope="module", autouse=True)
def probe_image() -> None:
    ensure_probe_image()


@pytest.fixture
def fabric(fabric_network: FabricNetwork, request: pytest.FixtureRequest) -> Iterator[FabricSettings]:
    """A fresh ledger chaincode per test (the server's first organization and collaboration are 1 and 1, so
    each test needs a ledger of its own), org1's User identity."""
    name = f"ledger-n{len(fabric_network.deployments)}"
    orgs = json.dumps({fabric_network.org("org1").msp_id: 1})
    fabric_network.deploy_chaincode(
        name, "1.0", 1, {o.name: CHAINCODE for o in fabric_network.orgs}, init_args=["InitLedger", "1", orgs]
    )
    ident = fabric_network.org("org1").identity("User1")
    yield FabricSettings(
        connection_profile=fabric_network.profile_path("org1"),
        channel=fabric_network.channel,
        chaincode=name,
        msp_id=ident.msp_id,
        certificate=ident.cert,
        private_key=ident.key,
    )


async def test_leased_runs_run_and_their_receipts_land_on_fabric(
    tmp_path: Path, fabric: FabricSettings
) -> None:
    async with site(tmp_path, fabric=fabric) as s:
        dataset = await s.register("patients")
        lease = await s.grant(dataset, max_runs=5)
        task = await s.task("patients", "echo", 3)
        refused = await s.task("nolease", "echo", 1)
        await s.agent.run(burst=True)
        run = await only_run(s, task)
        assert run["status"] == "completed", run
        no = await only_run(s, refused)
        assert no["status"] == "not-allowed" and "lease" in str(no["reason"]), no
        assert refusals(s.agent) >= 1
        assert await s.guard.receipts.deliver()
        # The receipt is on the Fabric channel: the researcher's client reads it there.
        report = await s.ledger.verify_full()
        assert not report.problems, report
        (receipt,) = s.ledger.state.receipts_for(s.org)
        assert (receipt.body.task, receipt.body.run) == (task["id"], run["id"])
        assert [u.lease for u in receipt.body.datasets] == [lease]
        receipts = await s.researcher.receipts(s.collaboration)
        assert [r.run_id for r in receipts] == [run["id"]]
        # The server's own ledger never saw the dataset, the lease or the receipt.
        body = await s.researcher.api.request("GET", f"/collaborations/{s.collaboration}/ledger")
        kinds = {e["entry"]["kind"] for e in body["entries"]}
        assert kinds and not kinds & {"dataset.registered", "lease.granted", "run.receipt"}


async def test_a_revocation_on_fabric_kills_the_running_run(tmp_path: Path, fabric: FabricSettings) -> None:
    async with site(tmp_path, fabric=fabric) as s:
        revoked = await s.grant(await s.register("patients"))
        task = await s.task("patients", "sleep", 60)
        serving = asyncio.create_task(s.agent.run())
        try:
            await wait_run_status(s.researcher, int(task["id"]), {"active"}, timeout_s=30)
            await s.revoke(revoked, "consent withdrawn")
            run = await only_run(s, task, timeout_s=40)
        finally:
            s.agent.stop()
            await asyncio.wait_for(serving, 30)
        assert run["status"] == "killed", run
        assert run["reason"].startswith("lease-revoked: ") and "consent withdrawn" in run["reason"], run
