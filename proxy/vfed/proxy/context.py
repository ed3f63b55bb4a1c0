"""What one run's proxy knows: the calling run, its server client, its organization's keys, the run's own
verified task descriptor and the verified key chains of other organizations."""

from __future__ import annotations

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
    subtasks: set[int] = field(default_factory=set)  # tasks of this job the run may read
    subtask_digests: dict[int, str] = field(default_factory=dict)  # subtask id -> its descriptor's digest
    created: int = field(default=0, init=False)  # subtasks this run created (or is creating)
    members: frozenset[int] | None = field(default=None, init=False)  # of the run's collaboration


class ProxyError(Exception):
    """A refusal with an HTTP status and a short code, turned into JSON by the middleware."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
