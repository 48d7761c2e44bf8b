from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, TimestampMixin

REASON_LENGTH = 500


class Pause(TimestampMixin, Base):
    """A roster pause (SPEC §4): while it runs, destructive roster changes of the districts it
    covers are deferred; when it ends, or is removed early, they are applied.

    Rows are never deleted: a removed pause keeps its record, and the events it deferred keep
    their link to it.
    """

    __tablename__ = "pauses"
    __table_args__ = (CheckConstraint("ends_at > starts_at", name="ends_after_start"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    # None: every district.
    district_id: Mapped[str | None] = mapped_column(
        ForeignKey("districts.id", ondelete="RESTRICT"), index=True
    )
    starts_at: Mapped[datetime]
    ends_at: Mapped[datetime] = mapped_column(index=True)
    reason: Mapped[str | None] = mapped_column(String(REASON_LENGTH))
    created_by: Mapped[str] = mapped_column(String(100))
    # Set by ``pause remove``: the pause no longer covers anything, whatever its end.
    removed_at: Mapped[datetime | None]
    removed_by: Mapped[str | None] = mapped_column(String(100))
