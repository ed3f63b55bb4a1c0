"""node broker passwords: each node's own Mosquitto account

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 00:40:00

`nodes.broker_password_hash` holds the `$7$` (PBKDF2-SHA512) hash of the node's broker password, the form
Mosquitto's password file takes; the server writes that file from these rows. Existing nodes have none until
their next login; a downgrade drops the column (nodes then get new hashes at their next login after an
upgrade).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("broker_password_hash", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("broker_password_hash")
