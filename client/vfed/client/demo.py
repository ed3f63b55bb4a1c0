"""`make demo`: a whole federation on this machine, on embedded defaults, through the real commands.

A server (`vserver start`, embedded MQTT broker), three organizations each with its own node agent
(`vnode run`) and its own private dataset, and a researcher at the first organization who asks for pooled
summary statistics. The central function runs at the researcher's organization and creates subtasks at all
three; every input and result crosses the server encrypted. The demo prints the federated answer next to the
same statistics computed on the pooled data, which only a demo can see.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import yaml

from vfed.client.client import AsyncClient

ORGS = ("hospital-a", "hospital-b", "hospital-c")
IMAGE = "vfed-examples/summary_stats:latest"
PASSWORD = "demo-password-123"
ROWS = (120, 200, 160)
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def make_datasets(root: Path) -> list[Path]:
    """Three hospitals' private tables: different sizes and slightly different populations."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(7)
    paths = []
    for i, (org, n) in enumerate(zip(ORGS, ROWS, strict=True)):
        df = pd.DataFrame(
            {
                "age": rng.normal(50 + 4 * i, 12, n).round(1),
                "bmi": rng.normal(26 + i, 4, n).round(2),
                "systolic": rng.normal(128 + 3 * i, 15, n).round(0),
            }
        )
        df.loc[rng.choice(n, 5, replace=False), "bmi"] = None  # some missing values
        path = root / f"{org}.csv"
        df.to_csv(path, index=False)
        paths.append(path)
    return paths


@contextmanager
def process(cmd: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"[demo] the server exited: see {log}\n{log.read_text()[-2000:]}")
        with suppress(OSError), urllib.request.urlopen(url, timeout=2):
            return
        time.sleep(0.2)
    raise SystemExit(f"[demo] the server did not answer within {timeout_s} s: see {log}")


def import_federation(work: Path, data_dir: Path) -> dict[str, str]:
    spec = {
        "organizations": [{"name": o} for o in ORGS],
        "collaborations": [{"name": "cardio", "organizations": list(ORGS)}],
        "users": [{"username": "researcher", "password": PASSWORD, "organization": ORGS[0]}],
        "nodes": [{"name": f"node-{o}", "organization": o, "collaboration": "cardio"} for o in ORGS],
    }
    (work / "federation.yaml").write_text(yaml.safe_dump(spec))
    out = subprocess.run(
        [str(BIN / "vserver"), "import", str(work / "federation.yaml"), "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    keys = {}
    for line in out.splitlines():
        if "API key" in line:
            name = line.split()[1].rstrip(":")
            keys[name.removeprefix("node-")] = line.rsplit(" ", 1)[1]
    return keys


def node_config(work: Path, org: str, api_key: str, url: str, mqtt_port: int, dataset: Path) -> Path:
    path = work / f"node-{org}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": f"demo-{org}",
                "server_url": url,
                "api_key": api_key,
                "data_dir": str(work / f"node-{org}"),
                "mqtt_url": f"mqtt://127.0.0.1:{mqtt_port}",
                "poll_interval_s": 2.0,
                "datasets": {"default": {"uri": str(dataset), "type": "csv"}},
                "policies": {"allowed_images": ["vfed-examples/*"]},
            }
        )
    )
    return path


async def research(url: str, key_file: Path) -> tuple[dict[str, Any], float]:
    async with AsyncClient(url, key_file=key_file) as client:
        await client.login("researcher", PASSWORD)
        await _wait_public_keys(client)
        _say("three node agents online; each generated its organization's key and published the public part")
        collab = (await client.collaborations())[0]
        me = client.organization_id
        assert me is not None
        t0 = time.monotonic()
        task = await client.create_task(
            collab["id"],
            IMAGE,
            "summary",
            kwargs={"bins": 5},
            organizations=[me],
            name="pooled summary statistics",
        )
        _say(f"task {task['id']} created; its input is encrypted for organization {me} only")
        await client.wait(task, timeout_s=600, progress=sys.stderr.isatty())
        [result] = await client.results(task)
        return result, time.monotonic() - t0


