"""Fresh outputs populated with MADV_POPULATE_WRITE: same bytes as plain page faults, and a failing or
missing madvise falls back to plain faults with the same result."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator

import pytest
from crypto_testkit import twin

from vfed.common.crypto import Encryptor, Keyring, decrypt_bytes, encrypt_bytes, populate
from vfed.common.crypto.populate import MIN_SPAN_BYTES, PAGE_BYTES, POPULATE_ENV

MIB = 1 << 20
ALICE, BOB, CAROL = Keyring.generate(), Keyring.generate(), Keyring.generate()
# Above glibc's largest dynamic mmap threshold (32 MiB), so every output is a new mapping whose pages
# are not there yet (smaller ones may reuse heap memory that calloc has just zero-filled: not populated).
PAYLOAD = os.urandom(40 * MIB + (200 << 10) + 7)
CHUNKS = 41  # 1 MiB each, the last one 200 KiB: every one spans many whole pages
REAL_MADVISE = populate._madvise
needs_kernel = pytest.mark.skipif(
    not populate.supported(), reason="this kernel has no MADV_POPULATE_WRITE (Linux >= 5.14)"
)


class Recorder:
    """Wraps the real madvise and keeps what each call asked for and what the kernel answered."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int, int, int]] = []  # address, length, advice, rc, errno

    def __call__(self, address: int, length: int, advice: int) -> int:
        assert REAL_MADVISE is not None
        rc = REAL_MADVISE(address, length, advice)
        self.calls.append((address, length, advice, rc, ctypes.get_errno() if rc else 0))
        return rc


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    rec = Recorder()
    monkeypatch.setattr(populate, "_madvise", rec)
    monkeypatch.setattr(populate, "enabled", True)
    monkeypatch.delenv(POPULATE_ENV, raising=False)
    yield rec


@pytest.fixture
def old_kernel(monkeypatch: pytest.MonkeyPatch, recorder: Recorder) -> Iterator[Recorder]:
    """An advice the kernel does not know: the real madvise answers EINVAL, as a pre-5.14 kernel does
    for MADV_POPULATE_WRITE."""
    monkeypatch.setattr(populate, "MADV_POPULATE_WRITE", 0x7FFF)
    populate.supported.cache_clear()
    yield recorder
    populate.supported.cache_clear()


def _sealed_pair(data: bytes, threads: int, commit: bool) -> tuple[bytes, bytes]:
    """The same envelope (one content key) sealed with populate off and on."""
    to = [BOB.current.public, CAROL.current.public]
    first = Encryptor(ALICE.current, to, chunk_size=MIB, commit=commit)
    second = twin(first)
    populate.enabled = False
    try:
        plain_faults = first.seal_all(data, threads=threads)
    finally:
        populate.enabled = True
    return plain_faults, second.seal_all(data, threads=threads)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("commit", [False, True])
def test_envelope_bytes_are_the_same_with_and_without_populate(
    recorder: Recorder, threads: int, commit: bool
) -> None:
    assert populate.supported()
    recorder.calls.clear()
    plain_faults, populated = _sealed_pair(PAYLOAD, threads, commit)
    assert populated == plain_faults
    assert len(recorder.calls) == CHUNKS  # one per frame, none while populate was off
    assert all(rc == 0 for _, _, _, rc, _ in recorder.calls)
    assert decrypt_bytes(populated, CAROL, ALICE.current.public) == PAYLOAD


@needs_kernel
def test_decrypt_populates_and_round_trips_on_every_thread_count(recorder: Recorder) -> None:
    blob = encrypt_bytes(PAYLOAD, ALICE.current, [BOB.current.public], threads=1)
    assert populate.supported()
    for threads in (1, 2, 3, 4, None):
        recorder.calls.clear()
        assert decrypt_bytes(blob, BOB, ALICE.current.public, threads=threads) == PAYLOAD
        assert len(recorder.calls) == CHUNKS
        assert all(rc == 0 for _, _, _, rc, _ in recorder.calls)


@pytest.mark.parametrize("size", [64 << 10, MIB, 3 * MIB - 1, 3 * MIB, 17 * MIB])
def test_outputs_that_may_reuse_memory_round_trip(recorder: Recorder, size: int) -> None:
    """Populated or not (whichever `fresh` finds), the bytes are right on every path."""
    data = PAYLOAD[:size]
    to = [BOB.current.public]
    first = Encryptor(ALICE.current, to, chunk_size=MIB)
    serial = twin(first).seal_all(data, threads=1)
    for threads in (2, 3, 4):
        assert twin(first).seal_all(data, threads=threads) == serial
        assert decrypt_bytes(serial, BOB, ALICE.current.public, threads=threads) == data
    assert all(rc == 0 for _, _, _, rc, _ in recorder.calls)


