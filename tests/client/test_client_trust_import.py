"""`vfed trust import FILE`: a researcher pins from the federation file (a single-operator setup), through the
real CLI against a real server (in this process, SQLite, no broker, no Docker)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import yaml
from tests.node.node_harness import PASSWORD, Server

from vfed.client.client import AsyncClient
from vfed.common.crypto import Keyring
from vfed.common.trust import TrustStore, fingerprint, records_for_keys
from vfed.node.server_api import NodeClient


async def vfed(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VFED_CONFIG_DIR": str(tmp_path / "cfg")}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "vfed.client.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


async def test_trust_import_pins_from_the_federation_file(tmp_path: Path) -> None:
    rings = {o: Keyring.generate() for o in "ab"}
    named = {o: fingerprint(r.keys[0].public) for o, r in rings.items()}
    orgs = ["a", "b", "c"]
    spec = {
        "organizations": [*({"name": o, "fingerprint": named[o]} for o in "ab"), {"name": "c"}],
        "collaborations": [{"name": "study", "organizations": orgs}],
        "users": [{"username": f"res-{o}", "password": PASSWORD, "organization": o} for o in orgs],
        "nodes": [{"name": f"node-{o}", "organization": o, "collaboration": "study"} for o in orgs],
    }
    file = tmp_path / "federation.yaml"
    file.write_text(yaml.safe_dump(spec))
    server = Server(tmp_path / "server", mqtt_url=None)
    api_keys = await server.import_spec(spec)
    await server.start()
    trust_file = Path(os.environ["VFED_TRUST_FILE"])
    try:
        async with aiohttp.ClientSession() as session:
            ids = {}
            for o, ring in rings.items():  # a and b publish their chains; c publishes nothing
                node = NodeClient(session, server.url, api_keys[o])
                ids[o] = (await node.login()).organization_id
                await node.post_key_records(ids[o], records_for_keys(ids[o], ring.keys))

        login = await vfed(
            tmp_path, "login", "--url", server.url, "--username", "res-a", "--password", PASSWORD
        )
        assert login.returncode == 0, login.stderr
        done = await vfed(tmp_path, "trust", "import", str(file))
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [
            f"pinned organization {ids['a']} (a): {named['a']}",  # a researcher pins her own organization too
            f"pinned organization {ids['b']} (b): {named['b']}",
            "skipped c: the file gives no fingerprint",
        ]
        assert done.stderr.startswith(f"warning: these pins trust whoever wrote {file}")
        assert "server's operator" in done.stderr and len(done.stderr.strip().splitlines()) == 1
        pins = {p.organization_id: p for p in TrustStore(trust_file).pins()}
        assert {o: pins[ids[o]].root for o in "ab"} == {o: r.keys[0].key_id for o, r in rings.items()}

        # the chains the server serves verify under the pins taken from the file
        listed = await vfed(tmp_path, "organizations", "list", "--format", "json")
        rows = {r["name"]: r for r in json.loads(listed.stdout)}
        assert [rows[o]["pinned"] for o in orgs] == ["yes", "yes", "no"], rows
        assert rows["a"]["problem"] is None and rows["b"]["problem"] is None

        again = await vfed(tmp_path, "trust", "import", str(file))
        assert again.returncode == 0 and again.stdout.startswith(
            f"already pinned organization {ids['a']} (a)"
        )
        before = await asyncio.to_thread(trust_file.read_text)

        async def fails(content: str | None, needle: str) -> None:
            target = tmp_path / "other.yaml"
            target.unlink(missing_ok=True)
            if content is not None:
                target.write_text(content)
            result = await vfed(tmp_path, "trust", "import", str(target))
            assert result.returncode == 1, result.stderr
            assert result.stderr.startswith("vfed: error: ") and len(result.stderr.strip().splitlines()) == 1
            assert needle in result.stderr, result.stderr
            assert "Traceback" not in result.stderr and result.stdout == ""
            assert await asyncio.to_thread(trust_file.read_text) == before

        await fails(None, "cannot read")
        await fails("organizations: {a: 1}", "expected `organizations:")
        await fails(f"organizations: [{{name: nowhere, fingerprint: {named['a']}}}]", "unknown organization")
        await fails(
            "organizations: [{name: c, fingerprint: not-hex}]", "(c): 'not-hex' is not a key fingerprint"
        )
        await fails(
            f"organizations: [{{name: b, fingerprint: {named['a']}}}]",
            f"organization {ids['b']} (b) is pinned to {named['b']}, the file names {named['a']}",
        )

        # the same from Python
        async with AsyncClient(server.url, trust_file=tmp_path / "py-trust") as client:
            await client.login("res-b", PASSWORD)
            pinned, skipped = await client.trust_from_file(file)
            assert [(p.name, p.pin.organization_id, p.new) for p in pinned] == [
                ("a", ids["a"], True),
                ("b", ids["b"], True),
            ]
            assert skipped == ["c"] and {p.organization_id for p in client.trusted()} == {ids["a"], ids["b"]}
            chain = await client.chains.chain(ids["a"])
            assert chain.fingerprint == named["a"]
    finally:
        await server.stop()
