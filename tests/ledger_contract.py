"""The ledger contract every backend passes (the embedded ledger of a real server, tests/server; a real Fabric
network, tests/fabric): what an append does, what is refused and that a refusal changes nothing, and that what
each organization reads verifies to the same chain.

A backend plugs in through a `Harness`: its organizations' writers (a `Ledger` appending as that
organization), how an organization's key records and admin certificates reach the ledger (the server carries
them; on Fabric each organization appends its own), and which errors are its refusals. The cases are plain
async functions; each backend's test module runs every one of them (`CASES`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import pytest

from vfed.common.crypto import OrgKey
from vfed.common.ledger import (
    DatasetUse,
    Head,
    Ledger,
    LedgerState,
    LedgerView,
    dataset_entry,
    extend_entry,
    lease_entry,
    receipt_entry,
    revoke_entry,
)
from vfed.common.trust import SignedEntry, certify, genesis_record

IMAGE = "sha256:" + "ab" * 32


class Harness(Protocol):
    """One backend holding one collaboration's ledger, fresh for each case, with three organizations."""

    collaboration: int
    orgs: tuple[int, int, int]
    admin_user: int
    """A user of the first organization, certified as its org admin by the cases."""
    refusals: tuple[type[BaseException], ...]
    """What the backend's `append` raises for an entry it refuses."""

    def writer(self, org: int) -> Ledger: ...

    async def publish_key(self, org: int, record: SignedEntry) -> None: ...

    async def publish_certificate(self, org: int, certificate: SignedEntry) -> None: ...


@dataclass
class Fed:
    """The cases' organizations: their keys (pinned by every reader), an org admin of the first."""

    h: Harness
    keys: dict[int, OrgKey] = field(default_factory=dict)
    admin: OrgKey = field(default_factory=OrgKey.generate)
    certificate: SignedEntry | None = None

    @classmethod
    async def start(cls, h: Harness) -> Fed:
        fed = cls(h, {org: OrgKey.generate() for org in h.orgs})
        for org in h.orgs:
            await h.publish_key(org, genesis_record(org, fed.keys[org]))
        owner = h.orgs[0]
        fed.certificate = certify(
            fed.keys[owner], owner, h.admin_user, "ada", fed.admin.public, roles=["org-admin"]
        )
        await h.publish_certificate(owner, fed.certificate)
        return fed

    @property
    def owner(self) -> int:
        return self.h.orgs[0]

    def state(self) -> LedgerState:
        pins = {org: key.key_id for org, key in self.keys.items()}
        return LedgerState(self.h.collaboration, anchors=pins.get)

    def view(self, org: int) -> LedgerView:
        return LedgerView(self.h.writer(org), self.state)

    async def head(self, org: int | None = None) -> Head:
        view = self.view(self.owner if org is None else org)
        await view.sync()
        return view.state.head

    async def dataset(
        self, label: str, *, key: OrgKey | None = None, collaboration: int | None = None
    ) -> SignedEntry:
        return dataset_entry(
            key or self.keys[self.owner],
            collaboration=self.h.collaboration if collaboration is None else collaboration,
            organization=self.owner,
            label=label,
            seen=await self.head(),
        )

    async def lease(
        self, dataset: SignedEntry, *, key: OrgKey | None = None, expires_in_s: int = 3600
    ) -> SignedEntry:
        assert self.certificate is not None
        return lease_entry(
            key or self.admin,
            collaboration=self.h.collaboration,
            dataset=dataset.digest,
            owner=self.owner,
            grantee=self.h.orgs[1],
            by_user=self.h.admin_user,
            certificate=self.certificate.digest,
            expires_at=int(time.time()) + expires_in_s,
            seen=await self.head(),
        )

    def lease_terms(self, lease: SignedEntry) -> dict[str, object]:
        assert self.certificate is not None
        return {
            "collaboration": self.h.collaboration,
            "lease": lease.digest,
            "by_user": self.h.admin_user,
            "certificate": self.certificate.digest,
        }

    async def receipt(
        self, dataset: SignedEntry, lease: SignedEntry, run: int, org: int | None = None
    ) -> SignedEntry:
        signer = self.owner if org is None else org
        return receipt_entry(
            self.keys[signer],
            collaboration=self.h.collaboration,
            organization=signer,
            task=1,
            run=run,
            image=IMAGE,
            finished_at=int(time.time()),
            status="completed",
            seen=await self.head(),
            datasets=[DatasetUse(label="patients", dataset=dataset.digest, lease=lease.digest)],
        )

    async def refused(self, org: int, entry: SignedEntry) -> None:
        """`entry` is refused, and the ledger is as it was."""
        before = await self.head()
        with pytest.raises(self.h.refusals):
            await self.h.writer(org).append(entry)
        assert await self.head() == before


