"""What a lease check adds to a run's dispatch (issue 14): bench/node.py's (b) on the baseline code (main
before any ledger work) and on this tree with `--leases`, interleaved in one run.

The baseline is a git worktree of BASELINE in a temporary folder (removed at the end). Both sides run the
same harness (this tree's bench/node.py and bench/node_bare.py, copied into the worktree; without `--leases`
it does what it always did) on their own code: the baseline with PYTHONPATH naming the worktree's source
roots, which come before this tree's on sys.path, so its `vnode run` agents (the venv's entry point script)
and its `python -m vfed.server.cli` server import the worktree's modules; checked before the first block.
Blocks alternate B L L B B L L B ..., each `bench/node.py --runs N/blocks --rounds 1 --json`, so a drift of
the machine over the run falls on both sides alike. Each run's dispatch is paired with the bare Docker
create+start measured right after it (bench/node.py's `dispatch_beyond_bare_between_paired`); the figure per
side is the p50 over all its runs, and the lease overhead is the current side's minus the baseline's.

Run: `flock -x /tmp/vfed-cpu.lock .venv/bin/python bench/node_compare.py [--runs 200] [--blocks 4] [--json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "8c5d2c9"
"""main before any ledger work."""
SOURCE_ROOTS = ("common", "node", "server", "proxy", "algorithms", "client")
HARNESS = ("node.py", "node_bare.py")
TARGET_MS = 1.0
PAIRED = "dispatch_beyond_bare_between_paired"
VNODE = str(Path(sys.executable).parent / "vnode")
PROBE = """
import importlib.util, json
import vfed.client.client, vfed.common.crypto, vfed.node.agent, vfed.node.cli, vfed.proxy, vfed.server.app
mods = [vfed.client.client, vfed.common.crypto, vfed.node.agent, vfed.node.cli, vfed.proxy, vfed.server.app]
print(json.dumps({
    "files": {m.__name__: m.__file__ for m in mods},
    "leases_module": importlib.util.find_spec("vfed.node.leases") is not None,
}))
"""


def log(message: str) -> None:
    print(f"[node_compare {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def percentile(values: list[float], q: float) -> float:
    """bench/node.py's percentile: the value at the rounded rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Side:
    """One side of the comparison: where its bench runs, with which environment, and what it measured."""

    def __init__(self, name: str, root: Path, env: dict[str, str], extra: list[str]) -> None:
        self.name = name
        self.root = root
        self.env = env
        self.extra = extra
        self.blocks: list[dict[str, Any]] = []

    def run_block(self, runs: int) -> dict[str, Any]:
        command = [sys.executable, str(self.root / "bench" / "node.py"), "--runs", str(runs)]
        command += ["--rounds", "1", "--json", *self.extra]
        done = subprocess.run(
            command, check=False, cwd=self.root, env=self.env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{self.name} block failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
            )
        for line in reversed(done.stdout.splitlines()):
            if line.startswith("{"):
                report: dict[str, Any] = json.loads(line)
                self.blocks.append(report)
                return report
        raise RuntimeError(f"{self.name} block printed no JSON:\n{done.stdout[-2000:]}")

    def pooled(self, key: str) -> list[float]:
        return [value for block in self.blocks for value in block["per_run_ms"][key]]

    def summary(self) -> dict[str, Any]:
        paired = self.pooled(PAIRED)
        steps: dict[str, list[float]] = {}
        for block in self.blocks:
            for key, value in block.items():
                if key.startswith("step_p50_ms."):
                    steps.setdefault(key.removeprefix("step_p50_ms."), []).append(value)
        return {
            "runs": len(paired),
            f"{PAIRED}_p50_ms": round(percentile(paired, 0.5), 2),
            f"{PAIRED}_mean_ms": round(statistics.fmean(paired), 2),
            f"{PAIRED}_p50_ms_per_block": [b[f"{PAIRED}_p50_ms"] for b in self.blocks],
            "dispatch_p50_ms": round(percentile(self.pooled("dispatch"), 0.5), 2),
            "bare_between_p50_ms": round(percentile(self.pooled("bare_between"), 0.5), 2),
            "task_post_p50_ms": round(percentile(self.pooled("task_post"), 0.5), 2),
            "post_to_create_p50_ms": round(percentile(self.pooled("post_to_create"), 0.5), 2),
            "dispatch_from_post_sent_p50_ms": round(
                percentile(self.pooled("dispatch_from_post_sent"), 0.5), 2
            ),
            # The agent's start marks, ms after the POST's answer: the median over blocks of each block's p50.
            "steps_p50_ms": {k: round(statistics.median(v), 1) for k, v in steps.items()},
        }


def overhead_ci95(base: list[float], lease: list[float], rounds: int = 2000) -> list[float]:
    """A 95% bootstrap interval of p50(lease) - p50(base), runs resampled within each side: how far the
    difference of this run's p50s can be from the machine's noise alone."""
    rng = random.Random(14)
    diffs = sorted(
        percentile(rng.choices(lease, k=len(lease)), 0.5) - percentile(rng.choices(base, k=len(base)), 0.5)
        for _ in range(rounds)
    )
    return [round(percentile(diffs, 0.025), 2), round(percentile(diffs, 0.975), 2)]


