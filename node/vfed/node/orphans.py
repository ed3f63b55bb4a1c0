"""Runs of an earlier server: what the node clears when its server is not the one its journal knows.

Why: a server whose database was reset (or that registered this node anew) numbers jobs and runs from 1 again.
A container of an old run that still runs holds the names a new run needs (`vfed-<node>-run-<run_id>`,
`vfed-<node>-<job_id>-tmp`), so the new run ended `start-failed`; a journal entry of an old run was taken for
the new run of the same id (its container followed and reported to the new server as that run). The server
sends no identity of its own, so the node derives one from what login answers plus its API key's id: the
server draws a fresh random key id whenever it registers a node, and a reset database cannot hand it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from vfed.node.runtime.base import NotFound, RunHandleInfo, RuntimeUnavailable
from vfed.node.server_api import NodeIdentity

if TYPE_CHECKING:
    from vfed.node.runner import Services

log = logging.getLogger(__name__)
SERVER_KEY = "server_identity"


def server_identity(identity: NodeIdentity, api_key: str) -> str:
    """A short fingerprint of (server database, node record); not secret: the key id is the public half."""
    key_id = api_key.partition(".")[0]
    text = f"{identity.node_id}:{identity.organization_id}:{identity.collaboration_id}:{key_id}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


async def adopt_server(s: Services, identity: str) -> None:
    """Record the server's identity; when the journal knew another one, clear that server's runs first.

    Called before recovery and before any claim. The identity is written last, so a start that fails midway
    clears again next time. A journal without an identity (new, or older than this) adopts the server as is.
    """
    known = s.journal.meta(SERVER_KEY)
    if known is not None and known != identity:
        log.warning(
            "this node now answers to another server (identity %s, was %s): its database was reset or the "
            "node was registered anew; runs of the earlier server are orphans and are cleared uncollected",
            identity,
            known,
        )
        await clear_orphans(s)
    s.journal.set_meta(SERVER_KEY, identity)


async def clear_orphans(s: Services) -> None:
    """Stop and remove this agent's run containers, job volumes and folders, and forget the journal's runs.

    Nothing is collected or reported: the server that asked for these runs is gone. Containers another agent
    of the same node name started are left alone, as recovery does.
    """
    name = s.settings.name
    own = [c for c in await s.runtime.list_runs(name) if c.agent_id in (None, s.journal.agent_id)]
    await asyncio.gather(*(_stop_and_remove(s, c) for c in own))
    for job_id in await s.runtime.list_job_volumes(name):
        try:
            await s.runtime.remove_job_volume(name, job_id)
        except (RuntimeUnavailable, NotFound) as exc:
            log.warning("orphan job volume of job %s not removed: %s", job_id, exc)
    await asyncio.to_thread(_clear_folders, s.settings.data_dir)
    forgotten = s.journal.forget_all()
    log.warning(
        "cleared the earlier server's runs: %d container(s), %d journal entr%s",
        len(own),
        len(forgotten),
        "y" if len(forgotten) == 1 else "ies",
    )


async def _stop_and_remove(s: Services, container: RunHandleInfo) -> None:
    with contextlib.suppress(NotFound, RuntimeUnavailable):
        await s.runtime.kill(container.handle, grace_s=s.settings.kill_grace_s)
        await s.runtime.cleanup(container.handle)
    log.warning(
        "run %s of the earlier server: container %s stopped and removed, nothing collected",
        container.run_id,
        container.handle,
    )


def _clear_folders(data_dir: Path) -> None:
    """Run folders and proxy socket folders of the old runs (no proxy runs yet at this point)."""
    for name in ("runs", "sockets"):
        folder = data_dir / name
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
