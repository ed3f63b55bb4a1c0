"""vfed.common.trust on its own: key chains, certificates, descriptors, the trust store and the resolver.

Each refusal is a typed error with the reason code a node reports; each check is shown to fail on a forgery.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from vfed.common.crypto import Keyring, OrgKey
from vfed.common.trust import (
    CertificateInvalid,
    CertificateRevoked,
    ChainForked,
    ChainInvalid,
    ChainResolver,
    DescriptorDocument,
    DescriptorExpired,
    DescriptorInvalid,
    DescriptorMismatch,
    KeyChain,
    Limits,
    MalformedEntry,
    SignedEntry,
    Target,
    TrustMode,
    TrustStore,
    TrustStoreError,
    UntrustedKey,
    canonical,
    certify,
    check_assignment,
    fingerprint,
    genesis_record,
    new_body,
    parse_fingerprint,
    records_for_keys,
    revoke,
    rotation_record,
    sign_document,
    sign_entry,
    verify_chain,
    verify_document,
)

ORG = 7
COLLAB = 3
SHA = "ab" * 32


def _roundtrip(entries: list[SignedEntry]) -> list[SignedEntry]:
    """As a node sees them: JSON text from the server, parsed again."""
    return [SignedEntry.parse(e.to_json()) for e in entries]


def _chain(ring: Keyring, org: int = ORG) -> KeyChain:
    return verify_chain(org, _roundtrip(records_for_keys(org, ring.keys)), ring.keys[0].key_id)


class Source:
    """Chains as a node would have them after pinning."""

    def __init__(self, chains: dict[int, KeyChain], revocations: dict[int, list[SignedEntry]] | None = None):
        self.chains = chains
        self.revoked = revocations or {}

    async def chain(self, organization_id: int) -> KeyChain:
        if organization_id not in self.chains:
            raise UntrustedKey("not pinned", organization_id, None, None)
        return self.chains[organization_id]

    async def revocations(self, organization_id: int) -> list[SignedEntry]:
        return self.revoked.get(organization_id, [])


def _verify(doc: DescriptorDocument, source: Source, **limits: Any) -> Any:
    return asyncio.run(
        verify_document(DescriptorDocument.parse(doc.to_json()), source, Limits(now=time.time(), **limits))
    )


# ---- entries ------------------------------------------------------------------------------------


def test_canonical_form_is_stable_and_refuses_nan() -> None:
    assert canonical({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'.encode()
    with pytest.raises(MalformedEntry):
        canonical({"x": float("nan")})


def test_entry_signature_covers_kind_and_body() -> None:
    key = OrgKey.generate()
    entry = sign_entry("k", {"a": 1}, [key])
    parsed = SignedEntry.parse(entry.to_json())
    parsed.verify_by(key.public)
    assert parsed.digest == entry.digest
    edited = SignedEntry.parse(entry.to_json().replace('"a":1', '"a":2'))
    with pytest.raises(MalformedEntry, match="does not verify"):
        edited.verify_by(key.public)
    relabelled = SignedEntry(kind="other", body=entry.body, sigs=entry.sigs)
    assert not relabelled.signed_by(key.public)
    with pytest.raises(MalformedEntry, match="not signed by"):
        entry.verify_by(OrgKey.generate().public)


@pytest.mark.parametrize("text", ["", "{}", "[]", '{"v":2,"kind":"k","body":{},"sigs":[]}', "x" * 10])
def test_malformed_entries_are_typed(text: str) -> None:
    with pytest.raises(MalformedEntry):
        SignedEntry.parse(text)


# ---- key chains ---------------------------------------------------------------------------------


def test_chain_of_rotations_verifies_against_the_first_key() -> None:
    ring = Keyring.generate()
    ring.rotate()
    ring.rotate()
    chain = _chain(ring)
    assert chain.head == ring.current.public
    assert chain.fingerprint == fingerprint(ring.keys[0].public)
    assert [k.superseded_at is None for k in chain.keys] == [False, False, True]
    assert chain.lookup()(ring.keys[1].key_id) == ring.keys[1].public
    assert parse_fingerprint(chain.fingerprint.upper().replace("-", " ")) == ring.keys[0].key_id


def test_swapped_first_key_is_refused_by_the_pin() -> None:
    ring, impostor = Keyring.generate(), Keyring.generate()
    with pytest.raises(UntrustedKey) as caught:
        verify_chain(ORG, _roundtrip(records_for_keys(ORG, impostor.keys)), ring.keys[0].key_id)
    assert caught.value.reason == "untrusted-key"
    assert caught.value.pinned == ring.keys[0].key_id
    assert caught.value.seen == impostor.keys[0].key_id


def test_rotation_not_signed_by_the_previous_key_is_refused() -> None:
    ring = Keyring.generate()
    server_key = OrgKey.generate()
    forged = sign_entry(
        "key.rotation",
        {"org": ORG, "key": server_key.public.to_text(), "prev": ring.current.key_id, "created_at": 1},
        [server_key],
    )
    records = [*records_for_keys(ORG, ring.keys), forged]
    with pytest.raises(ChainInvalid, match="signed by the previous and the new key"):
        verify_chain(ORG, _roundtrip(records), ring.keys[0].key_id)


def test_fork_is_refused_until_a_head_is_pinned() -> None:
    ring = Keyring.generate()
    left, right = OrgKey.generate(), OrgKey.generate()
    records = [
        genesis_record(ORG, ring.current),
        rotation_record(ORG, ring.current, left),
        rotation_record(ORG, ring.current, right),
    ]
    with pytest.raises(ChainForked):
        verify_chain(ORG, _roundtrip(records), ring.current.key_id)
    chain = verify_chain(ORG, _roundtrip(records), ring.current.key_id, head_pin=right.key_id)
    assert chain.head == right.public


def test_records_of_another_organization_are_refused() -> None:
    ring = Keyring.generate()
    with pytest.raises(ChainInvalid):
        verify_chain(ORG, _roundtrip(records_for_keys(ORG + 1, ring.keys)), None)


def test_grace_period_of_a_superseded_key() -> None:
    ring = Keyring.generate()
    records = [
        genesis_record(ORG, ring.current, created_at=1000),
        rotation_record(ORG, ring.current, new := OrgKey.generate(), created_at=2000),
    ]
    chain = verify_chain(ORG, _roundtrip(records), ring.current.key_id)
    assert chain.usable(ring.current.key_id, now=2500, grace_s=600)
    assert not chain.usable(ring.current.key_id, now=2700, grace_s=600)
    assert chain.usable(new.key_id, now=10**9, grace_s=0)


# ---- certificates and descriptors ---------------------------------------------------------------


def _task(
    org_ring: Keyring, researcher: Keyring, *, user: int = 11, validity_s: int = 3600, **body: Any
) -> tuple[DescriptorDocument, SignedEntry]:
    cert = certify(org_ring.current, ORG, user, "alice", researcher.current.public, validity_s=validity_s)
    fields: dict[str, Any] = {
        "collaboration": COLLAB,
        "initiator_org": ORG,
        "initiator_user": user,
        "signer": researcher.current.public,
        "signer_role": "user",
        "image": "vfed/probe",
        "method": "echo",
        "targets": [Target(org=ORG, datasets=["d"], input=SHA, key_id=org_ring.current.key_id)],
    }
    fields.update(body)
    return sign_document(new_body(**fields), researcher.current, cert), cert


def _user_body(org: Keyring, signer: Keyring, **extra: Any) -> dict[str, Any]:
    """A descriptor body as user 11 of ORG signing with `signer`'s key, targeting ORG."""
    fields: dict[str, Any] = {
        "collaboration": COLLAB,
        "initiator_org": ORG,
        "initiator_user": 11,
        "signer": signer.current.public,
        "signer_role": "user",
        "image": "i",
        "method": "m",
        "targets": [Target(org=ORG, input=SHA, key_id=org.current.key_id)],
    }
    fields.update(extra)
    return new_body(**fields)


