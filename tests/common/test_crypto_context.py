"""Envelopes bound to a context (a run or task id): every entry point, each mismatch, edits in transit."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import random
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import NoReturn

import nacl.bindings as nb
import pytest
from crypto_testkit import flip, layout

from vfed.common.crypto import (
    BadSignature,
    Cipher,
    ContextMismatch,
    CorruptHeader,
    CryptoError,
    Decryptor,
    Encryptor,
    Keyring,
    NotARecipient,
    PublicKey,
    TamperedChunk,
    TruncatedPayload,
    UnknownSender,
    context_digest,
    decrypt_bytes,
    decrypt_file,
    decrypt_fileobj,
    decrypt_stream,
    encrypt_bytes,
    encrypt_file,
    encrypt_fileobj,
    encrypt_stream,
    header_size,
    read_header,
)
from vfed.common.crypto.engine import open_content_key
from vfed.common.crypto.format import FRAME_HEAD, HEADER_FIXED_BYTES, aead_for, header_hash

ALICE, BOB, CAROL = Keyring.generate(), Keyring.generate(), Keyring.generate()
CS = 4096
DATA = os.urandom(5 * CS + 17)  # six chunks, the final one 17 bytes
RUN_1, RUN_2 = b"run:1/task:7", b"run:2/task:7"
FIXED, DIGEST, ENTRY = HEADER_FIXED_BYTES, 32, 96

Sealer = Callable[[bytes, bytes | None, list[PublicKey], Path], bytes]
Opener = Callable[[bytes, bytes | None, Path], bytes]


def _to(recipients: int) -> list[PublicKey]:
    return [BOB.current.public, CAROL.current.public][:recipients]


def _pieces(data: bytes, seed: int = 1) -> Iterable[bytes]:
    rng, pos = random.Random(seed), 0
    while pos < len(data):
        step = rng.randint(1, 3 * CS)
        yield data[pos : pos + step]
        pos += step


async def _apieces(data: bytes) -> AsyncIterator[bytes]:
    for piece in _pieces(data):
        yield piece


# --- every encrypt entry point: (plaintext, context, recipients, scratch dir) -> envelope ---------------


def _seal_bytes(threads: int) -> Sealer:
    def seal(data: bytes, ctx: bytes | None, to: list[PublicKey], tmp: Path) -> bytes:
        return encrypt_bytes(data, ALICE.current, to, chunk_size=CS, threads=threads, context=ctx)

    return seal


def _seal_stream(data: bytes, ctx: bytes | None, to: list[PublicKey], tmp: Path) -> bytes:
    async def run() -> bytes:
        stream = encrypt_stream(_apieces(data), ALICE.current, to, chunk_size=CS, context=ctx)
        return b"".join([piece async for piece in stream])

    return asyncio.run(run())


def _seal_fileobj(threads: int) -> Sealer:
    def seal(data: bytes, ctx: bytes | None, to: list[PublicKey], tmp: Path) -> bytes:
        out = io.BytesIO()
        src = io.BytesIO(data)
        encrypt_fileobj(src, out, ALICE.current, to, chunk_size=CS, threads=threads, context=ctx)
        return out.getvalue()

    return seal


def _seal_file(threads: int) -> Sealer:
    def seal(data: bytes, ctx: bytes | None, to: list[PublicKey], tmp: Path) -> bytes:
        (tmp / "plain.in").write_bytes(data)
        encrypt_file(
            tmp / "plain.in", tmp / "sealed", ALICE.current, to, chunk_size=CS, threads=threads, context=ctx
        )
        return (tmp / "sealed").read_bytes()

    return seal


def _seal_pieces(data: bytes, ctx: bytes | None, to: list[PublicKey], tmp: Path) -> bytes:
    enc = Encryptor(ALICE.current, to, chunk_size=CS, context=ctx)
    out = [piece for part in _pieces(data) for piece in enc.feed(part)]
    return b"".join(out + enc.finish())


SEALERS: dict[str, Sealer] = {
    "bytes": _seal_bytes(1),
    "bytes-t2": _seal_bytes(2),
    "stream": _seal_stream,
    "fileobj": _seal_fileobj(1),
    "fileobj-t2": _seal_fileobj(2),
    "file": _seal_file(1),
    "file-t2": _seal_file(2),
    "pieces": _seal_pieces,
}


# --- every decrypt entry point: (envelope, context, scratch dir) -> plaintext ---------------------------
# On an error each opener raises it with `.released` set to the plaintext that had left the API by then
# (returned, yielded, written to the destination), so tests can check that nothing leaked.


def _raise_with(exc: CryptoError, released: bytes) -> NoReturn:
    exc.released = released  # type: ignore[attr-defined]
    raise exc


def _open_bytes(threads: int) -> Opener:
    def open_(blob: bytes, ctx: bytes | None, tmp: Path) -> bytes:
        try:
            return decrypt_bytes(blob, BOB, ALICE.current.public, threads=threads, context=ctx)
        except CryptoError as exc:
            _raise_with(exc, b"")

    return open_


def _open_stream(blob: bytes, ctx: bytes | None, tmp: Path) -> bytes:
    got: list[bytes] = []

    async def run() -> None:
        async for piece in decrypt_stream(_apieces(blob), BOB, ALICE.current.public, context=ctx):
            got.append(piece)

    try:
        asyncio.run(run())
    except CryptoError as exc:
        _raise_with(exc, b"".join(got))
    return b"".join(got)


def _open_fileobj(threads: int) -> Opener:
    def open_(blob: bytes, ctx: bytes | None, tmp: Path) -> bytes:
        out = io.BytesIO()
        try:
            header = decrypt_fileobj(
                io.BytesIO(blob), out, BOB, ALICE.current.public, threads=threads, context=ctx
            )
        except CryptoError as exc:
            _raise_with(exc, out.getvalue())
        assert header.context_digest == (context_digest(ctx) if ctx is not None else None)
        return out.getvalue()

    return open_


def _open_file(threads: int) -> Opener:
    def open_(blob: bytes, ctx: bytes | None, tmp: Path) -> bytes:
        src, dst = tmp / "sealed.in", tmp / "plain.out"
        src.write_bytes(blob)
        try:
            decrypt_file(src, dst, BOB, ALICE.current.public, threads=threads, context=ctx)
        except CryptoError as exc:
            assert sorted(p.name for p in tmp.iterdir()) == ["sealed.in"]  # no output, no temp file
            _raise_with(exc, b"")
        plain = dst.read_bytes()
        dst.unlink()
        return plain

    return open_


def _open_pieces(blob: bytes, ctx: bytes | None, tmp: Path) -> bytes:
    dec = Decryptor(BOB, ALICE.current.public, context=ctx)
    got: list[bytes] = []
    try:
        for part in _pieces(blob, seed=2):
            got += dec.feed(part)
        dec.finish()
    except CryptoError as exc:
        _raise_with(exc, b"".join(got))
    return b"".join(got)


OPENERS: dict[str, Opener] = {
    "bytes": _open_bytes(1),
    "bytes-t2": _open_bytes(2),
    "stream": _open_stream,
    "fileobj": _open_fileobj(1),
    "fileobj-t2": _open_fileobj(2),
    "file": _open_file(1),
    "file-t2": _open_file(2),
    "pieces": _open_pieces,
}
# Openers that write as they go: a signature failure comes after the non-final chunks were released.
STREAMING = {"stream", "fileobj", "fileobj-t2", "pieces"}


def _fails(opener: Opener, blob: bytes, ctx: bytes | None, tmp: Path, error: type[CryptoError]) -> bytes:
    """Open `blob`, expecting exactly `error`; returns the plaintext released before it was raised."""
    with pytest.raises(CryptoError) as info:
        opener(blob, ctx, tmp)
    assert type(info.value) is error, repr(info.value)
    released: bytes = info.value.released  # type: ignore[attr-defined]
    return released


@pytest.fixture(scope="module")
def bound() -> bytes:
    return encrypt_bytes(DATA, ALICE.current, _to(1), chunk_size=CS, context=RUN_1)


@pytest.fixture(scope="module")
def unbound() -> bytes:
    return encrypt_bytes(DATA, ALICE.current, _to(1), chunk_size=CS)


# --- the format -------------------------------------------------------------------------------------------


def test_context_digest_is_personalised_blake2b() -> None:
    want = hashlib.blake2b(RUN_1, digest_size=32, person=b"vfed-env1-ctx").digest()
    assert context_digest(RUN_1) == want
    assert context_digest(b"") != context_digest(b"\x00")
    with pytest.raises(CryptoError, match="must be bytes"):
        context_digest("run:1")  # type: ignore[arg-type]


@pytest.mark.parametrize("recipients", [1, 2])
def test_unbound_header_layout_is_unchanged(recipients: int) -> None:
    blob = encrypt_bytes(DATA, ALICE.current, _to(recipients), chunk_size=CS)
    size = FIXED + ENTRY * recipients
    assert header_size(blob[:FIXED]) == size
    assert blob[6] == (1 if recipients > 1 else 0)  # only the committed bit, as before
    header = read_header(blob[:size])
    assert header.size == size and header.context_digest is None
    assert blob[FIXED : FIXED + 16] == bytes.fromhex(BOB.current.key_id)  # entries right after the fixed part
    assert len(blob) == size + 6 * (13 + 16) + len(DATA) + 64
    assert layout(blob).header == blob[:size]


@pytest.mark.parametrize("recipients", [1, 2])
def test_bound_header_carries_the_digest_before_the_recipients(recipients: int) -> None:
    blob = encrypt_bytes(DATA, ALICE.current, _to(recipients), chunk_size=CS, context=RUN_1)
    size = FIXED + DIGEST + ENTRY * recipients
    assert header_size(blob[:FIXED]) == size
    assert blob[6] == (3 if recipients > 1 else 2)
    assert blob[FIXED : FIXED + DIGEST] == context_digest(RUN_1)
    assert blob[FIXED + DIGEST : FIXED + DIGEST + 16] == bytes.fromhex(BOB.current.key_id)
    header = read_header(blob[:size])
    assert header.size == size
    assert header.context_digest == context_digest(RUN_1)
    assert header.recipient_key_ids == tuple(k.key_id for k in _to(recipients))
    assert header.committed is (recipients > 1)
    with pytest.raises(TruncatedPayload, match=f"needs {size} bytes"):
        read_header(blob[: size - 1])
    with pytest.raises(TruncatedPayload):
        read_header(blob[: FIXED + DIGEST - 1])


def test_unknown_header_flag_bits_still_fail(unbound: bytes, bound: bytes) -> None:
    for blob, flags in [(unbound, 0x04), (bound, 0x06), (bound, 0x82)]:
        with pytest.raises(CorruptHeader, match=f"unknown flag bits {flags:#04x}"):
            decrypt_bytes(blob[:6] + bytes([flags]) + blob[7:], BOB, ALICE.current.public, context=RUN_1)
        with pytest.raises(CorruptHeader):
            header_size(blob[:6] + bytes([flags]) + blob[7:FIXED])


def test_empty_context_is_a_context() -> None:
    blob = encrypt_bytes(b"x", ALICE.current, _to(1), context=b"")
    assert read_header(blob).context_digest == context_digest(b"")
    assert decrypt_bytes(blob, BOB, ALICE.current.public, context=b"") == b"x"
    with pytest.raises(ContextMismatch):
        decrypt_bytes(blob, BOB, ALICE.current.public)


# --- round trips over every encrypt x decrypt entry point --------------------------------------------


@pytest.mark.parametrize("sealer", sorted(SEALERS))
def test_every_encrypt_entry_point_binds(sealer: str, tmp_path: Path) -> None:
    for ctx, recipients in [(RUN_1, 1), (RUN_1, 2), (None, 1)]:
        blob = SEALERS[sealer](DATA, ctx, _to(recipients), tmp_path)
        header = read_header(blob)
        assert header.context_digest == (context_digest(ctx) if ctx is not None else None)
        assert header.size == FIXED + (DIGEST if ctx is not None else 0) + ENTRY * recipients
        assert blob[6] & 0x02 == (0x02 if ctx is not None else 0)
        assert decrypt_bytes(blob, BOB, ALICE.current.public, context=ctx) == DATA


@pytest.mark.parametrize("opener", sorted(OPENERS))
@pytest.mark.parametrize("sealer", sorted(SEALERS))
def test_round_trip_with_the_right_context(sealer: str, opener: str, tmp_path: Path) -> None:
    (tmp_path / "enc").mkdir()
    (tmp_path / "dec").mkdir()
    blob = SEALERS[sealer](DATA, RUN_1, _to(1), tmp_path / "enc")
    assert OPENERS[opener](blob, RUN_1, tmp_path / "dec") == DATA


@pytest.mark.parametrize("opener", sorted(OPENERS))
@pytest.mark.parametrize("size", [0, 1, CS, 3 * CS + 5])
def test_round_trip_sizes_two_recipients(opener: str, size: int, tmp_path: Path) -> None:
    data = DATA[:size]
    blob = encrypt_bytes(data, ALICE.current, _to(2), chunk_size=CS, threads=2, context=RUN_2)
    assert OPENERS[opener](blob, RUN_2, tmp_path) == data
    assert OPENERS[opener](encrypt_bytes(data, ALICE.current, _to(2), chunk_size=CS), None, tmp_path) == data


# --- the three mismatches, on every decrypt entry point ---------------------------------------------------


@pytest.mark.parametrize("opener", sorted(OPENERS))
def test_envelope_of_another_context(opener: str, bound: bytes, tmp_path: Path) -> None:
    with pytest.raises(ContextMismatch, match="envelope belongs to another context") as info:
        OPENERS[opener](bound, RUN_2, tmp_path)
    assert info.value.released == b""  # type: ignore[attr-defined]


@pytest.mark.parametrize("opener", sorted(OPENERS))
def test_unbound_envelope_where_a_context_is_expected(opener: str, unbound: bytes, tmp_path: Path) -> None:
    with pytest.raises(ContextMismatch, match="envelope is not bound to a context; expected") as info:
        OPENERS[opener](unbound, RUN_1, tmp_path)
    assert info.value.released == b""  # type: ignore[attr-defined]


@pytest.mark.parametrize("opener", sorted(OPENERS))
def test_bound_envelope_where_none_is_named(opener: str, bound: bytes, tmp_path: Path) -> None:
    match = "envelope is bound to a context; the caller must name the one it expects"
    with pytest.raises(ContextMismatch, match=match) as info:
        OPENERS[opener](bound, None, tmp_path)
    assert info.value.released == b""  # type: ignore[attr-defined]


def test_context_is_checked_before_any_key_work(bound: bytes) -> None:
    """A mismatch wins over a sender we cannot resolve and over not being a recipient: no lookup, no
    sealed-key opening happens for an envelope of another context."""
    asked: list[str] = []

    def lookup(key_id: str) -> PublicKey | None:
        asked.append(key_id)
        return None

    stranger = Keyring.generate()
    for ctx in (RUN_2, None):
        with pytest.raises(ContextMismatch):
            decrypt_bytes(bound, stranger, lookup, context=ctx)
        dec = Decryptor(stranger, lookup, context=ctx)
        with pytest.raises(ContextMismatch):
            dec.feed(bound[: read_header(bound).size])  # the header alone is enough
    assert asked == []
    with pytest.raises(UnknownSender):
        decrypt_bytes(bound, BOB, lookup, context=RUN_1)
    with pytest.raises(NotARecipient):
        decrypt_bytes(bound, stranger, ALICE.current.public, context=RUN_1)


def test_context_must_be_bytes() -> None:
    with pytest.raises(CryptoError, match="must be bytes"):
        Encryptor(ALICE.current, _to(1), context="run:1")  # type: ignore[arg-type]
    with pytest.raises(CryptoError, match="must be bytes"):
        Decryptor(BOB, ALICE.current.public, context="run:1")  # type: ignore[arg-type]


# --- the binding edited in transit ------------------------------------------------------------------------


def _rebind(blob: bytes, digest: bytes | None) -> bytes:
    """`blob` with its header's context digest replaced (None: the binding removed), frames untouched."""
    size = read_header(blob).size
    flags = (blob[6] & ~0x02) | (0x02 if digest is not None else 0)
    entries = blob[FIXED + (DIGEST if blob[6] & 0x02 else 0) : size]
    return blob[:6] + bytes([flags]) + blob[7:FIXED] + (digest or b"") + entries + blob[size:]


