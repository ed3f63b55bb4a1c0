"""Who may read `/metrics`: the metrics listener of its own (loopback, no token), and the API port only with
the bearer token from `metrics.token_file`. Every refusal is JSON. Through the real app and real sockets."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from pydantic import ValidationError
from vserver_testkit import JWT_SECRET

from vfed.server.app import create_app
from vfed.server.cli import main
from vfed.server.config import MetricsSettings, Settings
from vfed.server.metrics import METRICS_ACCESS

TOKEN = "metrics-token-for-the-scraper-0123456789"


def _settings(tmp_path: Path, **metrics: Any) -> Settings:
    return Settings(data_dir=tmp_path, jwt_secret=JWT_SECRET, metrics=MetricsSettings(**metrics))


def _token_file(tmp_path: Path, text: str = TOKEN + "\n") -> Path:
    path = tmp_path / "metrics-token"
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _get(http: aiohttp.ClientSession, url: str, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with http.get(url, headers=headers) as r:
        if "json" in r.headers.get("Content-Type", ""):
            return r.status, await r.json()
        return r.status, await r.text()


async def test_api_port_without_a_configured_token_refuses(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(_settings(tmp_path)))
    await client.get("/api/v1/health")
    r = await client.get("/metrics")
    assert r.status == 403
    body = await r.json()
    assert body["error"] == "forbidden" and "metrics listener" in body["detail"]
    r = await client.get("/metrics", headers={"Authorization": "Bearer anything-at-all-here"})
    assert r.status == 403


async def test_api_port_serves_with_the_token(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(_settings(tmp_path, token_file=_token_file(tmp_path))))
    await client.get("/api/v1/health")
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": TOKEN}):
        r = await client.get("/metrics", headers=headers)
        assert r.status == 401, headers
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert (await r.json())["error"] == "unauthorized"
    r = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status == 200
    text = await r.text()
    assert 'vserver_requests_total{method="GET",route="/api/v1/health",status="200"} 1.0' in text
    assert 'vserver_runs{status="pending"} 0.0' in text


async def test_the_metrics_listener_serves_on_loopback_without_token(
    aiohttp_client: Any, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    client = await aiohttp_client(create_app(_settings(tmp_path, port=0)))
    await client.get("/api/v1/health")
    address = client.app[METRICS_ACCESS].address
    assert address is not None and address[0] == "127.0.0.1" and address[1] != client.port
    base = f"http://127.0.0.1:{address[1]}"
    status, text = await _get(http, base + "/metrics")
    assert status == 200
    assert 'vserver_requests_total{method="GET",route="/api/v1/health",status="200"} 1.0' in text
    assert 'vserver_runs{status="pending"} 0.0' in text
    # the listener serves metrics only, and the API port still refuses them
    status, body = await _get(http, base + "/api/v1/health")
    assert status == 404 and body["error"] == "not-found"
    assert (await client.get("/metrics")).status == 403


async def test_with_a_token_the_listener_wants_it_too(
    aiohttp_client: Any, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    settings = _settings(tmp_path, port=0, token_file=_token_file(tmp_path))
    client = await aiohttp_client(create_app(settings))
    address = client.app[METRICS_ACCESS].address
    assert address is not None
    url = f"http://127.0.0.1:{address[1]}/metrics"
    status, body = await _get(http, url)
    assert status == 401 and body["error"] == "unauthorized"
    status, text = await _get(http, url, TOKEN)
    assert status == 200 and "vserver_runs" in text


def test_a_non_loopback_listener_needs_a_token(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"not a loopback address: set metrics\.token_file"):
        MetricsSettings(host="0.0.0.0", port=7601)
    assert MetricsSettings(host="0.0.0.0", port=7601, token_file=tmp_path / "t").port == 7601
    assert MetricsSettings(host="::1", port=7601).host == "::1"
    assert MetricsSettings(host="0.0.0.0", port=None).port is None  # no listener: nothing to protect


def test_vserver_start_refuses_an_unusable_token_file(tmp_path: Path) -> None:
    short = _token_file(tmp_path, "short\n")
    for token_file, problem in (
        (tmp_path / "missing", "cannot read"),
        (short, "must hold at least 16 characters"),
    ):
        config = tmp_path / "vserver.yaml"
        config.write_text(f"metrics:\n  token_file: {token_file}\n  port: null\n")
        result = CliRunner().invoke(main, ["start", "--config", str(config), "--data-dir", str(tmp_path)])
        assert result.exit_code == 1, result.output
        (line,) = result.output.strip().splitlines()
        assert line.startswith(f"error: metrics.token_file {token_file}: {problem}"), line


async def test_a_listener_that_cannot_bind_is_logged_and_the_server_serves_on(
    aiohttp_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="vfed.server.metrics"):
            client = await aiohttp_client(create_app(_settings(tmp_path, port=port)))
        assert client.app[METRICS_ACCESS].address is None
        assert f"metrics listener could not start on 127.0.0.1:{port}" in caplog.text
        r = await client.get("/api/v1/health")
        assert r.status == 200 and (await r.json())["status"] == "ok"