def test_researcher_signed_descriptor_verifies_and_matches() -> None:
    org, researcher = Keyring.generate(), Keyring.generate()
    doc, _ = _task(org, researcher)
    verified = _verify(doc, Source({ORG: _chain(org)}))
    assert verified.certificate is not None and verified.certificate.username == "alice"
    assert verified.reply_keys == (researcher.current.public,)
    check_assignment(
        verified,
        organization_id=ORG,
        collaboration_id=COLLAB,
        image="vfed/probe",
        datasets=["d"],
        input_sha256=SHA,
        initiator_org=ORG,
    )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"image": "evil"}, "image"),
        ({"datasets": ["other"]}, "datasets"),
        ({"input_sha256": "cd" * 32}, "input"),
        ({"collaboration_id": COLLAB + 1}, "collaboration"),
        ({"organization_id": ORG + 1}, "not a target"),
        ({"initiator_org": ORG + 1}, "initiating"),
    ],
)
def test_assignment_mismatch_is_refused(change: dict[str, Any], match: str) -> None:
    org, researcher = Keyring.generate(), Keyring.generate()
    doc, _ = _task(org, researcher)
    verified = _verify(doc, Source({ORG: _chain(org)}))
    asked: dict[str, Any] = {
        "organization_id": ORG,
        "collaboration_id": COLLAB,
        "image": "vfed/probe",
        "datasets": ["d"],
        "input_sha256": SHA,
        "initiator_org": ORG,
    }
    asked.update(change)
    with pytest.raises(DescriptorMismatch, match=match):
        check_assignment(verified, **asked)


