from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import ID_LENGTH, Base, utcnow
from models.enums import JournalKind, sql_in


class JournalEntry(Base):
    """One conversion step: what it changed on its subject, and (by ``removed_by``) every link
    it removed.

    ``kind`` says what the subject is: an account converted, a class dropped, a district exited.
    ``before`` holds the subject's own fields as they were, so restore can put them back.
    Class drops caused by a teacher's conversion, and everything a district exit did, hang under
    their cause by ``parent_id``: restoring the cause restores them too.
    """

    __tablename__ = "conversion_journal"
    __table_args__ = (
        CheckConstraint(sql_in("kind", JournalKind), name="kind"),
        CheckConstraint(
            f"(kind = '{JournalKind.ACCOUNT}' AND account_id IS NOT NULL AND class_id IS NULL)"
            f" OR (kind = '{JournalKind.CLASS}' AND class_id IS NOT NULL AND account_id IS NULL)"
            f" OR (kind = '{JournalKind.DISTRICT}' AND account_id IS NULL AND class_id IS NULL"
            " AND district_id IS NOT NULL)",
            name="subject",
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    # No foreign key: entries are never deleted, each parent is written before its children by
    # the same code, and the key's check (a lookup and a share lock on the parent, per row) cost
    # a district exit's batch of a thousand accounts as much as the rest of its journal insert.
    parent_id: Mapped[int | None] = mapped_column(index=True)
    # Rows written by one call share a batch token; set-based UPDATEs find their entry by it.
    batch: Mapped[str] = mapped_column(String(40), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    # Plain ids, not foreign keys: the journal outlives the rows it names (purge, audit).
    account_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), index=True)
    class_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    district_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), index=True)
    rule: Mapped[str] = mapped_column(String(64))
    trigger: Mapped[str] = mapped_column(String(200))
    before: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    restored_at: Mapped[datetime | None]
    purged_at: Mapped[datetime | None]
