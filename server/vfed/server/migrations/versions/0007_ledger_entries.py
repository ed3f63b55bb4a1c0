"""ledger_entries: each collaboration's ledger of datasets, leases, run receipts and key records

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 09:00:00

Signed entries are stored verbatim with the chain hash the server computed; nodes and clients verify both.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("collaboration_id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("entry", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["collaboration_id"], ["collaborations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("collaboration_id", "seq", name="uq_ledger_entries_collaboration_seq"),
        sa.UniqueConstraint("collaboration_id", "digest", name="uq_ledger_entries_collaboration_digest"),
    )


def downgrade() -> None:
    op.drop_table("ledger_entries")
