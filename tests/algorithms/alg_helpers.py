"""Shared helpers for the algorithm tests: generated partitions, example modules, the wrapper subprocess."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "algorithms" / "examples"
EXAMPLE_NAMES = ("summary_stats", "federated_glm", "dp_stats")
SDK_ROOTS = (ROOT / "algorithms", ROOT / "common")
"""The SDK's source roots in this checkout: a wrapper subprocess runs them, not whatever vfed is installed."""


def sdk_pythonpath(*folders: Path) -> str:
    """PYTHONPATH for a wrapper subprocess: the given folders (an algorithm's), then this checkout's SDK."""
    return os.pathsep.join(str(p) for p in (*folders, *SDK_ROOTS))


def example(name: str) -> ModuleType:
    """Import an example module from algorithms/examples/<name>/<name>.py."""
    folder = str(EXAMPLES / name)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def partitions(seed: int = 7, sizes: tuple[int, ...] = (120, 80, 200)) -> list[pd.DataFrame]:
    """Three organizations' data with different distributions, missing values and a binary outcome."""
    rng = np.random.default_rng(seed)
    frames = []
    for index, n in enumerate(sizes):
        age = rng.normal(50 + 5 * index, 12, n)
        bmi = rng.normal(26 + index, 4, n)
        logit = -8 + 0.08 * age + 0.12 * bmi
        frame = pd.DataFrame(
            {
                "age": age,
                "bmi": bmi,
                "cost": 1000 + 30 * age + 50 * bmi + rng.normal(0, 200, n),
                "event": (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int),
                "site": [f"site-{index}"] * n,
            }
        )
        frame.loc[rng.choice(n, size=n // 10, replace=False), "bmi"] = np.nan
        frames.append(frame)
    return frames


def run_wrapper(
    tmp_path: Path,
    task_input: Mapping[str, Any] | bytes,
    env: Mapping[str, str],
    module: str | None = None,
    pythonpath: list[Path] | None = None,
) -> tuple[subprocess.CompletedProcess[str], bytes | None]:
    """Run `python -m vfed.algorithms` as the node would; returns the process and the output bytes."""
    input_file, output_file = tmp_path / "input.json", tmp_path / "output"
    data = task_input if isinstance(task_input, bytes) else json.dumps(task_input).encode()
    input_file.write_bytes(data)
    output_file.unlink(missing_ok=True)
    full_env = {
        "PATH": os.environ.get("PATH", ""),
        "INPUT_FILE": str(input_file),
        "OUTPUT_FILE": str(output_file),
        "PYTHONPATH": sdk_pythonpath(*(pythonpath or [])),
        **env,
    }
    if module:
        full_env["VFED_ALGORITHM_MODULE"] = module
    process = subprocess.run(
        [sys.executable, "-m", "vfed.algorithms"],
        check=False,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return process, output_file.read_bytes() if output_file.exists() else None
