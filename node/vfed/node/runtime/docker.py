"""The Docker runtime: one hardened container per run, no network, the run's proxy socket as its only way out.

Blocking docker SDK calls run in threads. `wait` blocks for a whole run, so waits get their own bounded pool
instead of starving the default one that every other call shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self, TypeVar

import docker
import docker.errors
import docker.models.containers
import requests.exceptions
from docker.models.containers import Container
from docker.models.volumes import Volume
from docker.types import CancellableStream

from vfed.node.runtime import job_folder
from vfed.node.runtime.base import (
    LABEL_AGENT,
    LABEL_JOB_ID,
    LABEL_NODE,
    LABEL_RUN_ID,
    ExitStatus,
    NotFound,
    PermanentStartError,
    RunHandleInfo,
    RunSpec,
    RunState,
    Runtime,
    RuntimeConfig,
    RuntimeUnavailable,
    VfedRuntimeError,
    container_name,
    job_volume_name,
)
from vfed.node.runtime.docker_config import DockerRuntimeConfig
from vfed.node.runtime.docker_spec import check_local_paths, container_kwargs, grant_container_user
from vfed.node.runtime.engine_http import EngineHttp, unix_socket
from vfed.node.runtime.image_ids import ImageIds

log = logging.getLogger(__name__)
# docker-py's own translation of `containers.create` keyword arguments into the API's (not in its stubs).
_CREATE_ARGS: Callable[[dict[str, Any]], dict[str, Any]] = docker.models.containers._create_container_args  # type: ignore[attr-defined]

T = TypeVar("T")
HANDLE_PREFIX = "docker:"
_WAIT_CHUNK_S = 5.0  # short, so a closing agent never waits long for a blocked thread
_STATES = {
    "created": RunState.CREATED,
    "running": RunState.RUNNING,
    "paused": RunState.RUNNING,
    "restarting": RunState.RUNNING,
}


@contextlib.contextmanager
def _engine_errors(what: str) -> Iterator[None]:
    """Turn docker SDK errors into the boundary's errors, which say what the caller should do."""
    try:
        yield
    except docker.errors.ImageNotFound as exc:
        raise PermanentStartError(f"{what}: image not found: {exc.explanation}") from exc
    except docker.errors.NotFound as exc:
        raise NotFound(f"{what}: {exc.explanation}") from exc
    except docker.errors.APIError as exc:
        status = exc.status_code or 500
        if status >= 500:
            raise RuntimeUnavailable(f"{what}: docker engine error {status}: {exc.explanation}") from exc
        raise PermanentStartError(f"{what}: {exc.explanation}") from exc
    except (requests.exceptions.RequestException, docker.errors.DockerException) as exc:
        raise RuntimeUnavailable(f"{what}: docker engine unreachable: {exc}") from exc


def parse_handle(handle: str) -> str:
    """The container name inside a handle; a handle of another runtime is simply not found here."""
    if not handle.startswith(HANDLE_PREFIX) or len(handle) == len(HANDLE_PREFIX):
        raise NotFound(f"not a docker run handle: {handle!r}")
    return handle[len(HANDLE_PREFIX) :]


def exit_reason(
    exit_code: int | None, oom_killed: bool, error: str | None, memory_bytes: int | None
) -> str | None:
    """A short human reason for a run's end (None for a clean exit 0)."""
    if oom_killed:
        limit = f" (limit {memory_bytes // (1024 * 1024)} MiB)" if memory_bytes else ""
        return f"out of memory{limit}"
    if error:
        return error
    if exit_code in (None, 0):
        return None
    signals = {137: "killed (SIGKILL)", 143: "terminated (SIGTERM)", 139: "segmentation fault"}
    return signals.get(exit_code, f"exit code {exit_code}")


