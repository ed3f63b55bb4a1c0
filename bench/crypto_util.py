"""Shared pieces of bench/crypto.py: clocks, sizes, the child-process runner and the per-method timing.

Stdlib only at import time: vantage6's interpreter (build/v6venv) imports this too, without vfed.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MIB = 1 << 20
CHUNK = MIB  # vfed's default chunk size; the limit and vantage6 stream mode use the same
REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "crypto.py"  # what child processes run
Timing = dict[str, float | None]
Sample = list[float]  # [wall-clock seconds, CPU seconds (user + system) of the measuring process]


def clock() -> Sample:
    return [time.perf_counter(), time.process_time()]


def since(start: Sample) -> Sample:
    now = clock()
    return [now[0] - start[0], now[1] - start[1]]


def median_mibps(size: int, samples: list[Sample], which: int = 0) -> float:
    """Throughput of the median sample; which=0 wall clock, which=1 CPU time (immune to co-tenants)."""
    return round(size / MIB / max(statistics.median(s[which] for s in samples), 1e-9), 1)


def times(repeat: int, fn: Callable[[], object]) -> list[Sample]:
    """Seconds per call; each result is freed after its clock stops (see crypto_memory.per_call)."""
    seconds = []
    for _ in range(repeat):
        start = clock()
        result = fn()
        seconds.append(since(start))
        del result
    return seconds


def timing(size: int, res: dict[str, Any]) -> Timing:
    """One table row from raw samples: median MiB/s wall and CPU, or Nones when the method failed."""
    if "error" in res or not res.get("ok", False):
        print(f"  note: child failed: {res.get('error', 'output did not round-trip')}", file=sys.stderr)
        return {"enc": None, "dec": None, "enc_cpu": None, "dec_cpu": None, "rss_mib": res.get("rss_mib")}
    return {
        "enc": median_mibps(size, res["enc_s"]),
        "dec": median_mibps(size, res["dec_s"]),
        "enc_cpu": median_mibps(size, res["enc_s"], 1),
        "dec_cpu": median_mibps(size, res["dec_s"], 1),
        "rss_mib": res.get("rss_mib"),
    }


def peak_rss_mib() -> float:
    """VmHWM of this process; ru_maxrss would carry the parent's RSS over fork+exec on Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_child(python: str, args: list[str], timeout_s: float = 3600) -> dict[str, Any]:
    """Run `python bench/crypto.py --child ...` and return the JSON object its last line prints."""
    proc = subprocess.run(
        [python, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["child failed"])[-1]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def same_file(a: Path, b: Path) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            pa, pb = fa.read(MIB), fb.read(MIB)
            if pa != pb:
                return False
            if not pa:
                return True


def default_tmpdir(size: int) -> str | None:
    """tmpfs keeps disk speed out of a crypto benchmark; fall back to the system temp folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        stats = os.statvfs(shm)
        if stats.f_bavail * stats.f_frsize > 4 * size:
            return str(shm)
    return None


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MIB, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def label(size: int) -> str:
    return f"{size >> 30} GiB" if size >= 1 << 30 else f"{size // MIB} MiB"


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def progress(quiet: bool, what: str) -> None:
    if not quiet:
        print(f"... {what}", file=sys.stderr, flush=True)