def test_forged_and_revoked_certificates_are_refused() -> None:
    org, researcher, server = Keyring.generate(), Keyring.generate(), Keyring.generate()
    # The server certifies its own key for the organization's user.
    forged = certify(server.current, ORG, 11, "alice", server.current.public)
    body = _user_body(org, server)
    with pytest.raises(CertificateInvalid, match="not signed by a key of organization"):
        _verify(sign_document(body, server.current, forged), Source({ORG: _chain(org)}))
    doc, cert = _task(org, researcher)
    revoked = {ORG: [revoke(org.current, ORG, cert, "left")]}
    with pytest.raises(CertificateRevoked):
        _verify(doc, Source({ORG: _chain(org)}, revoked))
    # A revocation the organization did not sign revokes nothing.
    fake = {ORG: [revoke(server.current, ORG, cert, "dos")]}
    assert _verify(doc, Source({ORG: _chain(org)}, fake)).digest == doc.digest


def test_expired_certificate_and_descriptor_and_other_user() -> None:
    org, researcher = Keyring.generate(), Keyring.generate()
    doc, _ = _task(org, researcher, validity_s=-10_000)
    with pytest.raises(CertificateInvalid, match="expired"):
        _verify(doc, Source({ORG: _chain(org)}))
    doc, _ = _task(org, researcher, now=time.time() - 10 * 86400, lifetime_s=86400)
    with pytest.raises(DescriptorExpired):
        _verify(doc, Source({ORG: _chain(org)}))
    doc, _ = _task(org, researcher, now=time.time() + 3600)
    with pytest.raises(DescriptorInvalid, match="future"):
        _verify(doc, Source({ORG: _chain(org)}))
    cert = certify(org.current, ORG, 12, "bob", researcher.current.public)
    body = _user_body(org, researcher)
    with pytest.raises(DescriptorInvalid, match="another key or user"):
        _verify(sign_document(body, researcher.current, cert), Source({ORG: _chain(org)}))


def test_edited_descriptor_fails_its_signature() -> None:
    org, researcher = Keyring.generate(), Keyring.generate()
    doc, _ = _task(org, researcher)
    tampered = DescriptorDocument.parse(doc.to_json().replace('"vfed/probe"', '"vfed/evil"'))
    with pytest.raises(DescriptorInvalid, match="signature"):
        _verify(tampered, Source({ORG: _chain(org)}))


