"""Organization keys and their one-line public text form."""

from __future__ import annotations

import base64

import pytest

from vfed.common.crypto import BadSignature, CorruptKey, CryptoError, OrgKey, PublicKey


def test_public_text_round_trip_and_key_id() -> None:
    key = OrgKey.generate()
    text = key.public.to_text()
    assert "\n" not in text and " " not in text
    parsed = PublicKey.from_text(text)
    assert parsed == key.public
    assert parsed.key_id == key.key_id
    assert len(key.key_id) == 32 and int(key.key_id, 16) >= 0
    assert parsed.x25519 == key.public.x25519 and parsed.ed25519 == key.public.ed25519
    assert PublicKey.from_text(f"  {text}\n") == key.public


def test_key_ids_differ_between_keys() -> None:
    ids = {OrgKey.generate().key_id for _ in range(20)}
    assert len(ids) == 20


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "must start with"),
        ("ssh-ed25519 AAAA", "must start with"),
        ("vfedpk1:!!!!", "base64url"),
        ("vfedpk1:" + base64.urlsafe_b64encode(b"x" * 10).decode().rstrip("="), "decodes to 10 bytes"),
    ],
)
def test_garbage_public_text_raises_corrupt_key(text: str, needle: str) -> None:
    with pytest.raises(CorruptKey, match=needle):
        PublicKey.from_text(text)


def test_non_text_public_key_raises_corrupt_key() -> None:
    with pytest.raises(CorruptKey, match="must be text"):
        PublicKey.from_text(b"vfedpk1:abc")  # type: ignore[arg-type]


def test_one_changed_character_fails_the_checksum() -> None:
    text = OrgKey.generate().public.to_text()
    pos = len(text) - 10
    swapped = text[:pos] + ("A" if text[pos] != "A" else "B") + text[pos + 1 :]
    with pytest.raises(CorruptKey):
        PublicKey.from_text(swapped)


def _text_for(raw: bytes) -> str:
    import hashlib

    check = hashlib.blake2b(raw, digest_size=4, person=b"vfed-pk-check").digest()
    return "vfedpk1:" + base64.urlsafe_b64encode(raw + check).decode().rstrip("=")


def test_low_order_and_invalid_points_are_refused() -> None:
    good = OrgKey.generate().public
    with pytest.raises(CorruptKey, match="X25519"):
        PublicKey.from_text(_text_for(b"\x00" * 32 + good.ed25519))
    with pytest.raises(CorruptKey, match="Ed25519"):
        PublicKey.from_text(_text_for(good.x25519 + b"\x00" * 32))


def test_sign_and_verify_detached() -> None:
    key = OrgKey.generate()
    sig = key.sign(b"ledger entry")
    key.public.verify(b"ledger entry", sig)
    with pytest.raises(BadSignature, match=key.key_id):
        key.public.verify(b"ledger entrY", sig)
    with pytest.raises(BadSignature):
        OrgKey.generate().public.verify(b"ledger entry", sig)
    with pytest.raises(CryptoError):
        key.public.verify(b"ledger entry", b"short")


def test_private_key_halves_must_be_32_bytes() -> None:
    with pytest.raises(CorruptKey, match="32 bytes"):
        OrgKey(b"x" * 31, b"y" * 32)
