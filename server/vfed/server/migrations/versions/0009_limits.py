"""limits: blob owners and quotas, unreferenced-blob collection

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 23:10:00

An organization's blob quota is one SUM over (owner_organization_id, size), an index-only scan; the collector
finds unreferenced blobs older than the keep time by created_at.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_blobs_owner_organization_id_size", "blobs", ["owner_organization_id", "size"], unique=False
    )
    op.create_index("ix_blobs_created_at", "blobs", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_blobs_created_at", table_name="blobs")
    op.drop_index("ix_blobs_owner_organization_id_size", table_name="blobs")
