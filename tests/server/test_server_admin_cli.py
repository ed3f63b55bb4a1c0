"""`vserver user|organization|collaboration` in real subprocesses, against a real `vserver start` on SQLite
and PostgreSQL: what the operator creates works through the API, a reset revokes tokens, one-line errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from vserver_proc import VSERVER, server_process, vserver
from vserver_testkit import db_url

__all__ = ["db_url"]

FIRST = "first long password"
SECOND = "second long password"


async def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """One `vserver` command (off the event loop, so the server under test keeps answering)."""

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*_vserver_cmd(), *args], input=stdin, capture_output=True, text=True, timeout=90, check=False
        )

    return await asyncio.to_thread(run)


def _vserver_cmd() -> list[str]:
    return [*VSERVER, "--log-level", "WARNING"]


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def _one_error_line(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


async def _login(http: aiohttp.ClientSession, username: str, password: str) -> tuple[int, Any]:
    r = await http.post("/api/v1/token/user", json={"username": username, "password": password})
    return r.status, await r.json()


async def _status_with(http: aiohttp.ClientSession, token: str) -> int:
    r = await http.get("/api/v1/users", headers={"Authorization": f"Bearer {token}"})
    return r.status


async def test_operator_admin_through_the_real_api(tmp_path: Path, db_url: str) -> None:
    pw_file = tmp_path / "pw"
    pw_file.write_text(FIRST + "\n")
    with server_process(tmp_path, database_url=db_url) as srv:
        cfg = ("--config", str(srv.config))
        assert "organization alpha: created" in _ok(await _cli("organization", "create", "alpha", *cfg))
        _ok(await _cli("organization", "create", "beta", *cfg))
        orgs = json.loads(_ok(await _cli("organization", "list", "--format", "json", *cfg)))
        ids = {o["name"]: o["id"] for o in orgs}
        assert set(ids) == {"alpha", "beta"}
        _ok(await _cli("collaboration", "create", "study", "--organization", "alpha", *cfg))
        added = _ok(await _cli("collaboration", "add-organization", "study", str(ids["beta"]), *cfg))
        assert "organization beta added" in added
        collabs = json.loads(_ok(await _cli("collaboration", "list", "--format", "json", *cfg)))
        assert [(c["name"], c["organizations"], c["encrypted"]) for c in collabs] == [
            ("study", ["alpha", "beta"], True)
        ]

        created = _ok(
            await _cli(
                "user", "create", "boss", "--organization", "alpha", "--role", "root",
                "--password-file", str(pw_file), *cfg,
            )
        )  # fmt: skip
        assert "user boss: created" in created and FIRST not in created
        _ok(
            await _cli(
                "user", "create", "res", "--organization", str(ids["beta"]), "--password-file", "-", *cfg,
                stdin=FIRST + "\n",
            )
        )  # fmt: skip
        users = json.loads(_ok(await _cli("user", "list", "--format", "json", *cfg)))
        by_name = {u["username"]: u for u in users}
        assert by_name["boss"]["roles"] == ["root"] and by_name["boss"]["organization"] == "alpha"
        assert by_name["res"]["roles"] == ["researcher"] and by_name["res"]["organization"] == "beta"
        assert not by_name["boss"]["disabled"]
        table = _ok(await _cli("user", "list", *cfg)).splitlines()
        assert table[0].split() == ["id", "username", "organization", "roles", "disabled"] and len(table) == 3

        async with aiohttp.ClientSession(srv.url) as http:
            status, body = await _login(http, "boss", FIRST)
            assert status == 200, body
            old = body["access_token"]
            auth = {"Authorization": f"Bearer {old}"}
            r = await http.get("/api/v1/collaborations", headers=auth)
            assert [c["name"] for c in (await r.json())["data"]] == ["study"]
            # the operator's actions are in the audit log the API shows, attributed to the command line
            r = await http.get("/api/v1/audit", headers=auth, params={"per_page": "100"})
            assert r.status == 200, await r.text()
            entries = (await r.json())["data"]
            actions = {(e["action"], e["target_name"]) for e in entries if e["actor_kind"] == "cli"}
            assert {
                ("organization.create", "alpha"),
                ("collaboration.create", "study"),
                ("collaboration.add-organization", "study"),
                ("user.create", "boss"),
                ("user.create", "res"),
            } <= actions
            assert all(FIRST not in json.dumps(e) for e in entries)

            reset = await _cli("user", "reset-password", "boss", "--password-file", "-", *cfg, stdin=SECOND)
            assert "their tokens are revoked" in _ok(reset) and SECOND not in reset.stdout + reset.stderr
            deadline = time.monotonic() + 15  # a running server caches a caller for 5 s
            while await _status_with(http, old) != 401:
                assert time.monotonic() < deadline, "the old token still works after reset-password"
                await asyncio.sleep(0.5)
            assert (await _login(http, "boss", FIRST))[0] == 401
            status, body = await _login(http, "boss", SECOND)
            assert status == 200, body
            assert await _status_with(http, body["access_token"]) == 200

            assert "user res: disabled" in _ok(await _cli("user", "disable", "res", *cfg))
            status, body = await _login(http, "res", FIRST)
            assert status == 403 and body["error"] == "account-disabled", body
            listed = json.loads(_ok(await _cli("user", "list", "--format", "json", *cfg)))
            assert {u["username"]: u["disabled"] for u in listed} == {"boss": False, "res": True}
            _ok(await _cli("user", "enable", "res", *cfg))
            assert (await _login(http, "res", FIRST))[0] == 200


async def test_errors_are_one_line_with_the_right_exit_code(tmp_path: Path) -> None:
    d = ("--data-dir", str(tmp_path / "data"))
    _ok(await _cli("organization", "create", "alpha", *d))
    make = ("user", "create", "ann", "--organization", "alpha", "--password-file", "-", *d)
    weak = _one_error_line(await _cli(*make, stdin="short\n"))
    assert "password" in weak and "at least 8 characters" in weak and "short" not in weak
    _ok(await _cli(*make, stdin=FIRST))
    assert "'ann' is taken" in _one_error_line(await _cli(*make, stdin=FIRST))
    line = _one_error_line(
        await _cli(
            "user", "create", "bo", "--organization", "nowhere", "--password-file", "-", *d, stdin=FIRST
        )
    )
    assert "unknown organization 'nowhere'" in line
    assert "an organization named 'alpha' exists" in _one_error_line(
        await _cli("organization", "create", "alpha", *d)
    )
    assert "unknown collaboration 'nope'" in _one_error_line(
        await _cli("collaboration", "add-organization", "nope", "alpha", *d)
    )
    assert "unknown organization '99'" in _one_error_line(
        await _cli("collaboration", "create", "c", "--organization", "99", *d)
    )
    assert "unknown user 'ghost'" in _one_error_line(await _cli("user", "disable", "ghost", *d))
    # usage errors: exit 2 (a password is never a command-line argument; no terminal, no prompt)
    for args in (
        ("user", "create", "x", "--organization", "alpha", "--password", FIRST),
        ("user", "create", "x", "--organization", "alpha", "--role", "node", "--password-file", "-"),
        ("user", "create", "x", "--password-file", "-"),
        ("user", "create", "x", "--organization", "alpha"),
        ("user", "list", "--format", "xml"),
    ):
        result = await _cli(*args, *d, stdin="")
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
    users = json.loads(_ok(await _cli("user", "list", "--format", "json", *d)))
    assert [u["username"] for u in users] == ["ann"]


@pytest.mark.parametrize("command", [("user", "list"), ("organization", "list"), ("collaboration", "list")])
def test_listing_an_empty_server_is_an_empty_json_list(tmp_path: Path, command: tuple[str, ...]) -> None:
    result = vserver(*command, "--data-dir", str(tmp_path), "--format", "json")
    assert json.loads(result.stdout) == []
