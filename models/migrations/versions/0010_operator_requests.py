"""operator requests: an exit or a sync is a row before its message is sent

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 15:40:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0010'
down_revision: Union[str, Sequence[str], None] = '0009'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('operator_requests',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('district_id', sa.String(length=64), nullable=False),
    sa.Column('by', sa.String(length=200), nullable=False),
    sa.Column('dry_run', sa.Boolean(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('task_id', sa.String(length=64), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('taken_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("kind IN ('exit', 'sync')", name=op.f('ck_operator_requests_kind')),
    sa.CheckConstraint(
        "status IN ('asked', 'taken', 'done', 'dead', 'withdrawn')",
        name=op.f('ck_operator_requests_status'),
    ),
    sa.CheckConstraint('attempts >= 0', name=op.f('ck_operator_requests_attempts_non_negative')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_operator_requests'))
    )
    op.create_index('ix_operator_requests_asked', 'operator_requests', ['status', 'sent_at'], unique=False)
    op.create_index(op.f('ix_operator_requests_district_id'), 'operator_requests', ['district_id'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index(op.f('ix_operator_requests_district_id'), table_name='operator_requests')
    op.drop_index('ix_operator_requests_asked', table_name='operator_requests')
    op.drop_table('operator_requests')
