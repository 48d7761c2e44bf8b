"""fewer journal and audit indexes, no journal parent key

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 19:45:00

"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A district exit writes a journal row and an audit row per account, and every index is one more
# insert per row. The journal's batch token alone finds a batch's (at most a thousand) rows; no
# query looks journal rows up by class, nor audit rows by action. The parent key's check, a lookup
# and a share lock on the parent per row, cost a batch as much as the rest of its journal insert;
# journal entries are never deleted, and each parent is written before its children.

PARENT_KEY = "fk_conversion_journal_parent_id_conversion_journal"


def upgrade() -> None:
    with op.batch_alter_table("conversion_journal") as batch:
        batch.drop_constraint(PARENT_KEY, type_="foreignkey")
    op.create_index("ix_conversion_journal_batch", "conversion_journal", ["batch"])
    op.drop_index("ix_conversion_journal_batch_account", table_name="conversion_journal")
    op.drop_index("ix_conversion_journal_batch_class", table_name="conversion_journal")
    op.drop_index("ix_conversion_journal_class_id", table_name="conversion_journal")
    op.drop_index("ix_audit_log_action", table_name="audit_log")


def downgrade() -> None:
    op.create_index("ix_audit_log_action", "audit_log", ["action"])
    op.create_index("ix_conversion_journal_class_id", "conversion_journal", ["class_id"])
    op.create_index(
        "ix_conversion_journal_batch_class", "conversion_journal", ["batch", "kind", "class_id"]
    )
    op.create_index(
        "ix_conversion_journal_batch_account",
        "conversion_journal",
        ["batch", "kind", "account_id"],
    )
    op.drop_index("ix_conversion_journal_batch", table_name="conversion_journal")
    with op.batch_alter_table("conversion_journal") as batch:
        batch.create_foreign_key(
            PARENT_KEY, "conversion_journal", ["parent_id"], ["id"], ondelete="RESTRICT"
        )
