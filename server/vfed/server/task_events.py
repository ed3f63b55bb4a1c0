"""In-process wake-ups for task waiters: a committed change to a task's runs wakes whoever waits on it.

Handlers mark the tasks whose runs they changed on their session (`mark_changed`, called by
`refresh_status`); once that session commits, every waiter on those tasks is woken. On PostgreSQL the same
session also queues a `pg_notify` in its transaction, so the other server processes' waiters wake too
(vfed.server.pg_events). Events are a shortcut, not the truth: a waiter re-reads the database when woken and
also every `task_wait_recheck_s`, so an event that never came delays an answer but never loses it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.orm import Session

from vfed.server.pg_events import CHANNEL, payloads

_CHANGED = "vfed_changed_tasks"
HUB = "vfed_task_events"
NOTIFY_ORIGIN = "vfed_notify_origin"  # set (to this process's origin) on PostgreSQL: commits notify others
_NOTIFY = text("SELECT pg_notify(:channel, :payload)")


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

    def notify_all(self) -> None:
        """Wake every waiter (after a gap in the cross-process notices)."""
        for waiters in self._waiters.values():
            for ev in waiters:
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


@event.listens_for(NotifyingSession, "before_commit")
def _before_commit(session: Session) -> None:
    origin: str | None = session.info.get(NOTIFY_ORIGIN)
    changed: set[int] | None = session.info.get(_CHANGED)
    if origin is None or not changed:
        return
    for payload in payloads(origin, changed):  # delivered by PostgreSQL on commit, dropped on rollback
        session.execute(_NOTIFY, {"channel": CHANNEL, "payload": payload})


@event.listens_for(NotifyingSession, "after_commit")
def _after_commit(session: Session) -> None:
    changed: set[int] | None = session.info.pop(_CHANGED, None)
    hub: TaskEvents | None = session.info.get(HUB)
    if changed and hub is not None:
        hub.notify(changed)


@event.listens_for(NotifyingSession, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_CHANGED, None)
