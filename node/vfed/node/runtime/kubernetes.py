"""The Kubernetes runtime: one hardened Job per run, its own Secret and NetworkPolicy, a claim per job.

The `kubernetes` client is synchronous: every call runs in the runtime's own thread pool, never on the loop.
A deleted pod takes its logs and exit code with it, so `kill` follows the pod's log while it stops and keeps
the outcome for `wait` and `logs` (kubernetes_ended: in the agent's data folder, so a restarted agent reports
the same); `cleanup` forgets it. `wait` watches the run's pods and reads its state again on every event.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self, TypeVar

import urllib3.exceptions
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from pydantic import SecretStr

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
    Runtime,
    RuntimeConfig,
    RuntimeUnavailable,
)
from vfed.node.runtime.docker_spec import check_local_paths
from vfed.node.runtime.kubernetes_config import KubernetesRuntimeConfig
from vfed.node.runtime.kubernetes_ended import EndedRuns
from vfed.node.runtime.kubernetes_images import cluster_images
from vfed.node.runtime.kubernetes_logs import KEPT_LOG_BYTES, follow_log, pod_log
from vfed.node.runtime.kubernetes_spec import (
    LABEL_KIND,
    claim_body,
    claim_name,
    job_body,
    job_name,
    network_policy_body,
    secret_body,
)
from vfed.node.runtime.kubernetes_status import Obj, latest_pod, observe, run_state
from vfed.node.runtime.kubernetes_watch import next_pod_event, pod_end

log = logging.getLogger(__name__)
T = TypeVar("T")
HANDLE_PREFIX = "k8s:"
SWEEP_AGE_S = 300.0
"""A run's Secret or NetworkPolicy without a Job is removed once older than this (see `_sweep`)."""


@contextlib.contextmanager
def _api_errors(what: str) -> Iterator[None]:
    """The client's errors as the boundary's: 404 is NotFound, a refused request is permanent, the rest
    (authentication, throttling, server errors, no answer) may pass."""
    try:
        yield
    except ApiException as exc:
        detail = _message(exc)
        if exc.status == 404:
            raise NotFound(f"{what}: {detail}") from exc
        if exc.status in (400, 403, 409, 422):
            raise PermanentStartError(f"{what}: {detail}") from exc
        raise RuntimeUnavailable(f"{what}: API server answered {exc.status}: {detail}") from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise RuntimeUnavailable(f"{what}: API server unreachable: {exc}") from exc


def _message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "")["message"])
    except (TypeError, ValueError, KeyError):
        return str(exc.reason)


def parse_handle(handle: str) -> tuple[str, str]:
    """(namespace, job name) of a handle; a handle of another runtime is simply not found here."""
    rest = handle.removeprefix(HANDLE_PREFIX)
    namespace, _, name = rest.partition("/")
    if rest == handle or not namespace or not name:
        raise NotFound(f"not a kubernetes run handle: {handle!r}")
    return namespace, name


