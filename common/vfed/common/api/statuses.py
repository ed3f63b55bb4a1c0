"""Run and task statuses, the one definition every component uses (server, node, proxy, client, SDK).

A run moves pending -> initializing -> active -> one of the terminal statuses, after which it never changes.
A task has no status of its own: it is derived from its runs (`task_status`), the same way on the server,
in the proxy's view of a subtask and in the client.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class RunStatus(StrEnum):
    """Lifecycle of one run at one organization (docs/api.md)."""

    PENDING = "pending"
    INITIALIZING = "initializing"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    START_FAILED = "start-failed"
    NOT_ALLOWED = "not-allowed"
    KILLED = "killed"
    CRASHED = "crashed"

    @property
    def finished(self) -> bool:
        """Terminal: the run will not change any more."""
        return self in TERMINAL


TERMINAL: frozenset[RunStatus] = frozenset(
    {
        RunStatus.COMPLETED,
        RunStatus.FAILED,
        RunStatus.START_FAILED,
        RunStatus.NOT_ALLOWED,
        RunStatus.KILLED,
        RunStatus.CRASHED,
    }
)
"""The statuses a run ends in. Plain strings compare equal to their members: `"failed" in TERMINAL`."""


class TaskStatus(StrEnum):
    """A task's status, derived from its runs."""

    PENDING = "pending"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    KILLED = "killed"


def is_finished(status: str) -> bool:
    """A run status (a plain string off the wire) is terminal."""
    return status in TERMINAL


def task_status(statuses: Iterable[str]) -> TaskStatus:
    """A task's status from its runs' statuses: pending until a node picks a run up; final only when every
    run is final (killed if any was killed, completed if every one completed, else failed)."""
    found = list(statuses)
    if not found:
        return TaskStatus.PENDING
    if all(s in TERMINAL for s in found):
        if RunStatus.KILLED in found:
            return TaskStatus.KILLED
        if all(s == RunStatus.COMPLETED for s in found):
            return TaskStatus.COMPLETED
        return TaskStatus.FAILED
    if all(s == RunStatus.PENDING for s in found):
        return TaskStatus.PENDING
    return TaskStatus.ACTIVE
