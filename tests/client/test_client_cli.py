"""The `vfed` CLI's failure paths: one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.infra import free_port


def _vfed(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VFED_CONFIG_DIR": str(tmp_path / "cfg")}
    return subprocess.run(
        [sys.executable, "-m", "vfed.client.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--args", "{not json", "not JSON"),
        ("--args", '{"a": 1}', "must be a JSON list"),
        ("--kwargs", "[1]", "must be a JSON object"),
    ],
)
def test_bad_arguments_exit_2_with_one_clear_message(
    tmp_path: Path, flag: str, value: str, message: str
) -> None:
    create = ["task", "create", "--collaboration", "1", "--image", "x", "--method", "m"]
    res = _vfed(tmp_path, *create, flag, value)
    assert res.returncode == 2
    assert flag in res.stderr and message in res.stderr
    assert "Traceback" not in res.stderr


def test_not_logged_in_is_one_line(tmp_path: Path) -> None:
    res = _vfed(tmp_path, "task", "list")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert lines == ["vfed: error: not logged in: call login() or set VFED_TOKEN"]


def test_unreachable_server_is_one_line(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    res = _vfed(tmp_path, "login", "--url", f"http://127.0.0.1:{port}", "--username", "a", "--password", "b")
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith("vfed: error:") and "Traceback" not in res.stderr


def test_credentials_file_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vfed.client import credentials

    monkeypatch.setenv("VFED_CONFIG_DIR", str(tmp_path / "cfg"))
    path = credentials.save({"url": "http://x", "access_token": "t"})
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text())["access_token"] == "t"
    assert credentials.load()["url"] == "http://x"
