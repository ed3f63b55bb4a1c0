"""`vnode api-key NAME`: installing a rotated node API key, through the real CLI against a real server (in
this process, SQLite, no broker, no Docker): the new key is checked by a login before it is written, a
refused, malformed or missing key writes nothing, and the file keeps its comments and mode 0600."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import aiohttp
import yaml
from click.testing import Result
from tests.node.node_harness import PASSWORD, Server
from vnode_testlib import Dirs, dirs, vnode

from vfed.node.config import load_settings

__all__ = ["dirs"]
SPEC = {
    "organizations": [{"name": "a"}],
    "collaborations": [{"name": "study", "organizations": ["a"]}],
    "users": [{"username": "admin-a", "password": PASSWORD, "organization": "a", "roles": ["org-admin"]}],
    "nodes": [{"name": "node-a", "organization": "a", "collaboration": "study"}],
}


async def run(*args: str, input: str | None = None) -> Result:
    return await asyncio.to_thread(vnode, *args, input=input)


async def _rotate(url: str) -> str:
    """The org-admin rotates node 1's key through the API; the new key is answered once."""
    async with aiohttp.ClientSession(url + "/api/v1/") as http:
        login = await http.post("token/user", json={"username": "admin-a", "password": PASSWORD})
        token = (await login.json())["access_token"]
        r = await http.post("nodes/1/api-key", headers={"Authorization": f"Bearer {token}"})
        assert r.status == 200, await r.text()
        return str((await r.json())["api_key"])


async def test_api_key_installs_a_rotated_key(dirs: Dirs, tmp_path: Path) -> None:
    server = Server(tmp_path / "server", mqtt_url=None)
    old_key = (await server.import_spec(SPEC))["a"]
    await server.start()
    try:
        made = await run("new", "node-a", "--server-url", server.url, "--api-key", old_key)
        assert made.exit_code == 0, made.output
        config = dirs.user_config / "vfed" / "nodes" / "node-a.yaml"
        config.write_text(config.read_text() + "# the operator's own note\n")
        new_key = await _rotate(server.url)
        before = config.read_bytes()

        # the old key, refused by the server since the rotation: nothing written
        refused = await run("api-key", "node-a", "--api-key-file", "-", input=old_key + "\n")
        assert refused.exit_code == 1 and "the server refused the new key" in refused.output, refused.output
        assert "invalid-api-key" in refused.output and config.read_bytes() == before
        # not a key at all: a usage-type error, nothing written
        garbage = await run("api-key", "node-a", "--api-key-file", "-", input="no key here\n")
        assert garbage.exit_code == 2 and "<key_id>.<secret>" in garbage.output, garbage.output
        missing = await run("api-key", "node-a", "--api-key-file", str(tmp_path / "absent"))
        assert missing.exit_code == 2 and "cannot read" in missing.output, missing.output
        assert config.read_bytes() == before

        key_file = tmp_path / "new-key.txt"
        key_file.write_text(new_key + "\n")
        done = await run("api-key", "node-a", "--api-key-file", str(key_file))
        assert done.exit_code == 0, done.output
        assert "the server accepts the key: node 1" in done.output
        assert "vnode stop node-a && vnode start node-a" in done.output
        assert load_settings(config).api_key.get_secret_value() == new_key
        assert "# the operator's own note" in config.read_text()
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert old_key not in config.read_text()
    finally:
        await server.stop()


async def test_api_key_unchecked_when_the_server_is_away(dirs: Dirs) -> None:
    made = await run("new", "node-b", "--server-url", "http://127.0.0.1:9", "--api-key", "1.old-secret")
    assert made.exit_code == 0, made.output
    config = dirs.user_config / "vfed" / "nodes" / "node-b.yaml"
    away = await run("api-key", "node-b", "--api-key-file", "-", input="2.new-secret")
    assert away.exit_code == 1 and "nothing written" in away.output and "--no-check" in away.output
    assert load_settings(config).api_key.get_secret_value() == "1.old-secret"
    done = await run("api-key", "node-b", "--no-check", "--api-key-file", "-", input="2.new-secret")
    assert done.exit_code == 0, done.output
    assert load_settings(config).api_key.get_secret_value() == "2.new-secret"
    no_source = await run("api-key", "node-b")  # not a terminal: no question is asked
    assert no_source.exit_code == 2 and "--api-key-file" in no_source.output


async def test_a_key_kept_in_a_secret_file_is_rotated_there_and_mounted(dirs: Dirs, tmp_path: Path) -> None:
    """A config that names its key by `api_key_file` (a Docker/Kubernetes secret) keeps doing so: the rotated
    key goes into that file, and the dockerized agent gets the file mounted, not the host path."""
    from vfed.node.operator import container
    from vfed.node.operator.paths import NodeRef, Scope

    made = await run("new", "node-c", "--server-url", "http://127.0.0.1:9", "--api-key", "1.old-secret")
    assert made.exit_code == 0, made.output
    config = dirs.user_config / "vfed" / "nodes" / "node-c.yaml"
    secret = tmp_path / "secrets" / "api-key"
    secret.parent.mkdir()
    secret.write_text("1.old-secret\n")
    raw = yaml.safe_load(config.read_text())
    del raw["api_key"]
    raw["api_key_file"] = str(secret)
    config.write_text(yaml.safe_dump(raw))
    before = config.read_text()

    done = await run("api-key", "node-c", "--no-check", "--api-key-file", "-", input="2.new-secret")
    assert done.exit_code == 0, done.output
    assert str(secret) in done.output
    assert secret.read_text().strip() == "2.new-secret" and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert config.read_text() == before  # still names the file, holds no key
    assert load_settings(config).api_key.get_secret_value() == "2.new-secret"

    ref = NodeRef("node-c", Scope.USER)
    settings = load_settings(ref.config_path)
    secrets = container.secret_files(ref, settings)
    assert secrets[container.API_KEY_IN_CONTAINER] == secret.resolve()
    inside = container.agent_config(ref, settings, "/var/lib/docker/volumes/x/_data", secrets)
    assert inside["api_key_file"] == container.API_KEY_IN_CONTAINER and "api_key" not in inside
