"""File modes on the node: the agent's data folder is private to it (0700, enforced at start), and a run's
decrypted input is 0600 in a 0700 run folder, handed to the container's user (uid 10001) and nobody else.

A real server, the real agent, real Docker and the probe image; the modes are read while the run's container
runs. Data-folder checks that need no run use the agent's start alone.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from tests.node.node_harness import (
    PASSWORD,
    PROBE_IMAGE,
    ensure_probe_image,
    one_node,
    running_agent,
    wait_run_status,
)

from vfed.client.client import AsyncClient
from vfed.node.agent import Agent, AgentStartError
from vfed.node.config import parse_settings
from vfed.node.data_dir import UnsafeDataDir, secure_data_dir
from vfed.node.runtime.base import INPUT_NAME

CONTAINER_UID = 10001  # the Docker runtime's default user for algorithms


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.docker
async def test_input_is_0600_in_a_0700_run_folder_while_the_container_runs(
    tmp_path: Path, docker_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    ensure_probe_image()
    async with one_node(tmp_path, "fm") as (server, settings):
        settings.data_dir.mkdir(mode=0o755)
        os.chmod(settings.data_dir, 0o755)  # as an older agent, or `mkdir`, left it
        with caplog.at_level(logging.WARNING, logger="vfed.node.data_dir"):
            async with running_agent(settings) as agent:
                assert _mode(settings.data_dir) == 0o700
                assert f"data_dir {settings.data_dir} had mode 0755" in caplog.text
                async with AsyncClient(server.url, key_file=settings.key_path) as researcher:
                    await researcher.login("res-alpha", PASSWORD)
                    collaboration = (await researcher.collaborations())[0]["id"]
                    task = await researcher.create_task(collaboration, PROBE_IMAGE, "sleep", args=[4])
                    (run,) = await wait_run_status(researcher, task["id"], {"active"})
                    run_dir = settings.data_dir / "runs" / str(run["id"])
                    assert agent.runner is not None and agent.runner.run_dir(run["id"]) == run_dir
                    folder, given = run_dir.stat(), (run_dir / INPUT_NAME).stat()
                    assert stat.S_IMODE(folder.st_mode) == 0o700
                    assert (folder.st_uid, folder.st_gid) == (CONTAINER_UID, CONTAINER_UID)
                    assert stat.S_IMODE(given.st_mode) == 0o600 and stat.S_ISREG(given.st_mode)
                    assert (given.st_uid, given.st_gid) == (CONTAINER_UID, CONTAINER_UID)
                    assert given.st_size > 0
                    assert _mode(settings.data_dir / "runs") == 0o700
                    await wait_run_status(researcher, task["id"], {"completed"})
                    assert (await researcher.results(task)) == [{"slept": 4}]


async def test_a_data_folder_of_another_user_is_refused_at_start(tmp_path: Path) -> None:
    """Nothing is touched: the folder keeps its owner and mode, the agent does not start (no server needed:
    the check comes before anything else)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give a folder to another user")
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    os.chown(data_dir, 12345, 12345)
    settings = parse_settings(
        {"api_key": "1.secret", "data_dir": str(data_dir), "server_url": "http://127.0.0.1:9"}
    )
    with pytest.raises(
        AgentStartError, match=re.escape(f"data_dir {data_dir} belongs to uid 12345, not to the agent")
    ):
        async with Agent(settings):
            pass
    assert data_dir.stat().st_uid == 12345 and _mode(data_dir) == 0o755
    assert list(data_dir.iterdir()) == []


def test_data_folder_made_private_when_missing_fixed_when_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fresh = tmp_path / "deep" / "data"
    with caplog.at_level(logging.WARNING, logger="vfed.node.data_dir"):
        secure_data_dir(fresh)
    assert _mode(fresh) == 0o700 and caplog.text == ""  # made private: nothing to warn about
    for mode in (0o755, 0o750, 0o711, 0o500):
        os.chmod(fresh, mode)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vfed.node.data_dir"):
            secure_data_dir(fresh)
        assert _mode(fresh) == 0o700
        assert f"data_dir {fresh} had mode {mode:04o}" in caplog.text
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(UnsafeDataDir, match=re.escape(f"data_dir {a_file} is not a folder")):
        secure_data_dir(a_file)
