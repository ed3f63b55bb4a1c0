"""nodes indexed by (collaboration, organization)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 06:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_nodes_collaboration_organization", "nodes", ["collaboration_id", "organization_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_nodes_collaboration_organization", table_name="nodes")
