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


Sample = list[float]  # [wall-clock seconds, CPU seconds (user + system) of the measuring process]


def _clock() -> Sample:
    return [time.perf_counter(), time.process_time()]


def _since(start: Sample) -> Sample:
    now = _clock()
    return [now[0] - start[0], now[1] - start[1]]


def _median_mibps(size: int, samples: list[Sample], which: int = 0) -> float:
    """Throughput of the median sample; which=0 wall clock, which=1 CPU time (immune to co-tenants)."""
    return round(size / MIB / max(statistics.median(s[which] for s in samples), 1e-9), 1)


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


class _RawGcm:
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


def _limit_pairs() -> dict[str, tuple[Callable[[bytes], Any], Callable[[bytes], Any]]]:
    """`limit` writes each result into a new buffer (as encrypting a new payload must); `limit_reuse`
    reuses one output buffer across runs, which leaves only the cipher: the ceiling of this CPU."""
    raw = _RawGcm()
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
        "limit_threads": _threaded_limit(raw, _bench_threads()),
    }


def _bench_threads() -> int:
    """The thread count vfed picks by default for 1 MiB chunks (VFED_CRYPTO_THREADS, else min(4, CPUs))."""
    from vfed.common.crypto.parallel import default_threads

    return default_threads()


def _threaded_limit(raw: _RawGcm, threads: int) -> tuple[Callable[[bytes], Any], Callable[[bytes], Any]]:
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


def _vfed_pairs() -> dict[str, tuple[Callable[[bytes], Any], Callable[[bytes], Any]]]:
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
            times[name][0].append(_per_call(enc, data, inner))
            times[name][1].append(_per_call(dec, blobs[name], inner))
    return {name: _timing(size, {"enc_s": e, "dec_s": d, "ok": True}) for name, (e, d) in times.items()}


def _per_call(fn: Callable[[bytes], Any], arg: bytes, inner: int) -> Sample:
    """Seconds per call. Each result is freed right after its clock stops: freeing is the caller's later
    work, not the call's (unmapping 100 MiB costs ~20 ms on this VM); every method, vantage6's too, is timed
    so, and a small payload's memory is still reused by the next call as it would be in a loop."""
    total = [0.0, 0.0]
    for _ in range(inner):
        start = _clock()
        result = fn(arg)
        took = _since(start)
        del result
        total = [total[0] + took[0], total[1] + took[1]]
    return [t / inner for t in total]


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
        start = _clock()
        encrypt_file(src, sealed, sender.current, [receiver.current.public], chunk_size=CHUNK)
        enc_s.append(_since(start))
        start = _clock()
        decrypt_file(sealed, plain, receiver, sender.current.public)
        dec_s.append(_since(start))
    rss_mib = _peak_rss_mib()  # before the comparison, which is not part of the stream
    return {"enc_s": enc_s, "dec_s": dec_s, "rss_mib": rss_mib, "ok": _same_file(src, plain)}


def _child_stream_limit(src: Path, work: Path, repeat: int) -> dict[str, Any]:
    """File to file with two reusable buffers, readinto and direct libsodium calls."""
    raw, sealed, plain = _RawGcm(), work / "limit.sealed", work / "limit.plain"

    def run(inp: Path, out: Path, step: int, encrypt: bool) -> Sample:
        inbuf, outbuf = bytearray(step), bytearray(step + 16)
        in_ptr, out_ptr, view = raw.ptr(inbuf), raw.ptr(outbuf), memoryview(outbuf)
        start = _clock()
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
        return _since(start)

    enc_s = [run(src, sealed, CHUNK, True) for _ in range(repeat)]
    dec_s = [run(sealed, plain, CHUNK + 16, False) for _ in range(repeat)]
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
            res = _run_child(python, ["--child", kind, str(src), str(work), "1"])
            _drop_outputs(work, name)
            acc = runs[name]
            if "error" in res:
                acc["error"] = res["error"]
                continue
            acc["enc_s"] += res["enc_s"]
            acc["dec_s"] += res["dec_s"]
            acc["ok"] = acc["ok"] and res["ok"]
            acc["rss_mib"] = max(acc["rss_mib"], res["rss_mib"])
    return {name: _timing(size, acc) for name, acc in runs.items()}


