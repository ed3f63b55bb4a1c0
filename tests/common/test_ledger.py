"""The ledger's verifier (vfed.common.ledger.LedgerState): what a valid ledger says, and every way a
backend could rewrite one, caught with the entry named. Server-backed paths: tests/server, tests/trust."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest

from vfed.common.crypto import OrgKey
from vfed.common.ledger import (
    DatasetUse,
    Head,
    LedgerEntryInvalid,
    LedgerForked,
    LedgerState,
    LedgerTampered,
    NoValidLease,
    Record,
    checkpoint_entry,
    dataset_entry,
    extend_entry,
    lease_entry,
    link,
    receipt_entry,
    revoke_entry,
)
from vfed.common.trust import SignedEntry, certify, genesis_record, rotation_record

COLLAB = 3
IMAGE = "sha256:" + "ab" * 32
OTHER_IMAGE = "sha256:" + "cd" * 32


@dataclass
class World:
    """Two organizations (1 owns the data, 2 analyses it), an org admin and a researcher of organization 1."""

    a: OrgKey = field(default_factory=OrgKey.generate)
    b: OrgKey = field(default_factory=OrgKey.generate)
    admin: OrgKey = field(default_factory=OrgKey.generate)
    researcher: OrgKey = field(default_factory=OrgKey.generate)
    records: list[Record] = field(default_factory=list)
    now: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.state = self.fresh()
        self.add(genesis_record(1, self.a))
        self.add(genesis_record(2, self.b))
        self.admin_cert = self.add(certify(self.a, 1, 10, "ada", self.admin.public, roles=["org-admin"]))
        self.res_cert = self.add(certify(self.a, 1, 11, "rex", self.researcher.public))
        self.dataset = self.add(
            dataset_entry(self.a, collaboration=COLLAB, organization=1, label="patients", seen=self.head)
        )

    def fresh(self, **kwargs: object) -> LedgerState:
        pins = {1: self.a.key_id, 2: self.b.key_id}
        return LedgerState(COLLAB, anchors=pins.get, **kwargs)  # type: ignore[arg-type]

    @property
    def head(self) -> Head:
        return self.state.head

    def add(self, entry: SignedEntry) -> SignedEntry:
        seq = self.state.length + 1
        record = Record(seq, entry, link(COLLAB, seq, self.state.head.hash, entry.to_json()))
        self.state.apply(record)
        self.records.append(record)
        return entry

    def lease(
        self, key: OrgKey | None = None, cert: SignedEntry | None = None, **terms: object
    ) -> SignedEntry:
        cert = cert or self.admin_cert
        values: dict[str, object] = {"expires_at": self.now + 3600, "grantee": 2, **terms}
        return lease_entry(
            key or self.admin,
            collaboration=COLLAB,
            dataset=self.dataset.digest,
            owner=1,
            by_user=int(cert.body["user"]),
            certificate=cert.digest,
            seen=self.head,
            **values,  # type: ignore[arg-type]
        )

    def extend(self, lease: SignedEntry, expires_at: int) -> SignedEntry:
        return extend_entry(
            self.admin,
            collaboration=COLLAB,
            lease=lease.digest,
            expires_at=expires_at,
            by_user=10,
            certificate=self.admin_cert.digest,
            seen=self.head,
        )

    def revoke(self, lease: SignedEntry, reason: str) -> SignedEntry:
        return revoke_entry(
            self.admin,
            collaboration=COLLAB,
            lease=lease.digest,
            reason=reason,
            by_user=10,
            certificate=self.admin_cert.digest,
            seen=self.head,
        )

    def receipt(self, lease: str, org_key: OrgKey | None = None, org: int = 1) -> SignedEntry:
        return receipt_entry(
            org_key or self.a,
            collaboration=COLLAB,
            organization=org,
            task=1,
            run=len(self.records),
            image=IMAGE,
            finished_at=self.now,
            status="completed",
            seen=self.head,
            datasets=[DatasetUse(label="patients", dataset=self.dataset.digest, lease=lease, epsilon=0.5)],
        )

    def replay(self, records: list[Record], *, keep_hashes: bool = False) -> LedgerState:
        state = self.fresh()
        for number, record in enumerate(records, start=1):
            state.apply(Record(number, record.entry, record.hash if keep_hashes else None))
        return state


def covers(w: World, *, user: int | None = None, images: tuple[str, ...] = (IMAGE,), grantee: int = 2) -> str:
    leases = w.state.leases_for(
        owner=1, label="patients", grantee=grantee, user=user, images=images, now=w.now
    )
    return leases[0].id


def test_a_valid_ledger_says_who_may_use_what() -> None:
    w = World()
    lease = w.add(w.lease(images=[IMAGE], max_runs=2))
    assert covers(w) == lease.digest
    w.add(w.receipt(lease.digest))
    found = w.state.leases[lease.digest]
    assert (found.runs, found.epsilon_spent) == (1, 0.5)
    assert [r.body.run for r in w.state.receipts] == [6]
    replayed = w.replay(w.records, keep_hashes=True)
    assert replayed.head == w.state.head and replayed.problems == []


def test_terms_refuse_with_the_reason() -> None:
    w = World()
    w.add(w.lease(images=[IMAGE], users=[20]))
    with pytest.raises(NoValidLease, match="users 20, not user 21"):
        covers(w, user=21)
    with pytest.raises(NoValidLease, match="does not allow image"):
        covers(w, user=20, images=(OTHER_IMAGE,))
    with pytest.raises(NoValidLease, match="no lease for organization 4"):
        covers(w, user=20, grantee=4)
    assert covers(w, user=20)


def test_expiry_extension_and_revocation() -> None:
    w = World()
    lease = w.add(w.lease(expires_at=w.now - 1, not_before=w.now - 100))
    with pytest.raises(NoValidLease, match="expired at"):
        covers(w)
    w.add(w.extend(lease, w.now + 60))
    assert covers(w) == lease.digest
    w.add(w.revoke(lease, "study closed"))
    with pytest.raises(NoValidLease, match=r"revoked \(study closed\)"):
        covers(w)
    assert w.state.leases[lease.digest].status(w.now) == "revoked"
    with pytest.raises(LedgerEntryInvalid, match="which was revoked"):
        w.add(w.extend(lease, w.now + 99))


def test_a_lease_not_yet_valid_is_refused() -> None:
    w = World()
    w.add(w.lease(not_before=w.now + 600, expires_at=w.now + 3600))
    with pytest.raises(NoValidLease, match="valid only from"):
        covers(w)


def test_a_lease_signed_by_a_researcher_is_refused() -> None:
    w = World()
    with pytest.raises(LedgerEntryInvalid, match=r"ledger entry 6 .*roles researcher.*only an org admin"):
        w.add(w.lease(key=w.researcher, cert=w.res_cert))


def test_a_lease_signed_with_the_organization_key_is_refused() -> None:
    w = World()
    with pytest.raises(LedgerEntryInvalid, match="signed with organization 1's own key"):
        w.add(w.lease(key=w.a))


def test_a_lease_by_another_organization_on_my_dataset_is_refused() -> None:
    w = World()
    stranger = OrgKey.generate()
    w.add(certify(w.b, 2, 30, "eve", stranger.public, roles=["org-admin"]))
    cert = w.records[-1].entry
    with pytest.raises(LedgerEntryInvalid, match="not signed by a certified org admin of organization 1"):
        w.add(w.lease(key=stranger, cert=cert))


def test_a_revoked_admin_cannot_sign() -> None:
    from vfed.common.trust import revoke

    w = World()
    w.add(revoke(w.a, 1, w.admin_cert, "left"))
    with pytest.raises(LedgerEntryInvalid, match=r"certificate does not hold.*revoked"):
        w.add(w.lease())


def test_an_entry_forged_with_another_organizations_key() -> None:
    w = World()
    forged = dataset_entry(w.b, collaboration=COLLAB, organization=1, label="fake", seen=w.head)
    with pytest.raises(LedgerEntryInvalid, match=r"ledger entry 6 .*not signed by a key of organization 1"):
        w.add(forged)


def test_a_receipt_for_another_organizations_lease() -> None:
    w = World()
    lease = w.add(w.lease())
    with pytest.raises(LedgerEntryInvalid, match="organization 2 reports a run on organization 1's lease"):
        w.add(w.receipt(lease.digest, org_key=w.b, org=2))


def test_an_edited_entry_is_caught() -> None:
    w = World()
    w.add(w.lease())
    edited = w.records[5].entry.model_copy(update={"body": {**w.records[5].entry.body, "grantee": 4}})
    records = [*w.records[:5], Record(6, edited, w.records[5].hash)]
    with pytest.raises(LedgerTampered, match=r"ledger entry 6 .*was changed after it was chained"):
        w.replay(records, keep_hashes=True)
    with pytest.raises(LedgerEntryInvalid, match=r"ledger entry 6 .*admin's signature does not verify"):
        w.replay(records)  # hashes recomputed: the signature still gives it away


def test_a_dropped_or_reordered_entry_is_caught() -> None:
    w = World()
    lease = w.add(w.lease())
    w.add(w.receipt(lease.digest))
    with pytest.raises(LedgerTampered, match=r"ledger entry 7 .*expected entry 6 next; entries are missing"):
        w.fresh().apply_all([*w.records[:5], w.records[6]])  # a gap in the numbers
    with pytest.raises(LedgerTampered, match="claims to have seen entry 6, which comes after it"):
        w.replay([*w.records[:5], w.records[6]])  # renumbered: the receipt saw the lease's place
    with pytest.raises((LedgerTampered, LedgerEntryInvalid)):
        w.replay([*w.records[:4], w.records[5], w.records[4], w.records[6]])


def test_a_replayed_or_foreign_entry_is_caught() -> None:
    w = World()
    lease = w.add(w.lease())
    w.add(w.receipt(lease.digest))
    with pytest.raises(LedgerTampered, match="repeats entry 7"):
        w.add(w.records[6].entry)
    nowhere = Head(seq=0, hash="0" * 64)
    foreign = dataset_entry(w.a, collaboration=COLLAB + 1, organization=1, label="x", seen=nowhere)
    with pytest.raises(LedgerEntryInvalid, match="belongs to collaboration 4"):
        w.add(foreign)


def test_a_fork_is_caught_from_an_entry_and_from_a_head() -> None:
    w = World()
    other = World.__new__(World)
    other.__dict__.update({k: v for k, v in w.__dict__.items() if k not in ("state", "records")})
    other.records, other.state = list(w.records[:4]), w.replay(w.records[:4], keep_hashes=True)
    # The server shows `other` a history where entry 5 is another dataset registration.
    other.add(dataset_entry(w.a, collaboration=COLLAB, organization=1, label="other", seen=other.head))
    with pytest.raises(LedgerForked, match="verified ledger head 5:") as caught:
        w.state.check_head(other.head, "organization 2's task")
    assert caught.value.seq == 5 and caught.value.theirs == other.head.hash
    assert w.state.check_head(Head(seq=99, hash="1" * 64)) is False  # beyond: read further first
    checkpoint = checkpoint_entry(w.b, collaboration=COLLAB, organization=2, seen=other.head)
    with pytest.raises(LedgerForked, match=r"ledger entry 6 .*signed after its signer verified head 5"):
        w.add(checkpoint)


def test_unpinned_organizations_count_for_nothing_but_do_not_break_the_ledger() -> None:
    w = World()
    lease = w.add(w.lease())
    w.add(w.receipt(lease.digest))
    only_a = LedgerState(COLLAB, anchors={1: w.a.key_id}.get)
    only_a.apply_all(w.records)
    assert lease.digest in only_a.leases
    assert any("organization 2 is not pinned" in p.message for p in only_a.problems)
    only_b = LedgerState(COLLAB, anchors={2: w.b.key_id}.get)
    only_b.apply_all(w.records)  # organization 1's dataset, lease and receipt are skipped, not errors
    assert only_b.leases == {} and only_b.receipts == []


def test_trust_on_first_use_pins_what_it_sees() -> None:
    w = World()
    pinned: dict[int, str] = {}
    state = LedgerState(COLLAB, anchors=pinned.get, tofu=True, on_pin=pinned.__setitem__)
    state.apply_all(w.records)
    assert pinned == {1: w.a.key_id, 2: w.b.key_id}
    impostor = OrgKey.generate()
    later = LedgerState(COLLAB, anchors=pinned.get, tofu=True, on_pin=pinned.__setitem__)
    with pytest.raises(LedgerEntryInvalid, match=r"ledger entry 1 .*does not match the pinned fingerprint"):
        later.apply(Record(1, genesis_record(1, impostor)))


def test_a_rotated_key_signs_on() -> None:
    w = World()
    a2 = OrgKey.generate()
    w.add(rotation_record(1, w.a, a2))
    w.add(dataset_entry(a2, collaboration=COLLAB, organization=1, label="later", seen=w.head))
    assert w.state.dataset(1, "later") is not None


def test_expiring_leases_are_listed() -> None:
    w = World()
    soon = w.add(w.lease(expires_at=w.now + 3600))
    w.add(w.lease(expires_at=w.now + 90 * 86400, purpose="long"))
    assert [x.id for x in w.state.expiring(1, 7 * 86400, w.now)] == [soon.digest]


def test_a_receipt_naming_a_lease_of_an_unpinned_organization_counts_for_nothing_there() -> None:
    w = World()
    lease = w.add(w.lease())
    stranger = OrgKey.generate()
    w.add(genesis_record(5, stranger))
    receipt = receipt_entry(
        stranger,
        collaboration=COLLAB,
        organization=5,
        task=9,
        run=99,
        image=IMAGE,
        finished_at=w.now,
        status="completed",
        seen=w.head,
        datasets=[DatasetUse(label="patients", lease=lease.digest)],
    )
    seq = w.state.length + 1
    records = [*w.records, Record(seq, receipt, link(COLLAB, seq, w.state.head.hash, receipt.to_json()))]
    # Where organization 1 is pinned, a receipt of organization 5 on its lease is refused...
    everyone = LedgerState(COLLAB, anchors={1: w.a.key_id, 2: w.b.key_id, 5: stranger.key_id}.get)
    with pytest.raises(LedgerEntryInvalid, match="organization 5 reports a run on organization 1's lease"):
        everyone.apply_all(records)
    # ...where it is not, the lease is unknown: the receipt counts for no lease, and nothing breaks.
    state = LedgerState(COLLAB, anchors={2: w.b.key_id, 5: stranger.key_id}.get)
    state.apply_all(records)
    assert [r.body.run for r in state.receipts] == [99] and state.leases == {}
