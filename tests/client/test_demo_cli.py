"""`vfed demo`'s refusals before it starts anything: one line, the right exit code, nothing made. The demo
itself runs in tests/client/test_demo_installed.py."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vfed.client.cli import main


def test_demo_help_and_usage_errors(tmp_path: Path) -> None:
    done = CliRunner().invoke(main, ["demo", "--help"])
    assert done.exit_code == 0, done.output
    assert "--work-dir" in done.output and "--base-image" in done.output and "--wheelhouse" in done.output
    done = CliRunner().invoke(main, ["demo", "--wheelhouse", str(tmp_path / "nowhere")])
    assert done.exit_code == 2, done.output
    assert "--wheelhouse" in done.output


def test_demo_without_pandas_says_what_to_install(tmp_path: Path) -> None:
    """The demo's own data needs the `algorithms` extra: a Python without pandas is told so, in one line,
    before anything is started or written."""
    script = (
        "import sys; sys.modules['pandas'] = None\n"  # what `import pandas` meets where it is not installed
        "from vfed.client.cli import main\n"
        "main(['demo', '--work-dir', sys.argv[1]])\n"
    )
    work = tmp_path / "work"
    done = subprocess.run(
        [sys.executable, "-c", script, str(work)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        "vfed: error: the demo needs pandas: pip install 'vfed[algorithms]'"
    ]
    assert not work.exists()


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGHUP"])
def test_stop_signals_become_stopped(signal_name: str) -> None:
    """SIGTERM and SIGHUP stop the demo as Ctrl-C does (the clean-up runs), with 128 + their number."""
    script = (
        "import os, signal, sys\n"
        "from vfed.client.demo_session import Stopped, listen, restore\n"
        "listen()\n"
        "try:\n"
        f"    os.kill(os.getpid(), signal.{signal_name}); signal.pause()\n"
        "except Stopped as exc:\n"
        "    restore(); print(exc.signum)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == getattr(signal, signal_name)
