"""Envelope v1 over bytes: round trips, the header, and every tamper case the format must detect."""

from __future__ import annotations

import os
import struct

import pytest
from crypto_testkit import FRAME_HEAD, flip, layout

from vfed.common.crypto import (
    BadSignature,
    Cipher,
    CorruptHeader,
    CryptoError,
    Encryptor,
    Keyring,
    NotARecipient,
    ReorderedChunk,
    TamperedChunk,
    TrailingData,
    TruncatedPayload,
    UnknownSender,
    UnknownVersion,
    aes_gcm_available,
    decrypt_bytes,
    encrypt_bytes,
    read_header,
)

CS = 1024  # small chunks so boundaries and multi-chunk cases stay cheap
CIPHERS = [Cipher.XCHACHA20POLY1305] + ([Cipher.AES256GCM] if aes_gcm_available() else [])


@pytest.fixture(scope="module")
def orgs() -> dict[str, Keyring]:
    return {name: Keyring.generate() for name in ("alice", "bob", "carol", "mallory")}


def _env(orgs: dict[str, Keyring], data: bytes, *, cipher: Cipher | None = None, cs: int = CS) -> bytes:
    return encrypt_bytes(
        data, orgs["alice"].current, [orgs["bob"].current.public], chunk_size=cs, cipher=cipher
    )


def _open(orgs: dict[str, Keyring], blob: bytes) -> bytes:
    return decrypt_bytes(blob, orgs["bob"], orgs["alice"].current.public)


