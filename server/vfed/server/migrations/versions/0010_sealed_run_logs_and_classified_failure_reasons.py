"""sealed run logs and classified failure reasons

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 23:10:00

`runs.log` held the last 64 KiB of what each algorithm printed, in plaintext, readable by the initiator and
the server's operator; it has carried other organizations' data values. It is dropped, with whatever it
held (an upgrade erases the plaintext tails already stored), and `runs.sealed_log` holds the tail the node
seals to its own organization. A downgrade brings back an empty `log` column; sealed logs are lost.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("sealed_log", sa.Text(), nullable=True))
        batch.drop_column("log")


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("log", sa.Text(), nullable=False, server_default=""))
        batch.drop_column("sealed_log")
    with op.batch_alter_table("runs") as batch:  # the default only filled the rows there are
        batch.alter_column("log", existing_type=sa.Text(), server_default=None)