class DockerRuntime(Runtime):
    """Runs each run as a hardened sibling container on the local Docker engine."""

    name = "docker"
    creates_ahead = True

    def __init__(self, config: DockerRuntimeConfig | None = None, client: docker.DockerClient | None = None):
        self.config = config or DockerRuntimeConfig()
        self._client = client
        self._own_client = client is None
        self._waiters: ThreadPoolExecutor | None = None
        self._ready_volumes: set[str] = set()
        self._volume_locks: dict[str, asyncio.Lock] = {}
        self._open_lock = asyncio.Lock()
        self.image_ids = ImageIds()
        self._image_watch: asyncio.Task[None] | None = None
        self._image_events: CancellableStream[dict[str, Any]] | None = None
        self._engine_http: EngineHttp | None = None

    @classmethod
    def from_config(cls, config: RuntimeConfig, data_dir: Path) -> Self:
        """The agent's runtime: job folders live in its data folder unless the config names a place."""
        if not isinstance(config, DockerRuntimeConfig):
            raise TypeError(f"the docker runtime takes a DockerRuntimeConfig, not {type(config).__name__}")
        if config.jobs_dir is None:
            config = config.model_copy(update={"jobs_dir": str(data_dir / "jobs")})
        return cls(config)

    # -- lifecycle

    async def open(self) -> None:
        if self._waiters is None:
            self._waiters = ThreadPoolExecutor(self.config.max_waiters, thread_name_prefix="vfed-docker-wait")
        if self._client is None:
            async with self._open_lock:  # concurrent first calls share one client
                if self._client is None:
                    self._client = await asyncio.to_thread(self._connect)
        if self._image_watch is None:
            self._image_watch = asyncio.create_task(self._watch_images(), name="docker-image-events")
        socket_path = unix_socket(self.config.base_url) if self._own_client else None
        if self._engine_http is None and socket_path is not None:
            self._engine_http = EngineHttp(socket_path, self.client.api.api_version)

    def _connect(self) -> docker.DockerClient:
        pool = self.config.max_waiters + 16
        with _engine_errors("connect"):
            if self.config.base_url:
                client = docker.DockerClient(base_url=self.config.base_url, max_pool_size=pool)
            else:
                client = docker.from_env(max_pool_size=pool)
            try:
                client.ping()
            except BaseException:
                client.close()
                raise
            return client

    async def close(self) -> None:
        if self._image_watch is not None:
            self._image_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._image_watch
            self._image_watch = None
        if self._engine_http is not None:
            await self._engine_http.close()
            self._engine_http = None
        if self._waiters is not None:
            self._waiters.shutdown(wait=False, cancel_futures=True)
            self._waiters = None
        if self._client is not None and self._own_client:
            await asyncio.to_thread(self._client.close)
            self._client = None

    async def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking docker call in a thread, with errors translated."""
        await self.open()

        def call() -> T:
            with _engine_errors(what):
                return fn(*args)

        return await asyncio.to_thread(call)

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            raise RuntimeUnavailable("docker runtime is not open")
        return self._client

    # -- images and volumes

    async def image_digest(self, image: str, *, pull: bool = True) -> str:
        """The local image ID (sha256 of the image config): content-addressed, known for local builds too.

        Answered from the cache while the image event stream is up (no engine call on the start path).
        A missing image is pulled only with `pull` and `pull_missing` (off unless the operator set it)."""
        cached, generation = self.image_ids.get(image)
        if cached is not None:
            return cached
        image_id = await self._call(f"image {image}", self._image_id, image, pull)
        self.image_ids.store(image, image_id, generation)
        return image_id

    async def image_labels(self, image: str) -> dict[str, str]:
        found = await self._call(f"image {image}", lambda: self.client.images.get(image).labels or {})
        return {str(k): str(v) for k, v in found.items()}

    async def _watch_images(self) -> None:
        """Keep the image-ID cache right from the engine's image events; reconnect with backoff when the
        stream drops (meanwhile every lookup asks the engine). Runs while the runtime is open."""
        delay_s = 0.5
        while True:
            try:
                stream = await self._call("image events", self._subscribe_images)
            except VfedRuntimeError as exc:
                log.warning("docker image events unavailable (%s); image lookups ask the engine", exc)
            else:
                self._image_events = stream
                self.image_ids.set_live(True)
                delay_s = 0.5
                try:
                    loop = asyncio.get_running_loop()
                    await loop.run_in_executor(self._waiters, self._drain_image_events, stream)
                finally:
                    self.image_ids.set_live(False)
                    with contextlib.suppress(Exception):
                        stream.close()  # also ends a reader still blocked in its thread
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 30.0)

    def _subscribe_images(self) -> CancellableStream[dict[str, Any]]:
        # The engine has subscribed us once this returns: any later event reaches the stream.
        return self.client.api.events(decode=True, filters={"type": "image"})

    def _drain_image_events(self, stream: CancellableStream[dict[str, Any]]) -> None:
        """Blocks in a thread of the wait pool; each image event empties the cache. Returns when it ends."""
        with contextlib.suppress(Exception):  # a closed or broken stream: the watcher reconnects
            for _event in stream:
                self.image_ids.invalidate()

    def _image_id(self, image: str, pull: bool = True) -> str:
        try:
            return str(self.client.images.get(image).id)
        except docker.errors.ImageNotFound:
            if not (pull and self.config.pull_missing):
                raise
        log.info("pulling image %s", image)
        try:
            return str(self.client.images.pull(image).id)
        except docker.errors.APIError as exc:
            raise PermanentStartError(
                f"image {image} is not present and cannot be pulled: {exc.explanation}"
            ) from exc

    @property
    def jobs_dir(self) -> str:
        return self.config.jobs_dir or job_folder.default_jobs_dir()

    async def ensure_job_volume(self, node_name: str, job_id: str) -> str:
        """The job's folder for the container user and a local volume bound to it, once per job and agent."""
        name = job_volume_name(node_name, job_id)
        if name in self._ready_volumes:
            return name
        async with self._volume_locks.setdefault(name, asyncio.Lock()):
            if name not in self._ready_volumes:
                await self._make_job_volume(node_name, job_id)
                self._ready_volumes.add(name)
        return name

    async def _make_job_volume(self, node_name: str, job_id: str) -> None:
        """The folder (a few syscalls, on the loop), then the volume: a request on the loop when the engine
        listens on a Unix socket (engine_http), else the SDK in a thread."""
        folder = job_folder.job_folder(self.jobs_dir, node_name, job_id)
        try:
            job_folder.prepare(folder, self.config.uid, self.config.gid)
        except OSError as exc:
            raise PermanentStartError(f"preparing job folder {folder}: {exc}") from exc
        name = job_volume_name(node_name, job_id)
        labels = {LABEL_NODE: node_name, LABEL_JOB_ID: job_id, "vfed.kind": "job-tmp"}
        options = {"type": "none", "o": "bind", "device": self.config.to_host_path(str(folder))}
        if self._engine_http is not None:
            answer = await self._engine_http.create_volume(name, options, labels)
            if answer.get("Options") == options:
                return
        await self._call(f"volume {name}", self._create_volume, name, options, labels)

    def _create_volume(self, name: str, options: dict[str, str], labels: dict[str, str]) -> None:
        volume: Volume = self.client.volumes.create(name, driver="local", driver_opts=options, labels=labels)
        if volume.attrs.get("Options") != options:
            # Docker answers a create of an existing name with that volume, whatever it is bound to (e.g. a
            # plain volume an older agent made): replace it; in use, the engine refuses and the run fails.
            log.warning("volume %s is not bound to %s; replacing it", name, options["device"])
            volume.remove()
            self.client.volumes.create(name, driver="local", driver_opts=options, labels=labels)

    async def remove_job_volume(self, node_name: str, job_id: str) -> None:
        name = job_volume_name(node_name, job_id)
        # Under the job's lock: a run of the job starting meanwhile gets a fresh folder, not a removed one.
        async with self._volume_locks.setdefault(name, asyncio.Lock()):
            self._ready_volumes.discard(name)
            try:
                await self._call(f"volume {name}", lambda: self.client.volumes.get(name).remove())
            except NotFound:
                pass
            except PermanentStartError as exc:  # 409: a container still uses it
                raise RuntimeUnavailable(f"volume {name} is still in use: {exc}") from exc
            folder = job_folder.job_folder(self.jobs_dir, node_name, job_id)
            await asyncio.to_thread(job_folder.remove, folder)

    async def list_job_volumes(self, node_name: str) -> list[str]:
        filters = {"label": [f"{LABEL_NODE}={node_name}", LABEL_JOB_ID]}
        volumes = await self._call("list volumes", lambda: self.client.volumes.list(filters=filters))
        folders = await asyncio.to_thread(job_folder.listed, self.jobs_dir, node_name)
        return sorted({v.attrs["Labels"][LABEL_JOB_ID] for v in volumes} | set(folders))

    # -- runs

    async def start(self, spec: RunSpec) -> str:
        self.step("runtime_start")
        kwargs = container_kwargs(spec, self.config)
        handle = HANDLE_PREFIX + container_name(spec.node_name, spec.run_id)
        self._prepare_local(spec)
        # Before create: a volume the mount names but that does not exist would be made as a plain one.
        await self.ensure_job_volume(spec.node_name, spec.job_id)
        self.step("runtime_ready")
        await self._call(f"start {handle}", self._create_and_start, kwargs)
        log.info("run %s started as %s", spec.run_id, handle)
        return handle

    async def create(self, spec: RunSpec) -> str:
        kwargs = container_kwargs(spec, self.config)
        handle = HANDLE_PREFIX + container_name(spec.node_name, spec.run_id)
        await self.ensure_job_volume(spec.node_name, spec.job_id)  # else Docker would make a plain one
        self.step("create_sent")
        await self._call(f"create {handle}", self._create, kwargs)
        self.step("create_answered")
        return handle

    async def start_created(self, handle: str, spec: RunSpec) -> None:
        self.step("runtime_start")
        container = parse_handle(handle)
        try:
            self._prepare_local(spec)
        except PermanentStartError:
            with contextlib.suppress(NotFound, RuntimeUnavailable):
                await self.cleanup(handle)
            raise
        await self._call(f"start {handle}", self._start_existing, container)
        log.info("run %s started as %s", spec.run_id, handle)

    def _prepare_local(self, spec: RunSpec) -> None:
        """Right before a start: the run folder and proxy socket checked and handed to the container user."""
        try:
            check_local_paths(spec)
            grant_container_user(spec, self.config)
        except OSError as exc:
            raise PermanentStartError(f"preparing {spec.run_dir}: {exc}") from exc

    def _start_existing(self, container: str) -> None:
        """Start a created container; one that fails to start is removed so the run can start again."""
        self.step("start_sent")
        try:
            self.client.api.start(container)
        except BaseException:
            with contextlib.suppress(docker.errors.APIError, requests.exceptions.RequestException):
                self.client.api.remove_container(container, force=True)
            raise

    def _create_and_start(self, kwargs: dict[str, Any]) -> None:
        """Both in one thread hop; a container that fails to start is removed so the run can start again."""
        self.step("create_sent")
        container_id = self._create(kwargs)
        self.step("create_answered")
        self._start_existing(container_id)

    def _create(self, kwargs: dict[str, Any]) -> str:
        """The new container's id, through the low-level API: the SDK's `containers.create` inspects the new
        container once more (a round trip on the start path whose answer we do not use)."""
        create_args = _CREATE_ARGS({**kwargs, "version": self.client.api.api_version})
        try:
            return str(self.client.api.create_container(**create_args)["Id"])
        except docker.errors.ImageNotFound:
            if not self.config.pull_missing:
                raise
        self._image_id(kwargs["image"])  # pulls, or raises PermanentStartError
        return str(self.client.api.create_container(**create_args)["Id"])

    def _get(self, handle: str) -> Container:
        return self.client.containers.get(parse_handle(handle))

    async def wait(self, handle: str, timeout_s: float | None = None) -> ExitStatus:
        await self.open()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        loop = asyncio.get_running_loop()
        while True:
            chunk = (
                _WAIT_CHUNK_S
                if deadline is None
                else max(0.0, min(_WAIT_CHUNK_S, deadline - time.monotonic()))
            )
            status = await loop.run_in_executor(self._waiters, self._wait_chunk, handle, chunk)
            if status is not None:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                return ExitStatus(exit_code=None, timed_out=True, reason=f"still running after {timeout_s} s")

    def _wait_chunk(self, handle: str, chunk_s: float) -> ExitStatus | None:
        """Block up to chunk_s for the container to stop; None when it is still running."""
        with _engine_errors(f"wait {handle}"):
            container = self._get(handle)
            if chunk_s > 0:
                with contextlib.suppress(requests.exceptions.ConnectionError, requests.exceptions.Timeout):
                    container.wait(timeout=max(chunk_s, 0.01))
            container.reload()
            state = container.attrs["State"]
            if state["Status"] in ("running", "restarting", "paused"):
                return None
            if state["Status"] == "created":
                return ExitStatus(exit_code=None, reason="never started")
            code, oom = int(state["ExitCode"]), bool(state["OOMKilled"])
            memory = container.attrs["HostConfig"].get("Memory") or None
            return ExitStatus(
                exit_code=code,
                oom_killed=oom,
                reason=exit_reason(code, oom, state.get("Error") or None, memory),
            )

    async def kill(self, handle: str, grace_s: float = 10.0) -> None:
        def stop() -> None:
            container = self._get(handle)
            container.stop(timeout=max(0, round(grace_s)))

        with contextlib.suppress(NotFound):
            await self._call(f"kill {handle}", stop)

    async def logs(self, handle: str, max_bytes: int = 64 * 1024) -> str:
        def tail() -> str:
            kept = bytearray()
            for chunk in self._get(handle).logs(stream=True, follow=False, stdout=True, stderr=True):
                kept += chunk
                if len(kept) > 2 * max_bytes:
                    del kept[: len(kept) - max_bytes]
            return bytes(kept[-max_bytes:]).decode("utf-8", errors="replace") if max_bytes > 0 else ""

        return await self._call(f"logs {handle}", tail)

    async def cleanup(self, handle: str) -> None:
        def remove() -> None:
            try:
                self._get(handle).remove(force=True)
            except docker.errors.APIError as exc:
                if exc.status_code != 409:
                    raise

        with contextlib.suppress(NotFound):
            await self._call(f"cleanup {handle}", remove)

    async def list_runs(self, node_name: str) -> list[RunHandleInfo]:
        filters: dict[str, str | list[str] | bool] = {"label": [f"{LABEL_NODE}={node_name}", LABEL_RUN_ID]}
        containers = await self._call(
            "list runs", lambda: self.client.containers.list(all=True, filters=filters, sparse=False)
        )
        runs = []
        for c in containers:
            state = c.attrs["State"]
            run_state = _STATES.get(state["Status"], RunState.EXITED)
            runs.append(
                RunHandleInfo(
                    run_id=c.labels[LABEL_RUN_ID],
                    job_id=c.labels.get(LABEL_JOB_ID, ""),
                    handle=HANDLE_PREFIX + str(c.name),
                    state=run_state,
                    exit_code=int(state["ExitCode"]) if run_state is RunState.EXITED else None,
                    oom_killed=bool(state.get("OOMKilled")),
                    agent_id=c.labels.get(LABEL_AGENT),
                )
            )
        return sorted(runs, key=lambda r: r.run_id)
