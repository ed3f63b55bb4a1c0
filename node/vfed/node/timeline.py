"""Where a run's start goes: wall-clock marks from the doorbell to the started container.

Why: issue 5 bounds the agent's share of "task POST -> container started"; bench/node.py lines these marks up
with Docker's own create/start events (same clock). One DEBUG line per run on the `vfed.node.timeline`
logger (`vnode run --log-level INFO,vfed.node.timeline=DEBUG`); otherwise a few clock reads, nothing logged.
The current run's timeline travels in a context variable, so `mark`, set as the runtime's `on_step` hook by
the agent, marks the engine's steps from the runtime's threads too (asyncio.to_thread copies the context):
the runtime knows nothing of timelines.
"""

from __future__ import annotations

import contextvars
import logging
import time

log = logging.getLogger(__name__)
_CURRENT: contextvars.ContextVar[StartTimeline | None] = contextvars.ContextVar("vfed_start", default=None)


class StartTimeline:
    """Named wall-clock marks of one run's start, in the order they happened."""

    def __init__(self, run_id: int, rung_at: float | None = None) -> None:
        self.run_id = run_id
        self.marks: list[tuple[str, float]] = [] if rung_at is None else [("ring", rung_at)]

    def mark(self, step: str) -> None:
        self.marks.append((step, time.time()))  # list.append is atomic: the runtime's thread marks too

    def activate(self) -> None:
        """Make this the current task's timeline (tasks and threads started from here inherit it)."""
        _CURRENT.set(self)

    def emit(self) -> None:
        if log.isEnabledFor(logging.DEBUG):
            steps = " ".join(f"{name}={at:.6f}" for name, at in self.marks)
            log.debug("run %s start marks: %s", self.run_id, steps)


def mark(step: str) -> None:
    """Mark a step of the current run's start, if there is one (the runtime calls this from its thread)."""
    current = _CURRENT.get()
    if current is not None:
        current.mark(step)


def parse(line: str) -> tuple[int, dict[str, float]] | None:
    """(run id, {step: epoch seconds}) from one emitted line; None for any other line (for bench/node.py)."""
    head, sep, tail = line.partition(" start marks: ")
    words = head.split()
    if not sep or len(words) < 2 or words[-2] != "run" or not words[-1].isdigit():
        return None
    marks = {}
    for item in tail.split():
        name, _, at = item.partition("=")
        try:
            marks[name] = float(at)
        except ValueError:
            return None
    return int(words[-1]), marks
