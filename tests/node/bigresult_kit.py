"""A big result through the whole path, as deployed: `vserver start`, a `vnode run` agent with Docker, and the
researcher's client in a process of its own; each process's peak RSS (VmHWM). Shared by bench/bigresult.py
(10 GiB, beside `cp`) and tests/node/test_node_bigresult.py (1 GiB, marker slow).

    python -m tests.node.bigresult_kit '<json>'   (internal: the researcher's process)
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests import infra

MIB = 1024 * 1024


def peak_rss_mib(pid: int) -> float:
    """The process's high-water mark of resident memory (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def reset_peak_rss(pid: int) -> None:
    """Start the process's VmHWM afresh (Linux: 5 into /proc/PID/clear_refs), so a peak measured later is the
    peak since now, not that of its start-up or of a password login before."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


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
            assert agent.proc is not None
            idle = {"agent_startup_peak_rss_mib": peak_rss_mib(agent.proc.pid)}
            idle["server_startup_peak_rss_mib"] = peak_rss_mib(server.proc.pid)
            key_file = load_settings(config).key_path
            trust = {"trust_file": work / "researcher-trusted_orgs", "trust": "tofu"}
            async with AsyncClient(server.url, key_file=key_file, **trust) as researcher:
                await researcher.login("res-a", PASSWORD)
                token = researcher.api.token
                assert token is not None
                collab = (await researcher.collaborations())[0]["id"]
                for pid in (agent.proc.pid, server.proc.pid):  # the peaks of the result's path from here on
                    reset_peak_rss(pid)
                created = time.time()
                task = await researcher.create_task(
                    collab,
                    PROBE_IMAGE,
                    "stream_output",
                    args=[size],
                    organizations=[researcher.organization_id],
                )
                done = await researcher.wait(task, progress=False)
                completed = time.time()  # the node's upload and final report are in
                if done["status"] != "completed":
                    raise RuntimeError(f"task {task['id']} ended {done['status']}:\n{agent.log()[-3000:]}")
            fetched = fetch_in_process(server.url, token, key_file, work, task["id"])
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
        "result_bytes": fetched["bytes"],
        "throughput_mibps": size / MIB / moved_s,
        "transfer_s": moved_s,
        "end_to_end_s": fetched["done_at"] - created,
        "node_to_server_s": completed - watcher.died,
        "server_to_client_s": fetched["done_at"] - completed,
        "agent_peak_rss_mib": agent_rss,
        "server_peak_rss_mib": server_rss,
        "client_peak_rss_mib": fetched["peak_rss_mib"],
        **idle,
    }


def fetch_in_process(url: str, token: str, key_file: Path, work: Path, task_id: int) -> dict[str, float]:
    """The researcher's download in a process of its own (so its peak memory is its own)."""
    spec = json.dumps(
        {"url": url, "token": token, "key_file": str(key_file), "work": str(work), "task": task_id}
    )
    return infra.json_child("tests.node.bigresult_kit", spec, "the researcher's download")


async def fetch(spec: dict[str, Any]) -> tuple[Path, float]:
    """`results(task, to=DIR)` as the researcher runs it (with the token the researcher's session holds: a
    password login would put its argon2 hashing, 64 MiB by design, into the server's peak); the decrypted
    file and when it was complete."""
    from vfed.client.client import AsyncClient

    work = Path(spec["work"])
    trust = {"trust_file": work / "researcher-trusted_orgs", "trust": "tofu"}
    key_file = Path(spec["key_file"])
    async with AsyncClient(spec["url"], token=spec["token"], key_file=key_file, **trust) as researcher:
        found = await researcher.results(spec["task"], to=work / "results")
    done_at = time.time()
    [result] = found.organizations
    assert result.ok and result.file is not None, result
    return Path(result.file), done_at


def fetch_main(spec: dict[str, Any]) -> dict[str, float]:
    # the high-water mark a child inherits holds its parent's pages at the fork: start it afresh
    reset_peak_rss(os.getpid())
    path, done_at = asyncio.run(fetch(spec))
    with path.open("rb") as handle:
        head = handle.read(64)
    if not head.startswith(b'{"vfed":1,"format":"json","value":"xxxx'):
        raise RuntimeError(f"the decrypted result starts {head!r}")
    peak = peak_rss_mib(os.getpid())
    return {"done_at": done_at, "peak_rss_mib": peak, "bytes": path.stat().st_size}


if __name__ == "__main__":
    print(json.dumps(fetch_main(json.loads(sys.argv[1]))))
