"""A task's results per organization (`ResultSet`), and the failed runs behind a failed task, through every
level of subtasks the researcher may see.

A `ResultSet` is a read-only sequence of the decoded values in organization order, so code written when
`results()` returned a plain list (indexing, unpacking, `==` with a list) keeps working; `.by_organization`,
`.organizations` and `.to_dataframe()` add who returned what. Results streamed to files (`results(...,
to=DIR)`) keep each value in its file until it is first asked for.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final, overload

from vfed.client.errors import ClientError, NotTables, RunFailed
from vfed.common.api.reasons import code_of
from vfed.common.api.resources import Run
from vfed.common.payload import PARQUET_MAGIC, decode_result


class _NotLoaded:
    def __repr__(self) -> str:
        return "<not loaded>"


NOT_LOADED: Final[Any] = _NotLoaded()
"""The value of a result kept in its file and not read yet."""


class _FileBackedValue:
    """`OrganizationResult.value`: what the result was built with, or, when that is NOT_LOADED, read from
    its `file` on first access and kept (a table of many GiB is read only when asked for)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, result: OrganizationResult | None, owner: type | None = None) -> Any:
        if result is None:
            return None  # the dataclass field's default
        value = result.__dict__[self.slot]
        if value is NOT_LOADED and result.file is not None:
            value = load_result_file(result.file)
            result.__dict__[self.slot] = value
        return value

    def __set__(self, result: OrganizationResult, value: Any) -> None:
        result.__dict__[self.slot] = value


@dataclass(frozen=True)
class OrganizationResult:
    """One run of a task: whose it is, how it ended and its decoded value (completed) or its classified
    failure (`code`, the reason's first word, and `message`, the whole reason).

    `task_id` is the run's own task: the asked task for its own runs, a subtask for the runs `failures`
    found below a failed run. `path` lists the task ids from the asked task down to the run's task, and
    `parent_run_id` is the run that created that subtask (None for the asked task's own runs). `file` is
    the file a result streamed to (`results(..., to=DIR)`): `value` is read from it on first access."""

    organization_id: int
    organization: str | None
    run_id: int
    task_id: int
    status: str
    value: Any = _FileBackedValue()
    code: str | None = None
    message: str | None = None
    log_tail: str = ""
    path: tuple[int, ...] = ()
    parent_run_id: int | None = None
    file: Path | None = None

    def __repr__(self) -> str:
        """The dataclass's, without reading a value still in its file."""
        shown = (
            f"{f.name}={self.__dict__['_value' if f.name == 'value' else f.name]!r}" for f in fields(self)
        )
        return f"{type(self).__name__}({', '.join(shown)})"

    @property
    def loaded(self) -> bool:
        """False while the value is still only in `file`."""
        return self.__dict__["_value"] is not NOT_LOADED

    @property
    def ok(self) -> bool:
        """The run completed (its value is a result, not a RunFailed)."""
        return self.status == "completed"

    @property
    def depth(self) -> int:
        """0 for a run of the asked task, 1 for a run of its subtask, and so on."""
        return max(len(self.path) - 1, 0)

    @property
    def who(self) -> str:
        """The organization as messages name it: `name (id)`."""
        name = self.organization or "organization"
        return f"{name} ({self.organization_id})"

    def line(self) -> str:
        """One line naming the organization, the run, where it sits among subtasks, and why it failed."""
        where = f"run {self.run_id}"
        if self.depth:
            where += f" of subtask {self.task_id} (depth {self.depth}, created by run {self.parent_run_id})"
        return f"{self.who}: {where} {self.status}: {self.message or 'no reason given'}"


def failed_result(run: Run, failure: RunFailed, names: Mapping[int, str]) -> OrganizationResult:
    return OrganizationResult(
        organization_id=failure.organization_id,
        organization=names.get(failure.organization_id),
        run_id=failure.run_id,
        task_id=run.task_id,
        status=failure.status,
        value=failure,
        code=code_of(failure.reason),
        message=failure.reason or None,
        log_tail=failure.log_tail,
        path=(run.task_id,),
    )


def completed_result(
    run: Run, value: Any, names: Mapping[int, str], file: Path | None = None
) -> OrganizationResult:
    return OrganizationResult(
        organization_id=run.organization_id,
        organization=names.get(run.organization_id),
        run_id=run.id,
        task_id=run.task_id,
        status=str(run.status),
        value=value,
        path=(run.task_id,),
        file=file,
    )


