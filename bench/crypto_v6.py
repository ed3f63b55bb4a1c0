"""vantage6's RSACryptor for bench/crypto.py, run in whichever interpreter has vantage6-common.

Its default string mode (all in-memory sizes) and stream mode in memory run in one child process;
its file-to-file stream runs interleaved with vfed's (crypto_stream.bench_stream via child_stream_v6).
"""

from __future__ import annotations

import base64
import functools
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from crypto_util import CHUNK, REPO, Timing, peak_rss_mib, run_child, same_file, times, timing


def _v6_cryptor(work: Path) -> tuple[Any, str]:
    from vantage6.common.encryption import RSACryptor

    key_file = work / "v6-rsa.pem"
    RSACryptor.create_new_rsa_key(key_file)
    cryptor = RSACryptor(key_file)
    return cryptor, cryptor.public_key_str


def _json_payload(size: int) -> bytes:
    """vantage6's string mode only round-trips text that is JSON; random bytes raise in decrypt."""
    text = base64.b64encode(os.urandom(size * 3 // 4 + 3))[: size - 2]
    return b'"' + text + b'"'


def child_v6_memory(sizes: list[int], work: Path, repeat: int, stream_max: int) -> dict[str, Any]:
    cryptor, pub = _v6_cryptor(work)
    out: dict[str, Any] = {}
    for size in sizes:
        res = _v6_string(cryptor, pub, size, repeat)
        if size <= stream_max:
            res.update(_v6_stream_memory(cryptor, pub, size, repeat))
            res["ok"] = res["ok"] and res.pop("stream_ok")
        out[str(size)] = res
    return out


def _v6_string(cryptor: Any, pub: str, size: int, repeat: int) -> dict[str, Any]:
    """The default mode: base64 text out, JSON-or-base64 guessing on the way back."""
    text = _json_payload(size)
    sealed = cryptor.encrypt_bytes_to_str(text, pub)
    return {
        "ok": cryptor.decrypt(sealed) == text,
        "str_enc_s": times(repeat, functools.partial(cryptor.encrypt_bytes_to_str, text, pub)),
        "str_dec_s": times(repeat, functools.partial(cryptor.decrypt, sealed)),
    }


def _v6_stream_memory(cryptor: Any, pub: str, size: int, repeat: int) -> dict[str, Any]:
    data = os.urandom(size)
    blob = b"".join(cryptor.encrypt_stream(io.BytesIO(data), pub))

    def enc() -> list[bytes]:
        return list(cryptor.encrypt_stream(io.BytesIO(data), pub))

    def dec() -> list[bytes]:
        return list(cryptor.decrypt_stream(io.BytesIO(blob)))

    ok = b"".join(dec()) == data
    return {"stream_ok": ok, "stream_enc_s": times(repeat, enc), "stream_dec_s": times(repeat, dec)}


def child_stream_v6(src: Path, work: Path, repeat: int) -> dict[str, Any]:
    cryptor, pub = _v6_cryptor(work)
    sealed, plain = work / "v6.sealed", work / "v6.plain"

    def pump(pieces: Any, out: Path) -> None:
        with out.open("wb") as fout:
            for piece in pieces:
                fout.write(piece)

    def enc() -> None:
        with src.open("rb") as fin:
            pump(cryptor.encrypt_stream(fin, pub, chunk_size=CHUNK), sealed)

    def dec() -> None:
        with sealed.open("rb") as fin:
            pump(cryptor.decrypt_stream(fin, chunk_size=CHUNK), plain)

    enc_s, dec_s = times(repeat, enc), times(repeat, dec)
    rss_mib = peak_rss_mib()  # before the comparison, which is not part of the stream
    return {"enc_s": enc_s, "dec_s": dec_s, "rss_mib": rss_mib, "ok": same_file(src, plain)}


def find_v6_python() -> tuple[str | None, str]:
    """This interpreter if it imports vantage6, else VFED_BENCH_V6_PYTHON, else build/v6venv."""
    try:
        import vantage6.common.encryption  # noqa: F401

        return sys.executable, "vantage6-common in this interpreter"
    except ImportError:
        pass
    for candidate in (os.environ.get("VFED_BENCH_V6_PYTHON"), str(REPO / "build/v6venv/bin/python")):
        if candidate and Path(candidate).exists():
            probe = subprocess.run(
                [candidate, "-c", "import vantage6.common.encryption"], capture_output=True, check=False
            )
            if probe.returncode == 0:
                return candidate, f"vantage6-common via {candidate}"
    return None, (
        "vantage6 skipped: vantage6-common is not installed (python3 -m venv build/v6venv && "
        "build/v6venv/bin/pip install vantage6-common, or set VFED_BENCH_V6_PYTHON)"
    )


def bench_v6(
    python: str, sizes: list[int], big: int, work: Path, repeat: int
) -> dict[str, dict[str, Timing]]:
    """vantage6 default string mode (all sizes, in memory) and stream mode in memory (its file-to-file
    stream at the largest size runs interleaved with vfed in bench_stream)."""
    memory_sizes = [*sizes, big]
    res = run_child(
        python,
        ["--child", "v6-memory", ",".join(map(str, memory_sizes)), str(work), str(repeat), str(max(sizes))],
    )
    out: dict[str, dict[str, Timing]] = {}
    for size in memory_sizes:
        one = res.get(str(size), {"error": res.get("error", "no result")})
        out[str(size)] = {
            "v6_str": timing(size, {"enc_s": one.get("str_enc_s"), "dec_s": one.get("str_dec_s"), **one}),
        }
        if "stream_enc_s" in one:
            out[str(size)]["v6_stream"] = timing(
                size, {"enc_s": one["stream_enc_s"], "dec_s": one["stream_dec_s"], **one}
            )
    return out
