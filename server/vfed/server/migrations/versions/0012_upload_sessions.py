"""upload sessions: resumable blob uploads

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04 20:00:00

A session names the blob its bytes become, its owner, the size and SHA-256 declared (either may come only at
completion), the bytes committed so far and the store's handle (an S3 multipart upload id). The collector
finds expired sessions by `expires_at`; a downgrade drops the table (sessions in progress are lost, and their
stored bytes are removed by the collector as unfinished uploads).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "upload_sessions",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("blob_id", sa.String(length=64), nullable=False),
        sa.Column("owner_organization_id", sa.Integer(), nullable=False),
        sa.Column("owner_user_id", sa.Integer(), nullable=True),
        sa.Column("owner_node_id", sa.Integer(), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("committed_bytes", sa.BigInteger(), nullable=False),
        sa.Column("handle", sa.String(length=1024), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["owner_organization_id"], ["organizations.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["owner_user_id"], ["users.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["owner_node_id"], ["nodes.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("blob_id"),
    )
    op.create_index(
        "ix_upload_sessions_owner_organization_id", "upload_sessions", ["owner_organization_id"], unique=False
    )
    op.create_index("ix_upload_sessions_expires_at", "upload_sessions", ["expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_upload_sessions_expires_at", table_name="upload_sessions")
    op.drop_index("ix_upload_sessions_owner_organization_id", table_name="upload_sessions")
    op.drop_table("upload_sessions")
