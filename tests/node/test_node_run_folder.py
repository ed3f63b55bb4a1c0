"""The run folder (vfed.node.run_folder): what a run leaves there is read only when it is a plain, small file,
and a stopped run's folder is cleaned of everything else before the agent touches it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vfed.node import run_folder
from vfed.node.run_folder import BadOutput


def test_output_is_read_only_when_it_is_a_plain_small_file(tmp_path: Path) -> None:
    out = tmp_path / "output"
    with pytest.raises(BadOutput, match="no output"):
        run_folder.read_output(tmp_path, max_bytes=10)
    out.write_bytes(b"0123456789")
    assert run_folder.read_output(tmp_path, max_bytes=10) == b"0123456789"
    assert run_folder.output_size(tmp_path) == 10
    with pytest.raises(BadOutput, match="over the limit"):
        run_folder.read_output(tmp_path, max_bytes=9)
    out.unlink()
    secret = tmp_path / "key"
    secret.write_text("private")
    out.symlink_to(secret)
    with pytest.raises(BadOutput, match="not a regular file"):
        run_folder.read_output(tmp_path, max_bytes=100)
    out.unlink()
    out.mkdir()
    with pytest.raises(BadOutput, match="not a regular file"):
        run_folder.read_output(tmp_path, max_bytes=100)
    out.rmdir()
    os.mkfifo(out)
    with pytest.raises(BadOutput, match="not a regular file"):  # and the open did not block
        run_folder.read_output(tmp_path, max_bytes=100)


def test_output_growing_past_the_limit_while_read_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "output"
    out.write_bytes(b"x" * 10)
    with run_folder.open_output(tmp_path, max_bytes=10) as source:
        out.write_bytes(b"x" * 20)  # same inode, now over the limit
        with pytest.raises(BadOutput, match="grew over the limit of 10 bytes"):
            source.read()


def test_sanitize_keeps_only_regular_files(tmp_path: Path) -> None:
    (tmp_path / "input").write_text("in")
    (tmp_path / "output").write_text("out")
    secret = tmp_path.parent / f"{tmp_path.name}-key"
    secret.write_text("private")
    (tmp_path / run_folder.SEALED_NAME).symlink_to(secret)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "f").write_text("x")
    os.mkfifo(tmp_path / "pipe")
    assert run_folder.sanitize(tmp_path) == ["junk", "output.sealed", "pipe"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input", "output"]
    assert secret.read_text() == "private"
    assert run_folder.sanitize(tmp_path / "gone") == []


def test_fresh_folder_and_input_are_private(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "7"
    run_dir.mkdir(parents=True)
    (run_dir / "output").write_text("left from an earlier attempt")
    old_umask = os.umask(0)
    try:
        run_folder.fresh(run_dir)
        run_folder.write_input(run_dir, b"decrypted")
    finally:
        os.umask(old_umask)
    assert sorted(os.listdir(run_dir)) == ["input"]
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((run_dir / "input").stat().st_mode) == 0o600
    assert (run_dir / "input").read_bytes() == b"decrypted"
    with pytest.raises(FileExistsError):  # never written through something already there
        run_folder.write_input(run_dir, b"again")
