"""`vfed demo` (what `make demo` runs): a whole federation on this machine, on embedded defaults, through the
real commands.

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

It needs only an installed vfed (with its `algorithms` extra, for the demo's own data) and a Docker engine the
user may use, no root and no checkout: the image is found or built as vfed.client.demo_images says, and
whatever the demo starts is stopped and removed when it ends, Ctrl-C included (vfed.client.demo_session).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import yaml

from vfed.client import demo_images, tasks
from vfed.client.client import AsyncClient
from vfed.client.demo_session import DemoError, Session, Stopped, listen, restore, shield
from vfed.common.crypto import Keyring
from vfed.common.trust import TrustMode, TrustStore, certify, fingerprint, records_for_keys

ORGS = ("hospital-a", "hospital-b", "hospital-c")
PASSWORD = "demo-password-123"
ROWS = (120, 200, 160)
BIN = Path(sys.executable).parent
INTERRUPTED = "demo interrupted: its server and agents stopped, its containers and volumes removed"


def command(name: str) -> str:
    """An installed vfed command: beside this Python (a virtualenv), else on PATH."""
    beside = BIN / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DemoError(f"the `{name}` command of vfed is not installed here (reinstall vfed)")
    return found


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


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise DemoError(f"the server exited: {tail[0]} (log: {log})")
        with suppress(OSError), urllib.request.urlopen(url, timeout=2):
            return
        time.sleep(0.2)
    raise DemoError(f"the server did not answer within {timeout_s} s (log: {log})")


def import_federation(session: Session, data_dir: Path) -> dict[str, str]:
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
    federation = session.work / "federation.yaml"
    federation.write_text(yaml.safe_dump(spec))
    done = subprocess.run(
        [command("vserver"), "import", str(federation), "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        env=session.env,
        check=False,
    )
    if done.returncode != 0:
        raise DemoError(f"`vserver import` failed: {(done.stderr or done.stdout).strip()}")
    out = done.stdout
    keys = {}
    for line in out.splitlines():
        if "API key" in line:
            name = line.split()[1].rstrip(":")
            keys[name.removeprefix("node-")] = line.rsplit(" ", 1)[1]
    return keys


def node_config(
    session: Session, org: str, api_key: str, url: str, mqtt_port: int, dataset: Path, image: str
) -> Path:
    """The node's configuration, where `vnode` finds the node (XDG_CONFIG_HOME points at the demo)."""
    work = session.work
    path = work / "config" / "vfed" / "nodes" / f"{node_name(session, org)}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump(
            {
                "name": node_name(session, org),
                "server_url": url,
                "api_key": api_key,
                "data_dir": str(work / f"node-{org}"),
                "mqtt_url": f"mqtt://127.0.0.1:{mqtt_port}",
                "poll_interval_s": 2.0,
                "datasets": {"default": {"uri": str(dataset), "type": "csv"}},
                "policies": {"allowed_images": [image]},  # the one image the demo runs, nothing else
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
                raise DemoError(f"publishing {ORGS[0]}'s key chain failed: {r.status} {await r.text()}")


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
                raise DemoError(f"certifying the researcher's key failed: {r.status} {await r.text()}")
    _say(f"{ORGS[0]} certified the researcher's own key {researcher.current.key_id[:16]}...")


async def research(
    url: str, work: Path, image: str, rings: dict[str, Keyring], ids: dict[str, int]
) -> tuple[dict[str, Any], float]:
    researcher_key = work / "researcher" / "researcher.key"
    trust_file = work / "researcher" / "trusted_orgs"
    async with AsyncClient(url, key_file=researcher_key, trust_file=trust_file, trust="pinned") as client:
        for org in ORGS:
            client.trust(ids[org], fingerprint(rings[org].keys[0].public))
        await client.login("researcher", PASSWORD)
        await _wait_public_keys(client)
        _say("three node agents online; each published its organization's key chain")
        collab = (await client.collaborations())[0]
        for d in await client.datasets(collab.id):
            lease, rows = d.lease, d.metadata.rows if d.metadata is not None else "?"
            until = time.strftime("%Y-%m-%d", time.gmtime(lease.expires_at)) if lease else ""
            status = f"lease {lease.status.value} until {until}" if lease else "no lease"
            _say(f"ledger: dataset {d.label!r} of organization {d.owner}: {rows} rows; {status}")
        me = client.organization_id
        assert me is not None
        t0 = time.monotonic()
        task = await client.create_task(
            collab.id,
            image,
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
        # tasks.wait, not client.wait: on Ctrl-C the demo kills everything itself and says so in one line
        await tasks.wait(client, task.id, 600, sys.stderr.isatty(), sys.stderr)
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


def node_name(session: Session, org: str) -> str:
    """The demo's node at `org`: unique to this demo, so two demos on one engine never touch each other's
    containers and volumes."""
    return f"demo-{session.tag}-{org}"


def vnode(session: Session, *args: str) -> str:
    """One `vnode` command, as an operator types it; the demo stops with its message if it fails."""
    done = subprocess.run(
        [command("vnode"), *args], capture_output=True, text=True, env=session.env, check=False
    )
    if done.returncode != 0:
        raise DemoError(f"`vnode {' '.join(args)}` failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def image_digest(image: str) -> str:
    import docker

    engine = docker.from_env(timeout=60)
    try:
        return str(engine.images.get(image).id)
    finally:
        engine.close()


def lease_datasets(session: Session, url: str, ids: dict[str, int], image: str) -> None:
    """Each organization registers its dataset on the ledger; its org admin certifies her own key and
    grants the researcher's organization a week's lease, for this researcher and this image only."""
    work = session.work
    researcher = asyncio.run(user_id(url, "researcher"))
    digest = image_digest(image)
    (work / "admins").mkdir(exist_ok=True)
    for org in ORGS:
        node = node_name(session, org)
        admin = Keyring.generate()
        key_file = work / "admins" / f"{org}.key"
        admin.save(key_file)  # `vfed keys generate` does the same
        admin_id = asyncio.run(user_id(url, f"admin-{org}"))
        public = admin.current.public.to_text()
        vnode(session, "users", "certify", str(admin_id), node, "--key", public, "--roles", "org-admin")
        vnode(session, "datasets", "register", "default", node, "--description", f"{org}: age, bmi, systolic")
        vnode(
            session, "leases", "grant", node, "--dataset", "default", "--to", str(ids[ORGS[0]]),
            "--user", str(researcher), "--image", digest, "--expires", "7d", "--max-runs", "20",
            "--purpose", "pooled summary statistics (demo)", "--identity", str(key_file),
        )  # fmt: skip
    _say(
        f"each organization registered its dataset and leased it to {ORGS[0]}'s researcher for 7 days, "
        f"for image {digest[:19]}... only (`vnode datasets register`, `vnode leases grant`)"
    )


def show_ledger(session: Session, timeout_s: float = 60) -> None:
    """Every node's receipts on the ledger, then a full verification of it at each organization."""
    deadline = time.monotonic() + timeout_s
    for org in ORGS:
        node = node_name(session, org)
        while True:  # a node appends its receipt right after it reported the run
            receipts = json.loads(vnode(session, "ledger", "receipts", node, "--format", "json"))
            if receipts or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        statuses = ", ".join(f"run {r['run']} {r['status']}" for r in receipts) or "none yet"
        _say(f"{org}: receipts on the ledger: {statuses} (`vnode ledger receipts {node}`)")
    for org in ORGS:
        verdict = vnode(session, "ledger", "verify", node_name(session, org)).strip()
        _say(f"{org}: {verdict} (`vnode ledger verify`)")


def need_data_libraries() -> None:
    """The demo's own data (and the pooled comparison) use pandas and numpy: the `algorithms` extra."""
    try:
        import numpy  # noqa: F401
        import pandas  # noqa: F401
    except ImportError as exc:
        raise DemoError(f"the demo needs {exc.name}: pip install 'vfed[algorithms]'") from None


def federation(session: Session, images: demo_images.Choice) -> tuple[dict[str, Any], list[Path]]:
    """The whole demo up to the decrypted result; what it starts is registered with `session`."""
    work = session.work
    image = demo_images.algorithm_image(_say, command("vnode"), session.env, images)
    datasets = make_datasets(work)
    port, mqtt_port = _free_port(), _free_port()
    url = f"http://127.0.0.1:{port}"
    server_dir = work / "server"
    (work / "server.yaml").write_text(
        yaml.safe_dump({"mqtt": {"embedded_broker": True, "embedded_port": mqtt_port}})
    )
    keys = import_federation(session, server_dir)
    _say(f"imported {len(ORGS)} organizations, a collaboration, a researcher and {len(keys)} nodes")
    rings = make_keys(work)
    researcher = Keyring.generate()
    (work / "researcher").mkdir()
    researcher.save(work / "researcher" / "researcher.key")  # `vfed keys generate` does the same
    server_cmd = [command("vserver"), "start", "--config", str(work / "server.yaml"), "--port", str(port)]
    server = session.start([*server_cmd, "--data-dir", str(server_dir)], work / "server.log")
    _wait_http(f"{url}/api/v1/health", server, work / "server.log")
    _say(f"server on {url} (embedded MQTT broker on port {mqtt_port})")
    ids = establish_trust(work, url, keys, rings, researcher)
    session.nodes = [node_name(session, org) for org in ORGS]
    configs = [
        node_config(session, org, keys[org], url, mqtt_port, dataset, image)
        for org, dataset in zip(ORGS, datasets, strict=True)
    ]
    lease_datasets(session, url, ids, image)
    for org, cfg in zip(ORGS, configs, strict=True):
        session.start([command("vnode"), "run", "--config", str(cfg)], work / f"node-{org}.log")
    _say(f"node agents started: {', '.join(session.nodes)} (`vnode run`)")
    result, took = asyncio.run(research(url, work, image, rings, ids))
    _say(f"decrypted result at the researcher after {took:.1f} s")
    show_ledger(session)
    return result, datasets


def run(work_dir: Path | None, images: demo_images.Choice | None = None) -> int:
    """The demo; its exit code: 0 when the federated result equals the pooled one, 1 when not or on a
    failure (one line on stderr), 130 on Ctrl-C (143 on SIGTERM, 129 on SIGHUP). Whatever it started is gone
    when it returns; the work folder stays only when `work_dir` was given."""
    listen()
    session: Session | None = None
    try:
        need_data_libraries()
        session = Session(work_dir)
        result, datasets = federation(session, images or demo_images.Choice())
        ok = report(result, datasets)
        print(json.dumps({"organizations": result["organizations"]}), flush=True)
        if work_dir is not None:
            _say(f"its files and logs are in {session.work}")
        return 0 if ok else 1
    except KeyboardInterrupt as exc:
        shield()  # a second Ctrl-C must not cut the clean-up short
        kept = ""
        if session is not None:
            session.close()
            kept = ", its files too" if session.temporary else f"; its files and logs are in {session.work}"
            session = None
        print(f"vfed: {INTERRUPTED}{kept}", file=sys.stderr, flush=True)
        return 128 + (exc.signum if isinstance(exc, Stopped) else signal.SIGINT)
    except DemoError as exc:
        print(f"vfed: error: {exc}{_logs(session, work_dir)}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # a failure nobody foresaw: still one line, and everything removed
        text = str(exc).splitlines()[0] if str(exc) else ""
        print(f"vfed: error: {exc.__class__.__name__}: {text}{_logs(session, work_dir)}", file=sys.stderr)
        return 1
    finally:
        shield()
        if session is not None:
            session.close()
        restore()


def _logs(session: Session | None, work_dir: Path | None) -> str:
    return f" (logs in {session.work})" if session is not None and work_dir is not None else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the files and logs here")
    args = parser.parse_args(argv)
    return run(args.work_dir)


async def _wait_public_keys(client: AsyncClient, timeout_s: float = 90) -> None:
    """Until every organization has published a public key (its agent is up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        orgs = await client.organizations()
        if all(o.public_key for o in orgs):
            return
        await asyncio.sleep(0.5)
    raise DemoError(f"not every organization published a key within {timeout_s} s")


if __name__ == "__main__":
    sys.exit(main())