@pytest.mark.parametrize("opener", sorted(OPENERS))
def test_edited_digest_is_another_context(opener: str, bound: bytes, tmp_path: Path) -> None:
    """Any edit of the digest bytes: the receiver that names the right run refuses it at the header."""
    for offset in (FIXED, FIXED + DIGEST - 1):
        released = _fails(OPENERS[opener], flip(bound, offset), RUN_1, tmp_path, ContextMismatch)
        assert released == b""


@pytest.mark.parametrize("opener", sorted(OPENERS))
def test_moving_an_envelope_to_another_context_fails_at_chunk_0(
    opener: str, bound: bytes, unbound: bytes, tmp_path: Path
) -> None:
    """The server swaps the digest for that of the run the receiver expects, strips the binding or adds
    one: the header hash in every chunk's AAD no longer matches, so chunk 0 fails and nothing is out."""
    for blob, ctx in [
        (_rebind(bound, context_digest(RUN_2)), RUN_2),
        (_rebind(bound, None), None),
        (_rebind(unbound, context_digest(RUN_1)), RUN_1),
    ]:
        assert read_header(blob).context_digest == (context_digest(ctx) if ctx is not None else None)
        released = _fails(OPENERS[opener], blob, ctx, tmp_path, TamperedChunk)
        assert released == b""
    with pytest.raises(TamperedChunk, match="chunk 0 failed authentication"):
        OPENERS[opener](_rebind(bound, context_digest(RUN_2)), RUN_2, tmp_path)


