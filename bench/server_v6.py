"""vantage6-server 4.15.2 measured the way bench/server.py measures vfed: started in a subprocess and driven
with plain `requests` calls, as its own clients do. Runs under vantage6's Python 3.10 venv
(`python bench/server_v6.py --tasks N` prints one JSON object); bench/server.py starts it so. Imports the
standard library, `requests` and bench/server.py's stdlib-only helpers, never vfed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from server import CLIENTS, INPUT_BYTES, ORGS, RESULT_BYTES, free_port, pct, stop, wait_port

# --- vantage6 (runs under its Python 3.10 venv) -----------------------------------------------------------
V6_NODES_FOR_AUTH = 9  # one node per organization per collaboration is all vantage6 allows


def v6_config(tmp: Path, port: int) -> Path:
    cfg = tmp / "v6.yaml"
    cfg.write_text(
        "\n".join(
            [
                "description: bench",
                "ip: 127.0.0.1",
                f"port: {port}",
                "api_path: /api",
                f"uri: sqlite:///{tmp / 'v6.sqlite'}",
                "allow_drop_all: true",
                "jwt_secret_key: bench-secret-long-enough-for-hs256-signing",
                "logging:",
                "  level: WARNING",
                f"  file: {tmp / 'v6.log'}",
                "  use_console: false",
                "  backup_count: 1",
                "  max_size: 1024",
                "  format: '%(asctime)s %(name)s %(levelname)s %(message)s'",
                "  datefmt: '%H:%M:%S'",
                "",
            ]
        )
    )
    return cfg


def v6_worker(tasks: int) -> dict[str, float]:
    """Start vantage6-server 4.15.2 in a subprocess and measure it with plain `requests` calls."""
    with tempfile.TemporaryDirectory(prefix="v6-bench-") as d:
        tmp = Path(d)
        port = free_port()
        cfg = v6_config(tmp, port)
        code = (
            "import sys; from vantage6.server import run_server, run_dev_server; "
            f"app = run_server({str(cfg)!r}, system_folders=False); "
            f"run_dev_server(app, host='127.0.0.1', port={port})"
        )
        log = (tmp / "stdout.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=log, cwd=tmp)
        try:
            wait_port(port, proc)
            return v6_measure(f"http://127.0.0.1:{port}/api", tasks)
        finally:
            stop(proc)


class _V6:
    """vantage6-server's REST API as its own clients call it: a new connection per request."""

    def __init__(self, api: str) -> None:
        import requests

        self.api, self.requests = api, requests
        self.root = ""

    def call(self, method: str, path: str, token: str | None = None, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = self.requests.request(method, self.api + path, headers=headers, timeout=600, **kw)
        if r.status_code >= 300:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:300]}")
        return r.json()

    def login_root(self) -> None:
        for _ in range(100):
            try:
                body = {"username": "root", "password": "root"}
                self.root = self.call("POST", "/token/user", json=body)["access_token"]
                return
            except (self.requests.ConnectionError, RuntimeError):
                time.sleep(0.5)
        raise RuntimeError("vantage6: root login failed for 50 s")

    def seed(self) -> tuple[int, list[int], list[str]]:
        """Organizations, collaborations, nodes: (first collaboration id, organization ids, node API keys)."""
        orgs = [
            self.call("POST", "/organization", self.root, json={"name": f"org{i}"})["id"] for i in range(ORGS)
        ]
        root_org = self.call("GET", "/organization", self.root)["data"][0][
            "id"
        ]  # initiator's org is a member
        collabs = [
            self.call(
                "POST",
                "/collaboration",
                self.root,
                json={"name": f"bench{c}", "organization_ids": [*orgs, root_org], "encrypted": True},
            )["id"]
            for c in range(V6_NODES_FOR_AUTH // ORGS)
        ]
        keys = [
            self.call(
                "POST",
                "/node",
                self.root,
                json={"collaboration_id": c, "organization_id": o, "name": f"n{c}-{o}"},
            )["api_key"]
            for c in collabs
            for o in orgs
        ]
        return collabs[0], orgs, keys

    def create_task(self, collab: int, orgs: list[int]) -> tuple[float, dict[str, Any]]:
        """Seconds for one POST /task with three pre-encrypted base64 inputs, and the task."""

        body = {
            "name": "bench",
            "image": "bench/algo:1",
            "collaboration_id": collab,
            "organizations": [
                {"id": o, "input": base64.b64encode(os.urandom(INPUT_BYTES)).decode()} for o in orgs
            ],
            "databases": [{"label": "default"}],
        }
        t0 = time.perf_counter()
        created = self.call("POST", "/task", self.root, json=body)
        return time.perf_counter() - t0, created

    def result_roundtrip(self, task: dict[str, Any], org: int, key: str) -> float:
        """Seconds for a node to upload a 50 MiB result and the researcher to read it back."""

        node = self.call("POST", "/token/node", json={"api_key": key})["access_token"]
        runs = self.call("GET", f"/run?task_id={task['id']}", node)["data"]
        run_id = next(r["id"] for r in runs if r["organization"]["id"] == org)
        payload = base64.b64encode(os.urandom(RESULT_BYTES)).decode()
        t0 = time.perf_counter()
        self.call("PATCH", f"/run/{run_id}", node, json={"result": payload, "status": "completed"})
        got = self.call("GET", f"/result/{run_id}", self.root)
        roundtrip = time.perf_counter() - t0
        assert got["result"] == payload
        return roundtrip


def v6_measure(api: str, tasks: int) -> dict[str, float]:

    v6 = _V6(api)
    v6.login_root()
    collab, orgs, keys = v6.seed()
    started = time.perf_counter()
    timed = [v6.create_task(collab, orgs) for _ in range(tasks)]
    elapsed = time.perf_counter() - started
    latencies, task = [t for t, _ in timed], timed[-1][1]
    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(lambda _: v6.create_task(collab, orgs), range(tasks)))
    elapsed4 = time.perf_counter() - started
    auth_first = _timed(lambda: v6.call("POST", "/token/node", json={"api_key": keys[0]}))
    auth_last = _timed(lambda: v6.call("POST", "/token/node", json={"api_key": keys[-1]}))
    return {
        "v6_tasks_per_s": tasks / elapsed,
        f"v6_tasks_per_s_{CLIENTS}_clients": tasks / elapsed4,
        "v6_task_create_p50_ms": statistics.median(latencies) * 1000,
        "v6_task_create_p99_ms": pct(latencies, 0.99) * 1000,
        "v6_node_auth_first_ms": auth_first * 1000,
        f"v6_node_auth_last_of_{V6_NODES_FOR_AUTH}_ms": auth_last * 1000,
        "v6_result_50mib_roundtrip_s": v6.result_roundtrip(task, orgs[0], keys[0]),
    }


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=100)
    print(json.dumps(v6_worker(parser.parse_args().tasks)))


if __name__ == "__main__":
    main()