def test_subtask_keeps_the_root_and_refuses_forged_roots() -> None:
    a, b, researcher = Keyring.generate(), Keyring.generate(), Keyring.generate()
    other = ORG + 1
    root, _ = _task(
        a,
        researcher,
        targets=[
            Target(org=ORG, input=SHA, key_id=a.current.key_id),
            Target(org=other, input=SHA, key_id=b.current.key_id),
        ],
    )
    chains = Source({ORG: _chain(a), other: _chain(b, other)})

    def sub(parent: DescriptorDocument, signer: Keyring, org: int, **extra: Any) -> DescriptorDocument:
        fields: dict[str, Any] = {
            "collaboration": COLLAB,
            "initiator_org": org,
            "initiator_user": None,
            "signer": signer.current.public,
            "signer_role": "organization",
            "image": "vfed/probe",
            "method": "partial",
            "targets": [Target(org=ORG, input=SHA, key_id=a.current.key_id)],
            "parent": parent,
        }
        fields.update(extra)
        return sign_document(new_body(**fields), signer.current, None, parent)

    verified = _verify(sub(root, b, other), chains)
    assert verified.root.digest == root.digest
    assert [i.org for i in verified.initiators()] == [other, ORG]
    assert verified.initiators()[-1].user == 11
    # A forged root: signed by organization b, which cannot speak for a's researcher.
    forged_root = sign_document(
        new_body(
            collaboration=COLLAB,
            initiator_org=ORG,
            initiator_user=11,
            signer=b.current.public,
            signer_role="organization",
            image="vfed/probe",
            method="m",
            targets=[Target(org=other, input=SHA, key_id=b.current.key_id)],
        ),
        b.current,
    )
    with pytest.raises(DescriptorInvalid):
        _verify(sub(forged_root, b, other), chains)
    # The parent's digest does not match the embedded document.
    good = sub(root, b, other)
    swapped = DescriptorDocument(descriptor=good.descriptor, parent=_task(a, researcher)[0])
    with pytest.raises(DescriptorInvalid, match="parent"):
        _verify(swapped, chains)
    # Leaving the collaboration, and nesting too deep.
    with pytest.raises(DescriptorInvalid, match="collaboration"):
        _verify(sub(root, b, other, collaboration=COLLAB + 1), chains)
    deep = sub(sub(root, b, other), a, ORG)
    assert _verify(deep, chains).body.depth == 2
    with pytest.raises(DescriptorInvalid, match="deep"):
        _verify(sub(deep, a, ORG), chains)
    with pytest.raises(DescriptorInvalid, match="deep"):
        _verify(deep, chains, max_depth=1)
    # An organization that was not a target of the parent cannot make its subtasks.
    stranger = Keyring.generate()
    chains.chains[99] = _chain(stranger, 99)
    with pytest.raises(DescriptorInvalid, match="not a target"):
        _verify(sub(root, stranger, 99), chains)


# ---- trust store and resolver -------------------------------------------------------------------


def test_trust_store_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "trusted_orgs"
    store = TrustStore(path)
    key = OrgKey.generate()
    store.pin(3, fingerprint(key.public), note="hospital a")
    store.pin(4, key.key_id.upper(), head=key.key_id)
    again = TrustStore(path)
    assert again.get(3) is not None and again.get(3).root == key.key_id  # type: ignore[union-attr]
    assert again.get(4).head == key.key_id  # type: ignore[union-attr]
    assert again.unpin(3) and TrustStore(path).get(3) is None
    path.write_text("12 not-a-fingerprint\n")
    with pytest.raises(TrustStoreError, match=":1:"):
        TrustStore(path)


def test_resolver_pinned_refuses_unknown_and_tofu_pins_once(tmp_path: Path) -> None:
    ring = Keyring.generate()
    served: dict[int, list[Any]] = {ORG: [e.model_dump() for e in records_for_keys(ORG, ring.keys)]}
    refusals: list[str] = []

    async def fetch(org: int) -> list[Any]:
        return served.get(org, [])

    async def scenario() -> None:
        pinned = ChainResolver(
            TrustStore(None, TrustMode.PINNED), fetch, None, lambda e, o: refusals.append(e.reason)
        )
        with pytest.raises(UntrustedKey, match=fingerprint(ring.keys[0].public)):
            await pinned.chain(ORG)
        tofu = ChainResolver(TrustStore(tmp_path / "t", TrustMode.TOFU), fetch)
        assert (await tofu.chain(ORG)).head == ring.current.public
        assert TrustStore(tmp_path / "t").get(ORG) is not None
        # The server swaps the organization's chain: the pin made at first use refuses it.
        served[ORG] = [e.model_dump() for e in records_for_keys(ORG, Keyring.generate().keys)]
        with pytest.raises(UntrustedKey):
            await tofu.chain(ORG, refresh=True)

    asyncio.run(scenario())
    assert refusals == ["untrusted-key"]


def test_an_organization_policy_to_seal_results_to_it_too() -> None:
    """A certificate may say that the researcher's results go to the organization's key as well; a
    descriptor of that researcher that leaves the organization out is refused."""
    org, researcher = Keyring.generate(), Keyring.generate()
    cert = certify(org.current, ORG, 11, "alice", researcher.current.public, seal_to_organization=True)
    only_mine = sign_document(_user_body(org, researcher), researcher.current, cert)
    with pytest.raises(DescriptorInvalid, match="sealed to the organization"):
        _verify(only_mine, Source({ORG: _chain(org)}))
    both = _user_body(org, researcher, reply_to=[researcher.current.key_id, org.current.key_id])
    verified = _verify(sign_document(both, researcher.current, cert), Source({ORG: _chain(org)}))
    assert verified.reply_keys == (researcher.current.public, org.current.public)
    assert verified.certificate is not None and verified.certificate.seal_to_organization
