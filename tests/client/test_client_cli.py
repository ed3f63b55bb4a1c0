"""The `vfed` CLI: its failure paths (one clear line and a non-zero exit, never a traceback), the researcher's
own key, the trust store and the organizations' fingerprints."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from tests.infra import free_port
from tests.node.node_harness import PASSWORD, Server

from vfed.common.crypto import Keyring, PublicKey
from vfed.common.trust import DescriptorDocument, certify, fingerprint, records_for_keys
from vfed.node.server_api import NodeClient


def _vfed(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VFED_CONFIG_DIR": str(tmp_path / "cfg")}
    return subprocess.run(
        [sys.executable, "-m", "vfed.client.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--args", "{not json", "not JSON"),
        ("--args", '{"a": 1}', "must be a JSON list"),
        ("--kwargs", "[1]", "must be a JSON object"),
    ],
)
def test_bad_arguments_exit_2_with_one_clear_message(
    tmp_path: Path, flag: str, value: str, message: str
) -> None:
    create = ["task", "create", "--collaboration", "1", "--image", "x", "--method", "m"]
    res = _vfed(tmp_path, *create, flag, value)
    assert res.returncode == 2
    assert flag in res.stderr and message in res.stderr
    assert "Traceback" not in res.stderr


def test_not_logged_in_is_one_line(tmp_path: Path) -> None:
    res = _vfed(tmp_path, "task", "list")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert lines == ["vfed: error: not logged in: call login() or set VFED_TOKEN"]


def test_unreachable_server_is_one_line(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    res = _vfed(tmp_path, "login", "--url", f"http://127.0.0.1:{port}", "--username", "a", "--password", "b")
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith("vfed: error:") and "Traceback" not in res.stderr


def test_credentials_file_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vfed.client import credentials

    monkeypatch.setenv("VFED_CONFIG_DIR", str(tmp_path / "cfg"))
    path = credentials.save({"url": "http://x", "access_token": "t"})
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text())["access_token"] == "t"
    assert credentials.load()["url"] == "http://x"


def test_keys_generate_and_show(tmp_path: Path) -> None:
    res = _vfed(tmp_path, "keys", "generate")
    assert res.returncode == 0, res.stderr
    path = tmp_path / "cfg" / "researcher-key.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert "vnode users certify USER --key vfedpk1:" in res.stdout

    res = _vfed(tmp_path, "keys", "generate")
    assert res.returncode == 1 and "already exists" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1

    res = _vfed(tmp_path, "keys", "show", "--format", "json")
    assert res.returncode == 0, res.stderr
    shown = json.loads(res.stdout)
    key = Keyring.load(path).current.public
    assert shown["public_key"] == key.to_text() and shown["key_id"] == key.key_id
    assert shown["fingerprint"] == fingerprint(key)
    assert shown["certify"] == f"vnode users certify USER --key {key.to_text()}"
    res = _vfed(tmp_path, "keys", "show")
    assert res.returncode == 0 and key.to_text() in res.stdout and fingerprint(key) in res.stdout

    res = _vfed(tmp_path, "keys", "generate", "--force")
    assert res.returncode == 0 and Keyring.load(path).current.key_id != key.key_id

    other = tmp_path / "elsewhere" / "k.json"
    assert _vfed(tmp_path, "keys", "generate", "--file", str(other)).returncode == 0
    assert other.stat().st_mode & 0o777 == 0o600
    res = _vfed(tmp_path, "keys", "show", "--file", str(tmp_path / "missing.json"))
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0 and "vfed keys generate" in res.stderr


def test_trust_pin_list_untrust(tmp_path: Path) -> None:
    key = Keyring.generate().current.public
    res = _vfed(tmp_path, "trust", "3", "--fingerprint", fingerprint(key))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"pinned organization 3: {fingerprint(key)}"
    head = Keyring.generate().current.key_id
    res = _vfed(tmp_path, "trust", "pin", "5", "--fingerprint", key.key_id.upper(), "--head", head)
    assert res.returncode == 0, res.stderr

    res = _vfed(tmp_path, "trust", "list", "--format", "json")
    assert res.returncode == 0, res.stderr
    pins = {p["organization_id"]: p for p in json.loads(res.stdout)}
    assert pins[3]["fingerprint"] == fingerprint(key) and pins[3]["head"] is None
    assert pins[5]["head"] == head
    res = _vfed(tmp_path, "trust", "list")
    assert res.stdout.splitlines()[0].startswith(f"3 {fingerprint(key)}")
    stored = Path(os.environ["VFED_TRUST_FILE"]).read_text()
    assert f"3 {fingerprint(key)}" in stored and f"head={head}" in stored

    res = _vfed(tmp_path, "trust", "4", "--fingerprint", "not-a-fingerprint")
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith("vfed: error:") and "not a key fingerprint" in res.stderr
    res = _vfed(tmp_path, "trust", "4")
    assert res.returncode == 2 and "--fingerprint" in res.stderr

    assert _vfed(tmp_path, "untrust", "3").returncode == 0
    res = _vfed(tmp_path, "untrust", "3")
    assert res.returncode == 1 and "not pinned" in res.stderr
    assert [
        p["organization_id"] for p in json.loads(_vfed(tmp_path, "trust", "list", "--format", "json").stdout)
    ] == [5]


async def test_organizations_list_and_a_certified_researcher_key(tmp_path: Path) -> None:
    """Against a real server: `organizations list` shows each first key's fingerprint and yes/no/MISMATCH
    (and pins nothing); a researcher key made by `vfed keys generate`, certified by the admin, signs the
    tasks `vfed task create` makes (signer role user)."""
    server = Server(tmp_path / "server", mqtt_url=None)
    api_keys = await server.seed(["a", "b", "c"])
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            nodes, rings, orgs = {}, {}, {}
            for name, api_key in api_keys.items():
                nodes[name] = NodeClient(session, server.url, api_key)
                orgs[name] = (await nodes[name].login()).organization_id
                rings[name] = Keyring.generate()
                await nodes[name].post_key_records(orgs[name], records_for_keys(orgs[name], rings[name].keys))

            def vfed(*args: str) -> subprocess.CompletedProcess[str]:
                return _vfed(tmp_path, *args)

            res = await asyncio.to_thread(
                vfed, "login", "--url", server.url, "--username", "res-a", "--password", PASSWORD
            )
            assert res.returncode == 0, res.stderr
            wrong = fingerprint(Keyring.generate().current.public)
            for org, fp in ((orgs["a"], fingerprint(rings["a"].keys[0].public)), (orgs["b"], wrong)):
                assert (await asyncio.to_thread(vfed, "trust", str(org), "--fingerprint", fp)).returncode == 0
            trust_file = Path(os.environ["VFED_TRUST_FILE"])
            before = await asyncio.to_thread(trust_file.read_text)

            res = await asyncio.to_thread(vfed, "organizations", "list", "--format", "json")
            assert res.returncode == 0, res.stderr
            rows = {r["id"]: r for r in json.loads(res.stdout)}
            assert {rows[orgs[n]]["pinned"] for n in "abc"} == {"yes", "MISMATCH", "no"}
            assert rows[orgs["a"]]["pinned"] == "yes" and rows[orgs["b"]]["pinned"] == "MISMATCH"
            assert rows[orgs["b"]]["fingerprint"] == fingerprint(rings["b"].keys[0].public)
            assert rows[orgs["c"]]["pinned"] == "no" and rows[orgs["c"]]["name"] == "c"
            res = await asyncio.to_thread(vfed, "organizations", "list")
            assert res.returncode == 0 and "MISMATCH" in res.stdout and len(res.stdout.splitlines()) == 4
            assert await asyncio.to_thread(trust_file.read_text) == before  # listing pins nothing

            # A researcher key not certified yet: one line saying what the admin runs; then certified, it
            # signs, and a target whose pin does not match is refused.
            create = ["task", "create", "--collaboration", "1", "--image", "img", "--method", "m"]
            assert (await asyncio.to_thread(vfed, "keys", "generate")).returncode == 0
            res = await asyncio.to_thread(vfed, *create)
            assert res.returncode == 1 and "vnode users certify" in res.stderr, res.stderr
            assert len(res.stderr.strip().splitlines()) == 1

            shown = json.loads((await asyncio.to_thread(vfed, "keys", "show", "--format", "json")).stdout)
            user_id = int(shown["certify"].split()[3])
            cert = certify(
                rings["a"].current, orgs["a"], user_id, "res-a", PublicKey.from_text(shown["public_key"])
            )
            await nodes["a"].request(
                "POST", f"/organizations/{orgs['a']}/certificates", json={"certificate": cert.model_dump()}
            )
            res = await asyncio.to_thread(vfed, *create, "--org", str(orgs["b"]))
            assert res.returncode == 1 and "does not match the pinned fingerprint" in res.stderr, res.stderr
            res = await asyncio.to_thread(vfed, *create, "--org", str(orgs["c"]), "--format", "json")
            assert res.returncode == 0, res.stderr
            task = json.loads(res.stdout)
            stored = await nodes["c"].get_task(task["id"])
            assert stored.descriptor is not None
            document = DescriptorDocument.parse(stored.descriptor)
            assert document.digest == task["descriptor_digest"]
            body = document.body()
            assert body.signer.role == "user" and body.signer.key_id == shown["key_id"]
            assert body.initiator.user == user_id and document.certificate == cert
    finally:
        await server.stop()
