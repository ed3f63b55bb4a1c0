"""The ledger's backends side by side (issue 15): `bench/ledger.py --backend fabric` runs this.

In one run, on this machine:
- a real Fabric 2.5 network (tests/fabric/network.py: three organizations, a peer each, an etcdraft orderer,
  the project's chaincode served by each org) and a real server (SQLite, in this process) with its embedded
  ledger, each holding the same kind of ledger: three organizations' key records, an org admin's certificate,
  a dataset and a lease;
- `fabric_receipt_tx_per_s` / `embedded_receipt_tx_per_s`: run receipts appended (signed, verified by the
  backend, chained) with up to `--in-flight` appends waiting at once, as nodes with several runs finishing
  send them; `fabric_receipt_tx_per_s_sequential` one at a time (each waits for its commit);
- `fabric_lease_check_p50_ms`: the node's lease check on a Fabric-held ledger: `LedgerState.leases_for` on
  the view the node keeps (cached, never a peer query per run), and `fabric_refresh_after_block_p50_ms`: how
  long after an append commits the view of another organization that follows the channel's blocks holds it.
The dispatch figure with a Fabric-held ledger (`bench/node.py`) is not measured here.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from tests.fabric.network import FabricNetwork
from tests.node.node_harness import PASSWORD, Server

from vfed.client.client import AsyncClient
from vfed.common.crypto import OrgKey
from vfed.common.ledger import (
    DatasetUse,
    EmbeddedLedger,
    Head,
    Ledger,
    LedgerState,
    LedgerView,
    dataset_entry,
    lease_entry,
    receipt_entry,
)
from vfed.common.ledger.fabric import FabricLedger, FabricSettings
from vfed.common.trust import SignedEntry, certify, genesis_record
from vfed.node.server_api import NodeClient

CHAINCODE = Path(__file__).resolve().parents[1] / "chaincode"
IMAGE = "sha256:" + "ab" * 32


class Fed:
    """Three organizations' keys and an org admin of organization 1, writing through one backend each."""

    def __init__(self, collaboration: int, orgs: list[int]) -> None:
        self.collaboration = collaboration
        self.orgs = orgs
        self.keys = {org: OrgKey.generate() for org in orgs}
        self.admin = OrgKey.generate()
        self.lease: SignedEntry | None = None
        self.dataset: SignedEntry | None = None
        self.admin_user = 10
        """The org admin's user id (on the embedded ledger, a real user of organization 1)."""

    def state(self) -> LedgerState:
        pins = {org: key.key_id for org, key in self.keys.items()}
        return LedgerState(self.collaboration, anchors=pins.get)

    async def head(self, backend: Ledger) -> Head:
        view = LedgerView(backend, self.state)
        await view.sync()
        return view.state.head

    def certificate(self) -> SignedEntry:
        """Organization 1 certifies its org admin's key."""
        owner = self.orgs[0]
        return certify(
            self.keys[owner], owner, self.admin_user, "ada", self.admin.public, roles=["org-admin"]
        )

    async def dataset_and_lease(self, backend: Ledger, certificate: SignedEntry) -> None:
        """Organization 1 registers a dataset and its admin leases it to organization 2."""
        owner = self.orgs[0]
        self.dataset = dataset_entry(
            self.keys[owner],
            collaboration=self.collaboration,
            organization=owner,
            label="patients",
            seen=await self.head(backend),
        )
        await backend.append(self.dataset)
        self.lease = lease_entry(
            self.admin,
            collaboration=self.collaboration,
            dataset=self.dataset.digest,
            owner=owner,
            grantee=self.orgs[1],
            by_user=self.admin_user,
            certificate=certificate.digest,
            expires_at=int(time.time()) + 86400,
            seen=await self.head(backend),
        )
        await backend.append(self.lease)

    def receipt(self, run: int, seen: Head) -> SignedEntry:
        assert self.dataset is not None and self.lease is not None
        return receipt_entry(
            self.keys[self.orgs[0]],
            collaboration=self.collaboration,
            organization=self.orgs[0],
            task=1,
            run=run,
            image=IMAGE,
            finished_at=int(time.time()),
            status="completed",
            seen=seen,
            datasets=[DatasetUse(label="patients", dataset=self.dataset.digest, lease=self.lease.digest)],
        )


async def receipts_per_s(fed: Fed, backend: Ledger, count: int, in_flight: int, first_run: int) -> float:
    seen = await fed.head(backend)
    entries = [fed.receipt(first_run + i, seen) for i in range(count)]
    gate = asyncio.Semaphore(in_flight)

    async def send(entry: SignedEntry) -> None:
        async with gate:
            await backend.append(entry)

    start = time.perf_counter()
    await asyncio.gather(*(send(e) for e in entries))
    return count / (time.perf_counter() - start)