def _timestamp(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _tail(data: bytes, max_bytes: int) -> str:
    return data[-max_bytes:].decode("utf-8", errors="replace") if max_bytes > 0 else ""


class KubernetesRuntime(Runtime):
    """Runs each run as a Job in one namespace of a cluster, found again by its labels."""

    name = "kubernetes"
    proxy_over_network = True

    def __init__(self, config: KubernetesRuntimeConfig | None = None, state_dir: Path | None = None) -> None:
        """`state_dir` keeps the outcomes of runs this runtime ended (kubernetes_ended); None keeps them in
        memory only, for tools and tests that need no restart."""
        self.config = config or KubernetesRuntimeConfig()
        self._pool: ThreadPoolExecutor | None = None
        self._watch_pool: ThreadPoolExecutor | None = None
        self._api: k8s.ApiClient | None = None
        self.images = cluster_images(self.config)
        self._open_lock = asyncio.Lock()
        self._ready_claims: set[str] = set()
        self._ended = EndedRuns(state_dir)

    @classmethod
    def from_config(cls, config: RuntimeConfig, data_dir: Path) -> Self:
        if not isinstance(config, KubernetesRuntimeConfig):
            raise TypeError(
                f"the kubernetes runtime takes a KubernetesRuntimeConfig, not {type(config).__name__}"
            )
        return cls(config, data_dir / "kubernetes-ended")

    def proxy_listen_address(self) -> tuple[str, int] | None:
        """The listener behind `proxy_service`; None without one (runs then have no way out)."""
        if self.config.proxy_service is None:
            return None
        return self.config.proxy_listen_host, self.config.listen_port

    # -- lifecycle

    async def open(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.config.max_waiters, thread_name_prefix="vfed-k8s")
            self._watch_pool = ThreadPoolExecutor(self.config.max_waiters, thread_name_prefix="vfed-k8s-w")
        if self._api is None:
            async with self._open_lock:
                if self._api is None:
                    self._api = await self._in_pool(self._connect)

    def _connect(self) -> k8s.ApiClient:
        try:
            if self.config.kubeconfig is not None:
                api: k8s.ApiClient = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
                    self.config.kubeconfig, context=self.config.context
                )
            else:
                configuration = k8s.Configuration()
                k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
                api = k8s.ApiClient(configuration)
        except (ConfigException, OSError, ValueError) as exc:
            raise RuntimeUnavailable(f"kubernetes configuration: {exc}") from exc
        try:
            with _api_errors(f"namespace {self.config.namespace}"):
                k8s.CoreV1Api(api).read_namespace(self.config.namespace, _preload_content=False)
        except NotFound as exc:
            api.close()  # type: ignore[no-untyped-call]
            raise RuntimeUnavailable(f"kubernetes namespace {self.config.namespace} does not exist") from exc
        except BaseException:
            api.close()  # type: ignore[no-untyped-call]
            raise
        return api

    async def close(self) -> None:
        if self._api is not None:
            await asyncio.to_thread(self._api.close)
            self._api = None
        await self.images.close()
        for pool in (self._pool, self._watch_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._watch_pool = None

    async def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._pool is not None
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """A blocking client call in the runtime's pool, with errors translated."""
        await self.open()

        def call() -> T:
            with _api_errors(what):
                return fn(*args)

        return await self._in_pool(call)

    @property
    def core(self) -> Any:  # the client's typed models are bypassed: bodies are the API's JSON
        return k8s.CoreV1Api(self._opened())

    @property
    def batch(self) -> Any:
        return k8s.BatchV1Api(self._opened())

    @property
    def net(self) -> Any:
        return k8s.NetworkingV1Api(self._opened())

    def _api_any(self) -> Any:
        """The client, for its untyped helpers."""
        return self._opened()

    def _opened(self) -> k8s.ApiClient:
        if self._api is None:
            raise RuntimeUnavailable("kubernetes runtime is not open")
        return self._api

    @property
    def ns(self) -> str:
        return self.config.namespace

    def _job_of(self, handle: str) -> str:
        """The Job a handle names; one of another namespace is not a run of this runtime."""
        namespace, name = parse_handle(handle)
        if namespace != self.ns:
            raise NotFound(f"{handle} is in namespace {namespace}, not {self.ns}")
        return name

    @staticmethod
    def _json(answer: Any) -> Obj:
        data: Obj = json.loads(answer.data)
        return data

    def _list(self, fn: Callable[..., Any], selector: str) -> list[Obj]:
        return self._list_at(fn, selector)[0]

    def _list_at(self, fn: Callable[..., Any], selector: str) -> tuple[list[Obj], str]:
        """The items and the list's resourceVersion (where a watch of them starts)."""
        answer = self._json(fn(self.ns, label_selector=selector, _preload_content=False))
        return answer["items"], str(answer.get("metadata", {}).get("resourceVersion") or "")

    # -- images

    async def image_digest(self, image: str, *, pull: bool = True) -> str:
        """The image's digest where the cluster pulls from (kubernetes_images); never pulls: the cluster
        does, by the name and this digest."""
        return await self.images.digest(image)

    async def image_labels(self, image: str) -> dict[str, str]:
        return await self.images.labels(image)

    # -- job claims

    async def ensure_job_volume(self, node_name: str, job_id: str) -> str:
        name = claim_name(node_name, job_id)
        if name not in self._ready_claims:
            try:
                body = claim_body(node_name, job_id, self.config)
                await self._call(
                    f"claim {name}", self.core.create_namespaced_persistent_volume_claim, self.ns, body
                )
            except PermanentStartError as exc:
                if "already exists" not in str(exc):
                    raise
                await self._call(f"claim {name}", self._claim_usable, name)
            self._ready_claims.add(name)
        return name

    def _claim_usable(self, name: str) -> None:
        """An existing claim that is being deleted would keep a new run's pod pending: retry later."""
        claim = self._json(
            self.core.read_namespaced_persistent_volume_claim(name, self.ns, _preload_content=False)
        )
        if claim["metadata"].get("deletionTimestamp"):
            raise RuntimeUnavailable(
                f"claim {name} is being deleted; a run of its job can start once it is gone"
            )

    async def remove_job_volume(self, node_name: str, job_id: str) -> None:
        name = claim_name(node_name, job_id)
        self._ready_claims.discard(name)
        selector = f"{LABEL_NODE}={node_name},{LABEL_JOB_ID}={job_id}"
        pods = await self._call("list pods", self._list, self.core.list_namespaced_pod, selector)
        busy = [
            p["metadata"]["name"]
            for p in pods
            if p.get("status", {}).get("phase") not in ("Succeeded", "Failed")
            and not p["metadata"].get("deletionTimestamp")
        ]
        if busy:
            raise RuntimeUnavailable(f"claim {name} is still in use by {', '.join(busy)}")
        with contextlib.suppress(NotFound):
            await self._call(
                f"claim {name}", self.core.delete_namespaced_persistent_volume_claim, name, self.ns
            )

    async def list_job_volumes(self, node_name: str) -> list[str]:
        selector = f"{LABEL_NODE}={node_name},{LABEL_KIND}=job-tmp"
        fn = self.core.list_namespaced_persistent_volume_claim
        claims = await self._call("list claims", self._list, fn, selector)
        return sorted(
            c["metadata"]["labels"][LABEL_JOB_ID]
            for c in claims
            if not c["metadata"].get("deletionTimestamp")
        )

    # -- runs

    def _check_local(self, spec: RunSpec) -> None:
        """Right before a start: run folder, socket and datasets present; the run folder writable for the
        pod's user (the agent shares the node's disk, see host_path_map)."""
        check_local_paths(spec)
        claim = self.config.run_claim
        if claim is not None and claim.sub_path(spec.run_dir) is None:
            raise PermanentStartError(
                f"run_dir {spec.run_dir} is not under run_claim.agent_path {claim.agent_path}"
            )
        for dataset in spec.datasets:
            if dataset.label not in self.config.dataset_sources and not os.path.isfile(dataset.host_path):
                raise PermanentStartError(f"dataset {dataset.label}: {dataset.host_path} is not a file")
        try:
            if os.geteuid() == 0:
                os.chown(spec.run_dir, self.config.uid, self.config.gid)
                os.chmod(spec.run_dir, 0o700)
                for name in os.listdir(spec.run_dir):
                    path = os.path.join(spec.run_dir, name)
                    os.chown(path, self.config.uid, self.config.gid, follow_symlinks=False)
            else:
                os.chmod(spec.run_dir, 0o777)
            if spec.proxy_socket is not None:
                os.chmod(spec.proxy_socket, 0o666)
                os.chmod(os.path.dirname(spec.proxy_socket), 0o755)
        except OSError as exc:
            raise PermanentStartError(f"preparing {spec.run_dir}: {exc}") from exc

    async def start(self, spec: RunSpec) -> str:
        self.step("runtime_start")
        self._check_local(spec)
        await self.open()
        image = await self.images.pod_image(spec.image)
        await self.ensure_job_volume(spec.node_name, spec.job_id)
        self.step("runtime_ready")
        name = job_name(spec.node_name, spec.run_id)
        handle = f"{HANDLE_PREFIX}{self.ns}/{name}"
        await self._call(f"start {handle}", self._create_run, spec, image)
        log.info("run %s started as %s", spec.run_id, handle)
        return handle

    def _create_run(self, spec: RunSpec, image: str) -> None:
        """NetworkPolicy and Secret before the Job: its pod never runs unconfined or without its secret."""
        name = job_name(spec.node_name, spec.run_id)
        try:
            self.net.create_namespaced_network_policy(self.ns, network_policy_body(spec, self.config))
        except ApiException as exc:
            if exc.status != 409:
                raise
            if self._exists(self.batch.read_namespaced_job, name):
                raise PermanentStartError(f"run {spec.run_id} has a Job already ({name})") from None
        secret = secret_body(spec)
        try:
            if secret is not None:
                self._delete_quietly(self.core.delete_namespaced_secret, name)  # a crashed start's
                self.core.create_namespaced_secret(self.ns, secret)
            self.step("create_sent")
            self.batch.create_namespaced_job(self.ns, job_body(spec, image, self.config))
            self.step("create_answered")
        except BaseException:
            self._remove_run_objects(name)
            raise

    async def proxy_token(self, handle: str) -> SecretStr | None:
        """The token in the run's Secret (which the pod mounts); None when the run has none any more."""
        name = self._job_of(handle)

        def read() -> SecretStr | None:
            secret = self._json(self.core.read_namespaced_secret(name, self.ns, _preload_content=False))
            value = (secret.get("data") or {}).get("token")
            return SecretStr(base64.b64decode(value).decode()) if value else None

        try:
            return await self._call(f"proxy token of {handle}", read)
        except NotFound:
            return None

    def _exists(self, read: Callable[..., Any], name: str) -> bool:
        try:
            read(name, self.ns, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def _delete_quietly(self, delete: Callable[..., Any], name: str, **kw: Any) -> None:
        try:
            delete(name, self.ns, **kw)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _remove_run_objects(self, name: str) -> None:
        """The Job (its pods in the background), its Secret and its NetworkPolicy; missing ones are fine."""
        self._delete_quietly(self.batch.delete_namespaced_job, name, propagation_policy="Background")
        self._delete_quietly(self.core.delete_namespaced_secret, name)
        self._delete_quietly(self.net.delete_namespaced_network_policy, name)

    def _job_and_pods(self, name: str) -> tuple[Obj, list[Obj], str]:
        """The Job, its pods, and the pods' resourceVersion (a watch from there misses nothing after)."""
        job = self._json(self.batch.read_namespaced_job(name, self.ns, _preload_content=False))
        pods, version = self._list_at(self.core.list_namespaced_pod, f"job-name={name}")
        return job, pods, version

    async def _kept(self, handle: str) -> tuple[ExitStatus, bytes] | None:
        await self.open()
        return await self._in_pool(self._ended.get, handle)

    async def wait(self, handle: str, timeout_s: float | None = None) -> ExitStatus:
        name = self._job_of(handle)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            kept = await self._kept(handle)
            if kept is not None:
                return kept[0]
            try:
                job, pods, version = await self._call(f"wait {handle}", self._job_and_pods, name)
            except NotFound:
                if await self._kept(handle) is not None:
                    continue
                raise
            seen = observe(job, pods, unschedulable_wait_s=self.config.unschedulable_wait_s)
            if seen.status is not None:
                if seen.end:
                    await self._call(f"end {handle}", self._end, handle, name, pods, seen.status)
                return seen.status
            if deadline is not None and time.monotonic() >= deadline:
                return ExitStatus(exit_code=None, timed_out=True, reason=f"still running after {timeout_s} s")
            pause = self.config.poll_interval_s
            if deadline is not None:
                pause = max(0.0, min(pause, deadline - time.monotonic()))
            await self._next_change(handle, name, version, pause)

    async def _next_change(self, handle: str, name: str, version: str, timeout_s: float) -> None:
        """Returns on the next change to the run's pods after `version`, or after timeout_s (the safety net
        for a watch that stalls, and for changes only the Job shows). A watch refused or broken (410 Gone: the
        version is too old) just returns: the caller reads the state again and watches from there."""
        if timeout_s <= 0:
            return
        assert self._watch_pool is not None
        loop = asyncio.get_running_loop()
        try:
            selector = f"job-name={name}"
            watch = functools.partial(next_pod_event, self.core, self.ns, selector, version, timeout_s)
            watching = loop.run_in_executor(self._watch_pool, watch)
            await asyncio.wait_for(watching, timeout_s)  # the thread ends with the server's timeoutSeconds
        except TimeoutError:
            return
        except ApiException as exc:
            log.debug("watch of %s refused (%s); reading its state again", handle, exc.status)
            if exc.status != 410:  # Gone is answered by a new read; anything else waits out the pause
                await asyncio.sleep(timeout_s)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            log.debug("watch of %s broke (%s); reading its state again", handle, exc)
            await asyncio.sleep(timeout_s)

    def _end(self, handle: str, name: str, pods: list[Obj], status: ExitStatus) -> None:
        """End a run Kubernetes would keep trying: keep why (as its log), then remove its objects."""
        pod = latest_pod(pods)
        logs = self._pod_log(pod["metadata"]["name"]) if pod is not None else b""
        self._ended.put(handle, status, logs + f"vfed: the run ended: {status.reason}\n".encode())
        self._remove_run_objects(name)
        log.info("run %s ended by the runtime: %s", handle, status.reason)

    def _pod_log(self, pod: str) -> bytes:
        return pod_log(self.core, self.ns, pod)

    async def logs(self, handle: str, max_bytes: int = 64 * 1024) -> str:
        name = self._job_of(handle)
        kept = await self._kept(handle)
        if kept is not None:
            return _tail(kept[1], max_bytes)

        def read() -> bytes:
            pods = self._job_and_pods(name)[1]
            pod = latest_pod(pods)
            return self._pod_log(pod["metadata"]["name"]) if pod is not None else b""

        return _tail(await self._call(f"logs {handle}", read), max_bytes)

    async def kill(self, handle: str, grace_s: float = 10.0) -> None:
        try:
            name = self._job_of(handle)
        except NotFound:
            return
        with contextlib.suppress(NotFound):
            await self._call(f"kill {handle}", self._kill, handle, name, grace_s)

    def _kill(self, handle: str, name: str, grace_s: float) -> None:
        """Delete the pod with the grace (SIGTERM, SIGKILL after it) while following its log, keep the
        outcome, then delete the Job with Background propagation, its Secret and its NetworkPolicy."""
        if self._ended.get(handle) is not None:
            return
        job, pods, _ = self._job_and_pods(name)
        if observe(job, pods, unschedulable_wait_s=float("inf")).status is not None:
            return  # ended already: stays for its logs and exit code
        pod = latest_pod(pods)
        kept = bytearray()
        follower = None
        if pod is not None and pod.get("status", {}).get("phase") == "Running":
            follower = follow_log(self.core, self.ns, pod["metadata"]["name"], kept)
        if pod is not None:
            self._delete_quietly(
                self.core.delete_namespaced_pod,
                pod["metadata"]["name"],
                grace_period_seconds=max(1, round(grace_s)),
            )
        status = self._last_status(pod, grace_s + 30)
        if follower is not None:
            follower.join(10)
        self._ended.put(handle, status, bytes(kept[-KEPT_LOG_BYTES:]))
        self._remove_run_objects(name)
        log.info("run %s killed: %s", handle, status.reason)

    def _last_status(self, pod: Obj | None, timeout_s: float) -> ExitStatus:
        """The killed pod's terminated state, watched from the version we saw until it shows or the pod is
        gone (a poll could miss it: the object goes right after its container). A 410 Gone (that version
        is too old) reads the pod again and watches on from there."""
        if pod is None:
            return ExitStatus(exit_code=None, reason="killed before it ran")
        meta = pod["metadata"]
        selector = f"job-name={meta['labels']['job-name']}"
        version = str(meta["resourceVersion"])
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                left_s = deadline - time.monotonic()
                return pod_end(self._api_any(), self.core, self.ns, meta["name"], selector, version, left_s)
            except ApiException as exc:
                if exc.status != 410 or time.monotonic() >= deadline:
                    raise
            pods, version = self._list_at(self.core.list_namespaced_pod, selector)
            mine = [p for p in pods if p["metadata"]["name"] == meta["name"]]
            if not mine:
                return ExitStatus(exit_code=None, reason="killed")
            status = observe({}, mine, unschedulable_wait_s=float("inf")).status
            if status is not None:
                return status

    async def cleanup(self, handle: str) -> None:
        try:
            name = self._job_of(handle)
        except NotFound:
            return
        await self.open()
        await self._in_pool(self._ended.forget, handle)
        await self._call(f"cleanup {handle}", self._remove_run_objects, name)

    def _sweep(self, jobs: set[str], selector: str) -> None:
        """Secrets and NetworkPolicies of runs whose Job is gone (the cluster deleted a finished Job after
        its ttl, or an agent stopped between them): a run's token must not outlive it. Young ones are left
        alone: a start makes them before its Job, and this must not unconfine a run being started."""
        now = datetime.now(UTC)
        for list_fn, delete in (
            (self.core.list_namespaced_secret, self.core.delete_namespaced_secret),
            (self.net.list_namespaced_network_policy, self.net.delete_namespaced_network_policy),
        ):
            for item in self._list(list_fn, selector):
                name = item["metadata"]["name"]
                created = item["metadata"].get("creationTimestamp") or ""
                old = bool(created) and (now - _timestamp(created)).total_seconds() > SWEEP_AGE_S
                if name not in jobs and old:
                    log.info("removing %s of a run whose Job is gone", name)
                    self._delete_quietly(delete, name)

    async def list_runs(self, node_name: str) -> list[RunHandleInfo]:
        selector = f"{LABEL_NODE}={node_name},{LABEL_RUN_ID}"

        def read() -> tuple[list[Obj], list[Obj]]:
            jobs = self._list(self.batch.list_namespaced_job, selector)
            self._sweep({j["metadata"]["name"] for j in jobs}, selector)
            return jobs, self._list(self.core.list_namespaced_pod, selector)

        jobs, pods = await self._call("list runs", read)
        runs = []
        for job in jobs:
            meta = job["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            own = [p for p in pods if p["metadata"].get("labels", {}).get("job-name") == meta["name"]]
            state, status = run_state(job, own)
            labels = meta.get("labels", {})
            runs.append(
                RunHandleInfo(
                    run_id=labels[LABEL_RUN_ID],
                    job_id=labels.get(LABEL_JOB_ID, ""),
                    handle=f"{HANDLE_PREFIX}{self.ns}/{meta['name']}",
                    state=state,
                    exit_code=None if status is None else status.exit_code,
                    oom_killed=status is not None and status.oom_killed,
                    agent_id=labels.get(LABEL_AGENT),
                )
            )
        return sorted(runs, key=lambda r: r.run_id)
