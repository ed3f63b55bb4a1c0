"""bench/node.py's baselines: a bare run of the probe with exactly the agent's container definition and
limits, through the CLI (issue 5's (a)) and the SDK, alone and three at once, and what one costs in CPU."""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import docker
import psutil  # type: ignore[import-untyped]
from tests.node.node_harness import PROBE_IMAGE

from vfed.common.payload import TaskInput
from vfed.node.runtime.base import RunSpec, algorithm_env
from vfed.node.runtime.docker_config import DockerRuntimeConfig
from vfed.node.runtime.docker_spec import container_kwargs

MIB = 1024 * 1024
_RUN_NUMBERS = itertools.count(1)
CONFIG = DockerRuntimeConfig(memory_bytes=256 * MIB)  # the agents' memory limit here (write_node_config)


BARE_VOLUME = "vfed-bench-bare-tmp"
"""The job volume the bare runs share (named after their node `bench` and job `bare`)."""


def remove_bare_volume() -> None:
    """The bare runs' job volume, which their mounts created: gone when the benchmark ends."""
    with contextlib.suppress(docker.errors.NotFound):
        docker.from_env().volumes.get(BARE_VOLUME).remove(force=True)


def bare_spec(work: Path, tag: str) -> RunSpec:
    """The agent's run definition for the probe, with a run folder holding its input."""
    run_dir = work / f"bare-{tag}"
    run_dir.mkdir(mode=0o777)
    run_dir.chmod(0o777)
    (run_dir / "input").write_bytes(TaskInput(method="echo", args=[1]).to_json())
    number = str(next(_RUN_NUMBERS))  # the probe wants a numeric RUN_ID
    env = algorithm_env(run_id=number, job_id="1", organization_id="1", datasets=[], with_proxy=False)
    return RunSpec(
        run_id=f"bare{tag}",
        job_id="bare",
        node_name="bench",
        organization_id="1",
        image=PROBE_IMAGE,
        env=env,
        run_dir=str(run_dir),
    )


def bare_docker_runs(work: Path, runs: int, tag: str = "") -> dict[str, list[float]]:
    """Seconds per create+start+wait+remove of the probe (SDK), with exactly the agent's container definition,
    and of its create+start alone (what Docker itself takes to start a container the agent has ready)."""
    client = docker.from_env()
    times: dict[str, list[float]] = {"run": [], "create_start": []}
    for i in range(runs):
        spec = bare_spec(work, f"{tag}{i}")
        kwargs = container_kwargs(spec, CONFIG)
        started = time.perf_counter()
        container = client.containers.create(**kwargs)
        container.start()
        times["create_start"].append(time.perf_counter() - started)
        container.wait()
        container.remove(force=True)
        times["run"].append(time.perf_counter() - started)
        assert (Path(spec.run_dir) / "output").exists(), "the bare run wrote no output"
    client.close()
    return times


def cli_args(kwargs: dict[str, Any]) -> list[str]:
    """`docker run --rm` flags for the SDK keyword arguments of container_kwargs: the same container."""
    args = ["--rm", "--hostname", kwargs["hostname"], "--user", kwargs["user"]]
    args += ["--network", kwargs["network_mode"], "--ipc", kwargs["ipc_mode"], "--init"]
    args += ["--read-only"] if kwargs["read_only"] else []
    args += [a for path, opts in kwargs["tmpfs"].items() for a in ("--tmpfs", f"{path}:{opts}")]
    args += [a for cap in kwargs["cap_drop"] for a in ("--cap-drop", cap)]
    args += [a for opt in kwargs["security_opt"] for a in ("--security-opt", opt)]
    args += ["--pids-limit", str(kwargs["pids_limit"]), "--memory", str(kwargs["mem_limit"])]
    args += ["--memory-swap", str(kwargs["memswap_limit"]), "--cpus", str(kwargs["nano_cpus"] / 1e9)]
    log_config = kwargs["log_config"]
    args += ["--log-driver", log_config["Type"]]
    args += [a for k, v in log_config["Config"].items() for a in ("--log-opt", f"{k}={v}")]
    args += [a for k, v in kwargs["environment"].items() for a in ("-e", f"{k}={v}")]
    for m in kwargs["mounts"]:
        mount = f"type={m['Type']},src={m['Source']},dst={m['Target']}"
        mount += ",readonly" if m.get("ReadOnly") else ""
        mount += ",volume-nocopy" if (m.get("VolumeOptions") or {}).get("NoCopy") else ""
        args += ["--mount", mount]
    return [*args, kwargs["image"]]


def bare_cli_runs(work: Path, runs: int) -> tuple[list[float], list[float]]:
    """Seconds per `docker run --rm` of the probe with the same definition and limits (issue 5's (a)), and
    the CPU seconds the whole machine spent meanwhile (every core: the CLI, dockerd, containerd, the shim,
    runc, the kernel and the probe). Run alone, that is what one bare run costs in CPU."""
    times, cpu = [], []
    for i in range(runs):
        spec = bare_spec(work, f"cli{i}")
        command = ["docker", "run", *cli_args(container_kwargs(spec, CONFIG))]
        busy, started = cpu_busy_s(), time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
        cpu.append(cpu_busy_s() - busy)
        assert (Path(spec.run_dir) / "output").exists(), "the bare CLI run wrote no output"
    return times, cpu


def cpu_busy_s() -> float:
    """CPU seconds this machine has been busy since boot, all cores (idle and I/O wait left out)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def bare_parallel_runs(work: Path, rounds: int, width: int = 3) -> list[float]:
    """Seconds for `width` bare runs started together (the 3 nodes of (c) share this machine's cores)."""
    times = []
    for r in range(rounds):
        started = time.perf_counter()
        threads = [
            threading.Thread(target=bare_docker_runs, args=(work, 1, f"p{r}x{w}-")) for w in range(width)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        times.append(time.perf_counter() - started)
    return times


def c_floor(bare_s: float, bare_cpu_s: float, nodes: int = 3) -> dict[str, float]:
    """The least (c) can take on this machine: its nodes' bare runs alone need `nodes` times one bare run's
    CPU, and the machine has only so many cores (a bound, not a measurement of (c))."""
    cores = psutil.cpu_count() or 1
    floor_s = max(bare_s, nodes * bare_cpu_s / cores)
    return {
        "bare_docker_run_cpu_s": round(bare_cpu_s, 4),
        "cores": cores,
        "end_to_end_floor_s": round(floor_s, 4),
        "ratio_floor_vs_bare": round(floor_s / bare_s, 3),
    }
