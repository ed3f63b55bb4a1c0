"""organizations' key chains, researcher certificates and signed task descriptors

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 09:00:00

The server stores these signed entries verbatim and serves them; nodes and clients verify them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "key_records",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("organization_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("prev_key_id", sa.String(length=64), nullable=True),
        sa.Column("entry", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["organization_id"], ["organizations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("organization_id", "digest", name="uq_key_records_organization_digest"),
    )
    op.create_table(
        "user_certificates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("organization_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("entry", sa.Text(), nullable=False),
        sa.Column("revocation", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["organization_id"], ["organizations.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("digest"),
    )
    with op.batch_alter_table("user_certificates") as batch:
        batch.create_index("ix_user_certificates_organization_id", ["organization_id"], unique=False)
        batch.create_index("ix_user_certificates_user_id", ["user_id"], unique=False)
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("descriptor", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("descriptor")
    with op.batch_alter_table("user_certificates") as batch:
        batch.drop_index("ix_user_certificates_user_id")
        batch.drop_index("ix_user_certificates_organization_id")
    op.drop_table("user_certificates")
    op.drop_table("key_records")
