"""`make demo`: a whole federation on this machine, on embedded defaults, through the real commands.

A server (`vserver start`, embedded MQTT broker), three organizations each with its own node agent
(`vnode run`) and its own private dataset, and a researcher at the first organization who asks for pooled
summary statistics. The central function runs at the researcher's organization and creates subtasks at all
three; every input and result crosses the server encrypted.

Nothing rests on the server's word: each organization's key is pinned by fingerprint at the others (as
`vnode trust` does), the researcher holds her own key certified by her organization (as `vnode users certify`
does) and pins the three organizations (as `vfed trust` does); she signs the task, and the result is sealed
to her key. The demo prints the federated answer next to the same statistics computed on the pooled data,
which only a demo can see.

The data is leased, not handed over: each organization registers its dataset on the collaboration's ledger
(`vnode datasets register`) and its org admin, with her own certified key, grants the researcher's
organization a lease for this researcher and this image, for a week (`vnode leases grant`). The nodes run
with `leases: required`, append a signed receipt for every run, and `vnode ledger verify` checks the whole
ledger at the end.
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
from vfed.common.crypto import Keyring
from vfed.common.trust import TrustMode, TrustStore, certify, fingerprint, records_for_keys

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
        "users": [{"username": "researcher", "password": PASSWORD, "organization": ORGS[0]}]
        + [
            {"username": f"admin-{o}", "password": PASSWORD, "organization": o, "roles": ["org-admin"]}
            for o in ORGS
        ],
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
    """The node's configuration, where `vnode` finds node `demo-ORG` (XDG_CONFIG_HOME points at the demo)."""
    path = work / "config" / "vfed" / "nodes" / f"demo-{org}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
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
                "trust": "pinned",
                "leases": "required",
            }
        )
    )
    return path


def make_keys(work: Path) -> dict[str, Keyring]:
    """Each organization's key file, where its node looks for it (`vnode keys generate` does the same)."""
    rings = {}
    for org in ORGS:
        folder = work / f"node-{org}"
        folder.mkdir(parents=True, exist_ok=True)
        rings[org] = Keyring.generate()
        rings[org].save(folder / "org-key.json")
        _say(f"{org}: organization key fingerprint {fingerprint(rings[org].keys[0].public)}")
    return rings


async def organization_ids(url: str, api_key: str) -> dict[str, int]:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/api/v1/token/node", json={"api_key": api_key}) as r:
            token = (await r.json())["access_token"]
        async with http.get(f"{url}/api/v1/organizations", headers={"Authorization": f"Bearer {token}"}) as r:
            return {o["name"]: int(o["id"]) for o in (await r.json())["data"]}


def pin_each_other(work: Path, rings: dict[str, Keyring], ids: dict[str, int]) -> None:
    """The fingerprints travel out of band; each node pins the other two (what `vnode trust` writes)."""
    for org in ORGS:
        store = TrustStore(work / f"node-{org}" / "trusted_orgs", TrustMode.PINNED)
        for other in ORGS:
            if other != org:
                store.pin(ids[other], fingerprint(rings[other].keys[0].public), note=other)
    _say("each node pinned the other two organizations' fingerprints (`vnode trust ORG --fingerprint F`)")


async def publish_first_chain(url: str, api_key: str, ring: Keyring, org_id: int) -> None:
    """The organization's key chain, as its node publishes it at its first start (here before certifying)."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/api/v1/token/node", json={"api_key": api_key}) as r:
            token = (await r.json())["access_token"]
        path = f"{url}/api/v1/organizations/{org_id}/key-records"
        body = {"records": [e.model_dump(mode="json") for e in records_for_keys(org_id, ring.keys)]}
        async with http.post(path, json=body, headers={"Authorization": f"Bearer {token}"}) as r:
            if r.status not in (200, 201):
                raise SystemExit(
                    f"[demo] publishing {ORGS[0]}'s key chain failed: {r.status} {await r.text()}"
                )


async def user_id(url: str, username: str) -> int:
    import aiohttp

    login = {"username": username, "password": PASSWORD}
    async with aiohttp.ClientSession() as http, http.post(f"{url}/api/v1/token/user", json=login) as r:
        return int((await r.json())["user_id"])


async def certify_researcher(url: str, api_key: str, ring: Keyring, org_id: int, researcher: Keyring) -> None:
    """The org admin certifies the researcher's own key with the organization's (`vnode users certify`)."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{url}/api/v1/token/user", json={"username": "researcher", "password": PASSWORD}
        ) as r:
            user_id = int((await r.json())["user_id"])
        cert = certify(ring.current, org_id, user_id, "researcher", researcher.current.public)
        async with http.post(f"{url}/api/v1/token/node", json={"api_key": api_key}) as r:
            token = (await r.json())["access_token"]
        path = f"{url}/api/v1/organizations/{org_id}/certificates"
        body = {"certificate": cert.model_dump(mode="json")}
        async with http.post(path, json=body, headers={"Authorization": f"Bearer {token}"}) as r:
            if r.status != 201:
                raise SystemExit(
                    f"[demo] certifying the researcher's key failed: {r.status} {await r.text()}"
                )
    _say(f"{ORGS[0]} certified the researcher's own key {researcher.current.key_id[:16]}...")


