"""roster pauses, deferred events, a district's own brake

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 21:02:56.665819

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0007'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# Autogenerate does not see a changed check constraint: the status list is written out here, as
# the models build it from ``EventStatus`` (migrations must not import what they outlive).
STATUS_CHECK = "ck_roster_events_status"
STATUSES_BEFORE = (
    "status IN ('accepted', 'processing', 'done', 'ignored', 'stale', 'rejected', 'discarded',"
    " 'held', 'dead')"
)
STATUSES_AFTER = (
    "status IN ('accepted', 'processing', 'done', 'ignored', 'stale', 'rejected', 'discarded',"
    " 'held', 'dead', 'deferred')"
)
BRAKE_CHECK = "ck_districts_brake_percent_range"
PAUSE_KEY = "fk_roster_events_pause_id_pauses"


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('pauses',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('district_id', sa.String(length=64), nullable=True),
    sa.Column('starts_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ends_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('reason', sa.String(length=500), nullable=True),
    sa.Column('created_by', sa.String(length=100), nullable=False),
    sa.Column('removed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('removed_by', sa.String(length=100), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('ends_at > starts_at', name=op.f('ck_pauses_ends_after_start')),
    sa.ForeignKeyConstraint(['district_id'], ['districts.id'], name=op.f('fk_pauses_district_id_districts'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pauses'))
    )
    op.create_index(op.f('ix_pauses_district_id'), 'pauses', ['district_id'], unique=False)
    op.create_index(op.f('ix_pauses_ends_at'), 'pauses', ['ends_at'], unique=False)
    # Batch mode: SQLite alters a table's constraints only by copying it.
    with op.batch_alter_table('districts') as batch:
        batch.add_column(sa.Column('brake_percent', sa.Float(), nullable=True))
        batch.create_check_constraint(
            op.f(BRAKE_CHECK), "brake_percent IS NULL OR (brake_percent > 0 AND brake_percent <= 100)"
        )
    with op.batch_alter_table('roster_events') as batch:
        batch.add_column(sa.Column('pause_id', sa.Integer(), nullable=True))
        batch.create_foreign_key(op.f(PAUSE_KEY), 'pauses', ['pause_id'], ['id'], ondelete='RESTRICT')
        batch.drop_constraint(op.f(STATUS_CHECK), type_='check')
        batch.create_check_constraint(op.f(STATUS_CHECK), STATUSES_AFTER)


def downgrade() -> None:
    """Downgrade schema."""
    # A deferred event goes back to the inbox: applied by the workers, as without a pause.
    op.execute("UPDATE roster_events SET status = 'accepted' WHERE status = 'deferred'")
    with op.batch_alter_table('roster_events') as batch:
        batch.drop_constraint(op.f(STATUS_CHECK), type_='check')
        batch.create_check_constraint(op.f(STATUS_CHECK), STATUSES_BEFORE)
        batch.drop_constraint(op.f(PAUSE_KEY), type_='foreignkey')
        batch.drop_column('pause_id')
    with op.batch_alter_table('districts') as batch:
        batch.drop_constraint(op.f(BRAKE_CHECK), type_='check')
        batch.drop_column('brake_percent')
    op.drop_index(op.f('ix_pauses_ends_at'), table_name='pauses')
    op.drop_index(op.f('ix_pauses_district_id'), table_name='pauses')
    op.drop_table('pauses')