def report(result: dict[str, Any], datasets: list[Path]) -> bool:
    import pandas as pd

    pooled = pd.concat([pd.read_csv(p) for p in datasets], ignore_index=True)
    ok = True
    print(f"\n{'column':10} {'n':>6} {'mean':>10} {'pooled':>10} {'var':>10} {'pooled':>10} {'missing':>8}")
    for name, s in result["columns"].items():
        col = pooled[name]
        same = (
            s["count"] == col.count()
            and abs(s["mean"] - col.mean()) < 1e-9
            and abs(s["variance"] - col.var(ddof=1)) < 1e-6
        )
        ok &= same
        print(
            f"{name:10} {s['count']:>6} {s['mean']:>10.4f} {col.mean():>10.4f} {s['variance']:>10.4f} "
            f"{col.var(ddof=1):>10.4f} {s['missing']:>8}"
        )
    print(f"\nfederated result equals the pooled computation: {'yes' if ok else 'NO'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--work-dir", type=Path, default=Path("build/demo"))
    args = parser.parse_args(argv)
    work = args.work_dir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    datasets = make_datasets(work)
    port, mqtt_port = _free_port(), _free_port()
    url = f"http://127.0.0.1:{port}"
    server_dir = work / "server"
    (work / "server.yaml").write_text(
        yaml.safe_dump({"mqtt": {"embedded_broker": True, "embedded_port": mqtt_port}})
    )
    keys = import_federation(work, server_dir)
    _say(f"imported {len(ORGS)} organizations, a collaboration, a researcher and {len(keys)} nodes")
    with process(
        [
            str(BIN / "vserver"),
            "start",
            "--config",
            str(work / "server.yaml"),
            "--port",
            str(port),
            "--data-dir",
            str(server_dir),
        ],
        work / "server.log",
    ) as server:
        _wait_http(f"{url}/api/v1/health", server, work / "server.log")
        _say(f"server on {url} (embedded MQTT broker on port {mqtt_port})")
        agents = []
        with contextmanager_stack() as stack:
            for org, dataset in zip(ORGS, datasets, strict=True):
                cfg = node_config(work, org, keys[org], url, mqtt_port, dataset)
                agents.append(
                    stack.enter_context(
                        process([str(BIN / "vnode"), "run", "--config", str(cfg)], work / f"node-{org}.log")
                    )
                )
            _wait_files([work / f"node-{o}" / "org-key.json" for o in ORGS], work)
            result, took = asyncio.run(research(url, work / f"node-{ORGS[0]}" / "org-key.json"))
            _say(f"decrypted result at the researcher after {took:.1f} s")
    ok = report(result, datasets)
    print(json.dumps({"organizations": result["organizations"]}))
    return 0 if ok else 1


@contextmanager
def contextmanager_stack() -> Iterator[Any]:
    from contextlib import ExitStack

    with ExitStack() as stack:
        yield stack


def _wait_files(paths: list[Path], work: Path, timeout_s: float = 90) -> None:
    """Until every agent has written its organization key."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(p.exists() for p in paths):
            return
        time.sleep(0.3)
    logs = "\n".join((work / f"node-{o}.log").read_text()[-800:] for o in ORGS)
    raise SystemExit(f"[demo] the node agents did not start within {timeout_s} s:\n{logs}")


async def _wait_public_keys(client: AsyncClient, timeout_s: float = 90) -> None:
    """Until every organization has published a public key (its agent is up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        orgs = await client.organizations()
        if all(o.get("public_key") for o in orgs):
            return
        await asyncio.sleep(0.5)
    raise SystemExit(f"[demo] not every organization published a key within {timeout_s} s")


if __name__ == "__main__":
    sys.exit(main())
