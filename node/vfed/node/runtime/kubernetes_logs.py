"""A pod's log, streamed in chunks and kept as a bounded tail: whole (`pod_log`), or followed by a thread of
its own while the pod stops (`follow_log`), since a deleted pod takes its log with it."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

KEPT_LOG_BYTES = 16 * 1024 * 1024
"""The most of a pod's log kept (its tail)."""
_CHUNK_BYTES = 64 * 1024


def _drain(answer: Any, kept: bytearray) -> None:
    try:
        for chunk in answer.stream(_CHUNK_BYTES):
            kept.extend(chunk)
            if len(kept) > 2 * KEPT_LOG_BYTES:
                del kept[: len(kept) - KEPT_LOG_BYTES]
    finally:
        answer.release_conn()


def pod_log(core: Any, namespace: str, pod: str) -> bytes:
    """The pod's log so far (its tail); empty while its container has not started."""
    try:
        answer = core.read_namespaced_pod_log(pod, namespace, _preload_content=False)
    except ApiException as exc:
        if exc.status == 400:  # waiting to start: nothing written yet
            return b""
        raise
    kept = bytearray()
    _drain(answer, kept)
    return bytes(kept[-KEPT_LOG_BYTES:])


def follow_log(core: Any, namespace: str, pod: str, kept: bytearray) -> threading.Thread:
    """A thread appending the pod's log (all of it, then what follows) to `kept` until the stream ends.
    The stream is open when this returns: nothing the pod writes after is missed."""
    answer = core.read_namespaced_pod_log(pod, namespace, follow=True, _preload_content=False)

    def run() -> None:
        with contextlib.suppress(urllib3.exceptions.HTTPError, OSError):  # broken: what came is kept
            _drain(answer, kept)

    thread = threading.Thread(target=run, name=f"vfed-k8s-log-{pod}", daemon=True)
    thread.start()
    return thread