def _drop_outputs(work: Path, method: str) -> None:
    """Free the tmpfs space of one method's streamed outputs before the next one runs."""
    prefix = "v6" if method == "v6_stream" else method
    for suffix in ("sealed", "plain"):
        (work / f"{prefix}.{suffix}").unlink(missing_ok=True)


def _timing(size: int, res: dict[str, Any]) -> Timing:
    if "error" in res or not res.get("ok", False):
        print(f"  note: child failed: {res.get('error', 'output did not round-trip')}", file=sys.stderr)
        return {"enc": None, "dec": None, "enc_cpu": None, "dec_cpu": None, "rss_mib": res.get("rss_mib")}
    return {
        "enc": _median_mibps(size, res["enc_s"]),
        "dec": _median_mibps(size, res["dec_s"]),
        "enc_cpu": _median_mibps(size, res["enc_s"], 1),
        "dec_cpu": _median_mibps(size, res["dec_s"], 1),
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


def _times(repeat: int, fn: Callable[[], object]) -> list[Sample]:
    """Like _per_call: each result is freed after its clock stops."""
    seconds = []
    for _ in range(repeat):
        start = _clock()
        result = fn()
        seconds.append(_since(start))
        del result
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
    python: str, sizes: list[int], big: int, work: Path, repeat: int
) -> dict[str, dict[str, Timing]]:
    """vantage6 default string mode (all sizes, in memory) and stream mode in memory (its file-to-file
    stream at the largest size runs interleaved with vfed in bench_stream)."""
    memory_sizes = [*sizes, big]
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
    """MiB/s and MiB without decimals; ratios (suffix "x") with two."""
    if value is None:
        return "-"
    return f"{value:.2f}x" if suffix == "x" else f"{value:,.0f}{suffix}"


ROW_ORDER = (
    "vfed",
    "vfed_1thread",
    "limit",
    "limit_threads",
    "limit_reuse",
    "vfed_chunks",
    "vfed_committed",
    "v6_str",
    "v6_stream",
)


