"""Ctrl-C in `AsyncClient.wait` stops waiting, not the task, and says so as `Client.wait` and
`vfed task wait` do: cancelled in a running loop (a notebook's interrupt, `asyncio.timeout`) and under
`asyncio.run` in a child process sent SIGINT. Against the real server app (SQLite) with a task no node
will ever run: nothing is faked."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.client.test_client_saved_login import interrupt
from tests.node.node_harness import PASSWORD, Server, post_signed_task

from vfed.client import AsyncClient
from vfed.common.crypto import OrgKey

ASYNC_WAIT_SCRIPT = """
import asyncio, sys
from vfed.client import AsyncClient

async def main() -> None:
    async with AsyncClient(sys.argv[1]) as client:
        await client.login("res-north", sys.argv[2])
        print("waiting", flush=True)
        await client.wait(int(sys.argv[3]), progress=False)

try:
    asyncio.run(main())
except KeyboardInterrupt:
    sys.exit(3)
"""


async def _unfinishable_task(server: Server) -> int:
    """A task for an organization that runs no node, so waiting for it never ends by itself."""
    async with AsyncClient(server.url) as researcher:
        await researcher.login("res-north", PASSWORD)
        [collab] = await researcher.collaborations()
        south = next(o["id"] for o in await researcher.organizations() if o["name"] == "south")
        key = OrgKey.generate()
        task = await post_signed_task(
            researcher, key, collaboration=collab["id"], targets={south: key.public}, image="x/never:1"
        )
        return int(task["id"])


async def _still_running(server: Server, task_id: int) -> None:
    async with AsyncClient(server.url) as researcher:
        await researcher.login("res-north", PASSWORD)
        after = await researcher.task(task_id)
        assert after["status"] not in {"killed", "completed", "failed"}, after
        runs = await researcher.runs(task_id)
        assert runs and all(r["status"] != "killed" for r in runs), runs


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    server = Server(tmp_path / "server", mqtt_url=None)
    await server.seed(["north", "south"], collaboration="study")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_cancelled_async_wait_says_the_task_goes_on(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    task_id = await _unfinishable_task(server)
    async with AsyncClient(server.url) as researcher:
        await researcher.login("res-north", PASSWORD)
        waiting = asyncio.create_task(researcher.wait(task_id, progress=False))
        await asyncio.sleep(1.0)
        assert not waiting.done()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        err = capsys.readouterr().err
        assert f"stopped waiting for task {task_id}; the task goes on at the nodes" in err, err
        assert f"client.kill({task_id}) stops it" in err, err
        with pytest.raises(TimeoutError):  # asyncio.timeout still sees its own cancellation
            async with asyncio.timeout(0.5):
                await researcher.wait(task_id, progress=False)
        assert capsys.readouterr().err.count("stopped waiting") == 1
    await _still_running(server, task_id)


async def test_ctrl_c_under_asyncio_run_stops_waiting_not_the_task(server: Server) -> None:
    task_id = await _unfinishable_task(server)
    script = [sys.executable, "-c", ASYNC_WAIT_SCRIPT, server.url, PASSWORD, str(task_id)]
    res = await asyncio.to_thread(interrupt, script, "waiting")
    assert res.returncode == 3, (res.returncode, res.stdout, res.stderr)
    assert f"stopped waiting for task {task_id}; the task goes on at the nodes" in res.stderr, res.stderr
    assert f"client.kill({task_id}) stops it" in res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    await _still_running(server, task_id)
