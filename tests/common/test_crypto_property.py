"""Property tests: round trips over random sizes and chunkings; damage always yields a CryptoError."""

from __future__ import annotations

import asyncio
import itertools

from crypto_testkit import layout
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfed.common.crypto import (
    Cipher,
    CryptoError,
    Decryptor,
    Encryptor,
    Keyring,
    aes_gcm_available,
    decrypt_bytes,
    decrypt_stream,
    encrypt_bytes,
    encrypt_stream,
)

ALICE, BOB, CAROL = Keyring.generate(), Keyring.generate(), Keyring.generate()
CIPHERS = [Cipher.XCHACHA20POLY1305] + ([Cipher.AES256GCM] if aes_gcm_available() else [])


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=6000),
    chunk_size=st.integers(min_value=1, max_value=2500),
    plain_cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
    blob_cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=12),
    cipher=st.sampled_from(CIPHERS),
    to_carol=st.booleans(),
    commit=st.sampled_from([None, True, False]),
)
def test_round_trip_over_random_sizes_and_chunkings(
    data: bytes,
    chunk_size: int,
    plain_cuts: list[int],
    blob_cuts: list[int],
    cipher: Cipher,
    to_carol: bool,
    commit: bool | None,
) -> None:
    recipients = [BOB.current.public] + ([CAROL.current.public] if to_carol else [])
    enc = Encryptor(ALICE.current, recipients, chunk_size=chunk_size, cipher=cipher, commit=commit)
    pieces: list[bytes] = []
    for piece in _split(data, plain_cuts):
        pieces += enc.feed(piece)
    blob = b"".join(pieces + enc.finish())

    # However the plaintext was cut, the envelope has the canonical chunking.
    assert len(layout(blob).frames) == max(1, -(-len(data) // chunk_size))
    assert decrypt_bytes(blob, BOB, ALICE.current.public) == data
    if to_carol:
        assert decrypt_bytes(blob, CAROL, ALICE.current.public) == data

    dec = Decryptor(BOB, ALICE.current.public)
    out: list[bytes] = []
    for piece in _split(blob, blob_cuts):
        out += dec.feed(piece)
    dec.finish()
    assert b"".join(out) == data


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=3000), chunk_size=st.integers(1, 700), cuts=st.lists(st.integers(0, 5000)))
def test_async_stream_round_trip(data: bytes, chunk_size: int, cuts: list[int]) -> None:
    async def run() -> bytes:
        sealed = [
            p
            async for p in encrypt_stream(
                _split(data, cuts), ALICE.current, [BOB.current.public], chunk_size=chunk_size
            )
        ]
        blob = b"".join(sealed)
        return b"".join([p async for p in decrypt_stream(_split(blob, cuts), BOB, ALICE.current.public)])

    assert asyncio.run(run()) == data


BASE = encrypt_bytes(bytes(range(256)) * 7, ALICE.current, [BOB.current.public], chunk_size=300)
BASE_COMMITTED = encrypt_bytes(
    bytes(range(256)) * 7, ALICE.current, [BOB.current.public, CAROL.current.public], chunk_size=300
)


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(BASE) - 1), st.integers(1, 255)),
        min_size=1,
        max_size=4,
        unique_by=lambda edit: edit[0],
    ),
    cut=st.one_of(st.none(), st.integers(0, len(BASE) - 1)),
    committed=st.booleans(),
)
def test_any_damage_raises_a_crypto_error(
    edits: list[tuple[int, int]], cut: int | None, committed: bool
) -> None:
    """XOR some bytes and maybe truncate: decryption must fail with a CryptoError, never anything else."""
    damaged = bytearray(BASE_COMMITTED if committed else BASE)
    for pos, mask in edits:
        damaged[pos] ^= mask
    blob = bytes(damaged if cut is None else damaged[:cut])
    try:
        decrypt_bytes(blob, BOB, ALICE.current.public)
    except CryptoError as exc:
        assert str(exc)
    else:
        raise AssertionError("damaged envelope decrypted")
