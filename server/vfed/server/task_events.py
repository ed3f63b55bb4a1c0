"""In-process wake-ups for task waiters: a committed change to a task's runs wakes whoever waits on it.

Handlers mark the tasks whose runs they changed on their session (`mark_changed`, called by
`refresh_status`); once that session commits, every waiter on those tasks is woken. Events are a shortcut,
not the truth: a waiter re-reads the database when woken and also every few seconds, so a change made by
another server process, or an event that never came, delays an answer but never loses it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

_CHANGED = "vfed_changed_tasks"
HUB = "vfed_task_events"


class TaskEvents:
    """Waiters by task id. Everything runs on the event loop thread (SQLAlchemy's greenlets included)."""

    def __init__(self) -> None:
        self._waiters: dict[int, set[asyncio.Event]] = {}

    def subscribe(self, task_id: int) -> asyncio.Event:
        """An event set on the next committed change to the task's runs; `unsubscribe` it when done."""
        ev = asyncio.Event()
        self._waiters.setdefault(task_id, set()).add(ev)
        return ev

    def unsubscribe(self, task_id: int, ev: asyncio.Event) -> None:
        waiters = self._waiters.get(task_id)
        if waiters is not None:
            waiters.discard(ev)
            if not waiters:
                del self._waiters[task_id]

    def notify(self, task_ids: set[int]) -> None:
        """Wake every waiter on these tasks."""
        for task_id in task_ids:
            for ev in self._waiters.get(task_id, ()):
                ev.set()

    def waiting(self) -> int:
        """How many waiters are registered (a gauge, and how tests see that none leaked)."""
        return sum(len(w) for w in self._waiters.values())


def mark_changed(session: Any, task_id: int) -> None:
    """Note on the (async or sync) session that this task's runs changed; waiters wake after its commit."""
    info = session.info
    info.setdefault(_CHANGED, set()).add(task_id)


class NotifyingSession(Session):
    """The sync session behind every AsyncSession of the app; its commits wake task waiters."""


@event.listens_for(NotifyingSession, "after_commit")
def _after_commit(session: Session) -> None:
    changed: set[int] | None = session.info.pop(_CHANGED, None)
    hub: TaskEvents | None = session.info.get(HUB)
    if changed and hub is not None:
        hub.notify(changed)


@event.listens_for(NotifyingSession, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_CHANGED, None)
