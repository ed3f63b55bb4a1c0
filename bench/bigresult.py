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
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the test harness

MIB = 1024 * 1024
GIB = 1024 * MIB
TARGET_RSS_MIB = 150
TARGET_RATIO = 0.3


def peak_rss_mib(pid: int) -> float:
    """The process's high-water mark of resident memory (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


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


class DieWatcher:
    """Docker's `die` event of the node's run container (Docker's clock, the same wall clock as ours)."""

    def __init__(self, node: str) -> None:
        import docker

        self.died: float | None = None
        self._client = docker.from_env()
        self._events = self._client.events(
            decode=True, filters={"type": "container", "event": ["die"], "label": f"vfed.node={node}"}
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for event in self._events:
            self.died = event["timeNano"] / 1e9

    def close(self) -> None:
        self._events.close()
        self._client.close()


async def vfed_path(size: int, work: Path) -> dict[str, float]:
    from tests.node.node_harness import (
        PASSWORD,
        PROBE_IMAGE,
        AgentProcess,
        Server,
        ensure_probe_image,
        remove_run_containers,
        write_node_config,
    )
    from tests.server.vserver_proc import server_process

    from vfed.client.client import AsyncClient
    from vfed.node.config import load_settings

    ensure_probe_image()
    keys = await Server(work / "data", mqtt_url=None).seed(["a"])  # the database `vserver start` serves
    limit = size + 16 * MIB  # the JSON around the string, and the envelope's overhead
    with server_process(work, max_blob_bytes=limit) as server:
        node = f"bigres{secrets.token_hex(3)}"
        config = write_node_config(
            work / "a.yaml",
            name=node,
            api_key=keys["a"],
            server_url=server.url,
            mqtt_url=f"mqtt://127.0.0.1:{server.mqtt_port}",
            max_output_bytes=limit,
            trust="tofu",
        )
        agent = AgentProcess(config, work / "agent.log")
        agent.start()
        watcher = DieWatcher(node)
        try:
            await agent.wait_for_log("doorbell subscribed")
            key_file = load_settings(config).key_path
            trust = {"trust_file": work / "researcher-trusted_orgs", "trust": "tofu"}
            async with AsyncClient(server.url, key_file=key_file, **trust) as researcher:
                await researcher.login("res-a", PASSWORD)
                collab = (await researcher.collaborations())[0]["id"]
                created = time.time()
                task = await researcher.create_task(
                    collab,
                    PROBE_IMAGE,
                    "stream_output",
                    args=[size],
                    organizations=[researcher.organization_id],
                )
                done = await researcher.wait(task, progress=False)
                if done["status"] != "completed":
                    raise RuntimeError(f"task {task['id']} ended {done['status']}:\n{agent.log()[-3000:]}")
            fetched = fetch_in_process(server.url, key_file, work, task["id"])
            assert agent.proc is not None
            agent_rss = peak_rss_mib(agent.proc.pid)
            server_rss = peak_rss_mib(server.proc.pid)
        finally:
            agent.stop()
            watcher.close()
            remove_run_containers(node)
    if watcher.died is None:
        raise RuntimeError("no `die` event of the run's container was seen")
    moved_s = fetched["done_at"] - watcher.died
    return {
        "size_bytes": size,
        "throughput_mibps": size / MIB / moved_s,
        "transfer_s": moved_s,
        "end_to_end_s": fetched["done_at"] - created,
        "agent_peak_rss_mib": agent_rss,
        "server_peak_rss_mib": server_rss,
        "client_peak_rss_mib": fetched["peak_rss_mib"],
    }


def fetch_in_process(url: str, key_file: Path, work: Path, task_id: int) -> dict[str, float]:
    """The researcher's download in a process of its own (so its peak memory is its own)."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--fetch",
            json.dumps({"url": url, "key_file": str(key_file), "work": str(work), "task": task_id}),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the researcher's download failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


async def fetch(spec: dict[str, Any]) -> tuple[Path, float]:
    """`results(task, to=DIR)` as the researcher runs it; the decrypted file and when it was complete."""
    from tests.node.node_harness import PASSWORD

    from vfed.client.client import AsyncClient

    work = Path(spec["work"])
    trust = {"trust_file": work / "researcher-trusted_orgs", "trust": "tofu"}
    async with AsyncClient(spec["url"], key_file=Path(spec["key_file"]), **trust) as researcher:
        await researcher.login("res-a", PASSWORD)
        found = await researcher.results(spec["task"], to=work / "results")
    done_at = time.time()
    [result] = found.organizations
    assert result.ok and result.path is not None, result
    return Path(result.path), done_at


def fetch_main(spec: dict[str, Any]) -> dict[str, float]:
    path, done_at = asyncio.run(fetch(spec))
    with path.open("rb") as handle:
        head = handle.read(64)
    if not head.startswith(b'{"vfed": 1, "format": "json", "value": "xxxx'):
        raise RuntimeError(f"the decrypted result starts {head!r}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"done_at": done_at, "peak_rss_mib": peak, "bytes": path.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--size-gib", type=float, default=10.0, help="the result's size (default 10)")
    parser.add_argument("--fetch", help=argparse.SUPPRESS)  # the researcher's process (internal)
    args = parser.parse_args()
    if args.fetch:
        print(json.dumps(fetch_main(json.loads(args.fetch))))
        return
    size = int(args.size_gib * GIB)
    with tempfile.TemporaryDirectory(prefix="vfed-bench-bigresult-") as d:
        work = Path(d)
        check_space(size, work)
        cp = cp_mibps(size, work)
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
    if args.json:
        print(json.dumps(report))
        return
    for key, value in report.items():
        print(f"{key:24s} {value:12.2f}" if isinstance(value, float) else f"{key:24s} {value}")


if __name__ == "__main__":
    main()
