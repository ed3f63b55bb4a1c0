"""runs indexed by input and result blob

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 08:10:00

Reading a blob asks whether a run the caller may see references it; without these indexes that walked
every run of the server on each result download.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_runs_input_blob_id", "runs", ["input_blob_id"], unique=False)
    op.create_index("ix_runs_result_blob_id", "runs", ["result_blob_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_runs_result_blob_id", table_name="runs")
    op.drop_index("ix_runs_input_blob_id", table_name="runs")
