"""File objects with chunks in flight on the thread pool: same bytes, same plaintext, same errors."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO, cast

import pytest
from crypto_testkit import TAG, flip, layout, twin
from hypothesis import given, settings
from hypothesis import strategies as st

from vfed.common.crypto import (
    CryptoError,
    Encryptor,
    Keyring,
    TamperedChunk,
    decrypt_bytes,
    decrypt_file,
    decrypt_fileobj,
    encrypt_bytes,
    encrypt_file,
    encrypt_fileobj,
)
from vfed.common.crypto.parallel import MIN_PARALLEL_CHUNK
from vfed.common.crypto.pipeline import encrypt_pipelined

ALICE, BOB, CAROL = Keyring.generate(), Keyring.generate(), Keyring.generate()
CS = MIN_PARALLEL_CHUNK
PAYLOAD = os.urandom(9 * CS + 77)
SIZES = [0, 1, CS - 1, CS, CS + 1, 2 * CS, 4 * CS - 1, 4 * CS, 4 * CS + 1, 9 * CS + 77]


class _Trickle:
    """A pipe-like source without readinto that returns at most `step` bytes per read."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data, self._pos, self._step = data, 0, step

    def read(self, size: int = -1) -> bytes:
        size = self._step if size < 0 else min(size, self._step)
        piece = self._data[self._pos : self._pos + size]
        self._pos += len(piece)
        return piece


def Trickle(data: bytes, step: int) -> BinaryIO:
    return cast(BinaryIO, _Trickle(data, step))


def _seal_file(data: bytes, threads: int | None, commit: bool | None = None) -> bytes:
    out = io.BytesIO()
    to = [BOB.current.public, CAROL.current.public] if commit else [BOB.current.public]
    src = io.BytesIO(data)
    encrypt_fileobj(src, out, ALICE.current, to, chunk_size=CS, commit=commit, threads=threads)
    return out.getvalue()


def _open_file(blob: bytes, threads: int | None) -> bytes:
    out = io.BytesIO()
    decrypt_fileobj(io.BytesIO(blob), out, BOB, ALICE.current.public, threads=threads)
    return out.getvalue()


def _failure(blob: bytes, threads: int | None) -> tuple[type[CryptoError], str, bytes]:
    """The error, and what had been written to the output when it came."""
    out = io.BytesIO()
    with pytest.raises(CryptoError) as info:
        decrypt_fileobj(io.BytesIO(blob), out, BOB, ALICE.current.public, threads=threads)
    return type(info.value), str(info.value), out.getvalue()


@pytest.mark.parametrize("size", SIZES)
def test_pipelined_files_round_trip_either_way(size: int) -> None:
    data = PAYLOAD[:size]
    serial = _seal_file(data, 1)
    for threads in (2, 3, 4):
        piped = _seal_file(data, threads)
        assert len(piped) == len(serial)
        assert _open_file(piped, 1) == data
        assert _open_file(serial, threads) == data
        assert decrypt_bytes(piped, BOB, ALICE.current.public, threads=threads) == data
    assert _open_file(encrypt_bytes(data, ALICE.current, [BOB.current.public], chunk_size=CS), 2) == data


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("commit", [False, True])
def test_pipelined_encryption_writes_the_same_bytes(size: int, commit: bool) -> None:
    data = PAYLOAD[:size]
    first = Encryptor(ALICE.current, [BOB.current.public], chunk_size=CS, commit=commit)
    expected = twin(first).seal_all(data, threads=1)
    for threads in (2, 3):
        out = io.BytesIO()
        written = encrypt_pipelined(Trickle(data, 5000), out, twin(first), CS, threads)
        assert (written, out.getvalue()) == (len(expected), expected)


def test_committed_two_recipient_file_round_trips_on_threads() -> None:
    blob = _seal_file(PAYLOAD, 3, commit=True)
    out = io.BytesIO()
    decrypt_fileobj(io.BytesIO(blob), out, CAROL, ALICE.current.public, threads=2)
    assert out.getvalue() == PAYLOAD


