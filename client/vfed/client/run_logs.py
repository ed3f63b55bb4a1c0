"""A run's log tail, as its node sealed it: readable here only with a key among its recipients.

The node seals a run's log to its own organization, and to the run's initiator only when that node opted in
(`share_logs_with_initiator`): an algorithm's output can quote the data it read. The server shows each run's
`reason`, a classified code (vfed.common.api.reasons), to everyone who may see the run; the log is for the
node's organization (an organization admin's client holding the organization's keyring) and, by that opt-in,
the initiator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vfed.client.errors import ClientError
from vfed.common.api import RunLogError, open_log
from vfed.common.api.resources import Run

if TYPE_CHECKING:
    from vfed.client.client import AsyncClient


class LogUnreadable(ClientError):
    """The run has no sealed log, or this client's key is not among its recipients, or it does not verify."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


async def run_log(client: AsyncClient, run: Run) -> str:
    """The run's plaintext log, verified against the executing organization's key chain and bound to the run;
    LogUnreadable says why not."""
    run_id, org_id, task_id = run.id, run.organization_id, run.task_id
    sealed = run.sealed_log
    if not sealed:
        raise LogUnreadable(
            f"run {run_id} has no sealed log (its node sent none, or it has not ended)", "none"
        )
    chain = await client.chains.chain(org_id)
    ids = {"organization_id": org_id, "task_id": task_id, "run_id": run_id}
    try:
        try:
            return open_log(str(sealed), client.keyring, chain.lookup(), **ids)
        except RunLogError as exc:
            if exc.kind != "unknown-sender":
                raise
            chain = await client.chains.chain(org_id, refresh=True)  # signed by a newer key: read again, once
            return open_log(str(sealed), client.keyring, chain.lookup(), **ids)
    except RunLogError as exc:
        raise LogUnreadable(str(exc), exc.kind) from None


async def log_if_readable(client: AsyncClient, run: Run) -> str:
    """The run's log when this client may read it, else "" (a failure report never fails for its log)."""
    try:
        return await run_log(client, run)
    except ClientError:
        return ""
