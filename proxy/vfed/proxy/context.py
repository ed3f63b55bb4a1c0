"""What one run's proxy knows: the calling run, its server client, its organization's keys, the run's own
verified task descriptor and the verified key chains of other organizations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vfed.common.crypto import Keyring, OrgKey
from vfed.common.trust import ChainResolver, DescriptorDocument
from vfed.proxy.rest import RestClient


@dataclass(frozen=True)
class RunInfo:
    """The calling run, as `GET /run` shows it."""

    run_id: int
    task_id: int
    job_id: int
    organization_id: int
    collaboration_id: int
    image: str


@dataclass(frozen=True)
class ProxyLimits:
    """What one run may ask of its proxy (node config `proxy_*`): the agent's memory and the organization's
    server quota are shared by every run, so one run's algorithm must not take them all.

    At most `max_concurrent_requests` requests in flight (more: 429 at once, nothing read); of these, at most
    `max_concurrent_bodies` read and process a body at a time (the others wait with their bodies unread, so
    the agent holds at most that many bodies of up to `max_request_bytes`); a body must arrive within
    `body_timeout_s`, a request's head within `head_timeout_s`. Blob uploads (sealed subtask inputs) count
    against `max_blob_uploads` and `max_blob_bytes` for the run's lifetime.
    """

    max_concurrent_requests: int = 16
    max_concurrent_bodies: int = 2
    head_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keepalive_timeout_s: float = 75.0
    max_blob_uploads: int = 1000
    max_blob_bytes: int = 1024**3


@dataclass
class ProxyContext:
    """Everything one run's proxy needs; built by the agent after the run was claimed.

    Every public key comes from `chains` (key chains verified against the node's pins). With `descriptor`
    (the run's own verified task document), subtasks get a signed descriptor that embeds it, and their inputs
    and results are bound to it; without one (tests of the proxy alone) subtasks are unsigned.
    """

    run: RunInfo
    rest: RestClient
    org_key: OrgKey
    keyring: Keyring
    chains: ChainResolver
    max_request_bytes: int = 64 * 1024 * 1024
    spool_dir: Path | None = None
    descriptor: DescriptorDocument | None = None
    max_subtasks_per_run: int = 100
    max_subtask_depth: int = 2
    image_refusal: Callable[[str, int | None], str | None] | None = None
    """The node's image rules for subtasks: (image, root initiating organization) -> why not, or None."""
    limits: ProxyLimits = field(default_factory=ProxyLimits)
    subtasks: set[int] = field(default_factory=set)  # tasks of this job the run may read
    subtask_digests: dict[int, str] = field(default_factory=dict)  # subtask id -> its descriptor's digest
    created: int = field(default=0, init=False)  # subtasks this run created (or is creating)
    members: frozenset[int] | None = field(default=None, init=False)  # of the run's collaboration
    blob_uploads: int = field(default=0, init=False)  # blobs this run uploaded (or is uploading)
    blob_bytes: int = field(default=0, init=False)  # and their bytes


class ProxyError(Exception):
    """A refusal with an HTTP status and a short code, turned into JSON by the middleware."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
