"""Outcomes of runs whose Job the runtime itself removed: a kill, or an end Kubernetes would not make (an
image that cannot be pulled, a pod that stays unschedulable). Their pod is gone, and its log and exit code
with it, so the runtime keeps them until `cleanup`.

Kept as files in the agent's own data folder (beside its journal), not on the cluster: the Job goes with the
run (its token Secret and NetworkPolicy must not outlive it), an annotation dies with its object and could not
hold a log tail anyway (256 KiB for all of an object's annotations), and a run's log must stay with the node's
organization. A restarted agent reads the same folder, so it reports the same outcome for the same handle.
Blocking file I/O: the runtime calls this in its thread pool.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from pathlib import Path

from pydantic import ValidationError

from vfed.node.runtime.base import ExitStatus

log = logging.getLogger(__name__)
_SAFE = re.compile(r"[^A-Za-z0-9.-]")


class EndedRuns:
    """Handle -> (ExitStatus, log tail), in memory and, with a folder, on disk."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._memory: dict[str, tuple[ExitStatus, bytes]] = {}

    def _paths(self, handle: str) -> tuple[Path, Path]:
        assert self.folder is not None
        stem = _SAFE.sub("_", handle)
        return self.folder / f"{stem}.status.json", self.folder / f"{stem}.log"

    def put(self, handle: str, status: ExitStatus, logs: bytes) -> None:
        """Kept before the run's objects are deleted: a crash between the two loses nothing."""
        self._memory[handle] = (status, logs)
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        status_path, log_path = self._paths(handle)
        _write_atomically(log_path, logs)
        _write_atomically(status_path, status.model_dump_json().encode())  # last: it marks the pair whole

    def get(self, handle: str) -> tuple[ExitStatus, bytes] | None:
        found = self._memory.get(handle)
        if found is not None or self.folder is None:
            return found
        status_path, log_path = self._paths(handle)
        try:
            status = ExitStatus.model_validate_json(status_path.read_bytes())
            logs = log_path.read_bytes()
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            log.warning("the kept outcome of %s is unreadable (%s): treated as unknown", handle, exc)
            return None
        self._memory[handle] = (status, logs)
        return status, logs

    def forget(self, handle: str) -> None:
        self._memory.pop(handle, None)
        if self.folder is not None:
            for path in self._paths(handle):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