def add_worktree(folder: Path) -> Path:
    tree = folder / "baseline"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), BASELINE],
        check=True,
        capture_output=True,
    )
    for name in HARNESS:  # the same measuring code on both sides; only the product code differs
        shutil.copy2(ROOT / "bench" / name, tree / "bench" / name)
    return tree


def remove_worktree(tree: Path) -> None:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=False)


def environments(tree: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(baseline, current) environments: the baseline's source roots first on sys.path; the current side
    with no PYTHONPATH (the venv's .pth names this tree's roots)."""
    current = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    paths = [str(tree / r) for r in SOURCE_ROOTS] + [str(tree)]
    return {**current, "PYTHONPATH": os.pathsep.join(paths)}, current


def check_code(env: dict[str, str], root: Path, leases: bool) -> dict[str, Any]:
    """The side imports its own code (every module under `root`; the ledger's node module only on the current
    side), in the interpreter and through the `vnode` entry point the agents are started with."""
    found = json.loads(
        subprocess.run(
            [sys.executable, "-c", PROBE], env=env, cwd=root, capture_output=True, text=True, check=True
        ).stdout
    )
    wrong = {m: f for m, f in found["files"].items() if not Path(f).resolve().is_relative_to(root.resolve())}
    if wrong or found["leases_module"] != leases:
        raise RuntimeError(f"code under {root} not the one imported: {found}")
    commands = subprocess.run([VNODE, "--help"], env=env, capture_output=True, text=True, check=True).stdout
    has_ledger = any(line.split()[:1] == ["ledger"] for line in commands.splitlines())
    if has_ledger != leases:
        which = "lacks" if leases else "has"
        raise RuntimeError(f"`vnode --help` under {root} {which} `ledger`:\n{commands}")
    return {"modules": found["files"], "vnode_ledger_command": has_ledger}


def compare(runs: int, blocks: int) -> dict[str, Any]:
    per_block = runs // blocks
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="vfed-node-compare-") as tmp:
        tree = add_worktree(Path(tmp))
        try:
            baseline_env, current_env = environments(tree)
            checks = {
                "baseline": check_code(baseline_env, tree, leases=False),
                "leases": check_code(current_env, ROOT, leases=True),
            }
            log(f"imports checked: {json.dumps(checks)}")
            sides = {
                "baseline": Side("baseline", tree, baseline_env, []),
                "leases": Side("leases", ROOT, current_env, ["--leases"]),
            }
            for block in range(blocks):
                order = ["baseline", "leases"] if block % 2 == 0 else ["leases", "baseline"]
                for name in order:
                    started = time.monotonic()
                    report = sides[name].run_block(per_block)
                    log(
                        f"block {block + 1}/{blocks} {name}: {PAIRED}_p50_ms {report[f'{PAIRED}_p50_ms']} "
                        f"({time.monotonic() - started:.0f} s; load {loadavg()})"
                    )
        finally:
            remove_worktree(tree)
    base, lease = sides["baseline"].summary(), sides["leases"].summary()
    overhead = lease[f"{PAIRED}_p50_ms"] - base[f"{PAIRED}_p50_ms"]
    return {
        f"baseline_{PAIRED}_p50_ms": base[f"{PAIRED}_p50_ms"],
        f"leases_{PAIRED}_p50_ms": lease[f"{PAIRED}_p50_ms"],
        "lease_overhead_p50_ms": round(overhead, 2),
        "lease_overhead_p50_ci95_ms": overhead_ci95(
            sides["baseline"].pooled(PAIRED), sides["leases"].pooled(PAIRED)
        ),
        "target_ms": TARGET_MS,
        "met": overhead <= TARGET_MS,
        "runs_per_side": base["runs"],
        "blocks_per_side": blocks,
        "baseline_commit": BASELINE,
        "baseline": base,
        "leases": lease,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="runs of (b) per side, over all blocks")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per side")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = compare(args.runs, args.blocks)
    if args.json:
        print(json.dumps(result))
        return
    for side in ("baseline", "leases"):
        s = result[side]
        print(
            f"{side}: {s['runs']} runs, dispatch beyond the bare start between, paired: p50 "
            f"{s[f'{PAIRED}_p50_ms']} ms (per block {s[f'{PAIRED}_p50_ms_per_block']}); dispatch p50 "
            f"{s['dispatch_p50_ms']} ms, create_task p50 {s['task_post_p50_ms']} ms, its answer to Docker's "
            f"create p50 {s['post_to_create_p50_ms']} ms"
        )
        print("    steps p50 ms after the POST's answer: " + json.dumps(s["steps_p50_ms"]))
    print(
        f"lease overhead (leases - baseline), p50: {result['lease_overhead_p50_ms']} ms (bootstrap 95% "
        f"interval {result['lease_overhead_p50_ci95_ms']}); target "
        f"<= {TARGET_MS} ms: {'met' if result['met'] else 'NOT met'}"
    )
    print(f"load before {result['loadavg_before']}, after {result['loadavg_after']}")


if __name__ == "__main__":
    main()
