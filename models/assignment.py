from __future__ import annotations

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import ID_LENGTH, Base, TimestampMixin, journal_fk, removed_index


class Assignment(TimestampMixin, Base):
    """An assignment, created by a teacher in one class."""

    __tablename__ = "assignments"
    __table_args__ = (removed_index("assignments"),)

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    class_id: Mapped[str] = mapped_column(ForeignKey("classes.id", ondelete="CASCADE"), index=True)
    created_by: Mapped[str | None] = mapped_column(ForeignKey("accounts.id", ondelete="SET NULL"))
    title: Mapped[str] = mapped_column(String(500))
    removed_by: Mapped[int | None] = journal_fk()