def load_result_file(path: Path) -> Any:
    """The value a result file holds: a DataFrame for Parquet (pandas reads the file itself), else the
    value of the JSON result document (AlgorithmError for an algorithm's error document)."""
    with path.open("rb") as f:
        head = f.read(len(PARQUET_MAGIC))
    if head == PARQUET_MAGIC:
        return _pandas("reading a table result").read_parquet(path, engine="pyarrow")
    return decode_result(path.read_bytes())


class ResultSet(Sequence[Any]):
    """A task's results, one per run in organization order: the decoded value of a completed run, or its
    RunFailed when the results were read with `raise_on_failure=False`. A value kept in its file is read
    when it is first asked for (indexing, iteration, `by_organization`, `to_dataframe()`); `.files` names
    the files without reading them."""

    def __init__(
        self, task_id: int, runs: Sequence[OrganizationResult], failures: Sequence[OrganizationResult]
    ):
        self.task_id = task_id
        self.organizations: tuple[OrganizationResult, ...] = tuple(runs)
        self.failures: tuple[OrganizationResult, ...] = tuple(failures)
        """Every failed run: the task's own, then those of subtasks below them (see OrganizationResult)."""

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [r.value for r in self.organizations[index]]
        return self.organizations[index].value

    def __len__(self) -> int:
        return len(self.organizations)

    def __iter__(self) -> Iterator[Any]:
        return (r.value for r in self.organizations)

    def __eq__(self, other: object) -> bool:
        """Equal to a list (or another ResultSet) of the same values, as the plain list it replaces was."""
        if isinstance(other, ResultSet | list | tuple):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable values inside, like the list it replaces

    def __repr__(self) -> str:
        """Values still in their files are named by file, not read."""
        shown = {r.organization_id: r.value if r.loaded else r.file for r in self.organizations}
        return f"ResultSet(task={self.task_id}, {shown!r})"

    @property
    def files(self) -> dict[int, Path]:
        """Organization id -> the file its result streamed to (`results(..., to=DIR)`), for completed runs."""
        return {r.organization_id: r.file for r in self.organizations if r.file is not None}

    @property
    def by_organization(self) -> dict[int, Any]:
        """Organization id -> its run's value (its RunFailed for a failed run), in organization order."""
        return {r.organization_id: r.value for r in self.organizations}

    def to_dataframe(self, skip_failed: bool = False) -> Any:
        """The tables of all organizations in one pandas DataFrame with an `organization` column (the id)
        first. A table is a DataFrame, a list of records (dicts) or a dict of equally long column lists.
        NotTables when a result is something else, or an organization failed (unless `skip_failed`)."""
        pd = _pandas()
        frames = []
        for result in self.organizations:
            if not result.ok:
                if skip_failed:
                    continue
                raise NotTables(f"{result.line()}; to_dataframe(skip_failed=True) leaves it out")
            frame = _as_frame(pd, result)
            frame.insert(0, "organization", result.organization_id)
            frames.append(frame)
        if not frames:
            return pd.DataFrame({"organization": pd.Series([], dtype="int64")})
        return pd.concat(frames, ignore_index=True)


def _pandas(what: str = "to_dataframe()") -> Any:
    try:
        import pandas as pd
    except ImportError:
        raise ClientError(
            f"{what} needs pandas: install the algorithms extra (pip install 'vfed[algorithms]')"
        ) from None
    return pd


def _as_frame(pd: Any, result: OrganizationResult) -> Any:
    value = result.value
    if isinstance(value, pd.DataFrame):
        return value.copy()
    if isinstance(value, list) and all(isinstance(row, dict) for row in value):
        return pd.DataFrame.from_records(value)
    columns = list(value.values()) if isinstance(value, dict) else []
    if columns and all(isinstance(col, list) for col in columns) and len({len(c) for c in columns}) == 1:
        return pd.DataFrame(value)
    raise NotTables(
        f"the result of {result.who} (run {result.run_id}) is a {type(value).__name__}, not a table "
        "(a DataFrame, a list of records or a dict of equally long columns): use .by_organization"
    )
