"""organizations: the fingerprint of the first key, as the federation file names it

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 09:00:00

`vserver import` records it; the server then refuses a `key.genesis` record with another key.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("organizations") as batch:
        batch.add_column(sa.Column("root_key_id", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("organizations") as batch:
        batch.drop_column("root_key_id")
