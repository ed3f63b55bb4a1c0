"""The fake's Job controller: one pod at a time (parallelism 1, completions 1, restartPolicy Never),
retries up to backoffLimit, activeDeadlineSeconds, ttlSecondsAfterFinished, and the garbage collector's
propagation policies for Job deletion. Conditions are written as the 1.32 controller writes them
(SuccessCriteriaMet before Complete, FailureTarget before Failed)."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from fakek8s_core import invalid, now, quantity, report_failure
from fakek8s_kubelet import Kubelet
from fakek8s_store import Kind, Obj, Store

JOBS = Kind("jobs", "batch", "v1", "Job")
PODS = Kind("pods", "", "v1", "Pod")
RETRY_BACKOFF_S = 0.5  # the real controller starts at 10 s; tests cannot wait that long
_UNIMPLEMENTED = {
    "podFailurePolicy": "podFailurePolicy",
    "successPolicy": "successPolicy",
    "managedBy": "managedBy",
}


def check_job(job: Obj, require_digest: bool) -> None:
    """Rules beyond the schema that the real server (or a digest admission policy) enforces, and the
    features this fake does not implement (refused, so no test relies on them silently)."""
    name = job.get("metadata", {}).get("name", "")
    spec = job["spec"]
    pod_spec = spec["template"]["spec"]
    causes: list[tuple[str, str]] = []
    policy = pod_spec.get("restartPolicy")
    if policy not in ("Never", "OnFailure"):
        causes.append(
            (
                "spec.template.spec.restartPolicy",
                f'Unsupported value: "{policy or ""}": supported values: "OnFailure", "Never"',
            )
        )
    elif policy == "OnFailure":
        causes.append(("spec.template.spec.restartPolicy", "fakek8s: OnFailure is not implemented"))
    for key in ("parallelism", "completions"):
        if spec.get(key, 1) != 1:
            causes.append((f"spec.{key}", "fakek8s: only 1 is implemented"))
    if spec.get("completionMode", "NonIndexed") != "NonIndexed" or spec.get("suspend"):
        causes.append(("spec", "fakek8s: Indexed completion and suspend are not implemented"))
    causes += [
        (f"spec.{k}", f"fakek8s: {v} is not implemented") for k, v in _UNIMPLEMENTED.items() if k in spec
    ]
    for key in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        if spec.get(key) is not None and spec[key] < (1 if key == "activeDeadlineSeconds" else 0):
            causes.append(
                (
                    f"spec.{key}",
                    f"Invalid value: {spec[key]}: must be greater than or equal to "
                    f"{1 if key == 'activeDeadlineSeconds' else 0}",
                )
            )
    causes += pod_spec_causes(pod_spec, "spec.template.spec", require_digest)
    if causes:
        raise invalid("Job", "batch", name, causes)


def pod_spec_causes(pod_spec: Obj, at: str, require_digest: bool) -> list[tuple[str, str]]:
    causes: list[tuple[str, str]] = []
    if len(pod_spec["containers"]) != 1 or pod_spec.get("initContainers"):
        causes.append((f"{at}.containers", "fakek8s: exactly one container and no initContainers"))
    volumes = {v["name"] for v in pod_spec.get("volumes") or []}
    for i, container in enumerate(pod_spec["containers"]):
        here = f"{at}.containers[{i}]"
        if require_digest and "@sha256:" not in container.get("image", ""):
            causes.append(
                (
                    f"{here}.image",
                    "ValidatingAdmissionPolicy 'fakek8s-image-digest' denied request: "
                    "images must be referenced by digest (name@sha256:...)",
                )
            )
        for kind, value in ((container.get("resources") or {}).get("limits") or {}).items():
            try:
                quantity(value)
            except ValueError:
                causes.append(
                    (
                        f"{here}.resources.limits[{kind}]",
                        f'Invalid value: "{value}": quantities must '
                        "match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'",
                    )
                )
        for j, mount in enumerate(container.get("volumeMounts") or []):
            if mount["name"] not in volumes:
                causes.append((f"{here}.volumeMounts[{j}].name", f'Not found: "{mount["name"]}"'))
    return causes


def job_defaults(job: Obj) -> None:
    """What the real server fills into a created Job (the client and the runtime rely on these)."""
    meta, spec = job["metadata"], job["spec"]
    uid, name = meta["uid"], meta["name"]
    spec.setdefault("parallelism", 1)
    spec.setdefault("completions", 1)
    spec.setdefault("backoffLimit", 6)
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
    spec.setdefault("manualSelector", None)
    spec.pop("manualSelector")
    selector = {"batch.kubernetes.io/controller-uid": uid}
    spec["selector"] = {"matchLabels": selector}
    template_meta = spec["template"].setdefault("metadata", {})
    template_meta["labels"] = {
        **(template_meta.get("labels") or {}),
        **selector,
        "batch.kubernetes.io/job-name": name,
        "controller-uid": uid,
        "job-name": name,
    }
    pod_spec = spec["template"]["spec"]
    pod_spec.setdefault("dnsPolicy", "ClusterFirst")
    pod_spec.setdefault("schedulerName", "default-scheduler")
    pod_spec.setdefault("securityContext", {})
    pod_spec.setdefault("terminationGracePeriodSeconds", 30)
    for container in pod_spec["containers"]:
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        container.setdefault("resources", {})
        image = container["image"]
        tagged = "@" in image or ":" in image.rsplit("/", 1)[-1]
        latest = image.endswith(":latest") or not tagged
        container.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
    job["status"] = {}


def qos_class(pod_spec: Obj) -> str:
    resources = [c.get("resources") or {} for c in pod_spec["containers"]]
    if not any(r.get("limits") or r.get("requests") for r in resources):
        return "BestEffort"
    guaranteed = all(
        {"cpu", "memory"} <= set(r.get("limits") or {})
        and all((r.get("requests") or {}).get(k, v) == v for k, v in (r.get("limits") or {}).items())
        for r in resources
    )
    return "Guaranteed" if guaranteed else "Burstable"


class JobController:
    def __init__(self, store: Store, kubelet: Kubelet) -> None:
        self.store = store
        self.kubelet = kubelet
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.background: set[asyncio.Task[Any]] = set()

    def start(self, job: Obj) -> None:
        task = asyncio.get_running_loop().create_task(self._run(job), name=f"job {job['metadata']['name']}")
        task.add_done_callback(report_failure)
        self.tasks[job["metadata"]["uid"]] = task

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        task.add_done_callback(report_failure)

    def pods_of(self, job: Obj) -> list[Obj]:
        uid = job["metadata"]["uid"]
        return [
            p
            for p in self.store.list("pods", job["metadata"]["namespace"])
            if any(ref.get("uid") == uid for ref in p["metadata"].get("ownerReferences") or [])
        ]

    def pod_changed(self, pod: Obj) -> None:
        """The kubelet wrote a pod: recount the owner Job's active and ready pods. A pod's end is counted by
        the Job's own task, together with succeeded/failed, so watchers never see a half-counted status."""
        if pod["status"].get("phase") not in ("Pending", "Running"):
            return
        for ref in pod["metadata"].get("ownerReferences") or []:
            job = self.store.find("jobs", pod["metadata"]["namespace"], ref.get("name", ""))
            if (
                job is not None
                and job["metadata"]["uid"] == ref.get("uid")
                and job["status"].get("startTime")
            ):
                self._count(job)

    def _count(self, job: Obj) -> None:
        pods = self.pods_of(job)
        live = [p for p in pods if p["status"].get("phase") in ("Pending", "Running")]
        active = sum(1 for p in live if not p["metadata"].get("deletionTimestamp"))
        ready = sum(
            1
            for p in live
            if any(
                c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or []
            )
        )
        terminating = len(live) - active
        status = job["status"]
        if (status.get("active"), status.get("ready"), status.get("terminating")) != (
            active,
            ready,
            terminating,
        ):
            status.update(active=active, ready=ready, terminating=terminating)
            if not active:
                status.pop("active")
            self.store.update("jobs", job)

    def _new_pod(self, job: Obj) -> Obj:
        meta, template = job["metadata"], job["spec"]["template"]
        pod = {
            "metadata": {
                "generateName": f"{meta['name']}-",
                "labels": dict(template["metadata"]["labels"]),
                "annotations": dict(template["metadata"].get("annotations") or {}),
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": copy.deepcopy(template["spec"]),
            "status": {"phase": "Pending", "qosClass": qos_class(template["spec"])},
        }
        return self.store.create(PODS, meta["namespace"], pod)

    async def _run(self, job: Obj) -> None:
        spec, status = job["spec"], job["status"]
        loop = asyncio.get_running_loop()
        status.update(startTime=now(), terminating=0, uncountedTerminatedPods={})
        deadline = (
            None if spec.get("activeDeadlineSeconds") is None else loop.time() + spec["activeDeadlineSeconds"]
        )
        failed = 0
        while True:
            pod = self._new_pod(job)
            task = self.kubelet.start(pod)
            self._count(job)
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            done, _ = await asyncio.wait({task}, timeout=remaining)
            if not done:
                await self._fail(
                    job, "DeadlineExceeded", "Job was active longer than specified deadline", failed
                )
                break
            if task.result() == "Succeeded":
                status["succeeded"] = 1
                self._count(job)
                await self._finish(
                    job,
                    ("SuccessCriteriaMet", "Complete"),
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                )
                break
            failed += 1
            status["failed"] = failed
            self._count(job)
            if failed > spec["backoffLimit"]:
                await self._fail(
                    job, "BackoffLimitExceeded", "Job has reached the specified backoff limit", failed
                )
                break
            pause = RETRY_BACKOFF_S * 2 ** (failed - 1)
            if deadline is not None and loop.time() + pause >= deadline:
                await asyncio.sleep(max(0.0, deadline - loop.time()))
                await self._fail(
                    job, "DeadlineExceeded", "Job was active longer than specified deadline", failed
                )
                break
            await asyncio.sleep(pause)
        ttl = spec.get("ttlSecondsAfterFinished")
        if ttl is not None:
            await asyncio.sleep(ttl)
            await self.delete(job, "Background")

    async def _fail(self, job: Obj, reason: str, message: str, failed: int) -> None:
        """FailureTarget first, then the active pods are deleted, then Failed (as the real controller)."""
        self._add_conditions(job, ("FailureTarget",), reason, message)
        self.store.update("jobs", job)
        active = [p for p in self.pods_of(job) if p["status"].get("phase") in ("Pending", "Running")]
        grace = job["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        await asyncio.gather(*(self.kubelet.delete(p, grace) for p in active))
        job["status"]["failed"] = failed + len(active)
        await self._finish(job, ("Failed",), reason, message)

    async def _finish(self, job: Obj, types: tuple[str, ...], reason: str, message: str) -> None:
        self._add_conditions(job, types, reason, message)
        status = job["status"]
        status.pop("active", None)
        status["ready"] = 0
        if "Complete" in types:
            status["completionTime"] = now()
        self.store.update("jobs", job)

    @staticmethod
    def _add_conditions(job: Obj, types: tuple[str, ...], reason: str, message: str) -> None:
        conditions = job["status"].setdefault("conditions", [])
        for type_ in types:
            conditions.append(
                {
                    "type": type_,
                    "status": "True",
                    "lastProbeTime": now(),
                    "lastTransitionTime": now(),
                    "reason": reason,
                    "message": message,
                }
            )

    async def delete(self, job: Obj, propagation: str) -> Obj:
        """Orphan (the batch/v1 default): pods stay and keep running; Background: the Job goes now, its pods
        after; Foreground: the Job stays with deletionTimestamp until its pods are gone."""
        meta = job["metadata"]
        if meta.get("deletionTimestamp"):  # a Foreground deletion is under way already
            return copy.deepcopy(job)
        task = self.tasks.pop(meta["uid"], None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait({task})
        pods = self.pods_of(job)
        grace = job["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        if propagation == "Orphan":
            for pod in pods:
                pod["metadata"]["ownerReferences"] = [
                    r for r in pod["metadata"]["ownerReferences"] if r.get("uid") != meta["uid"]
                ]
                self.store.update("pods", pod)
            self.store.remove("jobs", meta["namespace"], meta["name"])
            return job
        if propagation == "Background":
            self.store.remove("jobs", meta["namespace"], meta["name"])
            for pod in pods:
                self.spawn(self.kubelet.delete(pod, grace))
            return job
        meta.update(deletionTimestamp=now(), deletionGracePeriodSeconds=0, finalizers=["foregroundDeletion"])
        self.store.update("jobs", job)
        answer = copy.deepcopy(job)
        self.spawn(self._foreground(job, pods, grace))
        return answer

    async def _foreground(self, job: Obj, pods: list[Obj], grace: float) -> None:
        await asyncio.gather(*(self.kubelet.delete(p, grace) for p in pods))
        job["metadata"].pop("finalizers", None)
        self.store.update("jobs", job)
        self.store.remove("jobs", job["metadata"]["namespace"], job["metadata"]["name"])
