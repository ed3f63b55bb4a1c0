"""Errors a researcher sees: each says what failed in one line. The ledger's own errors (`LedgerError` and
its kinds, each naming the entry) are raised as they are and exported here beside the client's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from vfed.common.api import errors as api_errors
from vfed.common.ledger.errors import LedgerEntryInvalid, LedgerError, LedgerForked, LedgerTampered

if TYPE_CHECKING:
    from vfed.client.results import OrganizationResult


class ClientError(Exception):
    """Base of every vfed client error."""


class ApiError(ClientError, api_errors.ApiError):
    """The server answered with an error: its status, code and detail."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        api_errors.ApiError.__init__(self, status, error, detail)
        self.args = (f"server answered {status} {error}: {detail}",)


class NotLoggedIn(ClientError):
    """No token: call `login` or set VFED_TOKEN."""


class KeyMissing(ClientError):
    """The organization's private key is needed to encrypt inputs and decrypt results."""


class TaskTimeout(ClientError):
    """`wait` gave up before every run finished."""


class RunFailed(ClientError):
    """A run did not complete: its organization, status, reason and the tail of its log."""

    def __init__(self, run_id: int, organization_id: int, status: str, reason: str, log_tail: str) -> None:
        msg = f"run {run_id} at organization {organization_id} {status}: {reason or 'no reason given'}"
        if log_tail:
            msg += "\n--- log tail ---\n" + log_tail
        super().__init__(msg)
        self.run_id = run_id
        self.organization_id = organization_id
        self.status = status
        self.reason = reason
        self.log_tail = log_tail


class TaskFailed(RunFailed):
    """Runs of the task did not complete. The attributes of RunFailed are those of its first failed run;
    `failures` holds every failed run, the task's own first, then the failed runs of the subtasks those runs
    created, at any depth (one line each in the message)."""

    def __init__(self, task_id: int, failures: Sequence[OrganizationResult]) -> None:
        first = failures[0]
        super().__init__(
            first.run_id, first.organization_id, first.status, first.message or "", first.log_tail
        )
        own = sum(1 for f in failures if f.depth == 0)
        lines = [f"task {task_id}: {own} organization(s) failed"] + ["  " + f.line() for f in failures]
        if first.log_tail:
            lines += [f"--- log tail of run {first.run_id} ---", first.log_tail]
        Exception.__init__(self, "\n".join(lines))
        self.task_id = task_id
        self.failures = list(failures)


class NotTables(ClientError):
    """`to_dataframe()` on results that are not tables (a list of records, a dict of columns, a DataFrame)."""


class TrustRefused(ClientError):
    """An organization's key chain, or a researcher certificate, does not verify against your pins."""

    def __init__(self, message: str, reason: str, organization_id: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.organization_id = organization_id


class NotCertified(ClientError):
    """The key file is neither the organization's keyring nor a researcher key certified by it."""


class ResultMismatch(ClientError):
    """A result blob is not the one its run produced: bound to another run or task, or signed by another
    organization (the server moved it)."""

    def __init__(self, run_id: int, organization_id: int, why: str) -> None:
        super().__init__(f"the result of run {run_id} (organization {organization_id}) {why}")
        self.run_id = run_id
        self.organization_id = organization_id


class LedgerUnavailable(ClientError):
    """The server keeps no ledger for this collaboration (an unknown collaboration, or an older server)."""


__all__ = [
    "ApiError",
    "ClientError",
    "KeyMissing",
    "LedgerEntryInvalid",
    "LedgerError",
    "LedgerForked",
    "LedgerTampered",
    "LedgerUnavailable",
    "NotCertified",
    "NotLoggedIn",
    "NotTables",
    "ResultMismatch",
    "RunFailed",
    "TaskFailed",
    "TaskTimeout",
    "TrustRefused",
]