def _damaged_cases(blob: bytes) -> list[bytes]:
    parts = layout(blob)
    swapped = parts.frames.copy()
    swapped[4], swapped[5] = swapped[5], swapped[4]
    two_bad = flip(flip(blob, parts.frame_offset(6) + 30), parts.frame_offset(3) + 30)
    return [
        flip(blob, parts.frame_offset(0) + 20),  # first chunk
        flip(blob, parts.frame_offset(5) + len(parts.frames[5]) - TAG),  # a tag
        flip(blob, parts.frame_offset(9) + 20),  # the final chunk
        two_bad,  # chunks 3 and 6: 3 is named
        flip(blob, parts.frame_offset(2) + 12),  # a frame head's length
        parts.header + b"".join(swapped) + parts.trailer,
        blob[: parts.frame_offset(7) + 40],  # inside chunk 7
        blob[: parts.frame_offset(7)],  # between chunks
        blob[:-1],  # inside the trailer
        flip(blob, len(blob) - 3),  # bad signature
        blob + b"x",  # trailing data
    ]


def test_damage_fails_as_with_one_thread_and_writes_the_same_prefix() -> None:
    blob = _seal_file(PAYLOAD, 2)
    for damaged in _damaged_cases(blob):
        serial = _failure(damaged, 1)
        for threads in (2, 3, 5):
            assert _failure(damaged, threads) == serial
    kind, message, written = _failure(_damaged_cases(blob)[3], 4)
    assert (kind, message.split(" failed")[0]) == (TamperedChunk, "chunk 3")
    assert written == PAYLOAD[: 3 * CS]  # chunks 0-2 passed, nothing after the failure


def test_files_on_threads_and_the_final_chunk_only_after_the_signature(tmp_path: Path) -> None:
    src, sealed, plain = tmp_path / "in.bin", tmp_path / "in.vfed", tmp_path / "out.bin"
    src.write_bytes(PAYLOAD)
    encrypt_file(src, sealed, ALICE.current, [BOB.current.public], chunk_size=CS, threads=3)
    decrypt_file(sealed, plain, BOB, ALICE.current.public, threads=2)
    assert plain.read_bytes() == PAYLOAD
    blob = sealed.read_bytes()
    _, _, written = _failure(flip(blob, len(blob) - 3), 3)
    assert written == PAYLOAD[: 9 * CS]  # all but the final chunk, which waits for the signature
    sealed.write_bytes(blob[:-1])
    with pytest.raises(CryptoError):
        decrypt_file(sealed, plain, BOB, ALICE.current.public, threads=3)
    assert plain.read_bytes() == PAYLOAD  # the earlier output is untouched


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=4000),
    chunk_size=st.integers(min_value=1, max_value=900),
    threads=st.integers(min_value=2, max_value=5),
    step=st.integers(min_value=1, max_value=3000),
    damage=st.one_of(st.none(), st.tuples(st.integers(min_value=0), st.integers(1, 255))),
)
def test_pipeline_over_thread_counts_and_short_reads(
    data: bytes, chunk_size: int, threads: int, step: int, damage: tuple[int, int] | None
) -> None:
    out = io.BytesIO()
    to = [BOB.current.public]
    encrypt_fileobj(Trickle(data, step), out, ALICE.current, to, chunk_size=chunk_size, threads=threads)
    blob = out.getvalue()
    if damage is None:
        for count in (1, threads):  # the one-thread loop must cope with short reads as well
            plain = io.BytesIO()
            decrypt_fileobj(Trickle(blob, step), plain, BOB, ALICE.current.public, threads=count)
            assert plain.getvalue() == data
        return
    raw = bytearray(blob)
    raw[damage[0] % len(raw)] ^= damage[1]
    assert _failure(bytes(raw), threads) == _failure(bytes(raw), 1)