async def appends_are_chained_and_every_reader_verifies_the_same_ledger(h: Harness) -> None:
    fed = await Fed.start(h)
    dataset = await fed.dataset("patients")
    first = await h.writer(fed.owner).append(dataset)
    lease = await fed.lease(dataset)
    second = await h.writer(fed.owner).append(lease)
    assert second.seq == first.seq + 1
    place = await h.writer(fed.owner).append(await fed.receipt(dataset, lease, run=1))
    heads = set()
    for org in h.orgs:
        view = fed.view(org)
        report = await view.verify_full()
        assert report.problems == () and report.length == place.seq
        await view.sync()
        heads.add(view.state.head)
        (found,) = view.state.leases_for(
            owner=fed.owner, label="patients", grantee=h.orgs[1], user=None, images=[IMAGE], now=time.time()
        )
        assert found.id == lease.digest and found.runs == 1
    assert heads == {Head(seq=place.seq, hash=place.hash)}
    # Reads page: a reader asking for a few at a time gets the same records.
    paged, after = [], 0
    while batch := await h.writer(h.orgs[2]).read(after, 2):
        paged.extend(batch)
        after = batch[-1].seq
    whole = await h.writer(h.orgs[2]).read(0)
    assert [(r.seq, r.entry.digest) for r in paged] == [(r.seq, r.entry.digest) for r in whole]


async def what_verifiers_refuse_is_refused_and_changes_nothing(h: Harness) -> None:
    fed = await Fed.start(h)
    other = h.orgs[1]
    # A dataset in another organization's name, and one for another collaboration.
    await fed.refused(other, await fed.dataset("stolen", key=fed.keys[other]))
    await fed.refused(fed.owner, await fed.dataset("elsewhere", collaboration=h.collaboration + 1))
    dataset = await fed.dataset("patients")
    await h.writer(fed.owner).append(dataset)
    # The same entry again.
    await fed.refused(fed.owner, dataset)
    # A lease signed with the organization's key instead of a certified admin's, and one by a stranger.
    await fed.refused(fed.owner, await fed.lease(dataset, key=fed.keys[fed.owner]))
    await fed.refused(fed.owner, await fed.lease(dataset, key=OrgKey.generate()))
    # A receipt by an organization that does not own the lease's dataset.
    lease = await fed.lease(dataset)
    await h.writer(fed.owner).append(lease)
    await fed.refused(other, await fed.receipt(dataset, lease, run=7, org=other))
    report = await fed.view(h.orgs[2]).verify_full()
    assert report.problems == ()


async def revocation_ends_a_lease_and_nothing_extends_it_after(h: Harness) -> None:
    fed = await Fed.start(h)
    dataset = await fed.dataset("patients")
    await h.writer(fed.owner).append(dataset)
    lease = await fed.lease(dataset, expires_in_s=600)
    await h.writer(fed.owner).append(lease)
    expires = int(time.time()) + 1200
    terms = fed.lease_terms(lease)
    await h.writer(fed.owner).append(
        extend_entry(fed.admin, expires_at=expires, seen=await fed.head(), **terms)
    )  # type: ignore[arg-type]
    await h.writer(fed.owner).append(
        revoke_entry(fed.admin, reason="study closed", seen=await fed.head(), **terms)
    )  # type: ignore[arg-type]
    await fed.refused(
        fed.owner, extend_entry(fed.admin, expires_at=expires + 600, seen=await fed.head(), **terms)
    )  # type: ignore[arg-type]
    view = fed.view(h.orgs[1])
    await view.sync()
    held = view.state.leases[lease.digest]
    assert held.expires_at == expires and held.revoked is not None and held.revoked.reason == "study closed"


async def concurrent_appends_take_consecutive_places(h: Harness) -> None:
    fed = await Fed.start(h)
    seen = await fed.head()
    entries = [
        dataset_entry(
            fed.keys[fed.owner],
            collaboration=h.collaboration,
            organization=fed.owner,
            label=f"d{i}",
            seen=seen,
        )
        for i in range(4)
    ]
    places = await asyncio.gather(*(h.writer(fed.owner).append(e) for e in entries))
    seqs = sorted(p.seq for p in places)
    assert seqs == list(range(seqs[0], seqs[0] + len(entries)))
    report = await fed.view(h.orgs[1]).verify_full()
    assert report.problems == () and report.length == seqs[-1]


CASES: dict[str, Callable[[Harness], Awaitable[None]]] = {
    case.__name__: case
    for case in (
        appends_are_chained_and_every_reader_verifies_the_same_ledger,
        what_verifiers_refuse_is_refused_and_changes_nothing,
        revocation_ends_a_lease_and_nothing_extends_it_after,
        concurrent_appends_take_consecutive_places,
    )
}
"""Every case, by name: a backend's module parametrizes one test over these."""
