"""`vserver` commands in real subprocesses: import (keys once, idempotent), db upgrade, bad config, start."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import aiomqtt
import pytest
from vserver_proc import server_process, vserver

IMPORT = """
organizations: [{name: alpha}, {name: beta}]
collaborations: [{name: study, organizations: [alpha, beta]}]
users:
  - {username: boss, password: "long password", organization: alpha, roles: [root]}
  - {username: res, password: "long password", organization: alpha, roles: [researcher]}
nodes:
  - {name: alpha-node, organization: alpha, collaboration: study}
  - {name: beta-node, organization: beta, collaboration: study}
"""


def test_import_is_idempotent_and_shows_keys_once(tmp_path: Path) -> None:
    spec = tmp_path / "import.yaml"
    spec.write_text(IMPORT)
    first = vserver("import", str(spec), "--data-dir", str(tmp_path))
    keys = [line.rsplit(" ", 1)[1] for line in first.stdout.splitlines() if "API key" in line]
    assert len(keys) == 2 and all("." in k for k in keys)
    second = vserver("import", str(spec), "--data-dir", str(tmp_path))
    assert "API key" not in second.stdout and ": created" not in second.stdout
    assert "node alpha-node: exists" in second.stdout
    assert vserver("db", "upgrade", "--data-dir", str(tmp_path)).returncode == 0


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("port: seventy", "port: Input should be a valid integer"),
        ("mqtt: {queue_max: 0}", "mqtt.queue_max"),
        ("colour: blue", "colour: Extra inputs are not permitted"),
        ("[1, 2]", "top level must be a mapping"),
        ("port: [", "not valid YAML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, content: str, needle: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    result = vserver("start", "--config", str(cfg), check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error: ")


def test_bad_import_file_names_the_key(tmp_path: Path) -> None:
    spec = tmp_path / "import.yaml"
    spec.write_text("users: [{username: x, password: 'long password', organization: nowhere}]")
    result = vserver("import", str(spec), "--data-dir", str(tmp_path), check=False)
    assert result.returncode == 1 and "users.0.organization: unknown name 'nowhere'" in result.stderr


@pytest.mark.mqtt
async def test_start_serves_api_and_embedded_doorbell(tmp_path: Path) -> None:
    spec = tmp_path / "import.yaml"
    spec.write_text(IMPORT)
    with server_process(tmp_path) as srv:
        out = vserver("import", str(spec), "--config", str(srv.config)).stdout
        beta_key = next(line.rsplit(" ", 1)[1] for line in out.splitlines() if "beta-node" in line)
        async with aiohttp.ClientSession(srv.url) as http:
            r = await http.post("/api/v1/token/node", json={"api_key": beta_key})
            beta = await r.json()  # the embedded broker takes the node's own account, nothing anonymous
            beta_node = beta["node_id"]
            r = await http.post("/api/v1/token/user", json={"username": "res", "password": "long password"})
            auth = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
            r = await http.get("/api/v1/doorbell")
            assert (await r.json())["url"] == f"mqtt://127.0.0.1:{srv.mqtt_port}"
            account = {"username": beta["broker_username"], "password": beta["broker_password"]}
            async with aiomqtt.Client("127.0.0.1", srv.mqtt_port, **account) as sub:
                await sub.subscribe(f"vfed/nodes/{beta_node}", qos=1)
                await asyncio.sleep(0.5)  # let the server's own publisher connect to its broker
                r = await http.get("/api/v1/collaborations", headers=auth)
                collab = (await r.json())["data"][0]
                body = {
                    "collaboration_id": collab["id"],
                    "image": "x",
                    "organizations": [{"id": collab["organization_ids"][1]}],
                }
                r = await http.post("/api/v1/tasks", json=body, headers=auth)
                assert r.status == 201
                async with asyncio.timeout(20):
                    msg = await anext(aiter(sub.messages))
                assert json.loads(bytes(msg.payload))["task_id"] == (await r.json())["id"]  # type: ignore[arg-type]
