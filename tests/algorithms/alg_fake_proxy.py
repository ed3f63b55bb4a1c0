"""A fake of the node's proxy (docs/proxy-api.md) served by aiohttp on a real Unix socket (or TCP).

The real proxy belongs to the node agent, built by another engineer; this fake speaks the same contract so
the SDK's client can be tested against real HTTP over a real socket. Subtasks are executed by a pluggable
coroutine (in-process, or the real `python -m vfed.algorithms` wrapper as a subprocess).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from vfed.common.payload import TaskInput, encode_error, result_content_type

Executor = Callable[[int, TaskInput], Awaitable[tuple[str, str | None, bytes | None]]]


@dataclass
class FakeRun:
    run_id: int
    organization_id: int
    status: str = "pending"
    reason: str | None = None
    result: bytes | None = None


@dataclass
class FakeTask:
    task_id: int
    body: dict[str, Any]
    runs: list[FakeRun]
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def done(self) -> bool:
        return all(run.status not in ("pending", "initializing", "active") for run in self.runs)

    def document(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "status": "completed" if self.done() else "active",
            "runs": [
                {
                    "run_id": r.run_id,
                    "organization_id": r.organization_id,
                    "status": r.status,
                    "reason": r.reason,
                }
                for r in self.runs
            ],
            "done": self.done(),
        }


async def _no_executor(org: int, task_input: TaskInput) -> tuple[str, str | None, bytes | None]:
    await asyncio.Event().wait()  # never finishes
    raise AssertionError("unreachable")


class FakeProxy:
    """Holds subtasks and serves the proxy API; `requests` records (time, method, path) of every call."""

    def __init__(
        self,
        organizations: list[int],
        executor: Executor = _no_executor,
        token: str | None = None,
        answer_wait_early: bool = False,
    ) -> None:
        self.organizations = organizations
        self.executor = executor
        self.token = token
        self.answer_wait_early = answer_wait_early
        self.tasks: dict[int, FakeTask] = {}
        self.requests: list[tuple[float, str, str]] = []
        self._ids = itertools.count(100)
        self._background: set[asyncio.Task[None]] = set()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/run", self._run)
        app.router.add_get("/organizations", self._organizations)
        app.router.add_post("/tasks", self._create)
        app.router.add_get("/tasks/{id}", self._task)
        app.router.add_get("/tasks/{id}/wait", self._wait)
        app.router.add_get("/runs/{id}/result", self._result)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((time.monotonic(), request.method, request.path_qs))
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "unauthorized", "detail": "bad run token"}, status=401)
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except web.HTTPNotFound:
            return web.json_response(
                {"error": "forbidden", "detail": f"{request.path} is not allowed"}, status=403
            )

    async def _run(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "run_id": 1,
                "task_id": 2,
                "job_id": 3,
                "organization_id": self.organizations[0],
                "collaboration_id": 4,
                "image": "img",
            }
        )

    async def _organizations(self, request: web.Request) -> web.Response:
        data = [{"id": org, "name": f"org-{org}", "key_id": f"k{org}"} for org in self.organizations]
        return web.json_response({"data": data})

    def _lookup(self, request: web.Request) -> FakeTask:
        task = self.tasks.get(int(request.match_info["id"]))
        if task is None:
            raise web.HTTPNotFound()
        return task

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        task = FakeTask(
            next(self._ids), body, [FakeRun(next(self._ids), org) for org in body["organizations"]]
        )
        self.tasks[task.task_id] = task
        for run in task.runs:
            raw = body["inputs"][str(run.organization_id)] if "inputs" in body else body["input"]
            background = asyncio.create_task(self._execute(task, run, TaskInput.model_validate(raw)))
            self._background.add(background)
            background.add_done_callback(self._background.discard)
        return web.json_response(
            {"task_id": task.task_id, "run_ids": [r.run_id for r in task.runs]}, status=201
        )

    async def _execute(self, task: FakeTask, run: FakeRun, task_input: TaskInput) -> None:
        run.status = "active"
        try:
            run.status, run.reason, run.result = await self.executor(run.organization_id, task_input)
        except Exception as exc:
            run.status, run.reason, run.result = (
                "crashed",
                str(exc),
                encode_error(type(exc).__name__, str(exc)),
            )
        task.changed.set()

    async def _task(self, request: web.Request) -> web.Response:
        return web.json_response(self._lookup(request).document())

    async def _wait(self, request: web.Request) -> web.Response:
        task = self._lookup(request)
        timeout_s = float(request.query.get("timeout_s", "30"))
        deadline = time.monotonic() + timeout_s
        while not task.done() and not self.answer_wait_early:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            task.changed.clear()
            try:
                await asyncio.wait_for(task.changed.wait(), remaining)
            except TimeoutError:
                break
        return web.json_response(task.document())

    async def _result(self, request: web.Request) -> web.Response:
        run_id = int(request.match_info["id"])
        for task in self.tasks.values():
            for run in task.runs:
                if run.run_id == run_id:
                    if run.status != "completed" or run.result is None:
                        detail = f"run {run_id} is {run.status}: {run.reason}"
                        return web.json_response({"error": "not-completed", "detail": detail}, status=409)
                    return web.Response(body=run.result, content_type=result_content_type(run.result))
        raise web.HTTPNotFound()


@dataclass
class Served:
    runner: web.AppRunner
    proxy: FakeProxy

    async def close(self) -> None:
        await self.runner.cleanup()


async def serve_unix(proxy: FakeProxy, path: str) -> Served:
    runner = web.AppRunner(proxy.app())
    await runner.setup()
    await web.UnixSite(runner, path).start()
    return Served(runner, proxy)


async def serve_tcp(proxy: FakeProxy, port: int) -> Served:
    runner = web.AppRunner(proxy.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return Served(runner, proxy)
