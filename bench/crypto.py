"""Benchmark: the vfed envelope against raw libsodium AES-256-GCM and vantage6's RSACryptor.

Payloads of 1 MiB and 100 MiB in memory and 1 GiB streamed file to file; encrypt and decrypt, median
of N runs. The 1 GiB streams run in fresh child processes so their peak RSS is their own. vantage6 runs
in another interpreter when it is not importable here (VFED_BENCH_V6_PYTHON, or build/v6venv).

    .venv/bin/python bench/crypto.py            # table
    .venv/bin/python bench/crypto.py --json     # one JSON object (100 MiB figures + 1 GiB peak RSS)
    .venv/bin/python bench/crypto.py --quick    # 1 MiB, 16 MiB, 128 MiB: a smoke run
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MIB = 1 << 20
CHUNK = MIB  # vfed's default chunk size; the limit and vantage6 stream mode use the same
REPO = Path(__file__).resolve().parent.parent
Timing = dict[str, float | None]


def _median_mibps(size: int, seconds: list[float]) -> float:
    return round(size / MIB / statistics.median(seconds), 1)


def _peak_rss_mib() -> float:
    """VmHWM of this process; ru_maxrss would carry the parent's RSS over fork+exec on Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _default_tmpdir(size: int) -> str | None:
    """tmpfs keeps disk speed out of a crypto benchmark; fall back to the system temp folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        stats = os.statvfs(shm)
        if stats.f_bavail * stats.f_frsize > 4 * size:
            return str(shm)
    return None


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MIB, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def _label(size: int) -> str:
    return f"{size >> 30} GiB" if size >= 1 << 30 else f"{size // MIB} MiB"


# ---- in-memory methods (vfed and the libsodium limit), timed interleaved in this process ------------


def _limit_pair() -> tuple[Callable[[bytes], Any], Callable[[Any], Any]]:
    """Raw libsodium AES-256-GCM over 1 MiB chunks: no header, framing, hashing or signature."""
    import nacl.bindings as nb

    key = os.urandom(32)

    def enc(data: bytes) -> _Pieces:
        return _Pieces(
            nb.crypto_aead_aes256gcm_encrypt(data[pos : pos + CHUNK], None, n.to_bytes(12, "big"), key)
            for n, pos in enumerate(range(0, len(data), CHUNK))
        )

    def dec(blob: bytes) -> list[bytes]:
        step = CHUNK + 16
        return [
            nb.crypto_aead_aes256gcm_decrypt(blob[pos : pos + step], None, n.to_bytes(12, "big"), key)
            for n, pos in enumerate(range(0, len(blob), step))
        ]

    return enc, dec


class _Pieces(list[bytes]):
    """Encrypted pieces kept apart while timing; joined once outside the timed region for decryption."""


def _vfed_pairs() -> dict[str, tuple[Callable[[bytes], Any], Callable[[bytes], Any]]]:
    from vfed.common.crypto import Decryptor, Encryptor, Keyring, decrypt_bytes, encrypt_bytes

    sender, receiver = Keyring.generate(), Keyring.generate()
    to = [receiver.current.public]

    def enc_chunks(data: bytes) -> _Pieces:
        enc = Encryptor(sender.current, to, chunk_size=CHUNK)
        return _Pieces(enc.feed(data) + enc.finish())

    def dec_chunks(blob: bytes) -> list[bytes]:
        dec = Decryptor(receiver, sender.current.public)
        out = dec.feed(blob)
        dec.finish()
        return out

    return {
        "vfed": (enc_chunks, dec_chunks),
        "vfed_bytes": (
            lambda data: encrypt_bytes(data, sender.current, to, chunk_size=CHUNK),
            lambda blob: decrypt_bytes(blob, receiver, sender.current.public),
        ),
    }


def _as_blob(sealed: Any) -> bytes:
    return b"".join(sealed) if isinstance(sealed, list) else bytes(sealed)


def bench_memory(size: int, repeat: int) -> dict[str, Timing]:
    """Time vfed (chunk API and bytes API) and the limit, interleaved so CPU contention hits all alike."""
    data = os.urandom(size)
    limit_enc, limit_dec = _limit_pair()
    methods = {
        **_vfed_pairs(),
        "limit": (limit_enc, limit_dec),
        # What any bytes-in/bytes-out API pays on top: one contiguous output buffer.
        "limit_bytes": (lambda d: b"".join(limit_enc(d)), lambda b: b"".join(limit_dec(b))),
    }
    blobs = {name: _as_blob(enc(data)) for name, (enc, _) in methods.items()}
    for name, (_, dec) in methods.items():  # correctness once, outside the timings
        if _as_blob(dec(blobs[name])) != data:
            raise SystemExit(f"{name} did not round-trip {size} bytes")
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in methods}
    for _ in range(repeat):
        for name, (enc, dec) in methods.items():
            start = time.perf_counter()
            enc(data)
            times[name][0].append(time.perf_counter() - start)
            start = time.perf_counter()
            dec(blobs[name])
            times[name][1].append(time.perf_counter() - start)
    return {
        name: {"enc": _median_mibps(size, e), "dec": _median_mibps(size, d)} for name, (e, d) in times.items()
    }


# ---- 1 GiB streamed file to file, each method in a fresh child process ---------------------------


def _make_file(path: Path, size: int) -> None:
    with path.open("wb") as out:
        for _ in range(size // MIB):
            out.write(os.urandom(MIB))
        out.write(os.urandom(size % MIB))


def _child_stream_vfed(src: Path, work: Path, repeat: int) -> dict[str, Any]:
    from vfed.common.crypto import Keyring, decrypt_file, encrypt_file

    sender, receiver = Keyring.generate(), Keyring.generate()
    sealed, plain = work / "vfed.sealed", work / "vfed.plain"
    enc_s, dec_s = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        encrypt_file(src, sealed, sender.current, [receiver.current.public], chunk_size=CHUNK)
        enc_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        decrypt_file(sealed, plain, receiver, sender.current.public)
        dec_s.append(time.perf_counter() - start)
    rss_mib = _peak_rss_mib()  # before the comparison, which is not part of the stream
    return {"enc_s": enc_s, "dec_s": dec_s, "rss_mib": rss_mib, "ok": _same_file(src, plain)}


def _child_stream_limit(src: Path, work: Path, repeat: int) -> dict[str, Any]:
    import nacl.bindings as nb

    key, sealed, plain = os.urandom(32), work / "limit.sealed", work / "limit.plain"

    def run(inp: Path, out: Path, step: int, fn: Callable[[bytes, None, bytes, bytes], bytes]) -> float:
        start = time.perf_counter()
        with inp.open("rb") as fin, out.open("wb") as fout:
            n = 0
            while piece := fin.read(step):
                fout.write(fn(piece, None, n.to_bytes(12, "big"), key))
                n += 1
        return time.perf_counter() - start

    enc_s = [run(src, sealed, CHUNK, nb.crypto_aead_aes256gcm_encrypt) for _ in range(repeat)]
    dec_s = [run(sealed, plain, CHUNK + 16, nb.crypto_aead_aes256gcm_decrypt) for _ in range(repeat)]
    rss_mib = _peak_rss_mib()  # before the comparison, which is not part of the stream
    return {"enc_s": enc_s, "dec_s": dec_s, "rss_mib": rss_mib, "ok": _same_file(src, plain)}


def _same_file(a: Path, b: Path) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            pa, pb = fa.read(MIB), fb.read(MIB)
            if pa != pb:
                return False
            if not pa:
                return True


def _run_child(python: str, args: list[str], timeout_s: float = 3600) -> dict[str, Any]:
    proc = subprocess.run(
        [python, str(Path(__file__).resolve()), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["child failed"])[-1]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def bench_stream(src: Path, work: Path, repeat: int) -> dict[str, Timing]:
    size = src.stat().st_size
    out: dict[str, Timing] = {}
    for method in ("vfed", "limit"):
        res = _run_child(sys.executable, ["--child", f"stream-{method}", str(src), str(work), str(repeat)])
        out[method] = _timing(size, res)
    return out


def _timing(size: int, res: dict[str, Any]) -> Timing:
    if "error" in res or not res.get("ok", False):
        print(f"  note: child failed: {res.get('error', 'output did not round-trip')}", file=sys.stderr)
        return {"enc": None, "dec": None, "rss_mib": res.get("rss_mib")}
    return {
        "enc": _median_mibps(size, res["enc_s"]),
        "dec": _median_mibps(size, res["dec_s"]),
        "rss_mib": res.get("rss_mib"),
    }


# ---- vantage6 RSACryptor (runs in whichever interpreter has vantage6-common) ----------------------


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


def _child_v6_memory(sizes: list[int], work: Path, repeat: int, stream_max: int) -> dict[str, Any]:
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
        "str_enc_s": _times(repeat, functools.partial(cryptor.encrypt_bytes_to_str, text, pub)),
        "str_dec_s": _times(repeat, functools.partial(cryptor.decrypt, sealed)),
    }


def _v6_stream_memory(cryptor: Any, pub: str, size: int, repeat: int) -> dict[str, Any]:
    data = os.urandom(size)
    blob = b"".join(cryptor.encrypt_stream(io.BytesIO(data), pub))

    def enc() -> list[bytes]:
        return list(cryptor.encrypt_stream(io.BytesIO(data), pub))

    def dec() -> list[bytes]:
        return list(cryptor.decrypt_stream(io.BytesIO(blob)))

    ok = b"".join(dec()) == data
    return {"stream_ok": ok, "stream_enc_s": _times(repeat, enc), "stream_dec_s": _times(repeat, dec)}


def _times(repeat: int, fn: Callable[[], object]) -> list[float]:
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def _child_stream_v6(src: Path, work: Path, repeat: int) -> dict[str, Any]:
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

    enc_s, dec_s = _times(repeat, enc), _times(repeat, dec)
    rss_mib = _peak_rss_mib()  # before the comparison, which is not part of the stream
    return {"enc_s": enc_s, "dec_s": dec_s, "rss_mib": rss_mib, "ok": _same_file(src, plain)}


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
    python: str, sizes: list[int], src: Path, work: Path, repeat: int
) -> dict[str, dict[str, Timing]]:
    """vantage6 default string mode and stream mode; its 1 GiB stream runs in its own child (RSS)."""
    memory_sizes = [*sizes, src.stat().st_size]
    res = _run_child(
        python,
        ["--child", "v6-memory", ",".join(map(str, memory_sizes)), str(work), str(repeat), str(max(sizes))],
    )
    out: dict[str, dict[str, Timing]] = {}
    for size in memory_sizes:
        one = res.get(str(size), {"error": res.get("error", "no result")})
        out[str(size)] = {
            "v6_str": _timing(size, {"enc_s": one.get("str_enc_s"), "dec_s": one.get("str_dec_s"), **one}),
        }
        if "stream_enc_s" in one:
            out[str(size)]["v6_stream"] = _timing(
                size, {"enc_s": one["stream_enc_s"], "dec_s": one["stream_dec_s"], **one}
            )
    size = src.stat().st_size
    stream = _run_child(python, ["--child", "stream-v6", str(src), str(work), str(repeat)])
    out[str(size)]["v6_stream"] = _timing(size, stream)
    return out


def child_main(argv: list[str]) -> None:
    kind, rest = argv[0], argv[1:]
    if kind == "v6-memory":
        sizes = [int(x) for x in rest[0].split(",")]
        result = _child_v6_memory(sizes, Path(rest[1]), int(rest[2]), int(rest[3]))
    else:
        runner = {"stream-vfed": _child_stream_vfed, "stream-limit": _child_stream_limit}
        runner["stream-v6"] = _child_stream_v6
        result = runner[kind](Path(rest[0]), Path(rest[1]), int(rest[2]))
    print(json.dumps(result))


# ---- report ---------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def _fmt(value: float | None, suffix: str = "") -> str:
    return "-" if value is None else f"{value:,.1f}{suffix}"


def print_table(results: dict[str, dict[str, Timing]], notes: list[str]) -> None:
    print(
        f"{'payload':>9} {'method':<12} {'enc MiB/s':>10} {'dec MiB/s':>10} {'enc/limit':>10} "
        f"{'dec/limit':>10} {'peak RSS':>9}"
    )
    for size, rows in results.items():
        limit = rows.get("limit", {})
        for name in ("vfed", "limit", "vfed_bytes", "limit_bytes", "v6_str", "v6_stream"):
            row = rows.get(name)
            if row is None:
                continue
            base = rows.get("limit_bytes", limit) if name == "vfed_bytes" else limit
            enc_ratio, dec_ratio = _ratio(row["enc"], base.get("enc")), _ratio(row["dec"], base.get("dec"))
            print(
                f"{_label(int(size)):>9} {name:<12} {_fmt(row['enc']):>10} {_fmt(row['dec']):>10} "
                f"{_fmt(enc_ratio, 'x'):>10} {_fmt(dec_ratio, 'x'):>10} {_fmt(row.get('rss_mib'), ' MiB'):>9}"
            )
    for note in notes:
        print(f"note: {note}")


def summary(results: dict[str, dict[str, Timing]], mid: int, big: int, notes: list[str]) -> dict[str, Any]:
    rows = results.get(str(mid), {})

    def get(method: str, field: str) -> float | None:
        return rows.get(method, {}).get(field)

    out: dict[str, Any] = {
        f"{m}_{d}_mibps": get(src, d)
        for m, src in (("vfed", "vfed"), ("limit", "limit"), ("v6_str", "v6_str"), ("v6_stream", "v6_stream"))
        for d in ("enc", "dec")
    }
    out["stream_1gib_peak_rss_mib"] = results.get(str(big), {}).get("vfed", {}).get("rss_mib")
    out["vfed_bytes_enc_mibps"], out["vfed_bytes_dec_mibps"] = (
        get("vfed_bytes", "enc"),
        get("vfed_bytes", "dec"),
    )
    out["ratio_vfed_limit_enc"] = _ratio(out["vfed_enc_mibps"], out["limit_enc_mibps"])
    out["ratio_vfed_limit_dec"] = _ratio(out["vfed_dec_mibps"], out["limit_dec_mibps"])
    out["ratio_vfed_v6_str_enc"] = _ratio(out["vfed_enc_mibps"], out["v6_str_enc_mibps"])
    out["ratio_vfed_v6_str_dec"] = _ratio(out["vfed_dec_mibps"], out["v6_str_dec_mibps"])
    out["ratio_vfed_bytes_limit_bytes_enc"] = _ratio(
        out["vfed_bytes_enc_mibps"], out["limit_bytes_enc_mibps"]
    )
    out["ratio_vfed_bytes_limit_bytes_dec"] = _ratio(
        out["vfed_bytes_dec_mibps"], out["limit_bytes_dec_mibps"]
    )
    out["figures_payload_mib"], out["stream_payload_mib"] = mid // MIB, big // MIB
    out["results"], out["notes"] = results, notes
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--quick", action="store_true", help="1 MiB, 16 MiB, 128 MiB (stream) instead")
    parser.add_argument("--sizes", default="1M,100M,1G", help="in-memory sizes..., then the streamed size")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure; the median is reported")
    parser.add_argument(
        "--tmpdir",
        default=None,
        help="where the streamed files go (needs ~4x the size; default /dev/shm if roomy)",
    )
    parser.add_argument("--no-v6", action="store_true", help="skip vantage6")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return
    sizes = [_parse_size(s) for s in ("1M,16M,128M" if args.quick else args.sizes).split(",")]
    memory_sizes, big = sizes[:-1], sizes[-1]
    mid = memory_sizes[1] if len(memory_sizes) > 1 else memory_sizes[0]
    notes: list[str] = [
        f"chunk size {CHUNK // MIB} MiB everywhere; {_label(big)} streamed file to file",
        "vfed/limit = chunk-level APIs, output kept as chunks; vfed_bytes/limit_bytes = one contiguous "
        "bytes result (ratio of vfed_bytes is against limit_bytes)",
    ]
    results: dict[str, dict[str, Timing]] = {}
    for size in memory_sizes:
        _progress(args.json, f"in memory {_label(size)}")
        results[str(size)] = bench_memory(size, args.repeat)
    tmpdir = args.tmpdir or _default_tmpdir(big)
    notes.append(f"streamed files in {tmpdir or tempfile.gettempdir()}")
    with tempfile.TemporaryDirectory(dir=tmpdir, prefix="vfed-bench-") as tmp:
        work = Path(tmp)
        src = work / "payload.bin"
        _make_file(src, big)
        _progress(args.json, f"streaming {_label(big)}")
        results[str(big)] = bench_stream(src, work, args.repeat)
        _bench_v6_into(results, args, memory_sizes, src, work, notes)
    if args.json:
        print(json.dumps(summary(results, mid, big, notes)))
    else:
        print_table(results, notes)
        _print_targets(summary(results, mid, big, notes))


def _bench_v6_into(
    results: dict[str, dict[str, Timing]],
    args: Any,
    sizes: list[int],
    src: Path,
    work: Path,
    notes: list[str],
) -> None:
    python, how = (None, "vantage6 skipped (--no-v6)") if args.no_v6 else find_v6_python()
    notes.append(how)
    if python is None:
        return
    notes.append(
        "vantage6 string mode is fed JSON text (it cannot round-trip arbitrary bytes) and holds "
        "the whole payload in memory, also at the streamed size"
    )
    _progress(args.json, "vantage6")
    for size, rows in bench_v6(python, sizes, src, work, args.repeat).items():
        results.setdefault(size, {}).update(rows)


def _progress(quiet: bool, what: str) -> None:
    if not quiet:
        print(f"... {what}", file=sys.stderr, flush=True)


def _print_targets(s: dict[str, Any]) -> None:
    print(
        f"targets at {s['figures_payload_mib']} MiB: vfed/limit enc {_fmt(s['ratio_vfed_limit_enc'], 'x')} "
        f"dec {_fmt(s['ratio_vfed_limit_dec'], 'x')} (target >= 0.8x); vfed/vantage6-string enc "
        f"{_fmt(s['ratio_vfed_v6_str_enc'], 'x')} dec {_fmt(s['ratio_vfed_v6_str_dec'], 'x')} (target >= 10x)"
    )
    print(
        f"peak RSS of the vfed {s['stream_payload_mib']} MiB stream: "
        f"{_fmt(s['stream_1gib_peak_rss_mib'], ' MiB')} (target <= 64 MiB)"
    )


if __name__ == "__main__":
    main()
