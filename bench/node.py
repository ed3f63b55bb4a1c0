"""Node agent benchmark, all in one run on this machine (issue 5).

(a) a bare container run of the probe image with the agent's own hardened spec and limits (Docker SDK:
    create, start, wait, remove) — the floor every run pays;
(b) task POST -> container started (Docker's own `start` event), p50/p99 over N runs, doorbell on MQTT;
(c) submit -> decrypted result at the researcher, a trivial task on 3 nodes (3 agent processes).
Also the RSS of an idle agent process. Run: `.venv/bin/python bench/node.py [--json] [--runs 50]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import docker
import psutil  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.node harness

from tests import infra
from tests.node.node_harness import (
    PASSWORD,
    PROBE_IMAGE,
    AgentProcess,
    Server,
    ensure_probe_image,
    write_node_config,
)

from vfed.client.client import AsyncClient
from vfed.common.payload import TaskInput
from vfed.node.config import load_settings
from vfed.node.runtime.base import RunSpec, algorithm_env
from vfed.node.runtime.docker_spec import DockerRuntimeConfig, container_kwargs

MIB = 1024 * 1024


def bare_docker_runs(work: Path, runs: int, tag: str = "") -> list[float]:
    """Seconds per create+start+wait+remove of the probe, with exactly the agent's container definition."""
    client = docker.from_env()
    config = DockerRuntimeConfig(memory_bytes=256 * MIB)
    times = []
    for i in range(runs):
        run_dir = work / f"bare-{tag}{i}"
        run_dir.mkdir(mode=0o777)
        run_dir.chmod(0o777)
        (run_dir / "input").write_bytes(TaskInput(method="echo", args=[1]).to_json())
        env = algorithm_env(run_id=str(i), job_id="1", organization_id="1", datasets=[], with_proxy=False)
        spec = RunSpec(
            run_id=f"bare{tag}{i}",
            job_id="bare",
            node_name="bench",
            organization_id="1",
            image=PROBE_IMAGE,
            env=env,
            run_dir=str(run_dir),
        )
        kwargs = container_kwargs(spec, config)
        started = time.perf_counter()
        container = client.containers.create(**kwargs)
        container.start()
        container.wait()
        container.remove(force=True)
        times.append(time.perf_counter() - started)
        assert (run_dir / "output").exists(), "the bare run wrote no output"
    client.close()
    return times


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