@pytest.mark.parametrize("cipher", CIPHERS)
@pytest.mark.parametrize("size", [0, 1, CS - 1, CS, CS + 1, 2 * CS, 3 * CS - 1, 3 * CS + 7])
def test_round_trip_sizes_at_chunk_boundaries(orgs: dict[str, Keyring], cipher: Cipher, size: int) -> None:
    data = os.urandom(size)
    blob = _env(orgs, data, cipher=cipher)
    if size >= 16:
        assert data[:16] not in blob
    assert _open(orgs, blob) == data
    lay = layout(blob)
    assert len(lay.frames) == max(1, -(-size // CS))  # exact multiples get no extra empty chunk
    assert read_header(blob).cipher is cipher


def test_default_chunk_size_round_trip(orgs: dict[str, Keyring]) -> None:
    data = os.urandom((1 << 20) * 2 + 3)
    blob = encrypt_bytes(data, orgs["alice"].current, [orgs["bob"].current.public])
    assert _open(orgs, blob) == data
    assert read_header(blob).chunk_size == 1 << 20


def test_several_recipients_share_one_payload(orgs: dict[str, Keyring]) -> None:
    data = os.urandom(5 * CS + 3)
    names = ("bob", "carol", "alice")
    recipients = [orgs[n].current.public for n in names]
    blob = encrypt_bytes(data, orgs["alice"].current, recipients, chunk_size=CS)
    header = read_header(blob)
    assert header.recipient_key_ids == tuple(orgs[n].current.key_id for n in names)
    # One payload: adding recipients adds only a 96-byte sealed key entry each.
    single = _env(orgs, data)
    assert len(blob) - len(single) == 2 * 96
    for name in names:
        assert decrypt_bytes(blob, orgs[name], orgs["alice"].current.public) == data
    with pytest.raises(NotARecipient, match="none of our keys"):
        decrypt_bytes(blob, orgs["mallory"], orgs["alice"].current.public)


def test_duplicate_recipients_are_sealed_once(orgs: dict[str, Keyring]) -> None:
    bob = orgs["bob"].current.public
    blob = encrypt_bytes(b"x", orgs["alice"].current, [bob, bob])
    assert read_header(blob).recipient_key_ids == (bob.key_id,)


def test_no_recipients_is_an_error(orgs: dict[str, Keyring]) -> None:
    with pytest.raises(CryptoError, match="at least one recipient"):
        encrypt_bytes(b"x", orgs["alice"].current, [])
    with pytest.raises(CryptoError, match="chunk size"):
        encrypt_bytes(b"x", orgs["alice"].current, [orgs["bob"].current.public], chunk_size=0)


def test_read_header_names_sender_and_recipients(orgs: dict[str, Keyring]) -> None:
    blob = _env(orgs, b"hello")
    header = read_header(blob[:300])
    assert header.version == 1
    assert header.sender_key_id == orgs["alice"].current.key_id
    assert header.recipient_key_ids == (orgs["bob"].current.key_id,)
    assert header.chunk_size == CS and header.size == 29 + 96
    with pytest.raises(TruncatedPayload, match="needs 125 bytes"):
        read_header(blob[:100])
    with pytest.raises(TruncatedPayload, match="needs 29 bytes"):
        read_header(blob[:10])


def test_sender_lookup_by_key_id(orgs: dict[str, Keyring]) -> None:
    blob = _env(orgs, b"data")
    seen: list[str] = []

    def lookup(key_id: str) -> object:
        seen.append(key_id)
        return orgs["alice"].current.public if key_id == orgs["alice"].current.key_id else None

    assert decrypt_bytes(blob, orgs["bob"], lookup) == b"data"  # type: ignore[arg-type]
    assert seen == [orgs["alice"].current.key_id]


def test_unknown_sender(orgs: dict[str, Keyring]) -> None:
    blob = _env(orgs, b"data")
    with pytest.raises(UnknownSender, match="is not known"):
        decrypt_bytes(blob, orgs["bob"], lambda _key_id: None)
    with pytest.raises(UnknownSender, match="expected sender key"):
        decrypt_bytes(blob, orgs["bob"], orgs["carol"].current.public)
    with pytest.raises(UnknownSender, match="returned key"):
        decrypt_bytes(blob, orgs["bob"], lambda _key_id: orgs["carol"].current.public)


# ---- tampering ----------------------------------------------------------------------------------


def _three_chunks(orgs: dict[str, Keyring]) -> bytes:
    return _env(orgs, os.urandom(3 * CS - 10))


def test_flipped_ciphertext_byte_is_a_tampered_chunk(orgs: dict[str, Keyring]) -> None:
    blob = _three_chunks(orgs)
    lay = layout(blob)
    with pytest.raises(TamperedChunk, match="chunk 1 failed authentication"):
        _open(orgs, flip(blob, lay.frame_offset(1) + 13 + 100))


def test_flipped_tag_byte_is_a_tampered_chunk(orgs: dict[str, Keyring]) -> None:
    blob = _three_chunks(orgs)
    lay = layout(blob)
    with pytest.raises(TamperedChunk, match="chunk 2 failed authentication"):
        _open(orgs, flip(blob, lay.frame_offset(3) - 1))


def test_reordered_chunks(orgs: dict[str, Keyring]) -> None:
    lay = layout(_three_chunks(orgs))
    lay.frames[0], lay.frames[1] = lay.frames[1], lay.frames[0]
    with pytest.raises(ReorderedChunk, match="chunk 1 arrived at position 0"):
        _open(orgs, lay.join())


def test_dropped_middle_chunk_reads_as_reordered(orgs: dict[str, Keyring]) -> None:
    lay = layout(_three_chunks(orgs))
    del lay.frames[1]
    with pytest.raises(ReorderedChunk, match="chunk 2 arrived at position 1"):
        _open(orgs, lay.join())


def test_rewritten_chunk_index_fails_authentication(orgs: dict[str, Keyring]) -> None:
    """Swapping chunks and relabeling their clear-text indexes still fails: the nonce binds the index."""
    lay = layout(_three_chunks(orgs))
    f0, f1 = lay.frames[0], lay.frames[1]
    lay.frames[0] = struct.pack(">Q", 0) + f1[8:]
    lay.frames[1] = struct.pack(">Q", 1) + f0[8:]
    with pytest.raises(TamperedChunk, match="chunk 0"):
        _open(orgs, lay.join())


@pytest.mark.parametrize(
    ("cut", "needle"),
    [
        (lambda lay: len(lay.header) - 5, "inside its header"),
        (lambda lay: 3, "inside its header"),
        (lambda lay: len(lay.header), "before any chunk"),
        (lambda lay: lay.frame_offset(1), "after chunk 0, which is not the final chunk"),
        (lambda lay: lay.frame_offset(2), "after chunk 1, which is not the final chunk"),
        (lambda lay: lay.frame_offset(1) + 5, "inside chunk 1"),
        (lambda lay: lay.frame_offset(1) + 40, "inside chunk 1"),
        (lambda lay: lay.frame_offset(3), "before the signature trailer"),
        (lambda lay: lay.frame_offset(3) + 63, "before the signature trailer"),
    ],
)
def test_truncation_anywhere_is_detected(orgs: dict[str, Keyring], cut: object, needle: str) -> None:
    blob = _three_chunks(orgs)
    lay = layout(blob)
    at = cut(lay)  # type: ignore[operator]
    with pytest.raises(TruncatedPayload, match=needle):
        _open(orgs, blob[:at])


def test_truncation_disguised_with_a_final_flag_fails(orgs: dict[str, Keyring]) -> None:
    """Cutting after chunk 1 and marking it final (plus any trailer) breaks chunk 1's nonce."""
    lay = layout(_three_chunks(orgs))
    f1 = bytearray(lay.frames[1])
    f1[8] |= 1
    forged = lay.header + lay.frames[0] + bytes(f1) + lay.trailer
    with pytest.raises(TamperedChunk, match="chunk 1 failed authentication"):
        _open(orgs, forged)


def test_spliced_chunk_from_another_envelope(orgs: dict[str, Keyring]) -> None:
    one, two = layout(_three_chunks(orgs)), layout(_three_chunks(orgs))
    one.frames[1] = two.frames[1]
    with pytest.raises(TamperedChunk, match="spliced"):
        _open(orgs, one.join())


def test_header_change_breaks_the_chunks(orgs: dict[str, Keyring]) -> None:
    """Chunks are bound to the header hash: editing another recipient's sealed key breaks chunk 0."""
    blob = encrypt_bytes(
        os.urandom(100), orgs["alice"].current, [orgs["bob"].current.public, orgs["carol"].current.public]
    )
    carol_entry = 29 + 96 + 16 + 5
    with pytest.raises(TamperedChunk, match="chunk 0"):
        _open(orgs, flip(blob, carol_entry))
    bob_entry = 29 + 16 + 5
    with pytest.raises(CorruptHeader, match="does not open"):
        _open(orgs, flip(blob, bob_entry))


def test_bad_signature_byte(orgs: dict[str, Keyring]) -> None:
    blob = _three_chunks(orgs)
    with pytest.raises(BadSignature, match=orgs["alice"].current.key_id):
        _open(orgs, flip(blob, len(blob) - 1))


def test_signature_by_another_key_is_refused(orgs: dict[str, Keyring]) -> None:
    """Mallory re-signs Alice's header and chunks with her own key: the envelope still names Alice."""
    blob = _three_chunks(orgs)
    lay = layout(blob)
    from vfed.common.crypto.format import FramesHash, header_hash, signed_message

    tags = FramesHash(committed=False)
    for frame in lay.frames:
        tags.update(frame[:13], frame[13:])
    message = signed_message(header_hash(lay.header), tags.digest())
    orgs["alice"].current.public.verify(message, lay.trailer)  # the test rebuilt what Alice signed
    lay.trailer = orgs["mallory"].current.sign(message)
    with pytest.raises(BadSignature):
        _open(orgs, lay.join())


def test_trailing_bytes_after_the_signature(orgs: dict[str, Keyring]) -> None:
    with pytest.raises(TrailingData, match="unexpected bytes"):
        _open(orgs, _three_chunks(orgs) + b"\x00")


def test_header_fields_are_checked(orgs: dict[str, Keyring]) -> None:
    blob = _env(orgs, b"abc")
    with pytest.raises(CorruptHeader, match="bad magic"):
        _open(orgs, b"PK\x03\x04" + blob[4:])
    with pytest.raises(CorruptHeader, match="bad magic"):
        _open(orgs, b"{}")
    with pytest.raises(UnknownVersion, match="version 2"):
        _open(orgs, blob[:4] + b"\x02" + blob[5:])
    with pytest.raises(CorruptHeader, match="unknown cipher id 9"):
        _open(orgs, blob[:5] + b"\x09" + blob[6:])
    with pytest.raises(CorruptHeader, match="chunk size 0"):
        _open(orgs, blob[:7] + b"\x00\x00\x00\x00" + blob[11:])
    with pytest.raises(CorruptHeader, match="no recipients"):
        _open(orgs, blob[:27] + b"\x00\x00" + blob[29:])
    with pytest.raises(CorruptHeader, match="unknown flag bits 0x80"):
        _open(orgs, blob[:6] + b"\x80" + blob[7:])
    oversized = blob[:7] + struct.pack(">I", (16 << 20) + 1) + blob[11:]
    with pytest.raises(CorruptHeader, match="outside"):
        _open(orgs, oversized)


def test_frame_length_lies_are_caught_before_reading_the_body(orgs: dict[str, Keyring]) -> None:
    lay = layout(_three_chunks(orgs))
    head = FRAME_HEAD.pack(0, 0, CS + 1)
    lay.frames[0] = head + lay.frames[0][13:]
    with pytest.raises(TamperedChunk, match=f"claims {CS + 1} bytes"):
        _open(orgs, lay.join())
    lay = layout(_three_chunks(orgs))
    lay.frames[0] = FRAME_HEAD.pack(0, 0x80, CS) + lay.frames[0][13:]
    with pytest.raises(TamperedChunk, match="unknown flag bits"):
        _open(orgs, lay.join())


def test_encryptor_refuses_use_after_finish(orgs: dict[str, Keyring]) -> None:
    enc = Encryptor(orgs["alice"].current, [orgs["bob"].current.public])
    pieces = enc.finish()
    assert _open(orgs, b"".join(pieces)) == b""
    with pytest.raises(CryptoError, match="already finished"):
        enc.feed(b"more")


def test_cipher_fallback_without_aes_ni(orgs: dict[str, Keyring], monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulates a CPU without AES-NI (this machine has it, so libsodium's probe is patched out):
    new envelopes fall back to XChaCha20-Poly1305, and AES-GCM envelopes fail with a clear error."""
    from vfed.common.crypto import UnsupportedCipher, default_cipher
    from vfed.common.crypto import format as fmt

    aes_blob = _env(orgs, b"payload", cipher=Cipher.AES256GCM) if aes_gcm_available() else None
    monkeypatch.setattr(fmt, "aes_gcm_available", lambda: False)
    assert default_cipher() is Cipher.XCHACHA20POLY1305
    blob = encrypt_bytes(b"payload", orgs["alice"].current, [orgs["bob"].current.public])
    assert read_header(blob).cipher is Cipher.XCHACHA20POLY1305
    assert _open(orgs, blob) == b"payload"
    if aes_blob is not None:
        with pytest.raises(UnsupportedCipher, match="AES-NI"):
            _open(orgs, aes_blob)


# ---- the co-recipient forgery that commit mode exists for ---------------------------------------


def _gf_mult(x: int, y: int) -> int:
    """GCM's GF(2^128) product (NIST SP 800-38D, algorithm 1; bit 0 is the most significant)."""
    z, v = 0, y
    for i in range(128):
        if (x >> (127 - i)) & 1:
            z ^= v
        v = (v >> 1) ^ (0xE1 << 120) if v & 1 else v >> 1
    return z


def _forge_same_tag(frame: bytes, content_key: bytes) -> bytes:
    """Change ciphertext blocks 0 and 2 of an AES-GCM frame so that its tag stays valid.

    Knowing the key gives H^2 from two one-block tags under any nonce; a change d in block 0 is then
    cancelled in GHASH by d * H^2 in block 2. This is why tags alone do not commit to the ciphertext.
    """
    import nacl.bindings as nb

    nonce = b"\x00" * 12
    one = (1 << 127).to_bytes(16, "big")  # the field's multiplicative identity
    t0 = nb.crypto_aead_aes256gcm_encrypt(b"\x00" * 16, None, nonce, content_key)[-16:]
    t1 = nb.crypto_aead_aes256gcm_encrypt(one, None, nonce, content_key)[-16:]
    h_squared = int.from_bytes(t0, "big") ^ int.from_bytes(t1, "big")
    delta_a = int.from_bytes(b"forged by carol!", "big")
    delta_b = _gf_mult(delta_a, h_squared)
    body = bytearray(frame)
    for offset, delta in ((13, delta_a), (13 + 32, delta_b)):
        block = int.from_bytes(body[offset : offset + 16], "big") ^ delta
        body[offset : offset + 16] = block.to_bytes(16, "big")
    return bytes(body)


@pytest.mark.skipif(not aes_gcm_available(), reason="the forgery is shown for AES-GCM")
def test_co_recipient_forgery_is_caught_only_in_commit_mode(orgs: dict[str, Keyring]) -> None:
    """Carol, a co-recipient, learns the content key and rewrites Alice's chunk for Bob keeping the
    tag. Signing tags only (commit=False) lets it through; the default for several recipients
    (commit=True, SHA-256 over all frame bytes) rejects it with BadSignature."""
    import nacl.bindings as nb

    alice, bob, carol = orgs["alice"], orgs["bob"], orgs["carol"]
    data = bytes(range(256)) * 8
    recipients = [bob.current.public, carol.current.public]
    results: dict[bool | None, bytes | BadSignature] = {}
    for commit in (False, None):
        blob = encrypt_bytes(data, alice.current, recipients, chunk_size=CS, commit=commit)
        header = read_header(blob)
        sealed = header.sealed_keys[header.recipient_key_ids.index(carol.current.key_id)]
        key = nb.crypto_box_seal_open(sealed, carol.current.public.x25519, carol.current.x25519_secret)
        lay = layout(blob)
        lay.frames[0] = _forge_same_tag(lay.frames[0], key)
        try:
            results[commit] = decrypt_bytes(lay.join(), bob, alice.current.public)
        except BadSignature as exc:
            results[commit] = exc
    forged = results[False]
    assert isinstance(forged, bytes) and forged != data and forged[16:32] == data[16:32]
    assert isinstance(results[None], BadSignature)


def test_commit_mode_defaults_and_round_trips(orgs: dict[str, Keyring]) -> None:
    one = encrypt_bytes(b"x" * 3000, orgs["alice"].current, [orgs["bob"].current.public], chunk_size=CS)
    two = encrypt_bytes(
        b"x" * 3000,
        orgs["alice"].current,
        [orgs["bob"].current.public, orgs["carol"].current.public],
        chunk_size=CS,
    )
    forced = _env(orgs, b"x" * 3000)
    assert not read_header(one).committed and read_header(two).committed
    assert decrypt_bytes(two, orgs["carol"], orgs["alice"].current.public) == b"x" * 3000
    assert _open(orgs, forced) == b"x" * 3000
    single_committed = encrypt_bytes(b"y", orgs["alice"].current, [orgs["bob"].current.public], commit=True)
    assert read_header(single_committed).committed
    assert _open(orgs, single_committed) == b"y"
    with pytest.raises(BadSignature):
        _open(orgs, flip(two, len(two) - 1))
