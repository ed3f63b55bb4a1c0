"""In-memory methods of bench/crypto.py: vfed's APIs and the raw libsodium limit, timed interleaved."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from crypto_util import CHUNK, MIB, Sample, Timing, clock, since, timing

Pair = tuple[Callable[[bytes], Any], Callable[[bytes], Any]]  # encrypt, decrypt


class RawGcm:
    """libsodium AES-256-GCM called directly (pynacl's cffi module): zero-copy in and out.

    This is the limit: the same 1 MiB chunks as vfed with no header, framing, hashing or signature,
    and no Python-level copies.
    """

    def __init__(self) -> None:
        from nacl._sodium import ffi, lib  # type: ignore[import-not-found]

        self.ffi, self.lib, self.key = ffi, lib, os.urandom(32)

    def ptr(self, buf: Any) -> Any:
        return self.ffi.from_buffer("unsigned char[]", buf)

    def seal(self, out: Any, src: Any, length: int, n: int) -> None:
        nonce = n.to_bytes(12, "big")
        self.lib.crypto_aead_aes256gcm_encrypt(
            out, self.ffi.NULL, src, length, self.ffi.NULL, 0, self.ffi.NULL, nonce, self.key
        )

    def open(self, out: Any, src: Any, sealed: int, n: int) -> None:
        nonce = n.to_bytes(12, "big")
        rc = self.lib.crypto_aead_aes256gcm_decrypt(
            out, self.ffi.NULL, self.ffi.NULL, src, sealed, self.ffi.NULL, 0, nonce, self.key
        )
        if rc != 0:
            raise SystemExit("limit: authentication failed")


def _limit_pairs() -> dict[str, Pair]:
    """`limit` writes each result into a new buffer (as encrypting a new payload must); `limit_reuse`
    reuses one output buffer across runs, which leaves only the cipher: the ceiling of this CPU."""
    raw = RawGcm()
    reuse: dict[int, bytearray] = {}

    def enc(data: bytes, out: bytearray | None = None) -> bytearray:
        chunks = -(-len(data) // CHUNK)
        out = bytearray(len(data) + 16 * chunks) if out is None else out
        src, dst = raw.ptr(data), raw.ptr(out)
        for n in range(chunks):
            length = min(CHUNK, len(data) - n * CHUNK)
            raw.seal(dst + n * (CHUNK + 16), src + n * CHUNK, length, n)
        return out

    def dec(blob: bytes, out: bytearray | None = None) -> bytearray:
        chunks = -(-len(blob) // (CHUNK + 16))
        out = bytearray(len(blob) - 16 * chunks) if out is None else out
        src, dst = raw.ptr(blob), raw.ptr(out)
        for n in range(chunks):
            sealed = min(CHUNK + 16, len(blob) - n * (CHUNK + 16))
            raw.open(dst + n * CHUNK, src + n * (CHUNK + 16), sealed, n)
        return out

    def enc_reuse(data: bytes) -> bytearray:
        if len(data) not in reuse:
            reuse[len(data)] = bytearray(len(data) + 16 * -(-len(data) // CHUNK))
        return enc(data, reuse[len(data)])

    def dec_reuse(blob: bytes) -> bytearray:
        if -len(blob) not in reuse:
            reuse[-len(blob)] = bytearray(len(blob) - 16 * -(-len(blob) // (CHUNK + 16)))
        return dec(blob, reuse[-len(blob)])

    return {
        "limit": (enc, dec),
        "limit_reuse": (enc_reuse, dec_reuse),
        "limit_threads": _threaded_limit(raw, bench_threads()),
    }


def bench_threads() -> int:
    """The thread count vfed picks by default for 1 MiB chunks (VFED_CRYPTO_THREADS, else min(4, CPUs))."""
    from vfed.common.crypto.parallel import default_threads

    return default_threads()


def _threaded_limit(raw: RawGcm, threads: int) -> Pair:
    """The limit on `threads` threads: chunks handed out in order to a plain ThreadPoolExecutor, written
    into a new calloc'd `bytes` so its pages are faulted in by the threads (as vfed does)."""
    import itertools
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=threads)

    def spread(chunks: int, one: Callable[[int], None]) -> None:
        claims = itertools.count()

        def worker() -> None:
            for n in claims:
                if n >= chunks:
                    return
                one(n)

        for future in [pool.submit(worker) for _ in range(threads)]:
            future.result()

    def enc(data: bytes) -> bytes:
        chunks = -(-len(data) // CHUNK)
        out = bytes(len(data) + 16 * chunks)
        src, dst = raw.ptr(data), raw.ptr(out)

        def one(n: int) -> None:
            raw.seal(dst + n * (CHUNK + 16), src + n * CHUNK, min(CHUNK, len(data) - n * CHUNK), n)

        spread(chunks, one)
        return out

    def dec(blob: bytes) -> bytes:
        chunks = -(-len(blob) // (CHUNK + 16))
        out = bytes(len(blob) - 16 * chunks)
        src, dst = raw.ptr(blob), raw.ptr(out)
        sealed = len(blob) - (chunks - 1) * (CHUNK + 16)

        def one(n: int) -> None:
            raw.open(dst + n * CHUNK, src + n * (CHUNK + 16), CHUNK + 16 if n < chunks - 1 else sealed, n)

        spread(chunks, one)
        return out

    return enc, dec


def _vfed_pairs() -> dict[str, Pair]:
    """`vfed` is the bytes-in/bytes-out API (default thread count); `vfed_1thread` the same on one thread;
    `vfed_chunks` the Encryptor/Decryptor piece API;
    `vfed_committed` the bytes API signing all frame bytes (the default for several recipients)."""
    from vfed.common.crypto import Decryptor, Encryptor, Keyring, decrypt_bytes, encrypt_bytes

    sender, receiver = Keyring.generate(), Keyring.generate()
    to = [receiver.current.public]

    def enc_chunks(data: bytes) -> list[bytes]:
        enc = Encryptor(sender.current, to, chunk_size=CHUNK)
        return enc.feed(data) + enc.finish()

    def dec_chunks(blob: bytes) -> list[bytes]:
        dec = Decryptor(receiver, sender.current.public)
        out = dec.feed(blob)
        dec.finish()
        return out

    def dec_bytes(blob: bytes) -> bytes:
        return decrypt_bytes(blob, receiver, sender.current.public)

    return {
        "vfed": (lambda data: encrypt_bytes(data, sender.current, to, chunk_size=CHUNK), dec_bytes),
        "vfed_1thread": (
            lambda data: encrypt_bytes(data, sender.current, to, chunk_size=CHUNK, threads=1),
            lambda blob: decrypt_bytes(blob, receiver, sender.current.public, threads=1),
        ),
        "vfed_chunks": (enc_chunks, dec_chunks),
        "vfed_committed": (
            lambda data: encrypt_bytes(data, sender.current, to, chunk_size=CHUNK, commit=True),
            dec_bytes,
        ),
    }


def _as_blob(sealed: Any) -> bytes:
    return b"".join(sealed) if isinstance(sealed, list) else bytes(sealed)


def bench_memory(size: int, repeat: int) -> dict[str, Timing]:
    """Time vfed (chunk API and bytes API) and the limit, interleaved so CPU contention hits all alike."""
    data = os.urandom(size)
    methods = {**_vfed_pairs(), **_limit_pairs()}
    blobs = {name: _as_blob(enc(data)) for name, (enc, _) in methods.items()}
    for name, (_, dec) in methods.items():  # correctness once, outside the timings
        if _as_blob(dec(blobs[name])) != data:
            raise SystemExit(f"{name} did not round-trip {size} bytes")
    times: dict[str, tuple[list[Sample], list[Sample]]] = {name: ([], []) for name in methods}
    inner = max(1, (64 * MIB) // size)  # small payloads: time enough calls to rise above timer noise
    for _ in range(repeat):
        for name, (enc, dec) in methods.items():
            times[name][0].append(per_call(enc, data, inner))
            times[name][1].append(per_call(dec, blobs[name], inner))
    return {name: timing(size, {"enc_s": e, "dec_s": d, "ok": True}) for name, (e, d) in times.items()}


def per_call(fn: Callable[[bytes], Any], arg: bytes, inner: int) -> Sample:
    """Seconds per call. Each result is freed right after its clock stops: freeing is the caller's later
    work, not the call's (unmapping 100 MiB costs ~20 ms on this VM); every method, vantage6's too, is timed
    so, and a small payload's memory is still reused by the next call as it would be in a loop."""
    total = [0.0, 0.0]
    for _ in range(inner):
        start = clock()
        result = fn(arg)
        took = since(start)
        del result
        total = [total[0] + took[0], total[1] + took[1]]
    return [t / inner for t in total]
