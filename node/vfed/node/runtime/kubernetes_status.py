"""How a run's Job and Pod read as the boundary's ExitStatus, as pure functions of the API's JSON.

Some ends are final only because we say so: Kubernetes keeps retrying an image pull or a container it cannot
create, and keeps an unschedulable pod pending forever. `observe` tells the runtime to end those runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from vfed.node.runtime.base import ExitStatus, RunState

Obj = dict[str, Any]
PULL_ERRORS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
START_ERRORS = frozenset({"CreateContainerConfigError", "CreateContainerError", "RunContainerError"})
_SIGNALS = {137: "killed (SIGKILL)", 143: "terminated (SIGTERM)", 139: "segmentation fault"}


@dataclass(frozen=True)
class Observed:
    """A run's state: `status` None while it runs; `end` when the runtime must end the run itself."""

    status: ExitStatus | None
    end: bool = False


def latest_pod(pods: list[Obj]) -> Obj | None:
    """The Job's newest pod (with backoffLimit 0 there is one, but a deleted one may linger)."""
    return max(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", default=None)


def _container(pod: Obj) -> Obj:
    statuses = pod.get("status", {}).get("containerStatuses") or [{}]
    return dict(statuses[0])


def _memory_limit(pod: Obj) -> int | None:
    limit = str(pod["spec"]["containers"][0].get("resources", {}).get("limits", {}).get("memory", ""))
    return int(limit) if limit.isdigit() else None


def _terminated_status(pod: Obj) -> ExitStatus | None:
    """The ExitStatus of a pod whose container ended, else None."""
    terminated = _container(pod).get("state", {}).get("terminated")
    if terminated is None:
        return None
    code = int(terminated.get("exitCode", 0))
    oom = terminated.get("reason") == "OOMKilled"
    status = pod.get("status", {})
    if status.get("reason") == "Evicted":
        reason: str | None = f"evicted: {status.get('message', '').strip()}"
    elif oom:
        limit = _memory_limit(pod)
        reason = f"out of memory (limit {limit // (1024 * 1024)} MiB)" if limit else "out of memory"
    elif code == 0:
        reason = None
    else:
        reason = _SIGNALS.get(code, f"exit code {code}")
    return ExitStatus(exit_code=code, oom_killed=oom, reason=reason)


def _pod_failure(pod: Obj) -> ExitStatus | None:
    """A failed pod whose container tells nothing (an eviction before it started, a node lost)."""
    status = pod.get("status", {})
    if status.get("phase") != "Failed" or not status.get("reason"):
        return None
    message = str(status.get("message") or "").strip()
    return ExitStatus(exit_code=None, reason=f"{str(status['reason']).lower()}: {message}")


def _since(timestamp: str | None, now: datetime) -> float:
    if not timestamp:
        return 0.0
    return (now - datetime.fromisoformat(timestamp.replace("Z", "+00:00"))).total_seconds()


def _stuck(pod: Obj, now: datetime, unschedulable_wait_s: float) -> ExitStatus | None:
    """A pending pod that will not run: its image cannot be pulled, its container not be made, or no
    node took it within the wait."""
    waiting = _container(pod).get("state", {}).get("waiting") or {}
    message = str(waiting.get("message") or "").strip()
    if waiting.get("reason") in PULL_ERRORS:
        return ExitStatus(exit_code=None, reason=f"image pull failed ({waiting['reason']}): {message}")
    if waiting.get("reason") in START_ERRORS:
        return ExitStatus(
            exit_code=None, reason=f"container could not start ({waiting['reason']}): {message}"
        )
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("reason") == "Unschedulable":
            waited = _since(condition.get("lastTransitionTime"), now)
            if waited >= unschedulable_wait_s:
                detail = str(condition.get("message") or "").strip()
                return ExitStatus(exit_code=None, reason=f"unschedulable for {waited:.0f} s: {detail}")
    return None


def _deadline_exceeded(job: Obj) -> ExitStatus | None:
    """The deadline's end, once the Job controller decided it (FailureTarget comes before it kills the pod,
    so the pod's own end, SIGKILL or SIGTERM, is the deadline's doing)."""
    for condition in job.get("status", {}).get("conditions") or []:
        if (
            condition.get("type") in ("FailureTarget", "Failed")
            and condition.get("status") == "True"
            and condition.get("reason") == "DeadlineExceeded"
        ):
            deadline = job["spec"].get("activeDeadlineSeconds")
            return ExitStatus(exit_code=None, reason=f"deadline exceeded ({deadline} s)")
    return None


def job_end(job: Obj) -> ExitStatus | None:
    """The end the Job's own conditions tell, for when no pod tells it (deadline exceeded deletes the pods;
    a pod may also be gone on its own)."""
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("type") == "Complete" and condition.get("status") == "True":
            return ExitStatus(exit_code=0)
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            failed = f"job failed: {condition.get('message') or ''}".strip()
            return _deadline_exceeded(job) or ExitStatus(exit_code=None, reason=failed)
    return None


def observe(
    job: Obj, pods: list[Obj], now: datetime | None = None, unschedulable_wait_s: float = 300
) -> Observed:
    """The run's state from its Job and pods."""
    now = now or datetime.now(UTC)
    pod = latest_pod(pods)
    if pod is not None and pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
        ended = _terminated_status(pod) or _pod_failure(pod)
        if ended is not None:
            return Observed(_deadline_exceeded(job) or ended)
    ended = job_end(job)
    if ended is not None:
        return Observed(ended)
    if pod is not None and pod.get("status", {}).get("phase") == "Pending":
        stuck = _stuck(pod, now, unschedulable_wait_s)
        if stuck is not None:
            return Observed(stuck, end=True)
    return Observed(None)


def run_state(job: Obj, pods: list[Obj]) -> tuple[RunState, ExitStatus | None]:
    """What list_runs reports: exited (with its status) or running (pending counts as running)."""
    status = observe(job, pods, unschedulable_wait_s=float("inf")).status
    return (RunState.RUNNING, None) if status is None else (RunState.EXITED, status)
