"""Streaming envelopes: async iterators, binary file objects and atomic file helpers."""

from __future__ import annotations

import io
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from crypto_testkit import flip, layout

from vfed.common.crypto import (
    BadSignature,
    CryptoError,
    Decryptor,
    Keyring,
    TamperedChunk,
    TrailingData,
    TruncatedPayload,
    decrypt_bytes,
    decrypt_file,
    decrypt_fileobj,
    decrypt_stream,
    encrypt_bytes,
    encrypt_file,
    encrypt_fileobj,
    encrypt_stream,
)

CS = 4096


@pytest.fixture(scope="module")
def alice() -> Keyring:
    return Keyring.generate()


@pytest.fixture(scope="module")
def bob() -> Keyring:
    return Keyring.generate()


async def _pieces(data: bytes, seed: int, max_piece: int = 3 * CS) -> AsyncIterator[bytes]:
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        step = rng.randint(1, max_piece)
        yield data[pos : pos + step]
        pos += step


async def _collect(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([piece async for piece in stream])


@pytest.mark.parametrize("size", [0, 1, CS, 5 * CS + 17])
async def test_async_stream_round_trip_matches_bytes_api(alice: Keyring, bob: Keyring, size: int) -> None:
    data = os.urandom(size)
    recipients = [bob.current.public]
    blob = await _collect(encrypt_stream(_pieces(data, size), alice.current, recipients, chunk_size=CS))
    assert decrypt_bytes(blob, bob, alice.current.public) == data
    plain = await _collect(decrypt_stream(_pieces(blob, size + 1), bob, alice.current.public))
    assert plain == data
    # The bytes helper and the stream agree on layout (same number and sizes of frames).
    other = encrypt_bytes(data, alice.current, recipients, chunk_size=CS)
    assert [len(f) for f in layout(other).frames] == [len(f) for f in layout(blob).frames]


async def test_stream_accepts_plain_iterables(alice: Keyring, bob: Keyring) -> None:
    blob = await _collect(encrypt_stream([b"ab", b"", b"cd"], alice.current, [bob.current.public]))
    assert await _collect(decrypt_stream([blob], bob, alice.current.public)) == b"abcd"


async def test_stream_yields_chunks_before_the_end_and_raises_on_bad_signature(
    alice: Keyring, bob: Keyring
) -> None:
    """The documented trade-off: non-final chunks flow out after their AEAD check; the final chunk is
    held back until the signature verifies, so a consumer never sees a complete unsigned payload."""
    data = os.urandom(4 * CS)
    blob = encrypt_bytes(data, alice.current, [bob.current.public], chunk_size=CS)
    got: list[bytes] = []
    with pytest.raises(BadSignature):
        damaged = _pieces(flip(blob, len(blob) - 3), 7, max_piece=1000)
        async for piece in decrypt_stream(damaged, bob, alice.current.public):
            got.append(piece)
    assert b"".join(got) == data[: 3 * CS]


async def test_stream_detects_truncation_at_the_end(alice: Keyring, bob: Keyring) -> None:
    blob = encrypt_bytes(os.urandom(3 * CS), alice.current, [bob.current.public], chunk_size=CS)
    with pytest.raises(TruncatedPayload, match="before the signature trailer"):
        await _collect(decrypt_stream(_pieces(blob[:-64], 3), bob, alice.current.public))


def test_fileobj_round_trip(alice: Keyring, bob: Keyring) -> None:
    data = os.urandom(7 * CS + 5)
    sealed = io.BytesIO()
    written = encrypt_fileobj(io.BytesIO(data), sealed, alice.current, [bob.current.public], chunk_size=CS)
    assert written == len(sealed.getvalue())
    out = io.BytesIO()
    header = decrypt_fileobj(io.BytesIO(sealed.getvalue()), out, bob, alice.current.public)
    assert out.getvalue() == data
    assert header.sender_key_id == alice.current.key_id


def test_fileobj_trailing_data(alice: Keyring, bob: Keyring) -> None:
    blob = encrypt_bytes(b"x" * 10, alice.current, [bob.current.public], chunk_size=CS)
    with pytest.raises(TrailingData):
        decrypt_fileobj(io.BytesIO(blob + b"junk"), io.BytesIO(), bob, alice.current.public)


def test_file_helpers_round_trip(tmp_path: Path, alice: Keyring, bob: Keyring) -> None:
    data = os.urandom(9 * CS + 1)
    src, sealed, plain = tmp_path / "in.bin", tmp_path / "in.vfed", tmp_path / "out.bin"
    src.write_bytes(data)
    encrypt_file(src, sealed, alice.current, [bob.current.public], chunk_size=CS)
    header = decrypt_file(sealed, plain, bob, alice.current.public)
    assert plain.read_bytes() == data
    assert header.chunk_size == CS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.bin", "in.vfed", "out.bin"]


def test_decrypt_file_leaves_no_output_on_failure(tmp_path: Path, alice: Keyring, bob: Keyring) -> None:
    data = os.urandom(5 * CS)
    blob = encrypt_bytes(data, alice.current, [bob.current.public], chunk_size=CS)
    sealed, plain = tmp_path / "x.vfed", tmp_path / "x.out"
    plain.write_bytes(b"previous content")
    for damaged, error in [
        (flip(blob, len(blob) - 1), BadSignature),
        (flip(blob, layout(blob).frame_offset(4) + 20), TamperedChunk),
        (blob[:-1], TruncatedPayload),
    ]:
        sealed.write_bytes(damaged)
        with pytest.raises(error):
            decrypt_file(sealed, plain, bob, alice.current.public)
        assert plain.read_bytes() == b"previous content"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["x.out", "x.vfed"]


def test_decryptor_buffers_at_most_one_frame(alice: Keyring, bob: Keyring) -> None:
    """Memory stays within a chunk or two whatever the piece size (bench/crypto.py measures RSS)."""
    blob = encrypt_bytes(os.urandom(20 * CS), alice.current, [bob.current.public], chunk_size=CS)
    dec = Decryptor(bob, alice.current.public)
    peak = 0
    for pos in range(0, len(blob), 1000):
        dec.feed(blob[pos : pos + 1000])
        peak = max(peak, dec._buffer.size)
    dec.finish()
    assert dec.verified
    assert peak < CS + 1000 + 29


class _TrickleReader:
    """A reader without readinto that returns at most 1000 bytes per read, like a pipe or socket."""

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def read(self, size: int = -1) -> bytes:
        size = len(self._data) if size < 0 else min(size, 1000)
        piece = self._data[self._pos : self._pos + size]
        self._pos += len(piece)
        return piece


def test_fileobj_paths_handle_short_reads(alice: Keyring, bob: Keyring) -> None:
    data = os.urandom(6 * CS + 3)
    sealed = io.BytesIO()
    encrypt_fileobj(_TrickleReader(data), sealed, alice.current, [bob.current.public], chunk_size=CS)  # type: ignore[arg-type]
    blob = sealed.getvalue()
    assert [len(f) for f in layout(blob).frames] == [CS + 29] * 6 + [3 + 29]
    out = io.BytesIO()
    decrypt_fileobj(_TrickleReader(blob), out, bob, alice.current.public)  # type: ignore[arg-type]
    assert out.getvalue() == data


@pytest.mark.parametrize("cut", [3, 40, 140, 150, 200, 4300, 4400, -64, -10, -1])
def test_fileobj_truncation_errors_match_the_bytes_path(alice: Keyring, bob: Keyring, cut: int) -> None:
    blob = encrypt_bytes(os.urandom(3 * CS), alice.current, [bob.current.public], chunk_size=CS)
    with pytest.raises(TruncatedPayload) as from_bytes:
        decrypt_bytes(blob[:cut], bob, alice.current.public)
    with pytest.raises(TruncatedPayload) as from_file:
        decrypt_fileobj(io.BytesIO(blob[:cut]), io.BytesIO(), bob, alice.current.public)
    assert str(from_file.value) == str(from_bytes.value)


@pytest.mark.parametrize("offset", [200, 4200, -70, -5])
def test_fileobj_tamper_errors_match_the_bytes_path(alice: Keyring, bob: Keyring, offset: int) -> None:
    blob = encrypt_bytes(os.urandom(3 * CS), alice.current, [bob.current.public], chunk_size=CS)
    damaged = flip(blob, offset % len(blob))
    with pytest.raises(CryptoError) as from_bytes:
        decrypt_bytes(damaged, bob, alice.current.public)
    out = io.BytesIO()
    with pytest.raises(CryptoError) as from_file:
        decrypt_fileobj(io.BytesIO(damaged), out, bob, alice.current.public)
    assert type(from_file.value) is type(from_bytes.value)
    assert str(from_file.value) == str(from_bytes.value)
    assert len(out.getvalue()) < 3 * CS  # the final chunk never reaches the output unverified