class StartWatcher:
    """Docker `create` and `start` events of one node's run containers, by run id (Docker's own clock).

    `extract-to-dir` is the agent giving a new job's folder to the container user (put_archive, between
    create and start): the agent's work, so it counts in the agent's share, not in Docker's own start.
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self.starts: dict[str, float] = {}
        self.creates: dict[str, float] = {}
        self.extracts: dict[str, float] = {}
        self.destroys: dict[str, float] = {}
        self._client = docker.from_env()
        self._events = self._client.events(
            decode=True,
            filters={
                "type": "container",
                "event": ["create", "start", "extract-to-dir", "destroy"],
                "label": f"vfed.node={node}",
            },
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for event in self._events:
            run_id = event.get("Actor", {}).get("Attributes", {}).get("vfed.run_id")
            tables = {
                "start": self.starts,
                "create": self.creates,
                "extract-to-dir": self.extracts,
                "destroy": self.destroys,
            }
            table = tables.get(str(event.get("Action", event.get("status"))))
            if run_id and table is not None:
                table[run_id] = event["timeNano"] / 1e9

    def docker_own_start(self, run_id: str) -> float:
        """Seconds Docker spent starting the container once the agent had it ready."""
        return self.starts[run_id] - max(self.creates[run_id], self.extracts.get(run_id, 0.0))

    def job_folder_s(self, run_id: str) -> float:
        """Seconds from create to the job folder's put_archive done (0 when the job's folder was ready)."""
        return max(0.0, self.extracts.get(run_id, self.creates[run_id]) - self.creates[run_id])

    async def seen(self, table: dict[str, float], run_id: str, timeout_s: float = 10.0) -> None:
        for _ in range(int(timeout_s * 100)):
            if run_id in table:
                return
            await asyncio.sleep(0.01)

    def close(self) -> None:
        self._events.close()
        self._client.close()


async def wait_done(researcher: AsyncClient, task_id: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = await researcher.runs(task_id)
        if runs and all(r["status"] not in ("pending", "initializing", "active") for r in runs):
            if any(r["status"] != "completed" for r in runs):
                raise RuntimeError(f"task {task_id} did not complete: {runs}")
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"task {task_id} not done after {timeout_s} s")


async def dispatch_latencies(
    researcher: AsyncClient, collab: int, org: int, runs: int
) -> dict[str, list[float]]:
    """Seconds from just before POST /tasks to Docker's start event of the run's container, the part of
    that between the container being ready (created, job folder set up) and started (Docker's own start),
    and the new job's folder set-up. Like (a), each run starts once the previous container is removed, so
    the previous run's clean-up does not compete with this one's start."""
    watcher = StartWatcher("a")
    out: dict[str, list[float]] = {"dispatch": [], "docker_start": [], "job_folder": []}
    try:
        for _ in range(runs):
            posted = time.time()
            task = await researcher.create_task(collab, PROBE_IMAGE, "echo", args=[1], organizations=[org])
            await wait_done(researcher, int(task["id"]))
            (run,) = await researcher.runs(int(task["id"]))
            run_id = str(run["id"])
            await watcher.seen(watcher.starts, run_id)
            out["dispatch"].append(watcher.starts[run_id] - posted)
            out["docker_start"].append(watcher.docker_own_start(run_id))
            out["job_folder"].append(watcher.job_folder_s(run_id))
            await watcher.seen(watcher.destroys, run_id)
    finally:
        watcher.close()
    return out


async def end_to_end(researcher: AsyncClient, collab: int, rounds: int) -> list[float]:
    """Seconds from submit to the decrypted results of a 3-organization task, the way a researcher gets
    them: the client's own `wait` (its polling schedule is part of the figure), then `results`."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        task = await researcher.create_task(collab, PROBE_IMAGE, "echo", args=[1])
        await researcher.wait(task, timeout_s=120, progress=False)
        results = await researcher.results(task)
        times.append(time.perf_counter() - started)
        assert len(results) == 3
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def federation_figures(work: Path, runs: int, rounds: int) -> dict[str, Any]:
    with infra.mosquitto() as broker:
        server = Server(work / "server", mqtt_url=f"mqtt://127.0.0.1:{broker.port}")
        keys = await server.seed(["a", "b", "c"])
        await server.start()
        agents = []
        try:
            for name, key in keys.items():
                config = write_node_config(
                    work / f"{name}.yaml",
                    name=name,
                    api_key=key,
                    server_url=server.url,
                    mqtt_url=None,
                    poll_interval_s=30.0,
                )
                agent = AgentProcess(config, work / f"{name}.log")
                agent.start()
                agents.append(agent)
            for agent in agents:
                await agent.wait_for_log("doorbell subscribed")
            await asyncio.sleep(3)
            assert agents[0].proc is not None
            idle_rss = psutil.Process(agents[0].proc.pid).memory_info().rss / MIB
            key_file = load_settings(agents[0].config).key_path
            async with AsyncClient(server.url, key_file=key_file) as researcher:
                await researcher.login("res-a", PASSWORD)
                collab = (await researcher.collaborations())[0]["id"]
                org = researcher.organization_id
                assert org is not None
                await end_to_end(researcher, collab, 1)  # warm-up: keys cached, images hot
                dispatch = await dispatch_latencies(researcher, collab, org, runs)
                e2e = await end_to_end(researcher, collab, rounds)
        finally:
            for agent in agents:
                agent.stop()
            await server.stop()
    return {**dispatch, "e2e": e2e, "idle_rss": idle_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--runs", type=int, default=50, help="runs for (b)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds for (a) and (c)")
    args = parser.parse_args()
    ensure_probe_image()
    with tempfile.TemporaryDirectory(prefix="vfed-bench-node-") as tmp:
        work = Path(tmp)
        bare = bare_docker_runs(work, args.rounds + 1)[1:]
        bare3 = bare_parallel_runs(work, args.rounds)
        figures = asyncio.run(federation_figures(work, args.runs, args.rounds))
    bare_s = statistics.median(bare)
    bare3_s = statistics.median(bare3)
    e2e_s = statistics.median(figures["e2e"])
    report = {
        "bare_docker_run_s": round(bare_s, 4),
        "dispatch_p50_ms": round(percentile(figures["dispatch"], 0.5) * 1000, 1),
        "dispatch_p99_ms": round(percentile(figures["dispatch"], 0.99) * 1000, 1),
        "docker_create_to_start_p50_ms": round(percentile(figures["docker_start"], 0.5) * 1000, 1),
        "dispatch_beyond_docker_p50_ms": round(
            percentile(
                [d - o for d, o in zip(figures["dispatch"], figures["docker_start"], strict=True)], 0.5
            )
            * 1000,
            1,
        ),
        "job_folder_p50_ms": round(percentile(figures["job_folder"], 0.5) * 1000, 1),
        "end_to_end_s": round(e2e_s, 4),
        "ratio_end_to_end_vs_bare": round(e2e_s / bare_s, 3),
        "bare_docker_run_x3_parallel_s": round(bare3_s, 4),
        "ratio_end_to_end_vs_bare_x3": round(e2e_s / bare3_s, 3),
        "idle_agent_rss_mib": round(figures["idle_rss"], 1),
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"(a) bare container run (create+start+wait+remove), median of {len(bare)}: {bare_s:.3f} s")
    print(
        f"(b) task POST -> container started, {len(figures['dispatch'])} runs: "
        f"p50 {report['dispatch_p50_ms']} ms, p99 {report['dispatch_p99_ms']} ms"
    )
    print(
        f"    of which Docker's own start (ready->start) p50 {report['docker_create_to_start_p50_ms']} ms; "
        f"the rest (server, doorbell, claim, decrypt, checks, job volume, create, job folder) p50 "
        f"{report['dispatch_beyond_docker_p50_ms']} ms, of which the new job's folder (put_archive) p50 "
        f"{report['job_folder_p50_ms']} ms"
    )
    print(f"(c) submit -> decrypted results, 3 nodes, median of {len(figures['e2e'])}: {e2e_s:.3f} s")
    print(f"(c)/(a) = {report['ratio_end_to_end_vs_bare']}")
    print(
        f"(a3) three bare runs at once on this machine, median: {bare3_s:.3f} s; "
        f"(c)/(a3) = {report['ratio_end_to_end_vs_bare_x3']}"
    )
    print(f"idle agent RSS: {report['idle_agent_rss_mib']} MiB")


if __name__ == "__main__":
    main()
