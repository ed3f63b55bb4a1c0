"""docker/systemd: the units that run `vserver` and `vnode run` on sites without Docker for the agent,
checked by `systemd-analyze verify` (with ExecStart pointing at this checkout's virtualenv instead of
/opt/vfed, so the executables the units name exist)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests import infra

UNITS = Path(__file__).resolve().parents[2] / "docker" / "systemd"
BIN = Path(sys.executable).parent


def _verify(*units: Path) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        infra.missing("systemd-analyze", "not installed (Debian's systemd package has it)")
    return subprocess.run(
        [str(analyze), "verify", "--man=no", "--recursive-errors=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _installed(tmp_path: Path, source: str, name: str, bin_dir: Path) -> Path:
    """The unit as a site installs it, with its executables taken from bin_dir."""
    text = (UNITS / source).read_text().replace("/opt/vfed/bin/", f"{bin_dir}/")
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("source", "name"), [("vserver.service", "vserver.service"),
                                              ("vnode@.service", "vnode@hospital-a.service")])  # fmt: skip
def test_unit_verifies(tmp_path: Path, source: str, name: str) -> None:
    done = _verify(_installed(tmp_path, source, name, BIN))
    assert done.returncode == 0, done.stderr
    assert name not in done.stderr, done.stderr  # no warnings about the unit either


def test_verify_catches_a_unit_whose_program_is_missing(tmp_path: Path) -> None:
    """The check can fail: the same unit with an ExecStart that does not exist is refused."""
    done = _verify(_installed(tmp_path, "vserver.service", "vserver.service", tmp_path / "nowhere"))
    assert done.returncode != 0
    assert "vserver" in done.stderr


def test_units_run_the_commands_the_docs_name() -> None:
    server = (UNITS / "vserver.service").read_text()
    node = (UNITS / "vnode@.service").read_text()
    assert "ExecStart=/opt/vfed/bin/vserver start --config /etc/vfed/server.yaml" in server
    assert "ExecStart=/opt/vfed/bin/vnode run --config /etc/vfed/nodes/%i.yaml" in node
    for unit in (server, node):
        assert "Restart=on-failure" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
