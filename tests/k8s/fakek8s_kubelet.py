"""The fake's kubelet: runs each Pod's container on the local Docker engine and writes the real outcome back.

Phases, container states, exit codes, OOM kills come from Docker itself. What a single Docker host cannot
cause (a failed registry pull, an eviction, an unschedulable pod) is injected by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
from fakek8s_core import from_docker_time, now, report_failure
from fakek8s_docker import PodInputs, Waiting, container_options
from fakek8s_store import Obj, Store

NODE_NAME = "fakek8s-node"
NODE_IP = "10.244.0.1"
LABEL = "vfed.test.fakek8s"
POLL_S = 0.2
PULL_RETRY_S = 1.0


@dataclass
class PodRun:
    """The kubelet's handle on one pod it is running."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False
    evicting: bool = False
    grace_s: float = 30.0
    container_id: str | None = None
    task: asyncio.Task[str] | None = None


@dataclass
class Injections:
    """Faults a test asks for, keyed by pod name or by the name of the pod's Job."""

    pull_failures: set[str] = field(default_factory=set)
    unschedulable: set[str] = field(default_factory=set)

    def hits(self, names: set[str], pod: Obj) -> bool:
        job = (pod["metadata"].get("labels") or {}).get("job-name")
        return pod["metadata"]["name"] in names or (job is not None and job in names)


