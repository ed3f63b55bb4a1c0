"""A bad environment gets one clear message and a non-zero exit from the set-up scripts; a taken port is
never fatal to the test session's services."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from tests import infra

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("runuser") is None, reason="needs root to drop to nobody"
)
def test_no_root_and_no_engine_says_what_to_install(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock",
        "HOME": str(tmp_path),
    }
    res = subprocess.run(
        [
            "runuser",
            "-u",
            "nobody",
            "--",
            "env",
            *(f"{k}={v}" for k, v in env.items()),
            "bash",
            str(ROOT / "scripts" / "ensure-infra.sh"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, res.stderr
    assert "no Docker engine answers" in errors[0] and "apt-get install docker.io" in errors[0]


def test_a_failing_install_step_shows_the_command_and_its_output_tail() -> None:
    script = (
        f". {ROOT}/scripts/lib.sh; "
        "run_logged 'apt-get install' bash -c 'for i in $(seq 1 40); do echo line-$i; done; exit 100'"
    )
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 1
    assert "error: apt-get install failed: bash -c" in res.stderr
    assert "line-40" in res.stderr and "line-21" in res.stderr and "line-20\n" not in res.stderr


@pytest.mark.mqtt
def test_a_taken_port_makes_the_broker_pick_another(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        infra.missing("mosquitto", "no mosquitto binary")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        offered = iter([busy])
        real = infra.free_port
        monkeypatch.setattr(infra, "free_port", lambda: next(offered, None) or real())
        broker = infra.Mosquitto(binary, tmp_path)
        try:
            started = broker.start()
            assert started.port != busy
            with socket.create_connection(("127.0.0.1", started.port), timeout=2):
                pass
        finally:
            broker.stop()
