"""`vnode trust import FILE`: pins from the federation file (a single-operator setup), through the real CLI
against a real server (in this process, SQLite, no broker, no Docker); and `vnode keys upload` refused when
the node's first key is not the one the file names."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import yaml
from click.testing import Result
from tests.node.node_harness import PASSWORD, Server
from vnode_testlib import Dirs, dirs, vnode

from vfed.common.crypto import Keyring
from vfed.common.trust import TrustStore, fingerprint
from vfed.node.config import load_settings

__all__ = ["dirs"]


def federation(fingerprints: dict[str, str | None]) -> dict[str, Any]:
    orgs = list(fingerprints)
    return {
        "organizations": [{"name": o, **({"fingerprint": f} if f else {})} for o, f in fingerprints.items()],
        "collaborations": [{"name": "study", "organizations": orgs}],
        "users": [{"username": f"res-{o}", "password": PASSWORD, "organization": o} for o in orgs],
        "nodes": [{"name": f"node-{o}", "organization": o, "collaboration": "study"} for o in orgs],
    }


async def run(*args: str) -> Result:
    return await asyncio.to_thread(vnode, *args)


async def test_trust_import_pins_from_the_federation_file(dirs: Dirs, tmp_path: Path) -> None:
    rings = {o: Keyring.generate() for o in "abc"}
    named = {o: fingerprint(r.keys[0].public) for o, r in rings.items()}
    named["c"] = fingerprint(Keyring.generate().current.public)  # c's node holds another key
    spec = federation({**named, "d": None})
    file = tmp_path / "federation.yaml"
    file.write_text(yaml.safe_dump(spec))
    server = Server(tmp_path / "server", mqtt_url=None)
    api_keys = await server.import_spec(spec)
    await server.start()
    try:
        for o in "ac":
            rings[o].save(tmp_path / f"{o}.json")
            new = await run(
                "new", f"node-{o}", "--server-url", server.url, "--api-key", api_keys[o],
                "--private-key", str(tmp_path / f"{o}.json"),
            )  # fmt: skip
            assert new.exit_code == 0, new.output

        # the server refuses a first key the file does not name (the honest server catching a mis-keyed node)
        assert (await run("keys", "upload", "node-a")).exit_code == 0
        refused = await run("keys", "upload", "node-c")
        assert refused.exit_code == 1 and "key-chain-conflict" in refused.output, refused.output
        assert f"the federation file names first key {named['c']}" in refused.output
        assert fingerprint(rings["c"].keys[0].public) in refused.output

        settings = load_settings(dirs.user_config / "vfed" / "nodes" / "node-a.yaml")
        store_path = settings.trust_store_path
        done = await run("trust", "import", str(file), "node-a")
        assert done.exit_code == 0, done.output
        orgs = {o: i for i, o in enumerate("abcd", 1)}  # import order: ids 1..4 on a fresh database
        assert done.stdout.splitlines() == [
            f"pinned organization {orgs['b']} (b) to {named['b']} in {store_path}",
            f"pinned organization {orgs['c']} (c) to {named['c']} in {store_path}",
            "skipped a: this node's own organization, pinned by its key file",
            "skipped d: the file gives no fingerprint",
        ]
        assert done.stderr.startswith(f"warning: these pins trust whoever wrote {file}")
        assert "server's operator" in done.stderr
        pins = {p.organization_id: p for p in TrustStore(store_path).pins()}
        assert set(pins) == {orgs["b"], orgs["c"]}
        assert fingerprint(rings["b"].keys[0].public) == named["b"]
        assert pins[orgs["b"]].root == rings["b"].keys[0].key_id
        assert pins[orgs["b"]].note == "from the federation file federation.yaml"

        again = await run("trust", "import", str(file), "node-a", "--format", "json")
        assert again.exit_code == 0, again.output
        doc = json.loads(again.stdout)
        assert [(p["name"], p["new"], p["fingerprint"]) for p in doc["pinned"]] == [
            ("b", False, named["b"]),
            ("c", False, named["c"]),
        ]
        assert doc["own"] == "a" and doc["skipped"] == ["d"] and "whoever wrote" in doc["warning"]
        before = store_path.read_text()

        # failures: one line, exit code 1, no pin written
        async def fails(content: str | None, needle: str) -> None:
            target = tmp_path / "other.yaml"
            target.unlink(missing_ok=True)
            if content is not None:
                target.write_text(content)
            result = await run("trust", "import", str(target), "node-a")
            assert result.exit_code == 1, result.output
            assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1
            assert needle in result.output, result.output
            assert store_path.read_text() == before

        await fails(None, "cannot read")
        await fails("organizations: [", "is not valid YAML")
        await fails("nodes: []\n", "expected `organizations:")
        await fails(
            f"organizations: [{{name: nowhere, fingerprint: {named['b']}}}]", "unknown organization 'nowhere'"
        )
        await fails(
            "organizations: [{name: b, fingerprint: 1a2b-3c4d}]", "(b): '1a2b-3c4d' is not a key fingerprint"
        )
        await fails(
            f"organizations: [{{name: b, fingerprint: {named['a']}}}]",
            f"organization {orgs['b']} (b) is pinned to {named['b']}, the file names {named['a']}",
        )

        usage = await run("trust", "import")
        assert usage.exit_code == 2 and "needs FILE" in usage.output
        usage = await run("trust", "import", str(file), "node-a", "--fingerprint", named["b"])
        assert usage.exit_code == 2 and "drop --fingerprint" in usage.output
    finally:
        await server.stop()
