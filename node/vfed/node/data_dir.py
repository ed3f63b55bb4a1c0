"""The agent's data folder holds the journal, the runs' decrypted inputs and their outputs before sealing, the
proxy sockets and, by default, the organization key: only the agent's own user may enter it (mode 0700).

Enforced at every start, by fixing rather than refusing: the folder is the agent's own, an older agent (or a
Docker volume) made it 0755, and a refusal would only stop the node until someone types the same chmod. A
folder that belongs to another user is refused instead: its owner could swap what is in it under the agent
(a link where the agent writes as root), and changing another user's folder is not the agent's call.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

MODE = 0o700


class UnsafeDataDir(Exception):
    """The data folder cannot be made private to the agent; the message says why and what to do."""


def secure_data_dir(path: Path) -> None:
    """Make the folder (0700) when missing; set it to 0700 with a warning when it is not; refuse one that is
    not a folder or belongs to another user."""
    if not path.exists():
        path.mkdir(mode=MODE, parents=True, exist_ok=True)
    info = path.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDataDir(f"data_dir {path} is not a folder")
    me = os.geteuid()
    if info.st_uid != me:
        raise UnsafeDataDir(
            f"data_dir {path} belongs to uid {info.st_uid}, not to the agent's user (uid {me}): give it to "
            f"that user (chown {me} {path}) or configure a data_dir of the agent's own"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode != MODE:
        os.chmod(path, MODE)
        log.warning(
            "data_dir %s had mode %04o (it holds decrypted inputs and the node's journal): set to %04o",
            path,
            mode,
            MODE,
        )
