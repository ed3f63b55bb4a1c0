"""A run's folder on the node: made private, given the input, and read back safely once the run has stopped.

Every runtime mounts this folder into the run, read-write (vfed.node.runtime.base.CONTAINER_RUN_DIR), so
whatever is in it after the run was written by code nobody trusts: `output` may be a symlink to the node's
private key, a FIFO that blocks its reader, a folder, or something huge. The agent reads it only through
this module, and only after the container stopped (`sanitize` first, so no trap can be put back).
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, cast

from vfed.node.runtime.base import INPUT_NAME, OUTPUT_NAME

SEALED_NAME = "output.sealed"
"""The output sealed for the initiator, written by the agent next to `output`."""


class BadOutput(Exception):
    """The run's output is missing, too large, or not a plain file (a symlink could name the node's key)."""


def fresh(run_dir: Path) -> None:
    """A fresh, private run folder (0700), made before the container. The runtime hands it to the container's
    user when the run starts (vfed.node.runtime.docker_spec.grant_container_user): as root by chown, keeping
    0700; an agent that is not root cannot chown and opens it to 0777 instead, inside its 0700 data folder."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    run_dir.mkdir(mode=0o700)
    os.chmod(run_dir, 0o700)  # whatever the umask


def write_input(run_dir: Path, plaintext: bytes) -> None:
    """The decrypted input, 0600 from its first byte (created with that mode, never a link followed), so no
    other user of the host reads it even for an instant; the start hands it to the container's user."""
    fd = os.open(
        run_dir / INPUT_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)  # whatever the umask
        handle.write(plaintext)


def sanitize(run_dir: Path) -> list[str]:
    """Remove everything but regular files from a STOPPED run's folder; return what was removed, sorted.

    The algorithm could leave `output`, or a name the agent writes next (`output.sealed`), as a symlink to a
    host file, a FIFO or a folder; the agent would then read or overwrite the host file through it. Only call
    this once the container has stopped, so nothing can put a trap back.
    """
    removed = []
    try:
        entries = list(os.scandir(run_dir))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.is_file(follow_symlinks=False):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.unlink(entry.path)
        removed.append(entry.name)
    return sorted(removed)


@contextmanager
def open_output(run_dir: Path, max_bytes: int) -> Iterator[BinaryIO]:
    """The output, open for reading, when it is a regular file of at most max_bytes: opened without following
    a link and without blocking on a FIFO, checked on the open file itself, and never read past max_bytes
    (a file growing meanwhile raises BadOutput on the read). BadOutput with a reason fit for the run's status
    otherwise."""
    try:
        fd = os.open(run_dir / OUTPUT_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise BadOutput("the algorithm wrote no output") from exc
    except OSError as exc:  # ELOOP: a symlink
        raise BadOutput(f"output is not a regular file ({exc.strerror})") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadOutput("output is not a regular file")
        if info.st_size > max_bytes:
            raise BadOutput(f"output is {info.st_size} bytes, over the limit of {max_bytes}")
        source = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with source:
        yield cast(BinaryIO, _Capped(source, max_bytes))  # the part of BinaryIO a reader uses


def read_output(run_dir: Path, max_bytes: int) -> bytes:
    """The whole output (see open_output)."""
    with open_output(run_dir, max_bytes) as source:
        return source.read()


def output_size(run_dir: Path) -> int:
    """The output's size without following a link (0 when absent); a link is refused when it is opened."""
    try:
        return os.lstat(run_dir / OUTPUT_NAME).st_size
    except OSError:
        return 0


class _Capped:
    """A reader that refuses to deliver more than max_bytes (a file growing under us)."""

    def __init__(self, source: BinaryIO, max_bytes: int) -> None:
        self.source, self.max_bytes, self.left = source, max_bytes, max_bytes

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n if n >= 0 else self.left + 1)
        self.left -= len(data)
        if self.left < 0:
            raise BadOutput(f"output grew over the limit of {self.max_bytes} bytes while it was read")
        return data
