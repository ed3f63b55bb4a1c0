"""What a Fabric-held ledger adds to a run's dispatch (issue 15): bench/node.py --leases with the server's
embedded ledger and with `--ledger fabric`, in blocks that alternate (and alternate which goes first), all in
one run on this machine.

Each block runs `bench/node.py --leases [--ledger fabric] --runs R --rounds 1 --json` as its own process; the
figure is (b)'s `dispatch_beyond_bare_between_paired` per run (each run's dispatch minus a bare Docker start
measured right after it, so the machine's drift cancels), pooled over a side's blocks. The overhead is the
Fabric side's p50 minus the embedded side's, with a 95% bootstrap interval (bench/node_compare.py's).
Target: at most 1 ms.

Run: `flock -x /tmp/vfed-cpu.lock .venv/bin/python bench/node_ledger_compare.py [--blocks 4] [--runs 50]
[--json]`. Keys: `embedded_dispatch_beyond_bare_between_paired_p50_ms`,
`fabric_dispatch_beyond_bare_between_paired_p50_ms`, `fabric_dispatch_overhead_p50_ms`,
`fabric_dispatch_overhead_ci95_ms`, `runs_per_side`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from node_compare import overhead_ci95, percentile

HERE = Path(__file__).resolve().parent
PAIRED = "dispatch_beyond_bare_between_paired"
SIDES = {"embedded": ["--leases"], "fabric": ["--leases", "--ledger", "fabric"]}


def block(side: str, runs: int) -> list[float]:
    """One bench/node.py process on one side; its runs' paired figures (ms)."""
    argv = [
        sys.executable,
        str(HERE / "node.py"),
        *SIDES[side],
        "--runs",
        str(runs),
        "--rounds",
        "1",
        "--json",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench/node.py ({side}) failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if report.get("ledger") != side or report.get("lease_receipts", 0) < runs:
        raise SystemExit(
            f"bench/node.py ({side}) did not run leased runs with receipts on that ledger: {report}"
        )
    return [float(v) for v in report["per_run_ms"][PAIRED]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4, help="blocks per side (default 4)")
    parser.add_argument("--runs", type=int, default=50, help="runs per block (default 50)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    pooled: dict[str, list[float]] = {side: [] for side in SIDES}
    per_block: dict[str, list[float]] = {side: [] for side in SIDES}
    for number in range(args.blocks):
        order = ["embedded", "fabric"] if number % 2 == 0 else ["fabric", "embedded"]
        for side in order:
            values = block(side, args.runs)
            pooled[side].extend(values)
            per_block[side].append(round(percentile(values, 0.5), 2))
            print(f"block {number + 1} {side}: p50 {per_block[side][-1]} ms", file=sys.stderr)
    embedded, fabric = (round(percentile(pooled[s], 0.5), 2) for s in ("embedded", "fabric"))
    report: dict[str, Any] = {
        f"embedded_{PAIRED}_p50_ms": embedded,
        f"fabric_{PAIRED}_p50_ms": fabric,
        "fabric_dispatch_overhead_p50_ms": round(fabric - embedded, 2),
        "fabric_dispatch_overhead_ci95_ms": overhead_ci95(pooled["embedded"], pooled["fabric"]),
        "runs_per_side": len(pooled["fabric"]),
        "p50_ms_per_block": per_block,
    }
    if args.json:
        print(json.dumps(report))
        return
    low, high = report["fabric_dispatch_overhead_ci95_ms"]
    print(
        f"dispatch beyond a bare Docker start (paired p50, {report['runs_per_side']} runs a side): embedded "
        f"ledger {embedded} ms, Fabric ledger {fabric} ms; the Fabric ledger adds "
        f"{report['fabric_dispatch_overhead_p50_ms']} ms (95% interval {low} to {high}; target: at most 1 ms)"
    )


if __name__ == "__main__":
    main()
