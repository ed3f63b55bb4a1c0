"""Watches of a run's pods (blocking; the runtime runs them in threads of its own): the next change after a
version, or a killed pod's last state. Both raise the client's ApiException 410 when the version is too old;
the caller reads again and watches from the version it read."""

from __future__ import annotations

import math
from typing import Any

from kubernetes import watch as k8s_watch

from vfed.node.runtime.base import ExitStatus
from vfed.node.runtime.kubernetes_status import Obj, observe


def next_pod_event(core: Any, namespace: str, selector: str, version: str, timeout_s: float) -> None:
    """Returns at the first change to the selected pods after `version`, or when the server ends the watch
    (after timeout_s, rounded up to a whole second)."""
    watcher: Any = k8s_watch.Watch()  # type: ignore[no-untyped-call]
    stream = watcher.stream(
        core.list_namespaced_pod,
        namespace,
        label_selector=selector,
        resource_version=version or None,
        timeout_seconds=max(1, math.ceil(timeout_s)),
        _request_timeout=timeout_s + 5,
    )
    for _ in stream:
        watcher.stop()
        break


def pod_end(
    api: Any, core: Any, namespace: str, pod_name: str, selector: str, version: str, timeout_s: float
) -> ExitStatus:
    """The pod's terminated state once it shows, or plain "killed" when the pod goes (or the time passes)
    without one."""
    watcher: Any = k8s_watch.Watch()  # type: ignore[no-untyped-call]
    stream = watcher.stream(
        core.list_namespaced_pod,
        namespace,
        label_selector=selector,
        resource_version=version,
        timeout_seconds=max(1, round(timeout_s)),
    )
    for event in stream:
        seen: Obj = api.sanitize_for_serialization(event["object"])
        if seen["metadata"]["name"] != pod_name:
            continue
        status = observe({}, [seen], unschedulable_wait_s=float("inf")).status
        if status is not None:
            return status
        if event["type"] == "DELETED":
            break
    return ExitStatus(exit_code=None, reason="killed")
