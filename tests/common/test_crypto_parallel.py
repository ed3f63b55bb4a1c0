"""Chunks sealed and opened on the thread pool: same envelope, same plaintext, same errors as one thread."""

from __future__ import annotations

import multiprocessing
import os
import threading

import pytest
from crypto_testkit import TAG, flip, layout, twin
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfed.common.crypto import (
    BadSignature,
    Cipher,
    CryptoError,
    Encryptor,
    Keyring,
    ReorderedChunk,
    TamperedChunk,
    TruncatedPayload,
    aes_gcm_available,
    decrypt_bytes,
    encrypt_bytes,
)
from vfed.common.crypto.parallel import (
    MIN_PARALLEL_CHUNK,
    THREADS_ENV,
    default_threads,
    plan_threads,
    run_chunks,
)

ALICE, BOB, CAROL = Keyring.generate(), Keyring.generate(), Keyring.generate()
CIPHERS = [Cipher.XCHACHA20POLY1305] + ([Cipher.AES256GCM] if aes_gcm_available() else [])
CS = MIN_PARALLEL_CHUNK  # the smallest chunk the automatic thread count spreads over the pool
PAYLOAD = os.urandom(7 * CS + 123)  # eight chunks


def _open(blob: bytes, threads: int | None) -> bytes:
    return decrypt_bytes(blob, BOB, ALICE.current.public, threads=threads)


def _seal(data: bytes, threads: int | None, cipher: Cipher | None = None) -> bytes:
    to = [BOB.current.public]
    return encrypt_bytes(data, ALICE.current, to, chunk_size=CS, cipher=cipher, threads=threads)


def _error(blob: bytes, threads: int | None) -> CryptoError:
    with pytest.raises(CryptoError) as info:
        _open(blob, threads)
    return info.value


SIZES = [0, 1, CS - 1, CS, CS + 1, 2 * CS, 3 * CS - 1, 3 * CS, 3 * CS + 1, 5 * CS + 17]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("cipher", CIPHERS)
def test_parallel_and_serial_envelopes_decrypt_either_way(size: int, cipher: Cipher) -> None:
    data = PAYLOAD[:size]
    serial = _seal(data, 1, cipher=cipher)
    for threads in (2, 3, 4):
        parallel = _seal(data, threads, cipher=cipher)
        assert len(layout(parallel).frames) == max(1, -(-size // CS))
        assert _open(parallel, 1) == data
        assert _open(serial, threads) == data
        assert _open(parallel, threads) == data
    assert _open(serial, None) == data


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("commit", [False, True])
def test_fixed_key_gives_the_same_bytes_on_any_path(size: int, commit: bool) -> None:
    """One content key and header: seal_all on 1..4 threads and the feed/finish path agree byte for byte."""
    data = PAYLOAD[:size]
    first = Encryptor(ALICE.current, [BOB.current.public], chunk_size=CS, commit=commit)
    twins = [twin(first) for _ in range(4)]
    streamed = b"".join(twins[0].feed(data) + twins[0].finish())
    outputs = {threads: twins[threads].seal_all(data, threads=threads) for threads in (1, 2, 3)}
    outputs[4] = first.seal_all(data, threads=4)
    assert all(blob == streamed for blob in outputs.values())
    assert _open(streamed, 4) == data


def test_committed_envelope_for_two_recipients_round_trips_on_threads() -> None:
    to = [BOB.current.public, CAROL.current.public]
    blob = encrypt_bytes(PAYLOAD, ALICE.current, to, chunk_size=CS, threads=3)
    assert decrypt_bytes(blob, CAROL, ALICE.current.public, threads=2) == PAYLOAD
    assert decrypt_bytes(blob, BOB, ALICE.current.public, threads=1) == PAYLOAD


@pytest.mark.parametrize("chunk", [0, 1, 4, 7])
@pytest.mark.parametrize("where", ["ciphertext", "tag", "head"])
def test_tampered_chunk_is_named_on_every_thread_count(chunk: int, where: str) -> None:
    blob = _seal(PAYLOAD, 1)
    parts = layout(blob)
    offset = (
        parts.frame_offset(chunk)
        + {
            "ciphertext": 13 + 5,
            "tag": len(parts.frames[chunk]) - TAG + 3,
            "head": 12,  # the ciphertext length's low byte: framing breaks, the stream path answers
        }[where]
    )
    damaged = flip(blob, offset)
    serial = _error(damaged, 1)
    for threads in (2, 3, 4, None):
        err = _error(damaged, threads)
        assert type(err) is type(serial)
        assert str(err) == str(serial)
    if where != "head":
        assert isinstance(serial, TamperedChunk)
        assert str(serial).startswith(f"chunk {chunk} failed authentication")


@pytest.mark.parametrize("commit", [False, True])
def test_several_tampered_chunks_name_the_lowest(commit: bool) -> None:
    to = [BOB.current.public, CAROL.current.public]
    blob = encrypt_bytes(os.urandom(40 * CS), ALICE.current, to, chunk_size=CS, commit=commit, threads=1)
    parts = layout(blob)
    damaged = blob
    for chunk in (31, 9, 25):
        damaged = flip(damaged, parts.frame_offset(chunk) + 20)
    for threads in (1, 2, 4, 8):
        with pytest.raises(TamperedChunk, match=r"^chunk 9 failed authentication"):
            _open(damaged, threads)
    with pytest.raises(BadSignature):
        _open(flip(blob, len(blob) - 1), 3)


def test_truncated_reordered_and_badly_signed_envelopes_fail_alike() -> None:
    blob = _seal(PAYLOAD, 4)
    parts = layout(blob)
    swapped = parts.frames.copy()
    swapped[2], swapped[3] = swapped[3], swapped[2]
    cases = [
        (blob[: parts.frame_offset(3) + 100], TruncatedPayload, "inside chunk 3"),
        (blob[:-10], TruncatedPayload, "before the signature trailer"),
        (parts.header + b"".join(swapped) + parts.trailer, ReorderedChunk, "chunk 3 arrived at position 2"),
        (flip(blob, len(blob) - 5), BadSignature, ALICE.current.key_id),
        (_seal(PAYLOAD, 2)[:-64] + parts.trailer, BadSignature, "does not verify"),
    ]
    for damaged, kind, needle in cases:
        for threads in (1, 2, 3, None):
            with pytest.raises(kind, match=needle):
                _open(damaged, threads)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=5000),
    chunk_size=st.integers(min_value=1, max_value=1500),
    enc_threads=st.integers(min_value=1, max_value=6),
    dec_threads=st.integers(min_value=1, max_value=6),
    cipher=st.sampled_from(CIPHERS),
    commit=st.booleans(),
    damage=st.one_of(st.none(), st.tuples(st.integers(min_value=0), st.integers(1, 255))),
)
def test_round_trip_and_damage_over_thread_counts(
    data: bytes,
    chunk_size: int,
    enc_threads: int,
    dec_threads: int,
    cipher: Cipher,
    commit: bool,
    damage: tuple[int, int] | None,
) -> None:
    """Explicit thread counts use the pool even for tiny chunks; any damage fails as on one thread."""
    blob = encrypt_bytes(
        data,
        ALICE.current,
        [BOB.current.public],
        chunk_size=chunk_size,
        cipher=cipher,
        commit=commit,
        threads=enc_threads,
    )
    if damage is None:
        assert _open(blob, dec_threads) == data
        return
    raw = bytearray(blob)
    raw[damage[0] % len(raw)] ^= damage[1]
    serial = _error(bytes(raw), 1)
    err = _error(bytes(raw), dec_threads)
    assert (type(err), str(err)) == (type(serial), str(serial))


