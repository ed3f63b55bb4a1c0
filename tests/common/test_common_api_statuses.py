"""The run and task statuses every component shares (vfed.common.api.statuses)."""

from __future__ import annotations

import pytest

from vfed.common.api.statuses import TERMINAL, RunStatus, TaskStatus, is_finished, task_status

R = RunStatus


@pytest.mark.parametrize(
    ("runs", "expected"),
    [
        ([], TaskStatus.PENDING),
        ([R.PENDING, R.PENDING], TaskStatus.PENDING),
        ([R.PENDING, R.INITIALIZING], TaskStatus.ACTIVE),
        ([R.COMPLETED, R.ACTIVE], TaskStatus.ACTIVE),
        ([R.COMPLETED, R.PENDING], TaskStatus.ACTIVE),
        ([R.COMPLETED, R.COMPLETED], TaskStatus.COMPLETED),
        ([R.COMPLETED, R.FAILED], TaskStatus.FAILED),
        ([R.NOT_ALLOWED], TaskStatus.FAILED),
        ([R.START_FAILED, R.CRASHED], TaskStatus.FAILED),
        ([R.FAILED, R.KILLED, R.COMPLETED], TaskStatus.KILLED),
    ],
)
def test_a_task_status_is_derived_from_its_runs(runs: list[RunStatus], expected: TaskStatus) -> None:
    assert task_status(runs) is expected
    assert task_status(str(r) for r in runs) is expected  # plain strings off the wire, a generator


def test_terminal_statuses_and_plain_strings() -> None:
    assert {str(s) for s in TERMINAL} == {
        "completed",
        "failed",
        "start-failed",
        "not-allowed",
        "killed",
        "crashed",
    }
    assert all(RunStatus(s).finished for s in TERMINAL)
    assert not any(s.finished for s in (R.PENDING, R.INITIALIZING, R.ACTIVE))
    assert is_finished("crashed") and not is_finished("active") and not is_finished("no-such-status")
    assert "failed" in TERMINAL and R.KILLED == "killed"
