"""The agent's `/metrics`: off unless `metrics_port` is set, on loopback by default, and behind a bearer token
from `metrics_token_file` when one is configured (which an address other than loopback requires).
A real server and the real agent on real Docker; the answers are read over a real socket."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests.node.node_harness import one_node

from vfed.node.agent import Agent, AgentStartError
from vfed.node.config import ConfigError, parse_settings

TOKEN = "node-metrics-token-0123456789abcdef"


def _token_file(tmp_path: Path, text: str = TOKEN + "\n") -> Path:
    path = tmp_path / "metrics-token"
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.mark.docker
async def test_metrics_want_the_token(tmp_path: Path, docker_client: Any) -> None:
    token_file = _token_file(tmp_path)
    async with (
        one_node(tmp_path, "mt", metrics_port=0, metrics_token_file=str(token_file)) as (_, settings),
        Agent(settings) as agent,
        aiohttp.ClientSession() as http,
    ):
        url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
        for headers in ({}, {"Authorization": "Bearer not-the-token-at-all"}, {"Authorization": TOKEN}):
            async with http.get(url, headers=headers) as r:
                assert r.status == 401, headers
                assert r.headers["WWW-Authenticate"] == "Bearer"
                assert (await r.json())["error"] == "unauthorized"
        async with http.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200
            assert "vnode_runs_active 0.0" in await r.text()


async def test_an_unusable_token_file_stops_the_start(tmp_path: Path) -> None:
    """Checked before anything else, so no server is needed."""
    for token_file, problem in (
        (tmp_path / "missing", "cannot read"),
        (_token_file(tmp_path, "short"), "16"),
    ):
        settings = parse_settings(
            {
                "api_key": "1.secret",
                "data_dir": str(tmp_path / "data"),
                "server_url": "http://127.0.0.1:9",
                "metrics_port": 0,
                "metrics_token_file": str(token_file),
            }
        )
        with pytest.raises(AgentStartError, match=re.escape(f"metrics_token_file {token_file}: ")) as caught:
            async with Agent(settings):
                pass
        assert problem in str(caught.value)


def test_metrics_off_loopback_need_a_token(tmp_path: Path) -> None:
    base = {"api_key": "1.secret", "data_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"metrics_host 0\.0\.0\.0 is not a loopback address"):
        parse_settings({**base, "metrics_port": 9100, "metrics_host": "0.0.0.0"})
    with_token = {"metrics_port": 9100, "metrics_host": "0.0.0.0", "metrics_token_file": "token"}
    settings = parse_settings({**base, **with_token}, base_dir=tmp_path)
    assert settings.metrics_token_file == tmp_path / "token"  # relative to the config file, like the key
    assert parse_settings({**base, "metrics_port": 9100, "metrics_host": "::1"}).metrics_host == "::1"
    assert parse_settings({**base, "metrics_host": "0.0.0.0"}).metrics_port is None  # off: nothing exposed
