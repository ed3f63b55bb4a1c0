"""Benchmark: the algorithm payload format and the SDK wrapper's fixed cost.

- encode_result / decode_result of a table (Parquet) and of a plain value (JSON), median of N runs;
- the cold start of `python -m vfed.algorithms` on the host (a federated partial_stats over a small CSV);
- the same run as the node does it, `docker run --network none` of vfed-examples/summary_stats (when present).

    .venv/bin/python bench/algorithms.py            # table
    .venv/bin/python bench/algorithms.py --json     # one JSON object
"""

from __future__ import annotations

import argparse
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

import numpy as np
import pandas as pd

from report import emit
from vfed.common.payload import TaskInput, decode_result, encode_result

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "algorithms" / "examples" / "summary_stats"
IMAGE = "vfed-examples/summary_stats:latest"


def _median_s(action: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def payload(rows: int, repeat: int) -> dict[str, Any]:
    """Encode/decode speed of a numeric table with rows x 5 columns, and a dict of 100k floats."""
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(rng.normal(size=(rows, 5)), columns=list("abcde"))
    table = encode_result(frame)
    value = {"values": rng.normal(size=100_000).tolist()}
    document = encode_result(value)
    mib = frame.memory_usage(deep=True).sum() / (1 << 20)
    encode_s = _median_s(lambda: encode_result(frame), repeat)
    decode_s = _median_s(lambda: decode_result(table), repeat)
    return {
        "table_rows": rows,
        "table_mib_in_memory": round(mib, 1),
        "table_parquet_mib": round(len(table) / (1 << 20), 1),
        "table_encode_mibps": round(mib / encode_s, 1),
        "table_decode_mibps": round(mib / decode_s, 1),
        "json_100k_floats_bytes": len(document),
        "json_encode_ms": round(_median_s(lambda: encode_result(value), repeat) * 1000, 1),
        "json_decode_ms": round(_median_s(lambda: decode_result(document), repeat) * 1000, 1),
    }


def _inputs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o777)
    rng = np.random.default_rng(2)
    frame = pd.DataFrame({"x": rng.normal(size=1000), "y": rng.normal(size=1000)})
    frame.to_csv(folder / "data.csv", index=False)
    (folder / "input").write_bytes(TaskInput(method="partial_stats").to_json())


def _child_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wrapper_host(repeat: int) -> tuple[float, float]:
    """Wall and CPU seconds from process start to exit of the wrapper on the host (medians).

    CPU time is the steadier figure on a shared machine; wall time includes waiting for a core.
    """
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _inputs(folder)
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(EXAMPLE),
            "VFED_ALGORITHM_MODULE": "summary_stats",
            "INPUT_FILE": str(folder / "input"),
            "OUTPUT_FILE": str(folder / "output"),
            "DATASETS": "default",
            "DATASET_DEFAULT_URI": str(folder / "data.csv"),
            "DATASET_DEFAULT_TYPE": "csv",
        }
        command = [sys.executable, "-m", "vfed.algorithms"]
        walls, cpus = [], []
        for _ in range(repeat):
            cpu, started = _child_cpu_s(), time.perf_counter()
            subprocess.run(command, env=env, check=True, capture_output=True)
            walls.append(time.perf_counter() - started)
            cpus.append(_child_cpu_s() - cpu)
        return statistics.median(walls), statistics.median(cpus)


def wrapper_docker(repeat: int) -> float | None:
    """Seconds for `docker run` of the example image as the node runs it (median), or None without it."""
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, check=False).returncode:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _inputs(folder)
        command = [
            "docker", "run", "--rm", "--network", "none", "--cap-drop", "ALL", "--read-only",
            "-v", f"{folder}:/mnt/run", "-v", f"{folder / 'data.csv'}:/mnt/data/default:ro",
            "-e", "INPUT_FILE=/mnt/run/input", "-e", "OUTPUT_FILE=/mnt/run/output",
            "-e", "DATASETS=default", "-e", "DATASET_DEFAULT_URI=/mnt/data/default",
            "-e", "DATASET_DEFAULT_TYPE=csv", IMAGE,
        ]  # fmt: skip
        return _median_s(lambda: subprocess.run(command, check=True, capture_output=True), repeat)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    results: dict[str, Any] = payload(options.rows, options.repeat)
    wall_s, cpu_s = wrapper_host(options.repeat)
    results["wrapper_host_wall_s"] = round(wall_s, 3)
    results["wrapper_host_cpu_s"] = round(cpu_s, 3)
    results["load_average_1min"] = os.getloadavg()[0]
    docker_s = wrapper_docker(options.repeat)
    results["wrapper_docker_s"] = None if docker_s is None else round(docker_s, 3)
    emit(results, options.json)


if __name__ == "__main__":
    main()
