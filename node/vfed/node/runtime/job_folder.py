"""The job's temporary folder: an agent-owned host folder, given to Docker as a bind-backed local volume.

Why not a plain Docker volume: a fresh one belongs to root, and handing its `tmp` to the container user took
an archive call on a created container (about 60 ms on the start path of every new job). A folder the agent
prepares itself is ready before `create`, and the volume keeps its name, labels and mount point.

Layout: `<jobs_dir>/<node>/<job_id>/` (the volume's root: the agent's, mode 0755, so an algorithm can neither
add a file there nor swap `tmp` for a link) holding `tmp/` (the container user's, mode 0700; 0777 when the
agent is not root and cannot hand it over; `jobs_dir` itself is 0700, so other host users cannot reach it).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

from vfed.node.runtime.base import JOB_VOLUME_MOUNT, TEMPORARY_FOLDER, PermanentStartError

TMP_NAME = TEMPORARY_FOLDER.removeprefix(JOB_VOLUME_MOUNT).strip("/")


def default_jobs_dir() -> str:
    """Where job folders go when the config names no place (a runtime used without an agent's data folder)."""
    return os.path.join(tempfile.gettempdir(), f"vfed-jobs-{os.geteuid()}")


def job_folder(jobs_dir: str, node_name: str, job_id: str) -> Path:
    return Path(jobs_dir) / node_name / job_id


def prepare(folder: Path, uid: int, gid: int) -> None:
    """Create the job folder and its `tmp` for the container user; leave an existing one as it is.

    Raises PermanentStartError when something other than a real folder sits at either path.
    """
    for private in (folder.parent.parent, folder.parent):
        private.mkdir(mode=0o700, parents=True, exist_ok=True)
        _require_dir(private)
    _make(folder, 0o755)
    tmp = folder / TMP_NAME
    if _make(tmp, 0o700):
        if os.geteuid() == 0:
            os.chown(tmp, uid, gid, follow_symlinks=False)
        else:
            os.chmod(tmp, 0o777)


def _make(path: Path, mode: int) -> bool:
    """mkdir with exactly this mode (umask aside); False when it exists already (checked to be a folder)."""
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        _require_dir(path)
        return False
    os.chmod(path, mode, follow_symlinks=False)
    return True


def _require_dir(path: Path) -> None:
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise PermanentStartError(f"job folder {path} is not a folder")


def remove(folder: Path) -> None:
    """Delete a job folder; rmtree never follows the links an algorithm may have left inside `tmp`."""
    shutil.rmtree(folder, ignore_errors=True)


def listed(jobs_dir: str, node_name: str) -> list[str]:
    """Job ids that have a folder on this node (also those whose volume a crash already removed)."""
    try:
        entries = list(os.scandir(Path(jobs_dir) / node_name))
    except FileNotFoundError:
        return []
    return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