async def fabric_side(net: FabricNetwork, count: int, in_flight: int) -> dict[str, float]:
    msp = {org.msp_id: org.index for org in net.orgs}
    net.deploy_chaincode(
        "bench-ledger",
        "1.0",
        1,
        {o.name: CHAINCODE for o in net.orgs},
        init_args=["InitLedger", "1", json.dumps(msp)],
    )
    fed = Fed(1, [o.index for o in net.orgs])

    def settings(org: Any) -> FabricSettings:
        ident = org.identity("User1")
        return FabricSettings(
            connection_profile=net.profile_path(org.name),
            channel=net.channel,
            chaincode="bench-ledger",
            msp_id=ident.msp_id,
            certificate=ident.cert,
            private_key=ident.key,
        )

    writers: dict[int, Ledger] = {o.index: FabricLedger(settings(o), 1) for o in net.orgs}
    try:
        for org, writer in writers.items():  # each organization publishes its own key records
            await writer.append(genesis_record(org, fed.keys[org]))
        owner = writers[fed.orgs[0]]
        certificate = fed.certificate()
        await owner.append(certificate)
        await fed.dataset_and_lease(owner, certificate)
        sequential = await receipts_per_s(fed, owner, max(count // 4, 5), 1, 1000)
        concurrent = await receipts_per_s(fed, owner, count, in_flight, 2000)
        # The grantee's node: its view follows the channel's blocks; its lease check never asks a peer.
        node = writers[fed.orgs[1]]
        view = LedgerView(node, fed.state)
        await view.sync()
        grew = asyncio.Event()
        assert isinstance(node, FabricLedger)
        await node.on_block(lambda _n: grew.set())
        refresh: list[float] = []
        for i in range(10):
            grew.clear()
            seen = view.state.head
            start = time.perf_counter()
            place = await owner.append(fed.receipt(3000 + i, seen))
            await grew.wait()
            await view.sync()
            if view.state.head.seq < place.seq:
                continue
            refresh.append(time.perf_counter() - start)
        checks = []
        for _ in range(2000):
            start = time.perf_counter()
            view.state.leases_for(
                owner=fed.orgs[0],
                label="patients",
                grantee=fed.orgs[1],
                user=None,
                images=[IMAGE],
                now=time.time(),
            )
            checks.append(time.perf_counter() - start)
    finally:
        for writer in writers.values():
            assert isinstance(writer, FabricLedger)
            await writer.close()
    return {
        "fabric_receipt_tx_per_s": round(concurrent, 2),
        "fabric_receipt_tx_per_s_sequential": round(sequential, 2),
        "fabric_lease_check_p50_ms": round(statistics.median(checks) * 1000, 4),
        "fabric_commit_and_refresh_p50_ms": round(statistics.median(refresh) * 1000, 1) if refresh else -1.0,
    }


async def embedded_side(work: Path, count: int, in_flight: int) -> dict[str, float]:
    server = Server(work / "server", mqtt_url=None)
    keys = await server.seed(["alpha", "beta", "gamma"])
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            clients: dict[int, NodeClient] = {}
            collaboration = 0
            for name in ("alpha", "beta", "gamma"):
                client = NodeClient(session, server.url, keys[name])
                identity = await client.login()
                clients[identity.organization_id] = client
                collaboration = identity.collaboration_id
            fed = Fed(collaboration, sorted(clients))
            for org, client in clients.items():  # the server carries key records onto the ledger
                await client.post_key_records(org, [genesis_record(org, fed.keys[org])])
            owner = fed.orgs[0]
            async with AsyncClient(server.url) as researcher:
                await researcher.login("res-alpha", PASSWORD)
                assert researcher.user_id is not None and researcher.organization_id == owner
                fed.admin_user = researcher.user_id
            backend = EmbeddedLedger(clients[owner], collaboration)
            certificate = fed.certificate()  # the server carries certificates onto the ledger too
            await clients[owner].request(
                "POST",
                f"/organizations/{owner}/certificates",
                json={"certificate": certificate.model_dump(mode="json")},
            )
            await fed.dataset_and_lease(backend, certificate)
            concurrent = await receipts_per_s(fed, backend, count, in_flight, 2000)
    finally:
        await server.stop()
    return {"embedded_receipt_tx_per_s": round(concurrent, 2)}


async def run(count: int, in_flight: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vfed-bench-backends-") as tmp:
        embedded = await embedded_side(Path(tmp), count, in_flight)
    with FabricNetwork(orgs=3) as net:
        fabric = await fabric_side(net, count, in_flight)
    report: dict[str, Any] = {"receipts": count, "in_flight": in_flight, **fabric, **embedded}
    report["ratio_fabric_vs_embedded_receipts"] = round(
        fabric["fabric_receipt_tx_per_s"] / embedded["embedded_receipt_tx_per_s"], 4
    )
    return report


def print_report(r: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(r))
        return
    print(f"ledger backends: {r['receipts']} run receipts, up to {r['in_flight']} appends waiting at once")
    print(
        f"  receipts/s: Fabric {r['fabric_receipt_tx_per_s']} "
        f"({r['fabric_receipt_tx_per_s_sequential']} one at a time), "
        f"embedded {r['embedded_receipt_tx_per_s']}: Fabric = {r['ratio_fabric_vs_embedded_receipts']} x"
    )
    print(
        f"  node lease check on a Fabric-held ledger (its cached view): p50 {r['fabric_lease_check_p50_ms']} "
        f"ms; an append committed and seen by another org's view: p50 "
        f"{r['fabric_commit_and_refresh_p50_ms']} ms"
    )
