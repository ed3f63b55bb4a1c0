"""Ledger sequences for the chaincode's cross-language vectors (make_vectors.py writes them).

Each step carries what `LedgerState` (tofu, as the server verifies) says about it, with the chain hash. Steps
marked `chaincode: rejected` while Python accepts are the chaincode's deliberate strictness (lib/contract.js
says why); they end their sequence, so the two states never diverge before a later step. `mutations` alters
one field of a valid entry at a time, re-signed, each judged on the same ledger prefix: the chaincode must
refuse whatever Python refuses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vfed.common.crypto import OrgKey
from vfed.common.ledger import (
    DatasetUse,
    Head,
    LedgerState,
    Record,
    checkpoint_entry,
    dataset_entry,
    extend_entry,
    lease_entry,
    receipt_entry,
    revoke_entry,
)
from vfed.common.trust import SignedEntry, certify, genesis_record, revoke, rotation_record
from vfed.common.trust.entries import sign_entry
from vfed.common.trust.errors import TrustError
from vfed.common.trust.keychain import KIND_ROTATION

COLLAB = 3
IMAGE = "sha256:" + "ab" * 32
ORGS = {"Org1MSP": 1, "Org2MSP": 2}


@dataclass
class Sequence:
    name: str
    now: int
    state: LedgerState = field(default_factory=lambda: LedgerState(COLLAB, anchors=lambda _: None, tofu=True))
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def head(self) -> Head:
        return self.state.head

    def step(
        self,
        name: str,
        entry: SignedEntry | str,
        *,
        msp: str = "Org1MSP",
        stricter: str = "",
        time_s: int | None = None,
    ) -> None:
        text = entry if isinstance(entry, str) else entry.to_json()
        step: dict[str, Any] = {
            "name": name,
            "entry": text,
            "msp": msp,
            "time": self.now if time_s is None else time_s,
        }
        try:
            parsed = SignedEntry.parse(text)
            seq = self.state.length + 1
            self.state.apply(Record(seq, parsed))
            step.update(python="accepted", seq=seq, hash=self.state.head.hash, json=parsed.to_json())
        except TrustError as exc:
            step.update(python="rejected", error=exc.message)
        step["chaincode"] = "rejected" if stricter else step["python"]
        if stricter:
            step["stricter"] = stricter
        self.steps.append(step)

    def out(self) -> dict[str, Any]:
        leases = [
            {
                "id": x.id,
                "seq": x.seq,
                "grantee": x.grantee,
                "expires_at": x.expires_at,
                "revoked": x.revoked is not None,
                "runs": x.runs,
                "epsilon_spent": x.epsilon_spent,
                "extensions": len(x.extensions),
            }
            for x in self.state.leases_on(1, "patients")
        ]
        return {
            "name": self.name,
            "collab": COLLAB,
            "now": self.now,
            "orgs": ORGS,
            "steps": self.steps,
            "leases": leases,
        }


@dataclass
class People:
    a: OrgKey = field(default_factory=OrgKey.generate)
    a2: OrgKey = field(default_factory=OrgKey.generate)
    b: OrgKey = field(default_factory=OrgKey.generate)
    admin: OrgKey = field(default_factory=OrgKey.generate)
    researcher: OrgKey = field(default_factory=OrgKey.generate)


def _founded(
    name: str, p: People, now: int, *, org2: bool = True, certified: int | None = None
) -> tuple[Sequence, SignedEntry, SignedEntry]:
    """Two organizations with keys (org2: the second one too), an admin and a researcher certificate of
    organization 1 (valid from `certified`, default now), a dataset."""
    s = Sequence(name, now)
    s.step("genesis of organization 1", genesis_record(1, p.a))
    if org2:
        s.step("genesis of organization 2", genesis_record(2, p.b), msp="Org2MSP")
    since = now if certified is None else certified
    admin_cert = certify(p.a, 1, 10, "ada", p.admin.public, roles=["org-admin"], now=since)
    s.step("admin certificate", admin_cert)
    s.step("researcher certificate", certify(p.a, 1, 11, "rex", p.researcher.public, now=since))
    data = dataset_entry(
        p.a,
        collaboration=COLLAB,
        organization=1,
        label="patients",
        seen=s.head,
        now=now,
        description="Kohorte \u00e9\u4e2d\U0001f600 \ue000 tab\t nul\x00",
    )
    s.step("dataset", data)
    return s, admin_cert, data


def _lease(
    p: People, s: Sequence, data: SignedEntry, cert: SignedEntry, key: OrgKey | None = None, **terms: Any
) -> SignedEntry:
    values: dict[str, Any] = {"expires_at": s.now + 3600, "grantee": 2, "now": s.now, **terms}
    return lease_entry(
        key or p.admin,
        collaboration=values.pop("collaboration", COLLAB),
        dataset=values.pop("dataset", data.digest),
        owner=1,
        by_user=int(cert.body["user"]),
        certificate=cert.digest,
        seen=s.head,
        **values,
    )


def _receipt(key: OrgKey, s: Sequence, lease: str, org: int = 1, **extra: Any) -> SignedEntry:
    values: dict[str, Any] = {
        "finished_at": s.now,
        "started_at": s.now - 10,
        "now": s.now,
        "datasets": [DatasetUse(label="patients", lease=lease, epsilon=0.5)],
        **extra,
    }
    return receipt_entry(
        key,
        collaboration=COLLAB,
        organization=org,
        task=1,
        run=s.state.length,
        image=IMAGE,
        status="completed",
        seen=s.head,
        **values,
    )


def main_sequence(p: People, now: int) -> Sequence:
    s, admin_cert, data = _founded("main", p, now)
    forged = dataset_entry(p.a, collaboration=COLLAB, organization=1, label="other", seen=s.head, now=now)
    s.step(
        "forged signature",
        SignedEntry(kind=forged.kind, body={**forged.body, "label": "changed"}, sigs=forged.sigs),
    )
    researcher_cert = s.steps[3]["entry"]
    lease = _lease(
        p, s, data, admin_cert, images=[IMAGE], max_runs=5, epsilon=1.5, users=[7], purpose="study \u00e9"
    )
    s.step("lease", lease)
    s.step("the same lease again", lease)
    s.step("lease by a researcher", _lease(p, s, data, SignedEntry.parse(researcher_cert), key=p.researcher))
    s.step("lease with the organization's key", _lease(p, s, data, admin_cert, key=p.a))
    s.step("lease on an unknown dataset", _lease(p, s, data, admin_cert, dataset="cd" * 32))
    s.step(
        "lease expiring before it begins",
        _lease(p, s, data, admin_cert, not_before=now + 100, expires_at=now + 50),
    )
    s.step("lease of another collaboration", _lease(p, s, data, admin_cert, collaboration=COLLAB + 1))
    s.step(
        "seen beyond the entry",
        dataset_entry(
            p.a, collaboration=COLLAB, organization=1, label="x", seen=Head(seq=99, hash="ab" * 32), now=now
        ),
    )
    s.step(
        "seen a forked head",
        dataset_entry(
            p.a, collaboration=COLLAB, organization=1, label="x", seen=Head(seq=1, hash="ab" * 32), now=now
        ),
    )
    s.step("receipt", _receipt(p.a, s, lease.digest))
    s.step(
        "dataset signed by a key unknown here",
        dataset_entry(
            OrgKey.generate(), collaboration=COLLAB, organization=1, label="x", seen=s.head, now=now
        ),
    )
    twice = [
        DatasetUse(label="patients", lease=lease.digest, epsilon=0.25),
        DatasetUse(label="patients", lease=lease.digest),
    ]
    s.step("receipt naming one lease twice", _receipt(p.a, s, lease.digest, datasets=twice))
    s.step("receipt by the grantee on the owner's lease", _receipt(p.b, s, lease.digest, org=2))
    s.step("receipt naming an unknown lease", _receipt(p.a, s, "ef" * 32))
    s.step(
        "extension",
        extend_entry(
            p.admin,
            collaboration=COLLAB,
            lease=lease.digest,
            expires_at=now + 7200,
            by_user=10,
            certificate=admin_cert.digest,
            seen=s.head,
            now=now,
        ),
    )
    lease2 = _lease(p, s, data, admin_cert, epsilon=1e-07)
    s.step("second lease", lease2)
    revoke1 = revoke_entry(
        p.admin,
        collaboration=COLLAB,
        lease=lease2.digest,
        reason="study ended",
        by_user=10,
        certificate=admin_cert.digest,
        seen=s.head,
        now=now,
    )
    s.step("revocation", revoke1)
    s.step(
        "extension after revocation",
        extend_entry(
            p.admin,
            collaboration=COLLAB,
            lease=lease2.digest,
            expires_at=now + 9000,
            by_user=10,
            certificate=admin_cert.digest,
            seen=s.head,
            now=now,
        ),
    )
    s.step(
        "second revocation",
        revoke_entry(
            p.admin,
            collaboration=COLLAB,
            lease=lease2.digest,
            reason="again",
            by_user=10,
            certificate=admin_cert.digest,
            seen=s.head,
            now=now,
        ),
    )
    s.step(
        "checkpoint of organization 2",
        checkpoint_entry(p.b, collaboration=COLLAB, organization=2, seen=s.head, now=now),
        msp="Org2MSP",
    )
    s.step("rotation", rotation_record(1, p.a, p.a2, created_at=now))
    s.step("receipt with the new key", _receipt(p.a2, s, lease.digest))
    s.step(
        "dataset with the old key",
        dataset_entry(p.a, collaboration=COLLAB, organization=1, label="old-key", seen=s.head, now=now),
    )
    s.step("second genesis", genesis_record(1, OrgKey.generate()))
    lone = OrgKey.generate()
    body = {"org": 1, "key": lone.public.to_text(), "prev": p.a2.key_id, "created_at": now}
    s.step("rotation signed by the new key only", sign_entry(KIND_ROTATION, body, [lone]))
    s.step(
        "rotation signed by the old key only",
        sign_entry(KIND_ROTATION, {**body, "key": OrgKey.generate().public.to_text()}, [p.a2]),
    )
    s.step("unknown kind", sign_entry("foo.bar", {"collab": COLLAB}, [p.a2]))
    s.step("not JSON", '{"v":1,"kind":')
    s.step("oversize", '{"v":1,"kind":"x","body":{"a":"' + "x" * (1 << 20) + '"}}')
    s.step("revoking the admin's certificate", revoke(p.a2, 1, admin_cert, "left"))
    s.step("lease by a revoked admin", _lease(p, s, data, admin_cert))
    old_admin = OrgKey.generate()
    old_cert = certify(
        p.a2, 1, 12, "old", old_admin.public, roles=["org-admin"], validity_s=100, now=now - 10000
    )
    s.step("expired admin certificate", old_cert)
    s.step("lease by an expired admin", _lease(p, s, data, old_cert, key=old_admin))
    s.step(
        "checkpoint of organization 1",
        checkpoint_entry(p.a2, collaboration=COLLAB, organization=1, seen=s.head, now=now),
    )
    return s


def stricter_sequences(now: int) -> list[Sequence]:
    out = []

    def founded(name: str, **kwargs: Any) -> tuple[Sequence, People, SignedEntry, SignedEntry]:
        p = People()
        s, cert, data = _founded(name, p, now, **kwargs)
        out.append(s)
        return s, p, cert, data

    s, p, _, _ = founded("coerced types")
    body = {"collab": str(COLLAB), "at": now, "seen": s.head.model_dump(), "org": 1, "label": "coerced"}
    s.step(
        "collab as text", sign_entry("dataset.registered", body, [p.a]), stricter="JSON types Python coerces"
    )
    s, p, _, _ = founded("certificate with an unreadable key")
    cert = sign_entry(
        "user.certificate",
        {
            "org": 1,
            "user": 5,
            "username": "u",
            "key": "vfedpk1:broken",
            "roles": [],
            "not_before": now,
            "expires_at": now + 10,
            "serial": "00",
        },
        [p.a],
    )
    s.step("certificate", cert, stricter="certificates are checked in full when taken in")
    s, p, _, _ = founded("key record from another organization's MSP")
    s.step(
        "genesis of organization 5",
        genesis_record(5, OrgKey.generate()),
        msp="Org1MSP",
        stricter="organization 5 has no MSP",
    )
    s, p, _, _ = founded("key record of a member from the wrong MSP", org2=False)
    s.step(
        "genesis of organization 2 by Org1MSP",
        genesis_record(2, p.b),
        msp="Org1MSP",
        stricter="key records come from the org's MSP",
    )
    s, p, cert, data = founded("stale lease", certified=now - 5000)
    s.step(
        "lease signed long ago",
        _lease(p, s, data, cert, now=now - 1000),
        stricter="lease entries must be fresh",
    )
    s, p, _, _ = founded("entry of an organization without keys")
    stranger = OrgKey.generate()
    s.step(
        "dataset of organization 3",
        dataset_entry(stranger, collaboration=COLLAB, organization=3, label="x", seen=s.head, now=now),
        stricter="organizations without key records",
    )
    s, p, cert, data = founded("receipt after revocation", certified=now - 5000)
    early = now - 2000
    lease = _lease(p, s, data, cert, now=early)
    s.step("lease, earlier", lease, time_s=early)
    s.step(
        "revocation, earlier",
        revoke_entry(
            p.admin,
            collaboration=COLLAB,
            lease=lease.digest,
            reason="r",
            by_user=10,
            certificate=cert.digest,
            seen=s.head,
            now=early,
        ),
        time_s=early,
    )
    s.step(
        "receipt of a run started later",
        _receipt(p.a, s, lease.digest, started_at=now - 60),
        stricter="a run must start while its lease is in force",
    )
    s, p, cert, data = founded("receipt after expiry", certified=now - 5000)
    lease = _lease(p, s, data, cert, now=early, expires_at=early + 100)
    s.step("lease, earlier, for 100 s", lease, time_s=early)
    s.step(
        "receipt of a run started later",
        _receipt(p.a, s, lease.digest, started_at=now - 60),
        stricter="a run must start while its lease is in force",
    )
    s, p, cert, data = founded("receipt from the future")
    lease = _lease(p, s, data, cert)
    s.step("lease", lease)
    s.step(
        "receipt finished in an hour",
        _receipt(p.a, s, lease.digest, finished_at=now + 3600),
        stricter="no time after now + skew",
    )
    return out


_MISSING = object()
_VALUES: list[Any] = [
    _MISSING, None, True, False, 0, 1, -1, 7.0, 1.5, "7", "", "x", 2**60, [], {}, [1], ["x"],
    "sha256:" + "ab" * 32, "ab" * 32, "x" * 2001,
]  # fmt: skip
_TIME_FIELDS = frozenset({"at", "not_before", "expires_at", "started_at", "finished_at"})
"""Fields the chaincode also judges against the transaction's time."""


