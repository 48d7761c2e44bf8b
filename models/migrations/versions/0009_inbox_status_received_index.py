"""inbox: one index on (status, received_at) in place of the one on status

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 16:00:00.000000

"""
from typing import Sequence, Union

from alembic import op


# revision identifiers, used by Alembic.
revision: str = '0009'
down_revision: Union[str, Sequence[str], None] = '0008'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_index('ix_roster_events_status_received_at', 'roster_events', ['status', 'received_at'], unique=False)
    op.drop_index('ix_roster_events_status', table_name='roster_events')


def downgrade() -> None:
    """Downgrade schema."""
    op.create_index('ix_roster_events_status', 'roster_events', ['status'], unique=False)
    op.drop_index('ix_roster_events_status_received_at', table_name='roster_events')