def _reseal_for(blob: bytes, keyring: Keyring, plain: bytes, digest: bytes) -> bytes:
    """What a recipient who holds the content key can do: rebind the header and re-encrypt every chunk
    under the new header hash, keeping the sender's signature (which it cannot remake)."""
    header = read_header(blob)
    key = open_content_key(header, keyring)
    moved = _rebind(blob, digest)
    new_header = moved[: read_header(moved).size]
    head_hash, aead = header_hash(new_header), aead_for(header.cipher)
    frames = layout(blob).frames
    out = [new_header]
    for index, frame in enumerate(frames):
        head = frame[: FRAME_HEAD.size]
        final = index == len(frames) - 1
        chunk = plain[index * header.chunk_size : (index + 1) * header.chunk_size]
        nonce = aead.nonce(index, final)
        out.append(head + nb.crypto_aead_xchacha20poly1305_ietf_encrypt(chunk, head_hash + head, nonce, key))
    return b"".join(out) + blob[-64:]


@pytest.mark.parametrize("opener", sorted(OPENERS))
@pytest.mark.parametrize("recipients", [1, 2])
def test_recipient_moving_an_envelope_fails_the_signature(
    opener: str, recipients: int, tmp_path: Path
) -> None:
    """Even with the content key the signature stops it; the final chunk is never released (the
    streaming openers have released the non-final chunks by then, as documented: discard them)."""
    blob = encrypt_bytes(
        DATA, ALICE.current, _to(recipients), chunk_size=CS, cipher=Cipher.XCHACHA20POLY1305, context=RUN_1
    )
    moved = _reseal_for(blob, BOB, DATA, context_digest(RUN_2))
    assert read_header(moved).context_digest == context_digest(RUN_2)
    released = _fails(OPENERS[opener], moved, RUN_2, tmp_path, BadSignature)
    assert DATA[: 5 * CS].startswith(released)  # whole non-final chunks at most
    assert len(released) % CS == 0
    if opener not in STREAMING:
        assert released == b""
    # the same re-encryption without moving it verifies: the failure above is the context's doing
    assert OPENERS[opener](_reseal_for(blob, BOB, DATA, context_digest(RUN_1)), RUN_1, tmp_path) == DATA
