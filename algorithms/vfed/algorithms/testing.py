"""Running an algorithm's central function in-process, against local DataFrames instead of nodes.

`LocalClient` stands in for the node's proxy so algorithm authors (and our own tests) can check a central
function without a server: subtasks run synchronously, their inputs and results go through the same JSON /
Parquet encoding as in production, disclosure control applies as a node applies it (min_rows on datasets,
every rule on structured results, and a plain result of a function that read a dataset refused as
`unchecked-output` unless `unchecked_outputs="allow"`), and a failing subtask surfaces as `SubtaskFailed` with
its reason, as it would through the proxy. `local_datasets` reads dataset files (CSV, Parquet, SQLite) with
the loader a node's run uses, so a test sees the same DataFrames the image will.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from vfed.algorithms.client import AlgorithmClient, SubtaskFailed
from vfed.algorithms.datasets import DatasetType, env_key, load_dataset
from vfed.algorithms.decorators import declared_functions
from vfed.algorithms.disclosure import (
    DEFAULT_MAX_GLM_SATURATION,
    DEFAULT_MIN_CELL_COUNT,
    DEFAULT_MIN_ROWS,
    DisclosureError,
    require_disclosable,
    require_min_rows,
)
from vfed.algorithms.transport import Transport
from vfed.common.api.proxy import Organization, Subtask, SubtaskRun, TaskState
from vfed.common.api.statuses import RunStatus
from vfed.common.disclosure import Limits, Rule, as_document
from vfed.common.manifest import FunctionKind, declared_epsilon
from vfed.common.payload import TaskInput, decode_result, encode_result

if TYPE_CHECKING:
    import pandas as pd


def local_datasets(
    files: Mapping[int, Mapping[str, str | Path]], kind: DatasetType | str | None = None
) -> dict[int, dict[str, pd.DataFrame]]:
    """{org_id: {label: DataFrame}} for `LocalClient`, from {org_id: {label: file}}: each file read as a node
    offers it to a run (`DATASET_<LABEL>_URI`/`_TYPE`); the type is `kind`, else the file's suffix."""
    frames: dict[int, dict[str, pd.DataFrame]] = {}
    for org, labels in files.items():
        frames[org] = {}
        for label, file in labels.items():
            path = Path(file)
            chosen = str(kind or path.suffix.lstrip(".").lower())
            if chosen in ("db", "sqlite3"):
                chosen = DatasetType.SQLITE.value
            env = {"DATASETS": label, f"{env_key(label)}_URI": str(path), f"{env_key(label)}_TYPE": chosen}
            frames[org][label] = load_dataset(label, env)
    return frames


class LocalClient(AlgorithmClient):
    """An AlgorithmClient whose organizations are in-memory datasets: {org_id: {label: DataFrame}}."""

    def __init__(
        self,
        module: ModuleType,
        datasets: Mapping[int, Mapping[str, pd.DataFrame]],
        *,
        min_rows: int = DEFAULT_MIN_ROWS,
        min_cell_count: int = DEFAULT_MIN_CELL_COUNT,
        max_glm_saturation: float = DEFAULT_MAX_GLM_SATURATION,
        unchecked_outputs: str = "refuse",
    ) -> None:
        super().__init__(Transport(url="http://local.invalid"))
        self._functions = declared_functions(module)
        self._datasets = datasets
        self._min_rows = min_rows
        self._limits = Limits(min_rows, min_cell_count, max_glm_saturation)
        self._unchecked = unchecked_outputs == "allow"
        self._ids = itertools.count(1)
        self._tasks: dict[int, list[tuple[SubtaskRun, bytes | None]]] = {}
        self.created: list[tuple[int, TaskInput]] = []
        """Every subtask input, in order: what a central function asked the organizations to do."""

    def organizations(self) -> list[Organization]:
        return [Organization(id=org, name=f"org-{org}") for org in self._datasets]

    def _run_one(self, org: int, task_input: TaskInput) -> tuple[RunStatus, str | None, bytes | None]:
        entry = self._functions.get(task_input.method)
        if entry is None:
            return RunStatus.FAILED, f"method {task_input.method!r} is not declared", None
        function, spec = entry
        try:
            epsilon = declared_epsilon(spec, task_input)
            if spec.kind is FunctionKind.CENTRAL:
                value = function(self, *task_input.args, **task_input.kwargs)
            else:
                frames = [self._datasets[org][label] for label in spec.datasets]
                for label, frame in zip(spec.datasets, frames, strict=True):
                    require_min_rows(frame, f"dataset {label!r}", limit=self._min_rows)
                value = function(*frames, *task_input.args, **task_input.kwargs)
                if spec.datasets:
                    self._as_a_node_would(value, epsilon)
            return RunStatus.COMPLETED, None, encode_result(value)
        except Exception as exc:  # a run's failure becomes its status and reason, as at a node
            return RunStatus.FAILED, f"{type(exc).__name__}: {exc}", None

    def _as_a_node_would(self, value: object, epsilon: float | None) -> None:
        """The node's check of a result that read a dataset (the epsilon a method declares counts as
        charged, as on a node whose dataset has a budget)."""
        if as_document(value) is None and not self._unchecked:
            raise DisclosureError(
                "the result",
                0,
                0,
                rule=Rule.UNCHECKED_OUTPUT.value,
                message="disclosure control (unchecked-output): a function that reads a dataset returns "
                "Parts (vfed.algorithms.Parts) for the node to check; a node releases plain values only "
                "from images its policy allows unchecked outputs for",
            )
        limits = self._limits
        require_disclosable(
            value, Limits(limits.min_rows, limits.min_cell_count, limits.max_glm_saturation, epsilon)
        )

    def create_subtask(
        self,
        method: str,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        organizations: Iterable[int] | None = None,
        per_org_inputs: Mapping[int, TaskInput] | None = None,
        datasets: Iterable[str] | None = None,
        name: str | None = None,
    ) -> Subtask:
        orgs = list(organizations) if organizations is not None else list(per_org_inputs or {})
        if not orgs:
            raise ValueError("create_subtask needs at least one organization")
        shared = TaskInput(method=method, args=list(args), kwargs=dict(kwargs or {}))
        task_id = next(self._ids)
        runs = []
        for org in orgs:
            chosen = per_org_inputs[org] if per_org_inputs is not None else shared
            wire = TaskInput.from_json(chosen.to_json())  # the same JSON round trip as through the proxy
            self.created.append((org, wire))
            status, reason, output = self._run_one(org, wire)
            run = SubtaskRun(run_id=next(self._ids), organization_id=org, status=status, reason=reason)
            runs.append((run, output))
        self._tasks[task_id] = runs
        return Subtask(task_id=task_id, run_ids=[run.run_id for run, _ in runs])

    def task(self, task_id: int) -> TaskState:
        runs = [run for run, _ in self._tasks[task_id]]
        failed = any(run.status is not RunStatus.COMPLETED for run in runs)
        return TaskState(task_id=task_id, status="failed" if failed else "completed", runs=runs, done=True)

    def wait(self, task_id: int, timeout_s: float = 3600.0) -> TaskState:
        return self.task(task_id)

    def results_by_organization(self, task_id: int) -> dict[int, Any]:
        values: dict[int, Any] = {}
        for run, output in self._tasks[task_id]:
            if run.status is not RunStatus.COMPLETED or output is None:
                raise SubtaskFailed(task_id, run)
            values[run.organization_id] = decode_result(output)
        return values