def print_table(results: dict[str, dict[str, Timing]], notes: list[str]) -> None:
    print(
        f"{'payload':>9} {'method':<15}{'wall enc':>9}{'dec':>8}{'x limit':>13}"
        f"{'CPU enc':>9}{'dec':>8}{'x limit':>13}{'peak RSS':>10}   (MiB/s)"
    )
    for size, rows in results.items():
        for name in ROW_ORDER:
            row = rows.get(name)
            if row is None:
                continue
            base = rows.get("limit", {})
            cells = []
            for suffix in ("", "_cpu"):
                enc, dec = row.get(f"enc{suffix}"), row.get(f"dec{suffix}")
                ratios = (_ratio(enc, base.get(f"enc{suffix}")), _ratio(dec, base.get(f"dec{suffix}")))
                cells.append(
                    f"{_fmt(enc):>9}{_fmt(dec):>8}{_fmt(ratios[0], 'x'):>7}/{_fmt(ratios[1], 'x'):<5}"
                )
            rss = _fmt(row.get("rss_mib"), " MiB")
            print(f"{_label(int(size)):>9} {name:<15}{cells[0]}{cells[1]}{rss:>10}")
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
    extra = ("limit_reuse", "limit_threads", "vfed_1thread", "vfed_chunks", "vfed_committed")
    for method in extra:
        out[f"{method}_enc_mibps"], out[f"{method}_dec_mibps"] = get(method, "enc"), get(method, "dec")
    for method in ("vfed", "limit", "v6_str", *extra):
        for d in ("enc", "dec"):
            out[f"{method}_{d}_cpu_mibps"] = get(method, f"{d}_cpu")
    for d in ("enc", "dec"):
        out[f"ratio_vfed_limit_{d}_cpu"] = _ratio(out[f"vfed_{d}_cpu_mibps"], out[f"limit_{d}_cpu_mibps"])
        out[f"ratio_vfed_v6_str_{d}_cpu"] = _ratio(out[f"vfed_{d}_cpu_mibps"], out[f"v6_str_{d}_cpu_mibps"])
    out["ratio_vfed_limit_enc"] = _ratio(out["vfed_enc_mibps"], out["limit_enc_mibps"])
    out["ratio_vfed_limit_dec"] = _ratio(out["vfed_dec_mibps"], out["limit_dec_mibps"])
    out["ratio_vfed_v6_str_enc"] = _ratio(out["vfed_enc_mibps"], out["v6_str_enc_mibps"])
    out["ratio_vfed_v6_str_dec"] = _ratio(out["vfed_dec_mibps"], out["v6_str_dec_mibps"])
    for d in ("enc", "dec"):
        out[f"ratio_vfed_limit_reuse_{d}"] = _ratio(out[f"vfed_{d}_mibps"], out[f"limit_reuse_{d}_mibps"])
    out["figures_payload_mib"], out["stream_payload_mib"] = mid // MIB, big // MIB
    out["threads"] = _bench_threads()
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
        "in memory: vfed = encrypt_bytes/decrypt_bytes on its default thread count, vfed_1thread the "
        "same with threads=1; limit = raw libsodium AES-256-GCM on one thread into a new zero-filled "
        "buffer per run; limit_threads = the same chunks on N threads into a new calloc'd bytes; "
        "limit_reuse = one thread into one reused buffer (cipher only, no page faults); ratios are "
        "against limit",
        f"threads: vfed and limit_threads use {_bench_threads()} (VFED_CRYPTO_THREADS, else "
        f"min(4, CPUs); CPUs here: {os.cpu_count()}); the CPU columns add up all threads' time",
    ]
    notes.append(f"load average at start {_loadavg()} on {os.cpu_count()} CPUs")
    results: dict[str, dict[str, Timing]] = {}
    for size in memory_sizes:
        _progress(args.json, f"in memory {_label(size)}")
        results[str(size)] = bench_memory(size, args.repeat)
    v6_python, how = (None, "vantage6 skipped (--no-v6)") if args.no_v6 else find_v6_python()
    notes.append(how)
    tmpdir = args.tmpdir or _default_tmpdir(big)
    notes.append(f"streamed files in {tmpdir or tempfile.gettempdir()}")
    with tempfile.TemporaryDirectory(dir=tmpdir, prefix="vfed-bench-") as tmp:
        work = Path(tmp)
        src = work / "payload.bin"
        _make_file(src, big)
        _progress(args.json, f"streaming {_label(big)}")
        stream_methods = [("vfed", sys.executable, "stream-vfed"), ("limit", sys.executable, "stream-limit")]
        if v6_python:
            stream_methods.append(("v6_stream", v6_python, "stream-v6"))
        results[str(big)] = bench_stream(src, work, args.repeat, stream_methods)
    if v6_python:
        notes.append(
            "vantage6 string mode is fed JSON text (it cannot round-trip arbitrary bytes) and holds the "
            "whole payload in memory, also at the streamed size"
        )
        _progress(args.json, "vantage6 in memory")
        with tempfile.TemporaryDirectory(prefix="vfed-bench-v6-") as tmp:
            for key, rows in bench_v6(v6_python, memory_sizes, big, Path(tmp), args.repeat).items():
                results.setdefault(key, {}).update(rows)
    notes.append(f"load average at end {_loadavg()}")
    if args.json:
        print(json.dumps(summary(results, mid, big, notes)))
    else:
        print_table(results, notes)
        _print_targets(summary(results, mid, big, notes))


def _loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _progress(quiet: bool, what: str) -> None:
    if not quiet:
        print(f"... {what}", file=sys.stderr, flush=True)


def _print_targets(s: dict[str, Any]) -> None:
    def pair(key: str) -> str:
        return f"{_fmt(s[f'{key}_enc'], 'x')}/{_fmt(s[f'{key}_dec'], 'x')}"

    def pair_cpu(key: str) -> str:
        return f"{_fmt(s[f'{key}_enc_cpu'], 'x')}/{_fmt(s[f'{key}_dec_cpu'], 'x')}"

    print(
        f"targets at {s['figures_payload_mib']} MiB (enc/dec, wall | CPU): "
        f"vfed/limit {pair('ratio_vfed_limit')} | {pair_cpu('ratio_vfed_limit')} (>= 0.80x); "
        f"vfed/vantage6-string {pair('ratio_vfed_v6_str')} | {pair_cpu('ratio_vfed_v6_str')} (>= 10x)"
    )
    print(
        f"peak RSS of the vfed {s['stream_payload_mib']} MiB stream: "
        f"{_fmt(s['stream_1gib_peak_rss_mib'], ' MiB')} (target <= 64 MiB)"
    )


if __name__ == "__main__":
    main()
