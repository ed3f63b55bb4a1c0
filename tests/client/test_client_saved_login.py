"""The Python client reuses `vfed login`: `Client()` with no URL takes the saved server, CA, tokens and key
file, writes refreshed tokens back (0600, atomic), and says to log in again when the server refused the saved
refresh token; explicit url/token never touch the file. Ctrl-C in `vfed task wait` and `Client.wait` stops
waiting, not the task.

Against the real server app (SQLite) and `vfed` in child processes: nothing is faked."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from tests.node.node_harness import PASSWORD, Server, post_signed_task

from vfed.client import AsyncClient, Client
from vfed.client.client import WaitInterrupted
from vfed.client.errors import ApiError, NotLoggedIn
from vfed.common.crypto import OrgKey
from vfed.server.config import Settings

ACCESS_S = 2


@dataclass
class ShortTokens(Server):
    """The test server with access tokens that expire after ACCESS_S seconds."""

    def settings(self) -> Settings:
        return super().settings().model_copy(update={"access_token_s": ACCESS_S})


def vfed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vfed.client.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
        timeout=120,
        check=False,
    )


async def avfed(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(vfed, *args)


def credentials_file() -> Path:
    return Path(os.environ["VFED_CONFIG_DIR"]) / "credentials.json"


def collaboration_names() -> list[str]:
    with Client() as client:
        return [c["name"] for c in client.collaborations()]


async def started(tmp_path: Path) -> ShortTokens:
    server = ShortTokens(tmp_path / "server", mqtt_url=None)
    await server.seed(["north", "south"], collaboration="study")
    await server.start()
    res = await avfed("login", "--url", server.url, "--username", "res-north", "--password", PASSWORD)
    assert res.returncode == 0, res.stderr
    return server


async def test_client_uses_the_saved_login_and_saves_refreshed_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("VFED_TOKEN", "VFED_SERVER_URL", "VFED_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    server = await started(tmp_path)
    try:
        first = json.loads(credentials_file().read_text())
        assert await asyncio.to_thread(collaboration_names) == ["study"]

        def who() -> tuple[str, int | None]:
            with Client.from_login(server.url + "/") as client:
                return client._async.url, client.organization_id

        url, org = await asyncio.to_thread(who)
        assert url == server.url and org == first["organization_id"]

        await asyncio.sleep(ACCESS_S + 1.5)  # the saved access token has expired
        assert await asyncio.to_thread(collaboration_names) == ["study"]
        after = json.loads(credentials_file().read_text())
        assert after["access_token"] != first["access_token"]
        assert after["refresh_token"] != first["refresh_token"]
        assert {k: v for k, v in after.items() if not k.endswith("_token")} == {
            k: v for k, v in first.items() if not k.endswith("_token")
        }
        assert stat.S_IMODE(credentials_file().stat().st_mode) == 0o600
        assert not [p for p in credentials_file().parent.iterdir() if p.name.endswith(".tmp")]
        # the CLI goes on with the tokens the notebook refreshed (the old refresh token was rotated away)
        res = await avfed("collaborations", "list", "--format", "json")
        assert res.returncode == 0 and json.loads(res.stdout)[0]["name"] == "study", res.stderr

        # a CLI command refreshes too; a client made before picks the newer tokens up from the file
        def stale_then_cli_then_call() -> list[str]:
            with Client() as client:
                time.sleep(ACCESS_S + 1.5)
                res = vfed("collaborations", "list", "--format", "json")
                assert res.returncode == 0, res.stderr
                return [c["name"] for c in client.collaborations()]

        assert await asyncio.to_thread(stale_then_cli_then_call) == ["study"]
        res = await avfed("whoami")
        assert res.returncode == 0 and "res-north" in res.stdout, res.stderr
    finally:
        await server.stop()


async def test_a_revoked_login_says_to_log_in_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VFED_TOKEN", "VFED_SERVER_URL"):
        monkeypatch.delenv(name, raising=False)
    server = await started(tmp_path)
    try:
        copy = credentials_file().read_text()
        res = await avfed("logout")
        assert res.returncode == 0 and "revoked" in res.stdout, res.stderr
        credentials_file().write_text(copy)  # the tokens of a login the server revoked
        os.chmod(credentials_file(), 0o600)
        await asyncio.sleep(ACCESS_S + 1.5)
        with pytest.raises(NotLoggedIn) as caught:
            await asyncio.to_thread(collaboration_names)
        message = str(caught.value)
        assert "run `vfed login` again" in message and "\n" not in message, message
        assert json.loads(copy)["refresh_token"] not in message
        assert credentials_file().read_text() == copy  # nothing refreshed, nothing written
    finally:
        await server.stop()


async def test_explicit_url_and_token_never_touch_the_saved_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("VFED_TOKEN", "VFED_SERVER_URL"):
        monkeypatch.delenv(name, raising=False)
    server = await started(tmp_path)
    try:
        saved = credentials_file().read_text()
        token = json.loads(saved)["access_token"]

        def explicit() -> None:
            with Client(server.url) as client:  # today's behaviour: log in yourself
                with pytest.raises(NotLoggedIn):
                    client.collaborations()
                client.login("res-south", PASSWORD)
                assert [c["name"] for c in client.collaborations()] == ["study"]
            with Client(server.url, token=token) as client:
                assert [c["name"] for c in client.collaborations()] == ["study"]
                time.sleep(ACCESS_S + 1.5)
                with pytest.raises(ApiError) as caught:  # no refresh token: the expired token is refused
                    client.collaborations()
                assert caught.value.status == 401
            with Client("http://127.0.0.1:9") as client:  # another server: the saved tokens are not used
                assert client._async.api.token is None
                with pytest.raises(NotLoggedIn):
                    client.collaborations()
            with pytest.raises(NotLoggedIn, match="saved login is for"):
                Client.from_login("http://127.0.0.1:9")

        await asyncio.to_thread(explicit)
        assert credentials_file().read_text() == saved
        monkeypatch.setenv("VFED_SERVER_URL", "http://127.0.0.1:9")
        assert AsyncClient().api.token is None  # VFED_SERVER_URL names another server
        monkeypatch.delenv("VFED_SERVER_URL")
        credentials_file().unlink()
        with pytest.raises(NotLoggedIn, match="vfed login"):
            AsyncClient.from_login()
        assert AsyncClient().api.token is None  # no saved login: Client() is today's client
    finally:
        await server.stop()


WAIT_SCRIPT = """
import sys
from vfed.client import Client
from vfed.client.client import WaitInterrupted
client = Client()
print("waiting", flush=True)
try:
    client.wait(int(sys.argv[1]), progress=False)