class Kubelet:
    def __init__(
        self, store: Store, engine: docker.DockerClient, instance_id: str, workdir: Path, network: str | None
    ) -> None:
        self.store = store
        self.engine = engine
        self.instance_id = instance_id
        self.workdir = workdir
        self.network = network
        self.injections = Injections()
        self.runs: dict[str, PodRun] = {}
        self.claim_paths: dict[tuple[str, str], str] = {}  # (namespace, claim) -> its volume's host folder
        self.on_change: Callable[[Obj], None] = lambda pod: None

    # --- lifecycle ---------------------------------------------------------------------------------------

    def start(self, pod: Obj) -> asyncio.Task[str]:
        """Run the pod; the task ends with the pod's final phase (or "Deleted" if it went before ending)."""
        run = PodRun()
        self.runs[pod["metadata"]["uid"]] = run
        run.task = asyncio.get_running_loop().create_task(
            self._run(pod, run), name=f"pod {pod['metadata']['name']}"
        )
        run.task.add_done_callback(report_failure)
        return run.task

    async def delete(self, pod: Obj, grace_s: float) -> None:
        """Graceful deletion: deletionTimestamp now; the container gets SIGTERM, SIGKILL after the grace
        period; the object goes once the container has stopped."""
        self.mark_deleting(pod, grace_s)
        meta = pod["metadata"]
        run = self.runs.get(meta["uid"])
        if run is not None and run.task is not None and not run.task.done():
            run.stopping, run.grace_s = True, grace_s
            run.wake.set()
            await asyncio.wait({run.task})  # the pod's own task stops the container
        await self._forget(pod)

    def mark_deleting(self, pod: Obj, grace_s: float) -> None:
        meta = pod["metadata"]
        if meta.get("deletionTimestamp") is None:
            meta["deletionTimestamp"] = now()
            meta["deletionGracePeriodSeconds"] = int(grace_s)
            self._write(pod)

    def evict(self, pod: Obj) -> None:
        run = self.runs.get(pod["metadata"]["uid"])
        if run is None or run.task is None or run.task.done() or run.container_id is None:
            raise ValueError(f"pod {pod['metadata']['name']} has no running container on the fake kubelet")
        run.evicting = True
        run.wake.set()

    async def _forget(self, pod: Obj) -> None:
        meta = pod["metadata"]
        run = self.runs.pop(meta["uid"], None)
        if run is not None and run.container_id is not None:
            await asyncio.to_thread(self._remove_container, run.container_id)
        await asyncio.to_thread(shutil.rmtree, self.workdir / "pods" / meta["uid"], True)
        if self.store.remove("pods", meta["namespace"], meta["name"]) is not None:
            self.on_change(pod)

    def _remove_container(self, container_id: str) -> None:
        try:
            self.engine.containers.get(container_id).remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: a removal already under way
                raise

    # --- one pod ------------------------------------------------------------------------------------------

    async def _run(self, pod: Obj, run: PodRun) -> str:
        if await self._schedule(pod, run):
            container_id = await self._create(pod, run)
            if container_id is not None:
                await self._watch(pod, run, container_id)
        return str(pod["status"].get("phase", "Pending")) if not run.stopping else "Deleted"

    def _write(self, pod: Obj) -> None:
        meta = pod["metadata"]
        if self.store.find("pods", meta["namespace"], meta["name"]) is pod:
            self.store.update("pods", pod)
            self.on_change(pod)

    async def _sleep(self, run: PodRun, seconds: float) -> None:
        if run.stopping or run.evicting:
            return
        run.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.wake.wait(), seconds)

    async def _schedule(self, pod: Obj, run: PodRun) -> bool:
        """PodScheduled: False/Unschedulable while injected or a claim is missing (the scheduler's checks)."""
        while not run.stopping:
            reason = self._unschedulable(pod)
            if reason is None:
                pod["spec"]["nodeName"] = NODE_NAME
                set_condition(pod, "PodScheduled", "True")
                pod["status"].update(hostIP=NODE_IP, hostIPs=[{"ip": NODE_IP}], startTime=now())
                set_condition(pod, "PodReadyToStartContainers", "True")
                set_condition(pod, "Initialized", "True")
                set_condition(pod, "Ready", "False", "ContainersNotReady", _not_ready(pod))
                set_condition(pod, "ContainersReady", "False", "ContainersNotReady", _not_ready(pod))
                container = pod["spec"]["containers"][0]
                pod["status"]["containerStatuses"] = [_waiting(container, "ContainerCreating", None)]
                self._write(pod)
                return True
            if _condition(pod, "PodScheduled") != ("False", reason):
                set_condition(pod, "PodScheduled", "False", "Unschedulable", reason)
                self._write(pod)
            await self._sleep(run, PULL_RETRY_S)
        return False

    def _unschedulable(self, pod: Obj) -> str | None:
        tail = " preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod."
        if self.injections.hits(self.injections.unschedulable, pod):
            return "0/1 nodes are available: 1 Insufficient memory." + tail
        for volume in pod["spec"].get("volumes") or []:
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if not claim:
                continue
            found = self.store.find("persistentvolumeclaims", pod["metadata"]["namespace"], claim)
            if found is None:
                return f'0/1 nodes are available: persistentvolumeclaim "{claim}" not found.' + tail
            if found["metadata"].get("deletionTimestamp"):
                return f'0/1 nodes are available: persistentvolumeclaim "{claim}" is being deleted.' + tail
        return None

    async def _create(self, pod: Obj, run: PodRun) -> str | None:
        """Create and start the container, reporting waiting states (pull errors, config errors) meanwhile."""
        container = pod["spec"]["containers"][0]
        pulls = 0
        while not run.stopping:
            try:
                inputs = await self._inputs(pod)
                labels = {
                    LABEL: self.instance_id,
                    "io.kubernetes.pod.name": pod["metadata"]["name"],
                    "io.kubernetes.pod.namespace": pod["metadata"]["namespace"],
                    "io.kubernetes.pod.uid": pod["metadata"]["uid"],
                }
                name = f"fakek8s-{self.instance_id}-{pod['metadata']['namespace']}-{pod['metadata']['name']}"
                options = container_options(pod, inputs, labels, name)
                run.container_id, attrs = await asyncio.to_thread(self._start_container, options)
            except Waiting as waiting:
                if waiting.reason == "ErrImagePull":
                    pulls += 1
                    if pulls % 2 == 0:
                        waiting = Waiting(
                            "ImagePullBackOff", f'Back-off pulling image "{container["image"]}"'
                        )
                pod["status"]["containerStatuses"] = [_waiting(container, waiting.reason, waiting.message)]
                self._write(pod)
                await self._sleep(run, PULL_RETRY_S)
                continue
            status = _base_status(container, inputs.image_id, run.container_id)
            status.update(
                ready=True,
                started=True,
                state={"running": {"startedAt": from_docker_time(attrs["State"]["StartedAt"])}},
            )
            pod["status"]["containerStatuses"] = [status]
            pod["status"]["phase"] = "Running"
            set_condition(pod, "Ready", "True")
            set_condition(pod, "ContainersReady", "True")
            self._write(pod)
            return run.container_id
        return None

    async def _inputs(self, pod: Obj) -> PodInputs:
        ns = pod["metadata"]["namespace"]
        secrets = {s["metadata"]["name"]: s for s in self.store.list("secrets", ns)}
        paths = {name: path for (claim_ns, name), path in self.claim_paths.items() if claim_ns == ns}
        image = pod["spec"]["containers"][0]["image"]
        if self.injections.hits(self.injections.pull_failures, pod):
            raise Waiting(
                "ErrImagePull",
                f'failed to pull and unpack image "{image}": failed to resolve reference "{image}": '
                f"{image}: not found (injected by the test)",
            )
        image_id, user = await asyncio.to_thread(self._local_image, image)
        return PodInputs(
            secrets,
            paths,
            image_id,
            user,
            self.workdir / "pods" / pod["metadata"]["uid"],
            self.network,
            self._service_hosts(ns) if self.network is not None else {},
        )

    def _service_hosts(self, ns: str) -> dict[str, str]:
        """The pod's view of its namespace's Services, as /etc/hosts entries: each routable Service's DNS
        names (`svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`) -> an endpoint's address.

        A cluster resolves the names to the Service's ClusterIP (cluster DNS) and kube-proxy forwards the
        ClusterIP's port to a ready endpoint's targetPort. Here no proxy translates ports, so only a Service
        without a selector whose EndpointSlice (label kubernetes.io/service-name) has a ready endpoint with
        the same port numbers is routed (the case of an agent outside the cluster); others get no name."""
        hosts: dict[str, str] = {}
        for service in self.store.list("services", ns):
            spec, name = service["spec"], service["metadata"]["name"]
            if spec.get("selector"):
                continue  # routed to pods' IPs on a cluster; the fake's pods have none
            ports = spec.get("ports") or []
            if any(p.get("targetPort", p["port"]) != p["port"] for p in ports):
                continue  # no kube-proxy here to translate a port
            address = self._endpoint(ns, name, {int(p["port"]) for p in ports})
            if address is None:
                continue
            for suffix in ("", f".{ns}", f".{ns}.svc", f".{ns}.svc.cluster.local"):
                hosts[f"{name}{suffix}"] = address
        return hosts

    def _endpoint(self, ns: str, service: str, ports: set[int]) -> str | None:
        """A ready endpoint's address in the Service's EndpointSlices that serve exactly its ports."""
        for piece in self.store.list("endpointslices", ns, f"kubernetes.io/service-name={service}"):
            if {int(p.get("port", 0)) for p in piece.get("ports") or []} != ports:
                continue
            for endpoint in piece.get("endpoints") or []:
                if (endpoint.get("conditions") or {}).get("ready", True) and endpoint.get("addresses"):
                    return str(endpoint["addresses"][0])
        return None

    def _local_image(self, reference: str) -> tuple[str, str]:
        """The image from the local engine: `name@sha256:<manifest digest>` as a repo digest it has (else
        pulled, as a kubelet does, when the name has a registry host), or `name@sha256:<image ID>` of a local
        image whose repository matches the name, or a plain name."""
        missing = Waiting(
            "ErrImagePull",
            f'failed to pull and unpack image "{reference}": failed to resolve reference "{reference}": '
            f"{reference}: not found",
        )
        try:
            image = self.engine.images.get(reference)
        except docker.errors.ImageNotFound:
            image = self._image_by_id(reference) or self._pull(reference)
        except docker.errors.APIError as exc:
            raise missing from exc
        if image is None:
            raise missing
        return str(image.id), str(image.attrs["Config"].get("User") or "")

    def _image_by_id(self, reference: str) -> Any:
        if "@sha256:" not in reference:
            return None
        name, digest = reference.split("@", 1)
        try:
            image = self.engine.images.get(digest)
        except docker.errors.ImageNotFound:
            return None
        repos = {t.rsplit(":", 1)[0] for t in image.tags}
        repos |= {d.split("@")[0] for d in image.attrs.get("RepoDigests") or []}
        return image if name in repos else None

    def _pull(self, reference: str) -> Any:
        """A pull from the image's registry (a reference with a host part only: nothing reaches Docker Hub).
        Whoever pushed the image there removes it from the engine after the test."""
        first = reference.split("/", 1)[0]
        if "/" not in reference or not ("." in first or ":" in first or first == "localhost"):
            return None
        try:
            return self.engine.images.pull(reference)
        except docker.errors.APIError:
            return None

    def _start_container(self, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        container = self.engine.containers.create(**options)
        try:
            container.start()
        except docker.errors.APIError as exc:
            container.remove(force=True)
            raise Waiting("CreateContainerError", str(exc.explanation or exc)) from exc
        container.reload()
        return str(container.id), dict(container.attrs)

    async def _watch(self, pod: Obj, run: PodRun, container_id: str) -> None:
        """Poll the container until it ends (or is stopped, evicted); write its terminated state."""
        while True:
            state = await asyncio.to_thread(self._state, container_id)
            if not state["Running"]:
                break
            if run.evicting:
                await asyncio.to_thread(self._stop, container_id, 0)
                self._terminated(pod, await asyncio.to_thread(self._state, container_id), run)
                pod["status"].update(
                    phase="Failed",
                    reason="Evicted",
                    message="The node was low on resource: memory. Threshold quantity: 100Mi, "
                    "available: 51200Ki. ",
                )
                set_condition(
                    pod,
                    "DisruptionTarget",
                    "True",
                    "TerminationByKubelet",
                    "The node was low on resource: memory.",
                )
                self._write(pod)
                return
            if run.stopping:
                await asyncio.to_thread(self._stop, container_id, run.grace_s)
                break
            await self._sleep(run, POLL_S)
        self._terminated(pod, await asyncio.to_thread(self._state, container_id), run)
        self._write(pod)

    def _state(self, container_id: str) -> dict[str, Any]:
        container = self.engine.containers.get(container_id)
        return dict(container.attrs["State"])

    def _stop(self, container_id: str, grace_s: float) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            self.engine.containers.get(container_id).stop(timeout=int(grace_s))

    def _terminated(self, pod: Obj, state: dict[str, Any], run: PodRun) -> None:
        code = int(state.get("ExitCode", 137))
        reason = "OOMKilled" if state.get("OOMKilled") else ("Completed" if code == 0 else "Error")
        status = pod["status"]["containerStatuses"][0]
        status.update(
            ready=False,
            started=False,
            state={
                "terminated": {
                    "exitCode": code,
                    "reason": reason,
                    "startedAt": from_docker_time(state.get("StartedAt", "")),
                    "finishedAt": from_docker_time(state.get("FinishedAt", "")),
                    "containerID": f"docker://{run.container_id}",
                }
            },
        )
        pod["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
        ready_reason = "PodCompleted" if code == 0 else "PodFailed"
        set_condition(pod, "PodReadyToStartContainers", "False")
        set_condition(pod, "Ready", "False", ready_reason)
        set_condition(pod, "ContainersReady", "False", ready_reason)

    # --- logs ---------------------------------------------------------------------------------------------

    def container_of(self, pod: Obj) -> str | None:
        run = self.runs.get(pod["metadata"]["uid"])
        return None if run is None else run.container_id


def claim_volume_name(instance_id: str, namespace: str, claim: str) -> str:
    return f"fakek8s-{instance_id}-{namespace}-{claim}"


def set_condition(
    pod: Obj, type_: str, status: str, reason: str | None = None, message: str | None = None
) -> None:
    conditions: list[Obj] = pod["status"].setdefault("conditions", [])
    entry = next((c for c in conditions if c["type"] == type_), None)
    if entry is None:
        entry = {"type": type_, "lastProbeTime": None}
        conditions.append(entry)
    if entry.get("status") != status:
        entry["lastTransitionTime"] = now()
    entry["status"] = status
    for key, value in (("reason", reason), ("message", message)):
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value


def _condition(pod: Obj, type_: str) -> tuple[str, str] | None:
    for c in pod["status"].get("conditions") or []:
        if c["type"] == type_:
            return str(c["status"]), str(c.get("message", ""))
    return None


def _not_ready(pod: Obj) -> str:
    return f"containers with unready status: [{pod['spec']['containers'][0]['name']}]"


def _waiting(container: Obj, reason: str, message: str | None) -> Obj:
    state: Obj = {"reason": reason}
    if message:
        state["message"] = message
    return {
        "name": container["name"],
        "image": container["image"],
        "imageID": "",
        "ready": False,
        "restartCount": 0,
        "started": False,
        "state": {"waiting": state},
        "lastState": {},
    }


def _base_status(container: Obj, image_id: str, container_id: str | None) -> Obj:
    return {
        "name": container["name"],
        "image": container["image"],
        "imageID": image_id,
        "containerID": f"docker://{container_id}",
        "restartCount": 0,
        "lastState": {},
    }