def test_run_chunks_uses_several_threads_at_once() -> None:
    """Two chunks that each wait for the other can only finish if two threads run them together."""
    barrier = threading.Barrier(2, timeout=10)
    seen: set[int] = set()

    def work(_: int) -> bool:
        seen.add(threading.get_ident())
        barrier.wait()
        return True

    assert run_chunks(2, work, 2) is None
    assert len(seen) == 2


def test_run_chunks_reports_the_lowest_failure_after_running_all_below_it() -> None:
    ran: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> bool:
        with lock:
            ran.append(i)
        return i not in (13, 41, 77)

    for threads in (1, 2, 5):
        ran.clear()
        assert run_chunks(100, work, threads) == 13
        assert set(range(14)) <= set(ran)
        assert run_chunks(10, lambda i: True, threads) is None


def test_run_chunks_re_raises_a_worker_error() -> None:
    def work(i: int) -> bool:
        if i == 3:
            raise OverflowError("chunk encryption failed")
        return True

    for threads in (1, 3):
        with pytest.raises(OverflowError):
            run_chunks(50, work, threads)


def test_thread_knob_keyword_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert default_threads() == min(4, os.cpu_count() or 1)
    assert plan_threads(None, 100, CS - 1) == 1  # small chunks: one thread unless asked
    assert plan_threads(3, 100, 16) == 3
    assert plan_threads(8, 2, CS) == 2  # never more threads than chunks
    monkeypatch.setenv(THREADS_ENV, "1")
    assert plan_threads(None, 100, CS) == 1
    monkeypatch.setenv(THREADS_ENV, "3")
    assert plan_threads(None, 100, CS) == 3
    assert _open(_seal(PAYLOAD, None), None) == PAYLOAD
    for bad in ("zero", "0", "-2", "99"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(CryptoError, match=THREADS_ENV):
            _seal(PAYLOAD, None)
    monkeypatch.delenv(THREADS_ENV)
    for bad_count in (0, -1, 17, True):
        with pytest.raises(CryptoError, match="threads must be"):
            _seal(PAYLOAD, bad_count)


def _seal_in_child(queue: multiprocessing.Queue[bytes]) -> None:
    queue.put(decrypt_bytes(_seal(PAYLOAD, 2), BOB, ALICE.current.public, threads=2))


def test_forked_child_makes_its_own_pool() -> None:
    """The parent's pool threads do not exist in a forked child; the child must not wait on them."""
    _seal(PAYLOAD, 2)  # the pool exists in this process now
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[bytes] = ctx.Queue()
    child = ctx.Process(target=_seal_in_child, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=60) == PAYLOAD
    finally:
        child.join(timeout=60)
    assert child.exitcode == 0
