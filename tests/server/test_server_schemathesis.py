"""Schemathesis fuzzes every operation of `/api/v1/openapi.json` on a real server process: zero 5xx answers.

Run as a root user (reaches every user operation) and as a node (reaches claim, heartbeat, run tokens).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from vserver_proc import server_process, vserver

IMPORT = """
organizations: [{name: alpha}, {name: beta}]
collaborations: [{name: study, organizations: [alpha, beta]}]
users: [{username: boss, password: "long password", organization: alpha, roles: [root]}]
nodes: [{name: alpha-node, organization: alpha, collaboration: study}]
"""
ST = str(Path(sys.executable).with_name("st"))


async def _token(url: str, who: str, api_key: str) -> str:
    async with aiohttp.ClientSession(url) as http:
        if who == "root":
            r = await http.post("/api/v1/token/user", json={"username": "boss", "password": "long password"})
        else:
            r = await http.post("/api/v1/token/node", json={"api_key": api_key})
        return str((await r.json())["access_token"])


@pytest.mark.slow
@pytest.mark.parametrize("who", ["root", "node"])
def test_fuzzing_finds_no_server_errors(tmp_path: Path, who: str) -> None:
    spec = tmp_path / "import.yaml"
    spec.write_text(IMPORT)
    with server_process(tmp_path, access_token_s=3600, task_wait_max_s=1) as srv:  # waits stay short
        out = vserver("import", str(spec), "--config", str(srv.config)).stdout
        api_key = next(line.rsplit(" ", 1)[1] for line in out.splitlines() if "API key" in line)
        token = asyncio.run(_token(srv.url, who, api_key))
        result = subprocess.run(
            [
                ST,
                "run",
                f"{srv.url}/api/v1/openapi.json",
                "--checks",
                "not_a_server_error",
                "--header",
                f"Authorization: Bearer {token}",
                "--max-examples",
                "25",
                "--phases",
                "coverage,fuzzing,stateful",
                "--workers",
                "1",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        server_log = (tmp_path / "vserver.log").read_text()
    summary = "\n".join(result.stdout.splitlines()[-40:])
    assert result.returncode == 0, f"{summary}\n--- server log tail ---\n{server_log[-4000:]}"
    assert "unhandled error" not in server_log
    assert "passed" in result.stdout