def test_fresh_tells_new_pages_from_pages_already_there() -> None:
    """Real memory: a new anonymous mapping is fresh until written; zero-filled memory never is."""
    size = 64 * PAGE_BYTES
    with mmap.mmap(-1, size) as mapping:
        view = (ctypes.c_char * size).from_buffer(mapping)
        address = ctypes.addressof(view)
        try:
            assert populate.fresh(address, size) == (populate._mincore is not None)
            mapping[size - 1 : size] = b"\x01"  # the last page is mapped in now
            assert not populate.fresh(address, size)
            assert not populate.fresh(address, PAGE_BYTES - 1)  # no whole page to ask about
        finally:
            del view
    zeroed = bytearray(size)
    assert not populate.fresh(ctypes.addressof((ctypes.c_char * size).from_buffer(zeroed)), size)


def test_populated_ranges_are_whole_pages_inside_the_chunk(recorder: Recorder) -> None:
    """A page shared with a neighbouring chunk is left alone; a span too short to pay is skipped."""
    buffer = bytearray(64 * PAGE_BYTES)
    base = ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))
    address, length = base + 123, 40 * PAGE_BYTES
    populate.populate(address, length)
    populate.populate(address, MIN_SPAN_BYTES)  # whole pages inside: one fewer than the minimum
    ((start, span, advice, rc, _),) = recorder.calls
    assert start % PAGE_BYTES == 0 and span % PAGE_BYTES == 0
    assert address <= start < address + PAGE_BYTES
    assert address + length - PAGE_BYTES < start + span <= address + length
    assert advice == populate.MADV_POPULATE_WRITE
    assert rc == 0 or not populate.supported()


def test_a_kernel_without_populate_is_probed_once_and_left_alone(old_kernel: Recorder) -> None:
    assert not populate.supported()
    assert not populate.supported()
    assert len(old_kernel.calls) == 1  # the probe, answered EINVAL by the real kernel
    assert old_kernel.calls[0][3] == -1
    blob = encrypt_bytes(PAYLOAD, ALICE.current, [BOB.current.public], threads=2)
    assert decrypt_bytes(blob, BOB, ALICE.current.public, threads=2) == PAYLOAD
    assert len(old_kernel.calls) == 1  # no output was populated


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_madvise_failing_on_every_chunk_still_gives_the_same_envelope(
    monkeypatch: pytest.MonkeyPatch, recorder: Recorder, threads: int
) -> None:
    """Probed as supported, then every populate call fails (EINVAL from the real kernel): the pages
    fault on first write and the envelope is byte for byte what plain faults give."""
    assert populate.supported()
    recorder.calls.clear()  # the probe, when an earlier test cleared its cached answer
    monkeypatch.setattr(populate, "MADV_POPULATE_WRITE", 0x7FFF)
    plain_faults, failed_populate = _sealed_pair(PAYLOAD, threads, commit=False)
    assert failed_populate == plain_faults
    assert len(recorder.calls) == CHUNKS
    assert all(rc == -1 for _, _, _, rc, _ in recorder.calls)
    for dec_threads in (1, 2):
        assert decrypt_bytes(failed_populate, BOB, ALICE.current.public, threads=dec_threads) == PAYLOAD


def test_environment_switch_turns_populate_off(monkeypatch: pytest.MonkeyPatch, recorder: Recorder) -> None:
    monkeypatch.setenv(POPULATE_ENV, "0")
    assert not populate.active()
    blob = encrypt_bytes(PAYLOAD, ALICE.current, [BOB.current.public], threads=2)
    assert decrypt_bytes(blob, BOB, ALICE.current.public, threads=2) == PAYLOAD
    assert recorder.calls == []
    monkeypatch.setenv(POPULATE_ENV, "1")
    assert populate.active() == populate.supported()


def test_small_outputs_are_never_populated(recorder: Recorder) -> None:
    """Outputs below FRESH_BYTES_MIN are BytesIO buffers whose pages were written while growing it."""
    data = PAYLOAD[: 60 << 10]
    blob = encrypt_bytes(data, ALICE.current, [BOB.current.public], chunk_size=4096, threads=2)
    assert decrypt_bytes(blob, BOB, ALICE.current.public, threads=2) == data
    assert recorder.calls == []
