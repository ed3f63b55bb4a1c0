"""Benchmark: the vfed envelope against raw libsodium AES-256-GCM and vantage6's RSACryptor.

Payloads of 1 MiB and 100 MiB in memory and 1 GiB streamed file to file; encrypt and decrypt, median
of N runs. The 1 GiB streams run in fresh child processes so their peak RSS is their own. vantage6 runs
in another interpreter when it is not importable here (VFED_BENCH_V6_PYTHON, or build/v6venv).

    .venv/bin/python bench/crypto.py            # table
    .venv/bin/python bench/crypto.py --json     # one JSON object (100 MiB figures + 1 GiB peak RSS)
    .venv/bin/python bench/crypto.py --quick    # 1 MiB, 16 MiB, 128 MiB: a smoke run

The parts live beside this file: crypto_memory.py (vfed and the limit in memory), crypto_stream.py
(file to file), crypto_v6.py (vantage6), crypto_report.py (table and JSON), crypto_util.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from crypto_memory import bench_memory, bench_threads
from crypto_report import print_table, print_targets, summary
from crypto_stream import StreamMethod, bench_stream, child_stream_limit, child_stream_vfed, make_file
from crypto_util import CHUNK, MIB, Timing, default_tmpdir, label, loadavg, parse_size, progress
from crypto_v6 import bench_v6, child_stream_v6, child_v6_memory, find_v6_python

Results = dict[str, dict[str, Timing]]


def child_main(argv: list[str]) -> None:
    kind, rest = argv[0], argv[1:]
    if kind == "v6-memory":
        sizes = [int(x) for x in rest[0].split(",")]
        result = child_v6_memory(sizes, Path(rest[1]), int(rest[2]), int(rest[3]))
    else:
        runner = {"stream-vfed": child_stream_vfed, "stream-limit": child_stream_limit}
        runner["stream-v6"] = child_stream_v6
        result = runner[kind](Path(rest[0]), Path(rest[1]), int(rest[2]))
    print(json.dumps(result))


def parse_args() -> argparse.Namespace:
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
    return parser.parse_args()


def first_notes(big: int) -> list[str]:
    return [
        f"chunk size {CHUNK // MIB} MiB everywhere; {label(big)} streamed file to file",
        "in memory: vfed = encrypt_bytes/decrypt_bytes on its default thread count, vfed_1thread the "
        "same with threads=1; limit = raw libsodium AES-256-GCM on one thread into a new zero-filled "
        "buffer per run; limit_threads = the same chunks on N threads into a new calloc'd bytes; "
        "limit_reuse = one thread into one reused buffer (cipher only, no page faults); ratios are "
        "against limit",
        f"threads: vfed and limit_threads use {bench_threads()} (VFED_CRYPTO_THREADS, else "
        f"min(4, CPUs); CPUs here: {os.cpu_count()}); the CPU columns add up all threads' time",
        f"load average at start {loadavg()} on {os.cpu_count()} CPUs",
    ]


def run_streams(big: int, repeat: int, tmpdir: str | None, v6_python: str | None, quiet: bool) -> Results:
    """The streamed size, one fresh child per method and run (vantage6's stream too when available)."""
    with tempfile.TemporaryDirectory(dir=tmpdir, prefix="vfed-bench-") as tmp:
        work = Path(tmp)
        src = work / "payload.bin"
        make_file(src, big)
        progress(quiet, f"streaming {label(big)}")
        methods: list[StreamMethod] = [
            ("vfed", sys.executable, "stream-vfed"),
            ("limit", sys.executable, "stream-limit"),
        ]
        if v6_python:
            methods.append(("v6_stream", v6_python, "stream-v6"))
        return {str(big): bench_stream(src, work, repeat, methods)}


def run_v6_memory(results: Results, v6_python: str, sizes: list[int], big: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory(prefix="vfed-bench-v6-") as tmp:
        for key, rows in bench_v6(v6_python, sizes, big, Path(tmp), repeat).items():
            results.setdefault(key, {}).update(rows)


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(args.child)
        return
    sizes = [parse_size(s) for s in ("1M,16M,128M" if args.quick else args.sizes).split(",")]
    memory_sizes, big = sizes[:-1], sizes[-1]
    mid = memory_sizes[1] if len(memory_sizes) > 1 else memory_sizes[0]
    notes = first_notes(big)
    results: Results = {}
    for size in memory_sizes:
        progress(args.json, f"in memory {label(size)}")
        results[str(size)] = bench_memory(size, args.repeat)
    v6_python, how = (None, "vantage6 skipped (--no-v6)") if args.no_v6 else find_v6_python()
    notes.append(how)
    tmpdir = args.tmpdir or default_tmpdir(big)
    notes.append(f"streamed files in {tmpdir or tempfile.gettempdir()}")
    results.update(run_streams(big, args.repeat, tmpdir, v6_python, args.json))
    if v6_python:
        notes.append(
            "vantage6 string mode is fed JSON text (it cannot round-trip arbitrary bytes) and holds the "
            "whole payload in memory, also at the streamed size"
        )
        progress(args.json, "vantage6 in memory")
        run_v6_memory(results, v6_python, memory_sizes, big, args.repeat)
    notes.append(f"load average at end {loadavg()}")
    if args.json:
        print(json.dumps(summary(results, mid, big, notes)))
    else:
        print_table(results, notes)
        print_targets(summary(results, mid, big, notes))


if __name__ == "__main__":
    main()
