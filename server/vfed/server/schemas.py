"""Pydantic models of every request body and query, and of the answers only the server gives; the resources
every component reads (organization, task, run, ...) are those of `vfed.common.api.resources`. The OpenAPI
document is generated from both."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from vfed.common.api import resources as res
from vfed.common.api.statuses import RunStatus, TaskStatus
from vfed.server.models import RoleName

Name = Annotated[str, Field(min_length=1, max_length=200)]
Text = Annotated[str, Field(max_length=100_000)]
Id = Annotated[int, Field(ge=1, le=2**31 - 1)]
KeyId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
Entry = Annotated[
    dict[str, Any],
    Field(description='a signed entry: {"v": 1, "kind", "body": {...}, "sigs": [{"key_id", "sig"}]}'),
]
DESCRIPTOR_MAX_BYTES = 2 << 20
MAX_KEY_RECORDS = 1000


class In(BaseModel):
    """Request bodies reject unknown keys, so typos fail loudly."""

    model_config = ConfigDict(extra="forbid")


# --- tokens -------------------------------------------------------------------------------------------
class TokenUserIn(In):
    username: Annotated[str, Field(min_length=1, max_length=200)]
    password: Annotated[str, Field(min_length=1, max_length=1000)]


class TokenNodeIn(In):
    api_key: Annotated[str, Field(min_length=3, max_length=200)]


class TokenRefreshIn(In):
    refresh_token: Annotated[str, Field(min_length=1, max_length=4000)]


class TokenRefreshOut(BaseModel):
    access_token: str
    refresh_token: str


class TokenUserOut(TokenRefreshOut):
    user_id: int
    organization_id: int


class TokenNodeOut(TokenRefreshOut):
    node_id: int
    organization_id: int
    collaboration_id: int
    broker_username: str | None = Field(
        None, description="the node's own broker account, when the server manages the broker's accounts"
    )
    broker_password: str | None = Field(
        None, description="its password (the same at every login until the API key is rotated)"
    )


# --- organizations, collaborations ----------------------------------------------------------------------
class OrganizationIn(In):
    name: Name
    public_key: Text | None = None


class PublicKeyIn(In):
    public_key: Annotated[str, Field(min_length=1, max_length=100_000)]


class OrganizationKeyOut(BaseModel):
    public_key: str
    key_id: str | None
    created_at: datetime
    retired_at: datetime


class OrganizationKeysOut(BaseModel):
    data: list[OrganizationKeyOut]


# --- key chains, researcher certificates (signed entries, stored verbatim) ------------------------------
class KeyRecordsIn(In):
    records: list[Entry] = Field(min_length=1, max_length=MAX_KEY_RECORDS)


class KeyRecordsOut(BaseModel):
    data: list[Entry] = Field(description="every record of the organization's chain, in append order")
    head_key_id: str | None = Field(description="the chain's newest key (null: no record yet)")


class CertificateIn(In):
    certificate: Entry


class RevocationIn(In):
    revocation: Entry


class CertificateOut(BaseModel):
    id: int
    organization_id: int
    user_id: int
    key_id: str
    digest: str
    certificate: Entry
    revocation: Entry | None
    created_at: datetime
    revoked_at: datetime | None


class CertificatesOut(BaseModel):
    data: list[CertificateOut]


class RevocationsOut(BaseModel):
    data: list[Entry]


# --- ledgers (signed entries chained by hash, stored verbatim; nodes and clients verify them) ---------------
LEDGER_PAGE_MAX = 5000


class LedgerRecordOut(BaseModel):
    seq: int = Field(description="the entry's place on the ledger, from 1")
    hash: str = Field(description="chain hash through this entry, as the server computed it")
    entry: Entry


class LedgerPageOut(BaseModel):
    collaboration_id: int
    length: int = Field(description="how many entries the ledger holds")
    entries: list[LedgerRecordOut] = Field(description="entries after `after`, in order, at most `limit`")


class LedgerQuery(In):
    after: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    limit: Annotated[int, Field(ge=1, le=LEDGER_PAGE_MAX)] = 1000


class LedgerAppendIn(In):
    entry: Entry


class LedgerAppendOut(BaseModel):
    seq: int
    hash: str


class CollaborationIn(In):
    name: Name
    organization_ids: list[Id] = Field(default_factory=list, max_length=10_000)
    encrypted: bool = True


class CollaborationPatch(In):
    name: Name | None = None
    organization_ids: list[Id] | None = Field(None, max_length=10_000)
    encrypted: bool | None = None


# --- nodes, users, roles --------------------------------------------------------------------------------
class NodeIn(In):
    collaboration_id: Id
    organization_id: Id | None = Field(None, description="default: the caller's organization")
    name: Name | None = None


class NodeCreatedOut(res.Node):
    api_key: str = Field(description="shown once; store it now")


class UserIn(In):
    username: Name
    password: Annotated[str, Field(min_length=8, max_length=1000)]
    organization_id: Id | None = Field(None, description="default: the caller's organization")
    roles: list[RoleName] = Field(default_factory=lambda: [RoleName.RESEARCHER], max_length=5)


class UserPatch(In):
    password: Annotated[str, Field(min_length=8, max_length=1000)] | None = None
    old_password: Annotated[str, Field(min_length=1, max_length=1000)] | None = Field(
        None, description="needed to change one's own password"
    )
    roles: list[RoleName] | None = Field(None, max_length=5)
    disabled: bool | None = Field(None, description="a disabled account cannot log in; its tokens die")


class UserOut(BaseModel):
    id: int
    username: str
    organization_id: int
    roles: list[str]
    disabled: bool = False
    links: res.Links


class UserPage(res.Page):
    data: list[UserOut]


class AuditEntryOut(BaseModel):
    id: int
    at: datetime
    actor_kind: str = Field(description="user | node | server | cli (a vserver admin command)")
    actor_id: int | None
    actor_name: str
    organization_id: int | None = Field(description="the organization of the target")
    action: str = Field(description="e.g. user.create, user.roles, user.delete, node.delete, node.rotate-key")
    target_kind: str
    target_id: int | None
    target_name: str
    detail: dict[str, Any]
    address: str = Field(description="the client address (see trusted_proxies)")


class AuditPage(res.Page):
    data: list[AuditEntryOut]


class RuleOut(BaseModel):
    resource: str
    operation: str
    scope: str


class RoleOut(BaseModel):
    id: int
    name: str
    description: str
    rules: list[RuleOut]


class RolePage(res.Page):
    data: list[RoleOut]


# --- blobs, tasks, runs ----------------------------------------------------------------------------------


Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
ByteCount = Annotated[int, Field(ge=0, le=2**62)]


class UploadIn(In):
    """A resumable upload: the size and SHA-256 may be declared now, or only when completing it."""

    size: ByteCount | None = None
    sha256: Sha256Hex | None = None


class UploadOut(BaseModel):
    id: str
    blob_id: str = Field(
        description="the blob's id once complete (a client whose completion answer was lost "
        "finds the blob under it)"
    )
    offset: int = Field(description="bytes the server has committed: the next append starts here")
    size: int | None = None
    sha256: str | None = None
    expires_at: datetime = Field(description="removed with its bytes if no append comes before this")


class UploadAppendQuery(In):
    offset: ByteCount | None = Field(None, description="where the body goes: the upload's committed offset")


class UploadCompleteIn(In):
    size: ByteCount
    sha256: Sha256Hex


class TaskOrganizationIn(In):
    id: Id
    input_blob_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    key_id: Annotated[str, Field(min_length=1, max_length=200)] | None = Field(
        None,
        description="The key the input was sealed to; when it is not the organization's current key, the "
        "task is refused (409 stale-key) and nothing is stored, so a client may cache members' keys",
    )


class TaskIn(In):
    collaboration_id: Id | None = Field(None, description="implied by a run token")
    name: Annotated[str, Field(max_length=200)] = ""
    description: Text = ""
    image: Annotated[str, Field(min_length=1, max_length=1000)]
    image_digest: Annotated[str, Field(max_length=200)] | None = None
    datasets: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=100
    )
    organizations: list[TaskOrganizationIn] = Field(min_length=1, max_length=1000)
    parent_id: Id | None = None
    descriptor: Annotated[str, Field(max_length=DESCRIPTOR_MAX_BYTES)] | None = Field(
        None,
        description="the signed task descriptor document (JSON text, at most 2 MiB), stored verbatim; its "
        "image, collaboration and target organizations must be this request's (422 descriptor-mismatch)",
    )


class TaskWaitQuery(In):
    timeout_s: Annotated[float, Field(ge=0, le=3600)] = Field(
        30.0, description="answer after this long at the latest (the server caps it, 60 s by default)"
    )
    since: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        None, description="a `version` from an earlier answer: answer as soon as any run changed since"
    )


SealedText = Annotated[str, Field(max_length=64 * 1024 * 1024, pattern=r"^[A-Za-z0-9+/]*={0,2}$")]
"""Base64 of a sealed envelope (the server checks the alphabet; it cannot read the content)."""


class RunPatch(In):
    status: RunStatus | None = None
    exit_code: Annotated[int, Field(ge=-(2**31), le=2**31 - 1)] | None = None
    reason: Text | None = None
    log: Annotated[str, Field(max_length=64 * 1024 * 1024)] | None = Field(
        default=None, description="ignored: the plaintext log of an older node is never stored"
    )
    sealed_log: SealedText | None = None
    image_digest: Annotated[str, Field(max_length=200)] | None = None
    result_blob_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None


class HealthOut(BaseModel):
    status: str
    version: str


class DoorbellOut(BaseModel):
    url: str | None = Field(description="the broker nodes should subscribe to, if the server knows one")
    topic_prefix: str


# --- query strings ---------------------------------------------------------------------------------------
class PageQuery(In):
    page: Annotated[int, Field(ge=1, le=10**6)] = 1
    per_page: Annotated[int, Field(ge=1, le=500)] = 50


class OrganizationQuery(PageQuery):
    name: Annotated[str, Field(max_length=200)] | None = None
    collaboration_id: Id | None = None


class CollaborationQuery(PageQuery):
    organization_id: Id | None = None


class NodeQuery(PageQuery):
    organization_id: Id | None = None
    collaboration_id: Id | None = None


class UserQuery(PageQuery):
    organization_id: Id | None = None


class AuditQuery(PageQuery):
    organization_id: Id | None = None
    action: Annotated[str, Field(max_length=64)] | None = None
    target_kind: Annotated[str, Field(max_length=32)] | None = None
    target_id: Id | None = None


class CertificateQuery(In):
    user_id: Id | None = None
    key_id: KeyId | None = None


class TaskQuery(PageQuery):
    collaboration_id: Id | None = None
    parent_id: Id | None = None
    job_id: Id | None = None
    status: TaskStatus | None = None


class RunQuery(PageQuery):
    task_id: Id | None = None
    organization_id: Id | None = None
    node_id: Id | None = None
    status: RunStatus | None = None
