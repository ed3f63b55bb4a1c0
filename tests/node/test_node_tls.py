"""The node agent and each run's proxy reach a real `vserver start` over HTTPS with the server's CA
(`server_ca_file`): a task whose algorithm makes a subtask through its proxy completes; a wrong CA stops
the agent at start with one clear reason."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from tests.node.node_harness import (
    PROBE_IMAGE,
    ensure_probe_image,
    remove_run_containers,
    run_containers_gone,
    running_agent,
    write_node_config,
)
from tests.server.tls_server import PASSWORD, tls_init, tls_server

from vfed.client.client import AsyncClient
from vfed.node.agent import Agent, AgentStartError
from vfed.node.config import load_settings

pytestmark = [pytest.mark.docker, pytest.mark.timeout(180)]


@pytest.fixture(scope="module", autouse=True)
def probe_image() -> None:
    ensure_probe_image()


async def test_agent_and_proxy_over_https(tmp_path: Path, docker_client: object) -> None:
    certs = tls_init(tmp_path / "tls", "localhost")
    name = f"tls{secrets.token_hex(3)}"
    with tls_server(tmp_path, certs) as server:
        path = write_node_config(
            tmp_path / "alpha.yaml",
            name=name,
            api_key=server.api_key,
            server_url=server.url,
            mqtt_url=None,
            server_ca_file="tls/ca.crt",  # relative to the config file's folder
        )
        settings = load_settings(path)
        assert settings.server_ca_file == certs.ca
        try:
            async with running_agent(settings):
                async with AsyncClient(
                    server.url, key_file=settings.key_path, ca_file=certs.ca
                ) as researcher:
                    await researcher.login("res", PASSWORD)
                    collab = (await researcher.collaborations())[0]["id"]
                    org = researcher.organization_id
                    assert org is not None
                    # `master` asks its proxy for the organizations and creates a subtask through it: the
                    # proxy's calls to the server go over the same verified TLS
                    task = await researcher.create_task(
                        collab, PROBE_IMAGE, "master", args=[1], organizations=[org]
                    )
                    done = await researcher.wait(task, timeout_s=90, progress=False)
                    assert done["status"] == "completed", await researcher.runs(task["id"])
                    (aggregate,) = await researcher.results(task)
                    assert aggregate["by_org"] == {str(org): org}
                await run_containers_gone(name)
        finally:
            remove_run_containers(name)


async def test_agent_with_the_wrong_ca_refuses_to_start(tmp_path: Path) -> None:
    certs = tls_init(tmp_path / "tls", "localhost")
    other = tls_init(tmp_path / "other", "localhost")
    with tls_server(tmp_path, certs) as server:
        path = write_node_config(
            tmp_path / "alpha.yaml",
            name=f"tls{secrets.token_hex(3)}",
            api_key=server.api_key,
            server_url=server.url,
            mqtt_url=None,
            server_ca_file=str(other.ca),
        )
        with pytest.raises(AgentStartError) as caught:
            async with Agent(load_settings(path)):
                pass
        assert "does not verify with the CA file" in str(caught.value)
