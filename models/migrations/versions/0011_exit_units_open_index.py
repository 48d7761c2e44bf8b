"""exit units: an index on the open units by key in place of the one on status

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 18:00:00.000000

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision: str = '0011'
down_revision: Union[str, Sequence[str], None] = '0010'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

OPEN = sa.text("status IN ('pending', 'dead')")


def upgrade() -> None:
    """Upgrade schema."""
    op.create_index('ix_exit_units_open', 'exit_units', ['exit_id', 'key'], unique=False, postgresql_where=OPEN, sqlite_where=OPEN)
    op.drop_index('ix_exit_units_status', table_name='exit_units')


def downgrade() -> None:
    """Downgrade schema."""
    op.create_index('ix_exit_units_status', 'exit_units', ['status'], unique=False)
    op.drop_index('ix_exit_units_open', table_name='exit_units', postgresql_where=OPEN, sqlite_where=OPEN)
