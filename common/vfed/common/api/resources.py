"""The resources the server's REST API serves, defined once: the server answers with these classes (its
OpenAPI document names them), the node, the proxy and the researcher's client parse its answers with them.

Reading is forward compatible: a field a newer server adds is ignored, and a field an older server leaves out
takes its default. Writing is exact: the server builds these models from its own rows, so it emits only the
declared fields; the OpenAPI document marks every one of them as always present
(`json_schema_serialization_defaults_required`).

Datasets and leases are not served as resources: they are signed ledger entries (`vfed.common.ledger.kinds`),
stored and served verbatim and read through a verified ledger.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vfed.common.api.statuses import RunStatus, TaskStatus, is_finished

Links = dict[str, str | None]
"""Related resources by relation name (`self`, `next`, `task`, ...): API paths, None where there is none."""


class Resource(BaseModel):
    """Base of every served resource: unknown fields are ignored when reading, instances are immutable.

    Fields read as attributes (`task.id`); reading them by name as from the JSON object (`task["id"]`,
    `task.get("parent_id")`, `dict(task)`) keeps working for code written when the client returned dicts.
    """

    model_config = ConfigDict(extra="ignore", frozen=True, json_schema_serialization_defaults_required=True)

    def __getitem__(self, key: str) -> Any:
        if key in type(self).model_fields:
            return getattr(self, key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        """The field named `key`, `default` when the model has none of that name."""
        return getattr(self, key) if key in type(self).model_fields else default

    def keys(self) -> list[str]:
        """The field names, in the order the JSON object has them."""
        return list(type(self).model_fields)

    def __contains__(self, key: object) -> bool:
        return key in type(self).model_fields


class Page(Resource):
    """The envelope of every list answer (`data` holds the items; follow `links.next` for more)."""

    page: int
    per_page: int
    total: int
    links: Links = Field(default_factory=dict)


class Organization(Resource):
    """An organization: its name and current public key (`key_id`: its fingerprint)."""

    id: int
    name: str
    public_key: str | None = None
    key_id: str | None = None
    links: Links = Field(default_factory=dict)


class Collaboration(Resource):
    """Organizations that run tasks together; `encrypted`: their tasks' inputs and results are sealed."""

    id: int
    name: str
    organization_ids: list[int] = Field(default_factory=list)
    encrypted: bool = True
    links: Links = Field(default_factory=dict)


class Node(Resource):
    """An organization's node agent in one collaboration; `status`: online or offline, as last heard."""

    id: int
    name: str
    organization_id: int
    collaboration_id: int
    status: str = Field("offline", description="online | offline")
    last_seen_at: datetime | None = None
    links: Links = Field(default_factory=dict)

    @property
    def online(self) -> bool:
        """The server heard from the node lately (its `online_window_s`)."""
        return self.status == "online"


class Blob(Resource):
    """A stored blob (ciphertext the server cannot read): its id, size and the SHA-256 of what arrived."""

    id: str
    size: int
    sha256: str


class Task(Resource):
    """A task: one image run at each target organization (one run each); its status follows from its runs
    (`vfed.common.api.statuses.task_status`). `job_id` is the root task's id, shared by its subtasks."""

    id: int
    collaboration_id: int
    initiator_organization_id: int | None = None
    initiator_user_id: int | None = None
    image: str
    image_digest: str | None = None
    name: str = ""
    description: str = ""
    organization_ids: list[int] = Field(default_factory=list)
    datasets: list[str] = Field(default_factory=list)
    parent_id: int | None = None
    job_id: int
    status: TaskStatus
    created_at: datetime | None = None
    descriptor: str | None = Field(None, description="the signed task descriptor document, verbatim")
    links: Links = Field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """Every run of the task has finished."""
        return self.status not in (TaskStatus.PENDING, TaskStatus.ACTIVE)


class Run(Resource):
    """One run of a task at one organization, claimed by one of its nodes."""

    id: int
    task_id: int
    job_id: int
    organization_id: int
    node_id: int | None = None
    status: RunStatus
    input_blob_id: str | None = None
    result_blob_id: str | None = None
    image_digest: str | None = None
    exit_code: int | None = None
    reason: str | None = Field(
        None,
        description="why the run ended: a classified code (vfed.common.api.reasons), optionally `: ` and the "
        "node's own words; never the algorithm's output",
    )
    sealed_log: str | None = Field(
        None,
        description="the log tail as base64 of an envelope sealed on the node to its organization (and to "
        "the initiator when the node shares logs); null when the node sent none",
    )
    created_at: datetime | None = None
    claimed_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    links: Links = Field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """Terminal: the run will not change any more."""
        return is_finished(self.status)


class RunState(Resource):
    """A run as a task's wait answer shows it: just what changes."""

    id: int
    organization_id: int
    node_id: int | None = None
    status: RunStatus


class TaskWait(Resource):
    """The answer of `GET /tasks/{id}/wait`."""

    done: bool = Field(description="every run has finished")
    version: str = Field(description="changes when any run's status or node changes; pass it as `since`")
    task: Task
    runs: list[RunState]


class RunToken(Resource):
    """A token scoped to one claimed run, for that run's proxy."""

    token: str
    expires_at: datetime | None = None


class Claim(Run):
    """A claimed run with what its node needs next, so starting it takes no further round trips."""

    task: Task
    run_token: RunToken


class OrganizationPage(Page):
    data: list[Organization]


class CollaborationPage(Page):
    data: list[Collaboration]


class NodePage(Page):
    data: list[Node]


class TaskPage(Page):
    data: list[Task]


class RunPage(Page):
    data: list[Run]


__all__ = [
    "Blob",
    "Claim",
    "Collaboration",
    "CollaborationPage",
    "Links",
    "Node",
    "NodePage",
    "Organization",
    "OrganizationPage",
    "Page",
    "Resource",
    "Run",
    "RunPage",
    "RunState",
    "RunToken",
    "Task",
    "TaskPage",
    "TaskWait",
]
