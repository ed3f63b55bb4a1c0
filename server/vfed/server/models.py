"""SQLAlchemy 2 models: the server's data, holding ciphertext references but never plaintext."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from vfed.common.api.statuses import RunStatus, TaskStatus


def utcnow() -> datetime:
    """Aware UTC now; every timestamp in the database is UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps come back timezone-aware on SQLite too."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class RoleName(StrEnum):
    """Fixed roles; their rules live in `access.py`."""

    ROOT = "root"
    ORG_ADMIN = "org-admin"
    RESEARCHER = "researcher"
    VIEWER = "viewer"
    NODE = "node"


class Base(DeclarativeBase):
    """Declarative base for all tables."""


collaboration_members = Table(
    "collaboration_members",
    Base.metadata,
    Column("collaboration_id", ForeignKey("collaborations.id", ondelete="CASCADE"), primary_key=True),
    Column("organization_id", ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True),
)

user_roles = Table(
    "user_roles",
    Base.metadata,
    Column("user_id", ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("role_id", ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True),
)


class Organization(Base):
    __tablename__ = "organizations"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    public_key: Mapped[str | None] = mapped_column(Text)
    key_id: Mapped[str | None] = mapped_column(String(200))
    # the key id of its first key as the federation file names it (`vserver import`); the server then
    # refuses another first key (nodes and clients still verify against their own pins)
    root_key_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class OrganizationKey(Base):
    """A public key an organization used before its current one."""

    __tablename__ = "organization_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[int] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    public_key: Mapped[str] = mapped_column(Text)
    key_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    retired_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class KeyRecord(Base):
    """A signed record of an organization's key chain (`key.genesis`, `key.rotation`), kept verbatim in the
    order it was appended; nodes and clients verify the chain themselves, against the fingerprints they
    pinned."""

    __tablename__ = "key_records"
    __table_args__ = (
        UniqueConstraint("organization_id", "digest", name="uq_key_records_organization_digest"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64))  # SHA-256 of what is signed (`SignedEntry.digest`)
    key_id: Mapped[str] = mapped_column(String(64))  # the key this record introduces
    prev_key_id: Mapped[str | None] = mapped_column(String(64))  # a rotation's previous key
    entry: Mapped[str] = mapped_column(Text)  # canonical JSON (`SignedEntry.to_json()`)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class UserCertificate(Base):
    """An organization's signed statement that a user's own key is theirs, and its revocation once revoked."""

    __tablename__ = "user_certificates"
    id: Mapped[int] = mapped_column(primary_key=True)
    organization_id: Mapped[int] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    key_id: Mapped[str] = mapped_column(String(64))  # the researcher key's id
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    entry: Mapped[str] = mapped_column(Text)
    revocation: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Collaboration(Base):
    __tablename__ = "collaborations"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    encrypted: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    organizations: Mapped[list[Organization]] = relationship(
        secondary=collaboration_members, lazy="selectin", order_by=Organization.id
    )


class LedgerEntry(Base):
    """One entry of a collaboration's ledger at its place: the signed entry's canonical text, verbatim, and
    the chain hash the server computed (`vfed.common.ledger.link`); nodes and clients recompute both."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        UniqueConstraint("collaboration_id", "seq", name="uq_ledger_entries_collaboration_seq"),
        UniqueConstraint("collaboration_id", "digest", name="uq_ledger_entries_collaboration_digest"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    collaboration_id: Mapped[int] = mapped_column(ForeignKey("collaborations.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)  # 1-based place on the collaboration's ledger
    kind: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64))  # `SignedEntry.digest`: one entry at most once a ledger
    hash: Mapped[str] = mapped_column(String(64))  # chain hash through this entry
    entry: Mapped[str] = mapped_column(Text)  # canonical JSON (`SignedEntry.to_json()`)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Node(Base):
    __tablename__ = "nodes"
    # the nodes of one organization in one collaboration (the doorbell's targets); without it the planner
    # may walk every node of the organization across all its collaborations
    __table_args__ = (Index("ix_nodes_collaboration_organization", "collaboration_id", "organization_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    organization_id: Mapped[int] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    collaboration_id: Mapped[int] = mapped_column(
        ForeignKey("collaborations.id", ondelete="CASCADE"), index=True
    )
    api_key_id: Mapped[str] = mapped_column(String(64), unique=True)
    api_key_hash: Mapped[str] = mapped_column(String(128))
    # raised when the API key is rotated: the node's tokens from the old key are refused
    token_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Mosquitto `$7$` hash of the node's broker password (vfed.server.broker_auth): set at login, cleared
    # when the API key is rotated (the next login sets the new one)
    broker_password_hash: Mapped[str | None] = mapped_column(String(200))
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Role(Base):
    __tablename__ = "roles"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(200), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    organization_id: Mapped[int] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    # raised on a password or role change, a disabling or a refresh-token reuse: every token carries the
    # version it was issued under, and a token of an older version is refused on its next request
    token_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    disabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    roles: Mapped[list[Role]] = relationship(secondary=user_roles, lazy="selectin", order_by=Role.id)


class RefreshToken(Base):
    """An issued refresh token, by its `jti`: each is exchanged once (rotation); presenting a used one again
    means it was copied, so its family (every token descended from one login) and the account's tokens are
    revoked."""

    __tablename__ = "refresh_tokens"
    jti: Mapped[str] = mapped_column(String(32), primary_key=True)
    family: Mapped[str] = mapped_column(String(32), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # user | node
    subject_id: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class AuditEntry(Base):
    """One administrative action: who did what to which target, when and from which address. No foreign keys,
    so the entry outlives the accounts and nodes it names."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    actor_kind: Mapped[str] = mapped_column(String(8))  # user | node
    actor_id: Mapped[int | None] = mapped_column(Integer)
    actor_name: Mapped[str] = mapped_column(String(200), default="")
    # the organization the entry belongs to (the target's); its org-admins may read it
    organization_id: Mapped[int | None] = mapped_column(Integer, index=True)
    action: Mapped[str] = mapped_column(String(64))
    target_kind: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[int | None] = mapped_column(Integer)
    target_name: Mapped[str] = mapped_column(String(200), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    address: Mapped[str] = mapped_column(String(64), default="")


class Blob(Base):
    """An opaque byte stream (ciphertext envelopes), with size and digest recorded: small ones in the row
    (`data`; creating a file costs more CPU than the rest of a task), larger ones on disk (`data` NULL)."""

    __tablename__ = "blobs"
    # an organization's quota is one SUM over this index alone (blob_limits.py)
    __table_args__ = (Index("ix_blobs_owner_organization_id_size", "owner_organization_id", "size"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    owner_organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    owner_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    owner_node_id: Mapped[int | None] = mapped_column(ForeignKey("nodes.id", ondelete="SET NULL"))
    # indexed for the collector, which looks for unreferenced blobs older than the keep time
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    data: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)


class UploadSession(Base):
    """A resumable upload (api/uploads.py): the bytes of blob `blob_id` arrive over several requests, each
    appended at `committed_bytes`; the blob's row is written only once they are complete and verified."""

    __tablename__ = "upload_sessions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    blob_id: Mapped[str] = mapped_column(String(64), unique=True)
    owner_organization_id: Mapped[int] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    owner_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    owner_node_id: Mapped[int | None] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    size: Mapped[int | None] = mapped_column(BigInteger)  # declared at creation, or only at completion
    sha256: Mapped[str | None] = mapped_column(String(64))
    committed_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    handle: Mapped[str] = mapped_column(String(1024), default="")  # the store's (an S3 multipart upload id)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # the collector removes a session (and its bytes) once this passed; every append moves it on
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class Task(Base):
    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    collaboration_id: Mapped[int] = mapped_column(ForeignKey("collaborations.id"), index=True)
    initiator_organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    initiator_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    initiator_run_id: Mapped[int | None] = mapped_column(Integer)
    image: Mapped[str] = mapped_column(Text)
    image_digest: Mapped[str | None] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(200), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    datasets: Mapped[list[str]] = mapped_column(JSON, default=list)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id"), index=True)
    # NULL for a top-level task (its job id is its own id), so creating one needs no second write
    job_id: Mapped[int | None] = mapped_column(Integer, index=True)
    status: Mapped[str] = mapped_column(String(20), default=TaskStatus.PENDING, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # the signed descriptor document (JSON text) as the initiator sent it; nodes verify it, the server cannot
    descriptor: Mapped[str | None] = mapped_column(Text)


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int] = mapped_column(Integer, index=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    node_id: Mapped[int | None] = mapped_column(ForeignKey("nodes.id", ondelete="SET NULL"), index=True)
    status: Mapped[str] = mapped_column(String(20), default=RunStatus.PENDING, index=True)
    input_blob_id: Mapped[str | None] = mapped_column(ForeignKey("blobs.id"), index=True)
    result_blob_id: Mapped[str | None] = mapped_column(ForeignKey("blobs.id"), index=True)
    image_digest: Mapped[str | None] = mapped_column(String(200))
    exit_code: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    sealed_log: Mapped[str | None] = mapped_column(Text)
    """The log tail, sealed on the node to its organization (base64 envelope, vfed.common.api.run_log):
    never plaintext here, since the server is not trusted with what an algorithm printed."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
