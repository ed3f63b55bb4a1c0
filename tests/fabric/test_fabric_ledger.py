"""`FabricLedger` on a real Fabric 2.5 network (three organizations, a peer each, majority endorsement) with
the project's own chaincode (chaincode/): appends are checked by every endorser and chained exactly as the
embedded ledger chains them, reads verify with the same `LedgerState` the nodes and clients run, refusals come
back as typed errors with the chaincode's reason, and a dishonest organization's peer cannot get an invalid
entry committed."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from tests.fabric.chaincode import ensure_node_modules
from tests.fabric.network import FabricNetwork
from vfed.common.crypto import OrgKey
from vfed.common.ledger import (
    DatasetUse,
    Head,
    LedgerEntryInvalid,
    LedgerState,
    LedgerView,
    dataset_entry,
    extend_entry,
    lease_entry,
    receipt_entry,
    revoke_entry,
)
from vfed.common.ledger.fabric import FabricLedger, FabricSettings, FabricUnavailable
from vfed.common.trust import SignedEntry, certify, genesis_record

pytestmark = [pytest.mark.fabric, pytest.mark.asyncio(loop_scope="module")]

CHAINCODE = Path(__file__).resolve().parents[2] / "chaincode"
COLLAB = 7
ORGS = {"org1": 1, "org2": 2, "org3": 3}
IMAGE = "sha256:" + "ab" * 32


@dataclass
class Fed:
    """Three organizations with their keys, an org admin of organization 1, and a FabricLedger per org."""

    net: FabricNetwork
    name: str
    keys: dict[int, OrgKey] = field(default_factory=lambda: {o: OrgKey.generate() for o in ORGS.values()})
    admin: OrgKey = field(default_factory=OrgKey.generate)
    ledgers: dict[str, FabricLedger] = field(default_factory=dict)

    def settings(self, org: str, **extra: object) -> FabricSettings:
        ident = self.net.org(org).identity("User1")
        return FabricSettings(
            connection_profile=self.net.profile_path(org),
            channel=self.net.channel,
            chaincode=self.name,
            msp_id=ident.msp_id,
            certificate=ident.cert,
            private_key=ident.key,
            **extra,  # type: ignore[arg-type]
        )

    def ledger(self, org: str) -> FabricLedger:
        if org not in self.ledgers:
            self.ledgers[org] = FabricLedger(self.settings(org), COLLAB)
        return self.ledgers[org]

    def fresh_state(self) -> LedgerState:
        pins = {org: key.key_id for org, key in self.keys.items()}
        return LedgerState(COLLAB, anchors=pins.get)

    def view(self, org: str = "org2") -> LedgerView:
        return LedgerView(self.ledger(org), self.fresh_state)

    async def dataset_leased_to_2(self, label: str, expires_at: int) -> tuple[SignedEntry, SignedEntry]:
        """Organization 1 certifies its admin, registers `label` and the admin leases it to organization 2;
        the dataset and the lease entries."""
        a = self.keys[1]
        cert = certify(a, 1, 10, "ada", self.admin.public, roles=["org-admin"])
        await self.ledger("org1").append(cert)
        dataset = dataset_entry(a, collaboration=COLLAB, organization=1, label=label, seen=await head(self))
        await self.ledger("org1").append(dataset)
        lease = lease_entry(
            self.admin,
            collaboration=COLLAB,
            dataset=dataset.digest,
            owner=1,
            grantee=2,
            by_user=10,
            certificate=cert.digest,
            expires_at=expires_at,
            seen=await head(self),
        )
        await self.ledger("org1").append(lease)
        return dataset, lease


def deploy(net: FabricNetwork, name: str, sources: dict[str, Path] | None = None) -> None:
    orgs = json.dumps({net.org(o).msp_id: n for o, n in ORGS.items()})
    net.deploy_chaincode(
        name, "1.0", 1, sources or {o: CHAINCODE for o in ORGS}, init_args=["InitLedger", str(COLLAB), orgs]
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fed(fabric_network: FabricNetwork) -> AsyncIterator[Fed]:
    deploy(fabric_network, "ledger-a")
    fed = Fed(fabric_network, "ledger-a")
    try:
        yield fed
    finally:
        for ledger in fed.ledgers.values():
            await ledger.close()


async def head(fed: Fed) -> Head:
    view = fed.view()
    await view.sync()
    return view.state.head


async def test_key_records_datasets_leases_and_receipts_append_and_verify(fed: Fed) -> None:
    # Each organization publishes its own key chain through its own Fabric identity.
    for org, number in ORGS.items():
        place = await fed.ledger(org).append(genesis_record(number, fed.keys[number]))
        assert place.seq >= 1
    a = fed.keys[1]
    now = int(time.time())
    dataset, lease = await fed.dataset_leased_to_2("patients", now + 3600)
    receipt = receipt_entry(
        a,
        collaboration=COLLAB,
        organization=1,
        task=1,
        run=1,
        image=IMAGE,
        finished_at=now,
        status="completed",
        seen=await head(fed),
        datasets=[DatasetUse(label="patients", dataset=dataset.digest, lease=lease.digest, epsilon=0.5)],
    )
    place = await fed.ledger("org1").append(receipt)

    # Every organization's view verifies the same chain, from its own peer.
    heads = set()
    for org in ORGS:
        view = fed.view(org)
        report = await view.verify_full()
        assert report.problems == ()
        heads.add(report.head)
        await view.sync()
        leases = view.state.leases_for(
            owner=1, label="patients", grantee=2, user=None, images=(IMAGE,), now=time.time()
        )
        assert [x.id for x in leases] == [lease.digest]
        assert leases[0].runs == 1
    assert heads == {Head(seq=place.seq, hash=place.hash)}


async def test_refusals_are_typed_with_the_chaincodes_reason(fed: Fed) -> None:
    a, b = fed.keys[1], fed.keys[2]
    seen = await head(fed)
    # Organization 2 cannot register a dataset in organization 1's name.
    forged = dataset_entry(b, collaboration=COLLAB, organization=1, label="stolen", seen=seen)
    with pytest.raises(LedgerEntryInvalid, match="refused"):
        await fed.ledger("org2").append(forged)
    # Another collaboration's entry is refused.
    foreign = dataset_entry(a, collaboration=COLLAB + 1, organization=1, label="elsewhere", seen=seen)
    with pytest.raises(LedgerEntryInvalid):
        await fed.ledger("org1").append(foreign)
    # A key record for organization 1 submitted through organization 2's Fabric identity is refused.
    with pytest.raises(LedgerEntryInvalid):
        await fed.ledger("org2").append(genesis_record(1, OrgKey.generate()))
    # The same entry twice: the second is refused.
    ok = dataset_entry(a, collaboration=COLLAB, organization=1, label="twice", seen=seen)
    await fed.ledger("org1").append(ok)
    with pytest.raises(LedgerEntryInvalid):
        await fed.ledger("org1").append(ok)
    report = await fed.view("org3").verify_full()
    assert report.problems == ()


async def test_lease_lifecycle_extend_revoke_and_out_of_order(fed: Fed) -> None:
    a = fed.keys[1]
    view = fed.view("org1")
    await view.sync()
    cert = next(e for e in view.state.certificates(1))
    ds = dataset_entry(a, collaboration=COLLAB, organization=1, label="cohort", seen=view.state.head)
    await fed.ledger("org1").append(ds)
    now = int(time.time())

    def terms(entry_seen: Head) -> SignedEntry:
        return lease_entry(
            fed.admin,
            collaboration=COLLAB,
            dataset=ds.digest,
            owner=1,
            grantee=3,
            by_user=10,
            certificate=cert.digest,
            expires_at=now + 600,
            seen=entry_seen,
        )

    lease = terms(await head(fed))
    await fed.ledger("org1").append(lease)
    common = {"collaboration": COLLAB, "lease": lease.digest, "by_user": 10, "certificate": cert.digest}
    await fed.ledger("org1").append(
        extend_entry(fed.admin, expires_at=now + 1200, seen=await head(fed), **common)
    )
    await fed.ledger("org1").append(
        revoke_entry(fed.admin, reason="study closed", seen=await head(fed), **common)
    )
    with pytest.raises(LedgerEntryInvalid):  # extending a revoked lease
        await fed.ledger("org1").append(
            extend_entry(fed.admin, expires_at=now + 2400, seen=await head(fed), **common)
        )
    view = fed.view("org3")
    await view.sync()
    assert view.state.leases[lease.digest].revoked is not None
    assert view.state.leases[lease.digest].expires_at == now + 1200


async def test_concurrent_appends_get_consecutive_places(fed: Fed) -> None:
    a = fed.keys[1]
    seen = await head(fed)
    entries = [
        dataset_entry(a, collaboration=COLLAB, organization=1, label=f"race{i}", seen=seen) for i in range(4)
    ]
    places = await asyncio.gather(*(fed.ledger("org1").append(e) for e in entries))
    seqs = sorted(p.seq for p in places)
    assert seqs == list(range(seqs[0], seqs[0] + 4))
    report = await fed.view("org2").verify_full()
    assert report.problems == ()


async def test_block_listeners_hear_commits(fed: Fed) -> None:
    ledger = fed.ledger("org2")
    heard: list[int] = []
    remove = await ledger.on_block(heard.append)
    before = await ledger.height()
    await fed.ledger("org1").append(
        dataset_entry(fed.keys[1], collaboration=COLLAB, organization=1, label="heard", seen=await head(fed))
    )
    for _ in range(100):
        if heard and max(heard) >= before:
            break
        await asyncio.sleep(0.05)
    remove()
    assert heard and max(heard) >= before


async def test_bad_settings_fail_with_one_clear_error(fed: Fed, tmp_path: Path) -> None:
    missing = FabricSettings(
        **{**fed.settings("org1").model_dump(), "connection_profile": tmp_path / "nope.json"}
    )
    with pytest.raises(FabricUnavailable, match="cannot read"):
        FabricLedger(missing, COLLAB)
    other = FabricSettings(**{**fed.settings("org1").model_dump(), "channel": "nochannel"})
    with pytest.raises(FabricUnavailable, match="no channel"):
        FabricLedger(other, COLLAB)


def dishonest_copy(workdir: Path) -> Path:
    """The project's chaincode with its checks switched off (signatures, references, times): what an
    organization that wants an invalid entry committed could run on its own peer."""
    ensure_node_modules(CHAINCODE, workdir)
    target = workdir / "ledger_dishonest"
    shutil.copytree(CHAINCODE, target, ignore=shutil.ignore_patterns("node_modules", "test"))
    (target / "node_modules").symlink_to(CHAINCODE / "node_modules")
    index = target / "index.js"
    index.write_text(
        "'use strict';\n"
        "const { Ledger } = require('./lib/ledger');\n"
        "Ledger.prototype.authorize = async function () {};\n"
        "Ledger.prototype.checkTime = function () {};\n" + index.read_text()
    )
    return target


async def publish_all(fed: Fed) -> None:
    for org, number in ORGS.items():
        await fed.ledger(org).append(genesis_record(number, fed.keys[number]))


async def test_a_dishonest_peer_cannot_get_an_invalid_entry_committed(
    fabric_network: FabricNetwork, tmp_path: Path
) -> None:
    cheat = dishonest_copy(tmp_path)
    deploy(fabric_network, "ledger-d", {"org1": CHAINCODE, "org2": CHAINCODE, "org3": cheat})
    fed = Fed(fabric_network, "ledger-d")
    try:
        await publish_all(fed)  # valid entries: all three peers agree
        before = await head(fed)
        # Organization 3 signs a dataset in organization 1's name: only its own peer endorses that.
        forged = dataset_entry(fed.keys[3], collaboration=COLLAB, organization=1, label="forged", seen=before)
        alone = FabricLedger(
            fed.settings("org3", endorsing_peers=[fabric_network.org("org3").peer_name]), COLLAB
        )
        try:
            with pytest.raises(LedgerEntryInvalid, match="ENDORSEMENT_POLICY_FAILURE"):
                await alone.append(forged)
        finally:
            await alone.close()
        # Asking every peer: the honest ones refuse, so nothing is submitted.
        with pytest.raises(LedgerEntryInvalid, match="refused"):
            await fed.ledger("org3").append(forged)
        assert await head(fed) == before
        report = await fed.view("org1").verify_full()
        assert report.problems == () and report.head == before
    finally:
        for ledger in fed.ledgers.values():
            await ledger.close()


async def test_time_is_the_transactions_checked_against_each_endorsers_clock(
    fabric_network: FabricNetwork, monkeypatch: pytest.MonkeyPatch
) -> None:
    orgs = json.dumps({fabric_network.org(o).msp_id: n for o, n in ORGS.items()})
    skew = 4
    fabric_network.deploy_chaincode(
        "ledger-t",
        "1.0",
        1,
        {o: CHAINCODE for o in ORGS},
        init_args=["InitLedger", str(COLLAB), orgs, str(skew)],
    )
    fed = Fed(fabric_network, "ledger-t")
    try:
        await publish_all(fed)
        a = fed.keys[1]
        start = int(time.time())
        ds, lease = await fed.dataset_leased_to_2("short", start + 2)

        def receipt(run: int, started_at: int) -> SignedEntry:
            return receipt_entry(
                a,
                collaboration=COLLAB,
                organization=1,
                task=9,
                run=run,
                image=IMAGE,
                started_at=started_at,
                finished_at=int(time.time()),
                status="completed",
                seen=view_head,
                datasets=[DatasetUse(label="short", dataset=ds.digest, lease=lease.digest)],
            )

        await asyncio.sleep(max(start + 2 + skew + 1 - time.time(), 0))  # expired, beyond the allowance
        view_head = await head(fed)
        # A run that started after the expiry is refused; one that ran while it held is recorded late.
        with pytest.raises(LedgerEntryInvalid, match="expired"):
            await fed.ledger("org1").append(receipt(2, int(time.time())))
        await fed.ledger("org1").append(receipt(1, start))

        # A client whose transaction claims another time than the endorsers' clocks is refused.
        import hfc.fabric.channel.channel as hfc_channel
        from hfc.util.utils import current_timestamp

        def an_hour_ago() -> object:
            stamp = current_timestamp()
            stamp.seconds -= 3600
            return stamp

        late = dataset_entry(a, collaboration=COLLAB, organization=1, label="late", seen=await head(fed))
        monkeypatch.setattr(hfc_channel, "current_timestamp", an_hour_ago)
        with pytest.raises(LedgerEntryInvalid, match="clock"):
            await fed.ledger("org1").append(late)
    finally:
        for ledger in fed.ledgers.values():
            await ledger.close()


async def test_an_upgraded_chaincode_keeps_the_ledger(fed: Fed) -> None:
    before = await head(fed)
    # A new definition (version 2.0, sequence 2) served by new chaincode servers; InitLedger's settings and
    # every record stay in the channel's state.
    fed.net.deploy_chaincode("ledger-a", "2.0", 2, {o: CHAINCODE for o in ORGS}, init_args=None)
    for ledger in fed.ledgers.values():
        await ledger.close()
    fed.ledgers.clear()
    report = await fed.view("org3").verify_full()
    assert report.head == before and report.problems == ()
    place = await fed.ledger("org1").append(
        dataset_entry(fed.keys[1], collaboration=COLLAB, organization=1, label="after-upgrade", seen=before)
    )
    assert place.seq == before.seq + 1
