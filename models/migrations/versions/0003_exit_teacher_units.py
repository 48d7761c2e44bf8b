"""district exits count their teacher units

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 17:25:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # An exit begun before this revision keeps 0: its account batches then start when the relay
    # finds the exit idle, as they would after a lost unit.
    with op.batch_alter_table("district_exits") as batch:
        batch.add_column(
            sa.Column("teacher_units", sa.Integer(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("district_exits") as batch:
        batch.drop_column("teacher_units")
