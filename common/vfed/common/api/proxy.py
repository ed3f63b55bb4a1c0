"""The proxy API's answers (docs/proxy-api.md), the one definition the proxy writes them with and the
algorithm SDK reads them with.

The proxy is the only way out of an algorithm's container: it answers who the run is, which organizations
the collaboration has, the subtasks it created and their runs. Unknown keys are ignored on reading, so a
newer proxy may add some (`PROXY_API_VERSION` changes only when a meaning does).
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

from vfed.common.api.statuses import RunStatus, task_status


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Organization(_Answer):
    """An organization of the collaboration (GET /organizations, each of `data`)."""

    id: int
    name: str
    key_id: str | None = None


class RunInfo(_Answer):
    """The run this algorithm is executing as (GET /run)."""

    run_id: int
    task_id: int
    job_id: int
    organization_id: int
    collaboration_id: int
    image: str


class Subtask(_Answer):
    """A created subtask: one run per target organization (POST /tasks, 201)."""

    task_id: int
    run_ids: list[int]


class SubtaskRun(_Answer):
    """One organization's run of a subtask."""

    run_id: int
    organization_id: int
    status: RunStatus
    reason: str | None = None


class TaskState(_Answer):
    """A subtask and its runs (GET /tasks/{id} and its long poll /wait); `done` when every run finished."""

    task_id: int
    status: str
    runs: list[SubtaskRun] = Field(default_factory=list)
    done: bool | None = None

    @property
    def finished(self) -> bool:
        """Every run is in a terminal status (the proxy's `done` flag when it gave one)."""
        if self.done is not None:
            return self.done
        return all(run.status.finished for run in self.runs)

    @classmethod
    def of(cls, task_id: int, runs: Iterable[SubtaskRun]) -> TaskState:
        """The state the proxy answers: the task's status derived from its runs, `done` when all finished."""
        found = list(runs)
        return cls(
            task_id=task_id,
            status=str(task_status(r.status for r in found)),
            runs=found,
            done=bool(found) and all(r.status.finished for r in found),
        )
