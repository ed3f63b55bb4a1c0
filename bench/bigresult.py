"""A 10 GiB result from a node's algorithm to the researcher's disk, each process's peak memory, beside `cp`.

    python bench/bigresult.py [--json] [--size-gib 10]

In one run on this machine:
- the baseline: `cp` of a file of the same size on the same disk, followed by an fsync of the copy (the
  vfed path syncs what it writes too), in MiB/s;
- the vfed path, as deployed: `vserver start` (its own process, SQLite, file blob store), one `vnode run`
  agent with Docker, and the researcher's client in a process of its own. The probe algorithm writes a JSON
  result holding SIZE bytes (1 MiB at a time); the agent seals it to the researcher (streamed, to a file) and
  uploads it (streamed); the server stores it (streamed); the client streams it to its disk and decrypts it
  there (`results(task, to=DIR)`). `throughput_mibps` is SIZE over the time from the algorithm's container
  exiting (Docker's `die` event) to the decrypted file complete at the researcher; `end_to_end_s` counts
  from the task's creation.
- peak RSS (the kernel's high-water mark, VmHWM) of the agent, the server and the client processes.

Targets (issue 19): each process <= 150 MiB; throughput >= 0.3x `cp` (the path writes the bytes more often
than `cp` does once: the algorithm's output, the sealed copy at the node, the server's blob, the client's
file). The machine needs about 5x SIZE free on the disk of /tmp and Docker's volumes; the bench checks first.
Not part of `make test` (tests/node/test_node_bigresult.py runs the same path with 1 GiB).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from report import emit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the test harness

MIB = 1024 * 1024
GIB = 1024 * MIB
TARGET_RSS_MIB = 150
TARGET_RATIO = 0.3


def free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


def check_space(size: int, work: Path) -> None:
    need = 5 * size + 2 * GIB
    for where in (str(work), "/var/lib/docker"):
        if os.path.exists(where) and free_bytes(where) < need:
            fits = max(1, free_bytes(where) // 5 // GIB - 1)
            raise SystemExit(
                f"bigresult: {where} has {free_bytes(where) / GIB:.1f} GiB free, the run needs about "
                f"{need / GIB:.1f} GiB (5x the result): use --size-gib {fits}"
            )


def cp_mibps(size: int, work: Path) -> float:
    """`cp` of a SIZE file on the same disk, then fsync of the copy; the source is written (not timed) from
    a random block repeated."""
    src, dst = work / "cp-src", work / "cp-dst"
    block = os.urandom(MIB)
    with src.open("wb") as handle:
        for _ in range(size // MIB):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    subprocess.run(["sync"], check=True)
    try:
        started = time.perf_counter()
        subprocess.run(["cp", "--reflink=never", str(src), str(dst)], check=True)
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return size / MIB / (time.perf_counter() - started)
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--size-gib", type=float, default=10.0, help="the result's size (default 10)")
    args = parser.parse_args()
    size = int(args.size_gib * GIB)
    with tempfile.TemporaryDirectory(prefix="vfed-bench-bigresult-") as d:
        work = Path(d)
        check_space(size, work)
        cp = cp_mibps(size, work)
        from tests.node.bigresult_kit import vfed_path

        report: dict[str, Any] = asyncio.run(vfed_path(size, work))
    report["cp_mibps"] = cp
    report["ratio_vs_cp"] = report["throughput_mibps"] / cp
    report["targets_met"] = {
        "ratio_vs_cp": report["ratio_vs_cp"] >= TARGET_RATIO,
        **{
            key: report[key] <= TARGET_RSS_MIB
            for key in ("agent_peak_rss_mib", "server_peak_rss_mib", "client_peak_rss_mib")
        },
    }
    emit(report, args.json)


if __name__ == "__main__":
    main()