except WaitInterrupted as exc:
    print(f"interrupted: {exc}", flush=True)
    client.close()
    sys.exit(3)
"""


def _talks_to(pid: int, port: int, timeout_s: float = 60) -> None:
    """Until process pid holds a TCP connection to the server's port (it is past its imports, waiting)."""
    deadline = time.monotonic() + timeout_s
    proc = psutil.Process(pid)
    while time.monotonic() < deadline:
        if any(c.raddr and c.raddr.port == port for c in proc.net_connections(kind="tcp")):
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} never connected to port {port}")


def interrupt(cmd: list[str], ready: str | None, port: int = 0) -> subprocess.CompletedProcess[str]:
    """Starts `cmd`, sends SIGINT once it waits (its `ready` line, else once it is connected to the
    server's `port`), returns what it did."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"}
    )
    try:
        if ready is not None:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == ready
            time.sleep(1.5)
        else:
            _talks_to(proc.pid, port)
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_ctrl_c_in_wait_stops_waiting_not_the_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("VFED_TOKEN", "VFED_SERVER_URL"):
        monkeypatch.delenv(name, raising=False)
    # Tokens that outlive the test: a refresh cut short by the SIGINT (the server rotated the refresh token,
    # the killed process never saved the new one) would make the next process's refresh a reuse.
    server = Server(tmp_path / "server", mqtt_url=None)
    await server.seed(["north", "south"], collaboration="study")
    await server.start()
    try:
        res = await avfed("login", "--url", server.url, "--username", "res-north", "--password", PASSWORD)
        assert res.returncode == 0, res.stderr
        async with AsyncClient.from_login() as researcher:
            [collab] = await researcher.collaborations()
            south = next(o["id"] for o in await researcher.organizations() if o["name"] == "south")
            key = OrgKey.generate()
            # no node runs at south: the task cannot finish
            task = await post_signed_task(
                researcher, key, collaboration=collab["id"], targets={south: key.public}, image="x/never:1"
            )
            task_id = int(task["id"])

            cli = [sys.executable, "-m", "vfed.client.cli", "task", "wait", str(task_id)]
            port = int(server.url.rsplit(":", 1)[1].split("/")[0])
            res = await asyncio.to_thread(interrupt, cli, None, port)
            lines = res.stderr.strip().splitlines()
            assert res.returncode == 130, (res.returncode, res.stdout, res.stderr)
            assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
            assert f"stopped waiting for task {task_id}" in lines[0] and "goes on at the nodes" in lines[0]
            assert f"`vfed task kill {task_id}` stops it" in lines[0], lines[0]
            assert res.stdout == ""

            script = [sys.executable, "-c", WAIT_SCRIPT, str(task_id)]
            res = await asyncio.to_thread(interrupt, script, "waiting")
            assert res.returncode == 3, (res.returncode, res.stdout, res.stderr)
            assert f"interrupted: stopped waiting for task {task_id}" in res.stdout
            assert f"client.kill({task_id}) stops it" in res.stdout

            after = await researcher.task(task_id)
            assert after["status"] not in {"killed", "completed", "failed"}, after
            runs = await researcher.runs(task_id)
            assert runs and all(r["status"] != "killed" for r in runs), runs
            assert issubclass(WaitInterrupted, KeyboardInterrupt)
    finally:
        await server.stop()
