"""A fake Kubernetes API server for tests, with a kubelet that runs each Job's pod on the local Docker engine.

Why a fake: no Kubernetes API server can run on these machines, and the node's Kubernetes runtime must still
be tested against something that answers like one. A real cluster can replace it: ENV_KUBECONFIG
(VFED_TEST_KUBECONFIG) names a real cluster's kubeconfig, which tests/runtime/test_runtime_kubernetes.py
honours (docs/vnode.md); this module's own tests always use the fake, as they drive its injections.

Faithful (the official `kubernetes` client talks to it unchanged, through a kubeconfig from
`write_kubeconfig`):
- REST paths, verbs and answers for namespaces (get), batch/v1 Jobs, v1 Pods (list, get, delete, log with
  follow), v1 Secrets, PersistentVolumeClaims, Services, discovery.k8s.io/v1 EndpointSlices and
  networking.k8s.io/v1 NetworkPolicies: create, get, list with labelSelector, delete; `Status` documents for
  errors (400 BadRequest, 401, 404 NotFound, 409 AlreadyExists, 422 Invalid).
- Watches: `?watch=true` on every list, answered as chunked JSON lines of ADDED/MODIFIED/DELETED events with
  the objects' resourceVersions; without resourceVersion (or "0") first an ADDED per existing object; from a
  version, every change after it; `timeoutSeconds` ends the stream. The history is a window (20,000 events,
  `set_history_window`, or what `compact` leaves): a watch from before it, or one that falls behind it, gets
  an ERROR event with a 410 Expired `Status` (after the 200), as the real server's watch cache answers.
- Every create body is validated against the real 1.32 schemas by `kubernetes-validate` (strict schemas): a
  wrong type is 400 (the real server fails to decode it), a broken rule (required, enum, ...) is 422 Invalid.
  Unknown fields follow the fieldValidation parameter (Strict: 400, Warn: dropped with a Warning header,
  Ignore: dropped) and default to Strict, which is stricter than the real server's default (Warn): a runtime
  that sends a misspelt field should hear about it here.
- Server-side defaults: uid, creationTimestamp, resourceVersion, generation, generateName; a Job's selector,
  its pod template labels (controller-uid, job-name) and spec defaults; Secret stringData -> data; PVCs bound.
- Outcomes are real: the kubelet starts a Docker container from the pod spec (image from the local engine,
  command/args, env with secretKeyRef, memory/cpu limits, securityContext, PVC -> Docker volume, Secret ->
  read-only files, hostPath -> bind, emptyDir -> tmpfs, no network unless `network` is given) and writes
  Docker's verdict back: phases, exit codes, OOMKilled, and the Job conditions the 1.32 controller writes
  (Complete, Failed with BackoffLimitExceeded or DeadlineExceeded, after SuccessCriteriaMet/FailureTarget).
  Job deletion follows the propagation policy (Orphan by default for batch/v1, as on a real cluster).

Not faithful:
- No scheduler and one node: a pod is scheduled at once unless a test injects Unschedulable (or a claim is
  missing). Image pull failures, evictions and unschedulable pods are injected, not caused.
- NetworkPolicies are validated and stored but not enforced: a real cluster is needed to show isolation
  (the escape probes run in real-cluster mode). Services get a ClusterIP that routes nothing; with a
  `network`, a pod's /etc/hosts names each Service without a selector after a ready endpoint of its
  EndpointSlice (when the port numbers match), which is where a cluster's DNS and kube-proxy would take a
  connection to the Service (Kubelet._service_hosts). That is how a test's pods reach an agent outside the
  fake cluster through its proxy Service; a Service with a selector routes nowhere (pods have no IPs).
- Only the Job shapes the node uses: one container, parallelism/completions 1, restartPolicy Never; other
  Job features are refused with a 422 naming the fake, never silently ignored. The retry back-off starts at
  0.5 s instead of 10 s. No RBAC, quotas, admission plugins (except the optional image digest policy), or
  PATCH/PUT; Pods are created only by the Job controller.
- Watches: no BOOKMARK events (allowWatchBookmarks is ignored), no fieldSelector, no
  resourceVersionMatch / sendInitialEvents (streaming lists); a watch whose client is too slow is not cut off.
- Namespaces exist as configured (default: "default"); they are not created or deleted over the API.
- Needs the Docker engine on this host and root: it bind-mounts its own folders, opens claim volumes to all
  users (as a local-path provisioner does) and chowns Secret files to the pod's fsGroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import yaml
from aiohttp import web
from fakek8s_api import NAMESPACES, Api, create_app
from fakek8s_jobs import PODS, JobController
from fakek8s_kubelet import LABEL, Kubelet
from fakek8s_store import Store

T = TypeVar("T")
ENV_KUBECONFIG = "VFED_TEST_KUBECONFIG"


class FakeKubernetes:
    """The fake cluster, served from a thread of its own so that synchronous clients (the official one) work.

    Use as a context manager; leaving it removes every container, volume and folder it made (all Docker
    objects carry the label `vfed.test.fakek8s=<instance id>`)."""

    def __init__(
        self,
        *,
        namespaces: Iterable[str] = ("default",),
        require_digest: bool = False,
        network: str | None = None,
    ) -> None:
        self.instance_id = uuid.uuid4().hex[:10]
        self.token = secrets.token_urlsafe(24)
        self.namespaces = tuple(namespaces)
        self.require_digest = require_digest
        self.network = network
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._workdir: Path | None = None
        self._engine: docker.DockerClient | None = None
        self.errors: list[str] = []  # exceptions inside the fake: stop() raises them, a bug never hides
        self.store: Store | None = None
        self.kubelet: Kubelet | None = None
        self.jobs: JobController | None = None

    # --- lifecycle (called from the test's thread) ------------------------------------------------------

    def __enter__(self) -> FakeKubernetes:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix=f"fakek8s-{self.instance_id}-"))
        self._engine = docker.from_env(timeout=60, max_pool_size=64)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fakek8s", daemon=True)
        self._thread.start()
        try:
            self._call(self._astart())
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop serving, then remove every Docker object and folder this instance made. The containers go
        while the loop still runs, so log followers see their stream end rather than a closed loop."""
        try:
            if self._loop is not None and self._thread is not None:
                self._call(self._astop())
        finally:
            try:
                if self._engine is not None:
                    remove_labelled(self._engine, self.label)
                    self._engine.close()
                    self._engine = None
            finally:
                if self._loop is not None and self._thread is not None:
                    self._loop.call_soon_threadsafe(self._loop.stop)
                    self._thread.join(30)
                    self._loop.close()
                    self._loop = self._thread = None
                if self._workdir is not None:
                    shutil.rmtree(self._workdir, ignore_errors=True)
                    self._workdir = None
        if self.errors:
            raise RuntimeError("fakek8s failed inside: " + "; ".join(self.errors))

    @property
    def label(self) -> str:
        return f"{LABEL}={self.instance_id}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig that `kubernetes.config.load_kube_config(path)` / `new_client_from_config` accept."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fakek8s", "cluster": {"server": self.url}}],
            "users": [{"name": "fakek8s", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "fakek8s",
                    "context": {"cluster": "fakek8s", "user": "fakek8s", "namespace": namespace},
                }
            ],
            "current-context": "fakek8s",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    # --- injections (what a single Docker host cannot cause) ---------------------------------------------

    def inject_pull_failure(self, name: str) -> None:
        """Pods named `name`, or the pods of the Job named `name`, fail to pull their image."""
        self._call(self._inject(lambda k: k.injections.pull_failures.add(name)))

    def inject_unschedulable(self, name: str) -> None:
        """Pods named `name`, or the pods of the Job named `name`, stay Pending: PodScheduled False."""
        self._call(self._inject(lambda k: k.injections.unschedulable.add(name)))

    def compact(self) -> None:
        """Forget the event history so far (etcd compaction): a watch from an older version gets 410."""

        async def go() -> None:
            assert self.store is not None
            self.store.compact()

        self._call(go())

    def set_history_window(self, events: int) -> None:
        """Keep at most about this many events (default 20,000): with a small window, a watch falls behind
        it at the next change and gets 410, as on a busy real server."""

        async def go() -> None:
            assert self.store is not None
            self.store.max_history = events

        self._call(go())

    def evict(self, namespace: str, pod: str) -> None:
        """The node evicts a running pod: its container is killed, phase Failed, reason Evicted."""

        async def go() -> None:
            assert self.store is not None and self.kubelet is not None
            self.kubelet.evict(self.store.get(PODS, namespace, pod))

        self._call(go())

    async def _inject(self, change: Callable[[Kubelet], None]) -> None:
        assert self.kubelet is not None
        change(self.kubelet)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(120)

    # --- on the server's loop ---------------------------------------------------------------------------

    async def _astart(self) -> None:
        assert self._engine is not None and self._workdir is not None
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(64, thread_name_prefix="fakek8s"))
        loop.set_exception_handler(
            lambda _, context: self.errors.append(f"{context.get('message')}: {context.get('exception')!r}")
        )
        self.store = Store()
        for name in self.namespaces:
            namespace = {
                "metadata": {"name": name},
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            }
            self.store.create(NAMESPACES, "", namespace, lambda obj: obj["metadata"].pop("namespace"))
        self.kubelet = Kubelet(self.store, self._engine, self.instance_id, self._workdir, self.network)
        self.jobs = JobController(self.store, self.kubelet)
        self.kubelet.on_change = self.jobs.pod_changed
        api = Api(
            self.store,
            self.kubelet,
            self.jobs,
            self._engine,
            self.instance_id,
            self.token,
            self.require_digest,
            self.errors,
        )
        self._runner = web.AppRunner(create_app(api), shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    async def _astop(self) -> None:
        assert self.jobs is not None and self.kubelet is not None
        tasks = [*self.jobs.tasks.values(), *self.jobs.background]
        tasks += [r.task for r in self.kubelet.runs.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()


def remove_labelled(engine: docker.DockerClient, label: str, timeout_s: float = 60) -> None:
    """Remove every container, then every volume, carrying `label`; wait out removals already under way."""
    deadline = time.monotonic() + timeout_s
    while True:
        containers = engine.containers.list(all=True, filters={"label": label})
        volumes = engine.volumes.list(filters={"label": label})
        if not containers and not volumes:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"fakek8s: could not remove {containers} {volumes} (label {label})")
        for container in containers:
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                container.remove(force=True)
        for volume in volumes:  # a volume still mounted by a container going away: the next round
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                volume.remove(force=True)
        time.sleep(0.2)