def _coercible(value: Any) -> bool:
    """A value pydantic turns into another type (or an int past 2^53): the chaincode may refuse it."""
    if isinstance(value, bool) or value == "7":
        return True
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and abs(value) >= 2**53


def _judge(prefix: list[SignedEntry], entry: SignedEntry) -> tuple[bool, str]:
    state = LedgerState(COLLAB, anchors=lambda _: None, tofu=True)
    for seq, done in enumerate(prefix, start=1):
        state.apply(Record(seq, done))
    try:
        state.apply(Record(len(prefix) + 1, SignedEntry.parse(entry.to_json())))
    except TrustError as exc:
        return False, exc.message
    return True, ""


def mutations(now: int) -> dict[str, Any]:
    """One field of a lease, a receipt and a dataset set to each of `_VALUES` (or removed), re-signed."""
    p = People()
    s, cert, data = _founded("mutations", p, now)
    lease = _lease(p, s, data, cert, images=[IMAGE], max_runs=5, epsilon=1.5, users=[7])
    s.step("lease", lease)
    prefix = [SignedEntry.parse(step["entry"]) for step in s.steps]
    bases: list[tuple[SignedEntry, OrgKey]] = [
        (_lease(p, s, data, cert, epsilon=0.5, max_runs=2, users=[1], images=[IMAGE], metadata={}), p.admin),
        (_receipt(p.a, s, lease.digest, descriptor="cd" * 32), p.a),
        (dataset_entry(p.a, collaboration=COLLAB, organization=1, label="more", seen=s.head, now=now), p.a),
    ]
    cases = []
    for base, key in bases:
        for name in sorted(base.body):
            for value in _VALUES:
                body = {k: v for k, v in base.body.items() if k != name}
                if value is not _MISSING:
                    body[name] = value
                entry = sign_entry(base.kind, body, [key])
                accepted, error = _judge(prefix, entry)
                shown = "(missing)" if value is _MISSING else repr(value)[:20]
                cases.append(
                    {
                        "name": f"{base.kind} {name}={shown}",
                        "entry": entry.to_json(),
                        "python": "accepted" if accepted else "rejected",
                        "error": error,
                        "may_be_stricter": _coercible(value) or name in _TIME_FIELDS or name == "org",
                    }
                )
    return {"prefix": s.out(), "cases": cases}
