"""The streamed size of bench/crypto.py: file to file, each method and run in a fresh child process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from crypto_memory import RawGcm
from crypto_util import CHUNK, MIB, Sample, Timing, clock, peak_rss_mib, run_child, same_file, since, timing


def make_file(path: Path, size: int) -> None:
    with path.open("wb") as out:
        for _ in range(size // MIB):
            out.write(os.urandom(MIB))
        out.write(os.urandom(size % MIB))


def child_stream_vfed(src: Path, work: Path, repeat: int) -> dict[str, Any]:
    from vfed.common.crypto import Keyring, decrypt_file, encrypt_file

    sender, receiver = Keyring.generate(), Keyring.generate()
    sealed, plain = work / "vfed.sealed", work / "vfed.plain"
    enc_s, dec_s = [], []
    for _ in range(repeat):
        start = clock()
        encrypt_file(src, sealed, sender.current, [receiver.current.public], chunk_size=CHUNK)
        enc_s.append(since(start))
        start = clock()
        decrypt_file(sealed, plain, receiver, sender.current.public)
        dec_s.append(since(start))
    rss_mib = peak_rss_mib()  # before the comparison, which is not part of the stream
    return {"enc_s": enc_s, "dec_s": dec_s, "rss_mib": rss_mib, "ok": same_file(src, plain)}


def child_stream_limit(src: Path, work: Path, repeat: int) -> dict[str, Any]:
    """File to file with two reusable buffers, readinto and direct libsodium calls."""
    raw, sealed, plain = RawGcm(), work / "limit.sealed", work / "limit.plain"

    def run(inp: Path, out: Path, step: int, encrypt: bool) -> Sample:
        inbuf, outbuf = bytearray(step), bytearray(step + 16)
        in_ptr, out_ptr, view = raw.ptr(inbuf), raw.ptr(outbuf), memoryview(outbuf)
        start = clock()
        with inp.open("rb", buffering=0) as fin, out.open("wb", buffering=0) as fout:
            n = 0
            while got := fin.readinto(inbuf):
                if encrypt:
                    raw.seal(out_ptr, in_ptr, got, n)
                    fout.write(view[: got + 16])
                else:
                    raw.open(out_ptr, in_ptr, got, n)
                    fout.write(view[: got - 16])
                n += 1
        return since(start)

    enc_s = [run(src, sealed, CHUNK, True) for _ in range(repeat)]
    dec_s = [run(sealed, plain, CHUNK + 16, False) for _ in range(repeat)]
    rss_mib = peak_rss_mib()  # before the comparison, which is not part of the stream
    return {"enc_s": enc_s, "dec_s": dec_s, "rss_mib": rss_mib, "ok": same_file(src, plain)}


StreamMethod = tuple[str, str, str]  # name, interpreter, child kind


def bench_stream(src: Path, work: Path, repeat: int, methods: list[StreamMethod]) -> dict[str, Timing]:
    """One fresh child per method and run, interleaved: contention hits all methods alike, and each
    child's peak RSS is its own."""
    size = src.stat().st_size
    runs: dict[str, dict[str, Any]] = {
        m[0]: {"enc_s": [], "dec_s": [], "ok": True, "rss_mib": 0.0} for m in methods
    }
    for _ in range(repeat):
        for name, python, kind in methods:
            res = run_child(python, ["--child", kind, str(src), str(work), "1"])
            _drop_outputs(work, name)
            acc = runs[name]
            if "error" in res:
                acc["error"] = res["error"]
                continue
            acc["enc_s"] += res["enc_s"]
            acc["dec_s"] += res["dec_s"]
            acc["ok"] = acc["ok"] and res["ok"]
            acc["rss_mib"] = max(acc["rss_mib"], res["rss_mib"])
    return {name: timing(size, acc) for name, acc in runs.items()}


def _drop_outputs(work: Path, method: str) -> None:
    """Free the tmpfs space of one method's streamed outputs before the next one runs."""
    prefix = "v6" if method == "v6_stream" else method
    for suffix in ("sealed", "plain"):
        (work / f"{prefix}.{suffix}").unlink(missing_ok=True)
