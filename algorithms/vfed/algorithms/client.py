"""AlgorithmClient: what a central function uses to run subtasks, per docs/proxy-api.md.

The proxy encrypts subtask inputs for each organization and decrypts their results, so everything here is
plaintext. Waiting uses the proxy's long-poll endpoint; failures of the connection back off exponentially,
so a central function never spins.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

from vfed.algorithms.transport import ProxyError, ProxyUnavailable, Response, Transport
from vfed.common.api.proxy import Organization, RunInfo, Subtask, SubtaskRun, TaskState
from vfed.common.api.statuses import RunStatus
from vfed.common.manifest import FunctionSpec
from vfed.common.payload import TaskInput, decode_result

log = logging.getLogger(__name__)

LONG_POLL_S = 30.0
BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 10.0


class SubtaskFailed(Exception):
    """A run of a subtask did not complete; carries the organization and the node's reason."""

    def __init__(self, task_id: int, run: SubtaskRun) -> None:
        super().__init__(
            f"subtask {task_id}: run {run.run_id} at organization {run.organization_id} "
            f"{run.status.value}: {run.reason or 'no reason given'}"
        )
        self.task_id = task_id
        self.run = run


class _Backoff:
    """Exponential delays for retries, reset after a healthy answer."""

    def __init__(self, initial_s: float = BACKOFF_INITIAL_S, maximum_s: float = BACKOFF_MAX_S) -> None:
        self._initial_s = initial_s
        self._maximum_s = maximum_s
        self._next_s = initial_s

    def next_delay(self) -> float:
        delay = self._next_s
        self._next_s = min(self._next_s * 2, self._maximum_s)
        return delay

    def reset(self) -> None:
        self._next_s = self._initial_s


class AlgorithmClient:
    """The proxy seen from a central function: organizations, subtasks, waiting and results."""

    def __init__(
        self,
        transport: Transport,
        *,
        long_poll_s: float = LONG_POLL_S,
        get_attempts: int = 6,
        declared: Mapping[str, FunctionSpec] | None = None,
    ) -> None:
        self._transport = transport
        self._declared = dict(declared or {})
        self._long_poll_s = long_poll_s
        self._get_attempts = max(1, get_attempts)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, declared: Mapping[str, FunctionSpec] | None = None
    ) -> AlgorithmClient:
        """The client for the proxy the node gave this run (PROXY_SOCKET, or PROXY_URL + PROXY_TOKEN_FILE).

        `declared` (the image's own functions) lets subtasks ask for the datasets their method declares.
        """
        return cls(Transport.from_env(environ), declared=declared)

    def _get_response(self, path: str, timeout_s: float = 60.0) -> Response:
        """GET with retries on connection failures (GETs are safe to repeat)."""
        backoff = _Backoff()
        for _ in range(self._get_attempts - 1):
            try:
                return self._transport.call("GET", path, timeout_s=timeout_s)
            except ProxyUnavailable as exc:
                delay_s = backoff.next_delay()
                log.warning("GET %s: %s; retrying in %.1f s", path, exc, delay_s)
                time.sleep(delay_s)
        return self._transport.call("GET", path, timeout_s=timeout_s)

    def _get(self, path: str) -> Any:
        return self._get_response(path).json()

    def run_info(self) -> RunInfo:
        """This run's identity, as the proxy knows it."""
        return RunInfo.model_validate(self._get("/run"))

    def organizations(self) -> list[Organization]:
        """The organizations of the collaboration."""
        document = self._get("/organizations")
        return [Organization.model_validate(item) for item in document.get("data", [])]

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
        """Ask the organizations to run `method` with one shared input, or each its own (`per_org_inputs`).

        `datasets` defaults to the labels `method` declares in this image, so the nodes mount them.
        """
        orgs = list(organizations) if organizations is not None else list(per_org_inputs or {})
        if not orgs:
            raise ValueError("create_subtask needs at least one organization")
        body: dict[str, Any] = {"name": name or method, "organizations": orgs}
        if per_org_inputs is not None:
            missing = set(orgs) - set(per_org_inputs)
            if missing:
                raise ValueError(f"per_org_inputs has no input for organizations {sorted(missing)}")
            body["inputs"] = {str(org): json.loads(per_org_inputs[org].to_json()) for org in orgs}
        else:
            task_input = TaskInput(method=method, args=list(args), kwargs=dict(kwargs or {}))
            body["input"] = json.loads(task_input.to_json())  # refuses NaN rather than sending null
        if datasets is None and method in self._declared:
            datasets = self._declared[method].datasets
        if datasets is not None:
            body["datasets"] = list(datasets)
        answer = self._transport.call("POST", "/tasks", body).json()
        subtask = Subtask.model_validate(answer)
        log.info("subtask %s created: %s at organizations %s", subtask.task_id, method, orgs)
        return subtask

    def task(self, task_id: int) -> TaskState:
        """The subtask's current state, without waiting."""
        return TaskState.model_validate(self._get(f"/tasks/{task_id}"))

    def wait(self, task_id: int, timeout_s: float = 3600.0) -> TaskState:
        """Block until every run of the subtask has finished (long poll); TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        backoff = _Backoff()
        while True:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise TimeoutError(f"subtask {task_id} not finished after {timeout_s:g} s")
            poll_s = max(1, math.ceil(min(remaining_s, self._long_poll_s)))
            started = time.monotonic()
            try:
                answer = self._transport.call(
                    "GET", f"/tasks/{task_id}/wait?timeout_s={poll_s}", timeout_s=poll_s + 30
                )
            except ProxyUnavailable as exc:
                delay_s = backoff.next_delay()
                log.warning("waiting for subtask %s: %s; retrying in %.1f s", task_id, exc, delay_s)
                time.sleep(min(delay_s, max(0.0, remaining_s)))
                continue
            state = TaskState.model_validate(answer.json())
            if state.finished:
                return state
            if time.monotonic() - started < poll_s / 2:
                # The proxy answered early without news: back off instead of spinning.
                time.sleep(min(backoff.next_delay(), max(0.0, deadline - time.monotonic())))
            else:
                backoff.reset()

    def results(self, task_id: int) -> list[Any]:
        """The decoded result of every run (DataFrames for tables), in run order.

        Raises SubtaskFailed with the node's reason when a run did not complete.
        """
        return list(self.results_by_organization(task_id).values())

    def results_by_organization(self, task_id: int) -> dict[int, Any]:
        """Like `results`, keyed by organization id."""
        state = self.task(task_id)
        values: dict[int, Any] = {}
        for run in state.runs:
            if run.status is not RunStatus.COMPLETED:
                raise SubtaskFailed(task_id, run)
            try:
                response = self._get_response(f"/runs/{run.run_id}/result")
            except ProxyError as exc:
                if exc.status == 409:
                    raise SubtaskFailed(task_id, run.model_copy(update={"reason": exc.detail})) from exc
                raise
            values[run.organization_id] = decode_result(response.body)
        return values

    def run_subtask(
        self,
        method: str,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        organizations: Iterable[int] | None = None,
        datasets: Iterable[str] | None = None,
        timeout_s: float = 3600.0,
    ) -> list[Any]:
        """Create a subtask for the organizations (default: all), wait, and return its results."""
        orgs = list(organizations) if organizations is not None else [o.id for o in self.organizations()]
        subtask = self.create_subtask(method, args, kwargs, organizations=orgs, datasets=datasets)
        self.wait(subtask.task_id, timeout_s)
        return self.results(subtask.task_id)