async def research(
    url: str, work: Path, researcher_key: Path, rings: dict[str, Keyring], ids: dict[str, int]
) -> tuple[dict[str, Any], float]:
    trust_file = work / "researcher" / "trusted_orgs"
    async with AsyncClient(url, key_file=researcher_key, trust_file=trust_file, trust="pinned") as client:
        for org in ORGS:
            client.trust(ids[org], fingerprint(rings[org].keys[0].public))
        await client.login("researcher", PASSWORD)
        await _wait_public_keys(client)
        _say("three node agents online; each published its organization's key chain")
        collab = (await client.collaborations())[0]
        for d in await client.datasets(collab["id"]):
            lease, rows = d.lease, d.metadata.rows if d.metadata is not None else "?"
            until = time.strftime("%Y-%m-%d", time.gmtime(lease.expires_at)) if lease else ""
            status = f"lease {lease.status.value} until {until}" if lease else "no lease"
            _say(f"ledger: dataset {d.label!r} of organization {d.owner}: {rows} rows; {status}")
        me = client.organization_id
        assert me is not None
        t0 = time.monotonic()
        task = await client.create_task(
            collab["id"],
            IMAGE,
            "summary",
            # coarse bins: every hospital's bin holds 0 or at least 5 patients, or its node refuses
            # the histogram (disclosure control, min_cell_count)
            kwargs={"bins": 3},
            organizations=[me],
            name="pooled summary statistics",
        )
        _say(
            f"task {task['id']} signed by the researcher and created; "
            f"its input is encrypted for organization {me} only"
        )
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


def establish_trust(
    work: Path, url: str, keys: dict[str, str], rings: dict[str, Keyring], researcher: Keyring
) -> dict[str, int]:
    """Out of band, before any task: the organizations pin each other, and the first one certifies the
    researcher's own key. Answers the organizations' ids."""
    first = ORGS[0]
    ids = asyncio.run(organization_ids(url, keys[first]))
    pin_each_other(work, rings, ids)
    for org in ORGS:
        asyncio.run(publish_first_chain(url, keys[org], rings[org], ids[org]))
    asyncio.run(certify_researcher(url, keys[first], rings[first], ids[first], researcher))
    return ids


def vnode(*args: str) -> str:
    """One `vnode` command, as an operator types it; the demo stops with its message if it fails."""
    done = subprocess.run([str(BIN / "vnode"), *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"[demo] `vnode {' '.join(args)}` failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def image_digest(image: str) -> str:
    done = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", image],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def lease_datasets(work: Path, url: str, ids: dict[str, int]) -> None:
    """Each organization registers its dataset on the ledger; its org admin certifies her own key and
    grants the researcher's organization a week's lease, for this researcher and this image only."""
    researcher = asyncio.run(user_id(url, "researcher"))
    digest = image_digest(IMAGE)
    (work / "admins").mkdir(exist_ok=True)
    for org in ORGS:
        node = f"demo-{org}"
        admin = Keyring.generate()
        key_file = work / "admins" / f"{org}.key"
        admin.save(key_file)  # `vfed keys generate` does the same
        admin_id = asyncio.run(user_id(url, f"admin-{org}"))
        public = admin.current.public.to_text()
        vnode("users", "certify", str(admin_id), node, "--key", public, "--roles", "org-admin")
        vnode("datasets", "register", "default", node, "--description", f"{org}: age, bmi, systolic")
        vnode(
            "leases", "grant", node, "--dataset", "default", "--to", str(ids[ORGS[0]]),
            "--user", str(researcher), "--image", digest, "--expires", "7d", "--max-runs", "20",
            "--purpose", "pooled summary statistics (demo)", "--identity", str(key_file),
        )  # fmt: skip
    _say(
        f"each organization registered its dataset and leased it to {ORGS[0]}'s researcher for 7 days, "
        f"for image {digest[:19]}... only (`vnode datasets register`, `vnode leases grant`)"
    )


def show_ledger(timeout_s: float = 60) -> None:
    """Every node's receipts on the ledger, then a full verification of it at each organization."""
    deadline = time.monotonic() + timeout_s
    for org in ORGS:
        node = f"demo-{org}"
        while True:  # a node appends its receipt right after it reported the run
            receipts = json.loads(vnode("ledger", "receipts", node, "--format", "json"))
            if receipts or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        statuses = ", ".join(f"run {r['run']} {r['status']}" for r in receipts) or "none yet"
        _say(f"{org}: receipts on the ledger: {statuses} (`vnode ledger receipts {node}`)")
    for org in ORGS:
        _say(f"{org}: {vnode('ledger', 'verify', f'demo-{org}').strip()} (`vnode ledger verify`)")


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
    os.environ["XDG_CONFIG_HOME"] = str(work / "config")  # where `vnode NAME` finds the demo's nodes
    keys = import_federation(work, server_dir)
    _say(f"imported {len(ORGS)} organizations, a collaboration, a researcher and {len(keys)} nodes")
    rings = make_keys(work)
    researcher = Keyring.generate()
    (work / "researcher").mkdir()
    researcher.save(work / "researcher" / "researcher.key")  # `vfed keys generate` does the same
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
        ids = establish_trust(work, url, keys, rings, researcher)
        configs = [
            node_config(work, org, keys[org], url, mqtt_port, dataset)
            for org, dataset in zip(ORGS, datasets, strict=True)
        ]
        lease_datasets(work, url, ids)
        agents = []
        with contextmanager_stack() as stack:
            for org, cfg in zip(ORGS, configs, strict=True):
                agents.append(
                    stack.enter_context(
                        process([str(BIN / "vnode"), "run", "--config", str(cfg)], work / f"node-{org}.log")
                    )
                )
            result, took = asyncio.run(
                research(url, work, work / "researcher" / "researcher.key", rings, ids)
            )
            _say(f"decrypted result at the researcher after {took:.1f} s")
            show_ledger()
    ok = report(result, datasets)
    print(json.dumps({"organizations": result["organizations"]}))
    return 0 if ok else 1


@contextmanager
def contextmanager_stack() -> Iterator[Any]:
    from contextlib import ExitStack

    with ExitStack() as stack:
        yield stack


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
